"""The ``meshbake`` command line. Thin: each subcommand calls a typed function.

Results go to stdout, progress and warnings to stderr. A ``UserError`` exits 1 with
its message; anything else is a bug and exits 3 with the traceback.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import traceback
from collections.abc import Callable, Sequence
from pathlib import Path

from builder import __version__, proc
from builder.bake import artifacts, base
from builder.bake import run as build
from builder.bake.gates import validate_spec
from builder.bake.run import TARGETS
from builder.cli import aws as cli_aws
from builder.cli import release as cli_release
from builder.cli.common import (
    add_secret_args,
    load,
    note,
    progress,
    spec_paths,
    token_args,
    user_data_from_args,
    warn,
)
from builder.errors import Interrupted, UserError, reason
from builder.render.context import render_context
from builder.render.hcl import manifest_name, qcow2_arch
from builder.spec import boundary
from builder.spec.model import Accelerator, Arch
from builder.tools.packer import Packer
from builder.tools.qemu import host_arch
from builder.verify.localmesh import MeshInputs

# --- subcommands ---------------------------------------------------------------------


def cmd_render(args: argparse.Namespace) -> int:
    loaded = load(args.spec)
    ctx = render_context(loaded, args.out, packer=Packer())
    print(ctx.root)
    return 0


def cmd_validate(args: argparse.Namespace) -> int:
    all_ok = True
    results = []
    for path in spec_paths(args.specs):
        report = validate_spec(path)
        all_ok &= report.ok
        for message in report.warnings:
            warn(message)
        for message in report.notes:
            note(message)
        if args.json:
            results.append(
                {
                    "spec": str(path),
                    "ok": report.ok,
                    "notes": report.notes,
                    "gates": [
                        {"name": g.name, "ok": g.ok, "detail": g.detail} for g in report.gates
                    ],
                }
            )
        else:
            print(f"{path}:")
            for gate in report.gates:
                print(f"  {gate.line()}")
    if args.json:
        print(json.dumps(results, indent=2))
    else:
        print("all gates passed" if all_ok else "some gates failed")
    return 0 if all_ok else 1


def cmd_userdata(args: argparse.Namespace) -> int:
    sys.stdout.write(user_data_from_args(load(args.spec), args, joins=args.join))
    return 0


def cmd_base(args: argparse.Namespace) -> int:
    built = base.build_base(args.cache, arch=Arch(args.arch), progress=progress)
    state = "reused from the cache" if built.reused else "built"
    print(f"{built.path}\t{state}\tsha256:{built.sha256}")
    return 0


#: A local Consul zip to bake instead of downloading one (as ``--consul-zip``).
CONSUL_ZIP_ENV = "MESHBAKE_CONSUL_ZIP"


def _env_path(name: str) -> Path | None:
    value = os.environ.get(name)
    return Path(value) if value else None


def cmd_build(args: argparse.Namespace) -> int:
    if args.dry_run and args.target != "aws":
        raise UserError("--dry-run plans an AMI build: use it with --target aws")
    key = None
    if args.consul_key is not None:
        if not args.consul_key_fingerprint:
            raise UserError("--consul-key needs --consul-key-fingerprint (40 hex digits)")
        key = artifacts.TrustedKey(args.consul_key, args.consul_key_fingerprint.replace(" ", ""))
    options = build.BuildOptions(
        target=args.target,
        out=args.out,
        cache=args.cache,
        consul_mirror=args.consul_mirror,
        consul_key=key,
        consul_zip=args.consul_zip or _env_path(CONSUL_ZIP_ENV),
        accelerator=None if args.accelerator is None else Accelerator(args.accelerator),
        force=args.force,
        dry_run=args.dry_run,
        arch=args.arch,
    )
    specs = spec_paths(args.specs)
    if len(specs) == 1:
        result = build.build_image(specs[0], options, progress)
        results = [result]
    else:
        results = build.build_many(specs, options, args.jobs, progress)
    if args.json:
        print(json.dumps([r.to_json() for r in results], indent=2))
    elif len(results) > 1:
        print(build.summary_table(results))
    else:
        for r in results:
            if len(r.outputs) > 1:  # a qcow2 per architecture
                print("\n".join(map(str, r.outputs)))
                continue
            print(r.plan or r.output or r.manifest or r.status, end="" if r.plan else "\n")
    return 0 if all(r.status != "failed" for r in results) else 1


def mesh_inputs(
    image: Path, consul_zip: Path | None, envoy: Path | None, cache: Path | None
) -> MeshInputs:
    """The Consul zip and the Envoy binary of verify's local mesh: the ones given, else
    the image's own, found by the digests in its manifest in the artifact cache."""
    for given, what in ((consul_zip, "--consul-zip"), (envoy, "--envoy")):
        if given is not None:
            try:
                boundary.regular_size(given, 1 << 30)
            except (OSError, ValueError) as exc:
                raise UserError(f"{given}: {what}: {reason(exc)}") from None
    if consul_zip is not None and envoy is not None:
        return MeshInputs(consul_zip, envoy)
    manifest_path = image.parent / manifest_name(qcow2_arch(image.name))
    if not manifest_path.is_file():
        raise UserError(
            f"{image}: no {manifest_path.name} beside it names its Consul and Envoy;"
            " give --consul-zip and --envoy for verify's local mesh"
        )
    manifest = boundary.read_json_object(manifest_path, "build manifest")
    entries = manifest.get("artifacts")
    # The mesh runs on this host: an image of another architecture recorded the host's
    # build of its Consul and Envoy beside its own.
    host = host_arch()
    if manifest.get("arch", Arch.AMD64.value) != (host.value if host else None):
        mesh = manifest.get("mesh_artifacts")
        recorded = mesh.get("arch") if isinstance(mesh, dict) else None
        if not isinstance(mesh, dict) or host is None or recorded != host.value:
            raise UserError(
                f"{manifest_path}: the image is {manifest.get('arch')}, and no Consul and"
                f" Envoy for this host ({host.value if host else os.uname().machine}) are"
                " recorded for verify's local mesh; give --consul-zip and --envoy"
            )
        entries = mesh.get("artifacts")
    digests = {
        entry.get("name"): entry.get("sha256") for entry in entries or [] if isinstance(entry, dict)
    }
    root = cache or base.default_cache_dir()

    def find(name: str) -> Path:
        digest = digests.get(name)
        if not isinstance(digest, str):
            raise UserError(f"{manifest_path}: artifacts: no {name} entry with a sha256")
        return artifacts.cached(root, name, digest)

    return MeshInputs(consul_zip or find("consul"), envoy or find("envoy"))


def cmd_verify(args: argparse.Namespace) -> int:
    # Imported here, not at the top: it brings paramiko, which no other command needs.
    from builder.verify import runner as verify

    tokens = token_args(args.token_file)
    token = tokens.get("agent")
    if args.host is not None:
        if args.spec is None or token is None:
            # The checks look for exactly this token: in its files after first boot,
            # nowhere in a baked image. An empty one would prove nothing.
            raise UserError("--host needs --spec and --token-file (the token it was given)")
        phase = args.phase[0] if args.phase else "firstboot"
        result = verify.verify_host(args.host, spec=args.spec, phase=phase, token=token)
        report = verify.VerifyReport(str(args.host), (result,))
    elif args.image is None:
        raise UserError("verify needs an IMAGE to boot, or --host with --spec")
    else:
        phases = args.phase or verify.PHASES
        mesh = None
        if "firstboot" in phases:
            # A drifted spec is the first thing to say, before what the mesh needs.
            loaded = load(args.spec or verify.spec_for(args.image))
            verify.check_spec_drift(args.image, loaded, allow=args.allow_spec_drift)
            mesh = mesh_inputs(args.image, args.consul_zip, args.envoy, args.cache)
        report = verify.verify_image(
            args.image,
            spec=args.spec,
            phases=phases,
            accelerator=Accelerator(args.accelerator),
            progress=progress,
            allow_spec_drift=args.allow_spec_drift,
            token=token,
            mesh_inputs=mesh,
        )
    if args.report is not None:
        args.report.write_text(json.dumps(report.to_json(), indent=2) + "\n")
    if args.junit is not None:
        args.junit.write_text(report.to_junit())
    print(json.dumps(report.to_json(), indent=2) if args.json else report.summary())
    return 0 if report.ok else 1


def up_image(value: Path) -> Path:
    """An image for ``up``: a qcow2 as given, or the image a spec builds by default."""
    if value.suffix == ".qcow2":
        if not value.is_file():
            raise UserError(f"{value}: no such image")
        return value
    loaded = load(value)
    image = Path("build") / loaded.spec.name / f"{loaded.spec.name}.qcow2"
    if not image.is_file():
        raise UserError(f"{value}: no image at {image}; bake it first: meshbake build {value}")
    return image


def cmd_up(args: argparse.Namespace) -> int:
    from builder.verify import runner
    from builder.verify import up as local_mesh

    images = [up_image(value) for value in args.images]
    loaded = []
    for image in images:
        spec = runner.spec_for(image)
        one = load(spec)
        runner.check_spec_drift(image, one)
        loaded.append((image, one))
    consul_zip = args.consul_zip or _env_path(CONSUL_ZIP_ENV)
    if consul_zip is None:
        consul_zip = mesh_inputs(images[0], None, None, args.cache).consul_zip
    intentions = [local_mesh.Intention.parse(v, True) for v in args.intention]
    intentions += [local_mesh.Intention.parse(v, False) for v in args.deny]
    local_mesh.up(
        loaded,
        consul_zip,
        intentions=intentions,
        accelerator=Accelerator(args.accelerator),
        progress=progress,
        say=lambda line: print(line, flush=True),
        as_json=args.json,
    )
    return 0


# --- wiring -----------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="meshbake",
        description="Bake Consul service-mesh golden images (qcow2, AMIs) from one YAML spec.",
    )
    parser.add_argument("--version", action="version", version=f"meshbake {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log every command run")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("render", help="write the bake context (Packer template, files, seed)")
    p.add_argument("spec", type=Path)
    p.add_argument("--out", type=Path, required=True, help="context folder to (re)write")
    p.set_defaults(handler=cmd_render)

    p = sub.add_parser("validate", help="run every static gate on one or more specs")
    p.add_argument("specs", type=Path, nargs="+", metavar="SPEC", help="spec files or folders")
    p.add_argument("--json", action="store_true", help="machine-readable results")
    p.set_defaults(handler=cmd_validate)

    p = sub.add_parser("userdata", help="print the minimal first-boot user data")
    p.add_argument("spec", type=Path)
    add_secret_args(p)
    p.add_argument(
        "--join",
        action="append",
        default=[],
        metavar="ADDR",
        help="a server address (IPv4, IPv6 or DNS name) the agent joins besides the baked"
        " consul.retry_join; repeatable",
    )
    p.set_defaults(handler=cmd_userdata)

    p = sub.add_parser("base", help="build (or reuse) the cached Debian 12 base qcow2")
    p.add_argument("--cache", type=Path, help="cache folder (default: /var/cache/meshbake)")
    p.add_argument(
        "--arch",
        choices=[a.value for a in Arch],
        default=Arch.AMD64.value,
        help="the base's architecture (arm64: through qemu-user, about 9 minutes here)",
    )
    p.set_defaults(handler=cmd_base)

    p = sub.add_parser("build", help="bake golden images from specs (qemu: a local qcow2)")
    p.add_argument("specs", type=Path, nargs="+", metavar="SPEC", help="spec files or folders")
    p.add_argument("--target", default="qemu", choices=tuple(TARGETS))
    p.add_argument("--out", type=Path, help="output folder (default: build/<name>/)")
    p.add_argument("--cache", type=Path, help="cache folder (default: /var/cache/meshbake)")
    p.add_argument("-j", "--jobs", type=int, default=1, help="builds at once (several specs)")
    p.add_argument("--accelerator", choices=[a.value for a in Accelerator])
    p.add_argument("--consul-mirror", help="folder or URL laid out like HashiCorp's releases")
    p.add_argument("--consul-key", type=Path, help="trusted release key (default: HashiCorp's)")
    p.add_argument("--consul-key-fingerprint", help="fingerprint of --consul-key")
    p.add_argument("--consul-zip", type=Path, help="a local Consul zip you vouch for")
    p.add_argument(
        "--arch",
        choices=[a.value for a in Arch],
        help="build only this architecture of the target's (default: all it lists)",
    )
    p.add_argument("--force", action="store_true", help="rebuild even when up to date")
    p.add_argument("--dry-run", action="store_true", help="aws: render, validate and plan only")
    p.add_argument("--json", action="store_true")
    p.set_defaults(handler=cmd_build)

    p = sub.add_parser("verify", help="boot an image (or reach a host) and prove it")
    p.add_argument("image", type=Path, nargs="?", help="the qcow2 to boot (not with --host)")
    p.add_argument("--spec", type=Path, help="default: the spec named in the image's manifest")
    p.add_argument("--phase", action="append", choices=("baked", "firstboot"))
    p.add_argument("--report", type=Path, help="also write the JSON report here")
    p.add_argument("--junit", type=Path, help="also write one JUnit XML (both phases) here")
    p.add_argument("--accelerator", choices=[a.value for a in Accelerator], default="auto")
    p.add_argument("--host", help="check a running host instead, e.g. ssh://admin@10.0.0.5")
    p.add_argument(
        "--allow-spec-drift",
        action="store_true",
        help="verify even if the spec changed since the image was built (its spec_hash)",
    )
    p.add_argument(
        "--token-file",
        action="append",
        default=[],
        metavar="[ROLE=]FILE",
        help="with --host (required): the agent token the host was given; with an IMAGE"
        " the local mesh mints the first boot's tokens, and this token is the one the baked"
        " phase searches for (default: a random one)",
    )
    p.add_argument(
        "--consul-zip",
        type=Path,
        help="the Consul release zip of the local mesh's server (default: the image's own,"
        " from the artifact cache)",
    )
    p.add_argument(
        "--envoy",
        type=Path,
        help="the Envoy binary of the local mesh's upstreams (default: the image's own)",
    )
    p.add_argument("--cache", type=Path, help="cache folder (default: /var/cache/meshbake)")
    p.add_argument("--json", action="store_true")
    p.set_defaults(handler=cmd_verify)

    p = sub.add_parser("up", help="run images in a local mesh with a Consul server")
    p.add_argument(
        "images", type=Path, nargs="+", metavar="IMAGE_OR_SPEC", help="qcow2 files or specs"
    )
    p.add_argument(
        "--consul-zip",
        type=Path,
        help=f"the server's Consul release zip (default: ${CONSUL_ZIP_ENV}, else the first"
        " image's own, from the artifact cache)",
    )
    p.add_argument(
        "--intention",
        action="append",
        default=[],
        metavar="SRC=DST",
        help="allow SRC to reach DST (default: every image may reach every other)",
    )
    p.add_argument("--deny", action="append", default=[], metavar="SRC=DST", help="deny SRC -> DST")
    p.add_argument("--accelerator", choices=[a.value for a in Accelerator], default="auto")
    p.add_argument("--cache", type=Path, help="cache folder (default: /var/cache/meshbake)")
    p.add_argument("--json", action="store_true", help="one JSON line once every VM is up")
    p.set_defaults(handler=cmd_up)

    for add in (*AWS_COMMANDS, *RELEASE_COMMANDS):
        add(sub)
    return parser


#: The AWS subcommands (images, launch, prune), added after the local ones.
AWS_COMMANDS = (cli_aws.add_images, cli_aws.add_launch, cli_aws.add_prune)

#: The pipeline at scale (plan, collect) and release channels (promote, revoke, channels).
RELEASE_COMMANDS = (
    cli_release.add_plan,
    cli_release.add_collect,
    cli_release.add_promote,
    cli_release.add_revoke,
    cli_release.add_channels,
)


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.WARNING,
        format="%(message)s",
        stream=sys.stderr,
    )
    handler: Callable[[argparse.Namespace], int] = args.handler
    try:
        with proc.handle_signals():
            return handler(args)
    except UserError as exc:
        # A failed tool (CommandError) too: one line with the tool, the stage, the log.
        print(f"meshbake: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt as exc:
        # SIGINT, SIGTERM and SIGHUP all end here, after the cleanup ran: 128 + signal,
        # as a shell reports it (130 for Ctrl-C, 143 for SIGTERM, 129 for SIGHUP).
        code = exc.exit_code if isinstance(exc, Interrupted) else 130
        name = f" ({exc.args[0]})" if isinstance(exc, Interrupted) else ""
        print(f"meshbake: interrupted{name}; stopped and cleaned up", file=sys.stderr)
        return code
    except Exception:
        traceback.print_exc()
        print(
            "meshbake: internal error (a bug): please report it with the traceback above",
            file=sys.stderr,
        )
        return 3


if __name__ == "__main__":
    raise SystemExit(main())
