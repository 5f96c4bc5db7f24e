"""Issue 16: every input besides the spec's strings (claims on meshbake's own units and
paths, ``--out``, CLI arguments, environment variables, files read and build folders)
is refused with one line and exit 1, or used as given; none writes outside its folder.

Each class is a table: one parametrised test sends every row through the real CLI or
the one function that guards it.
"""

from __future__ import annotations

import base64
import os
import re
import shutil
import subprocess
import typing
from pathlib import Path

import pytest

from builder.bake import gates
from builder.cli import main as cli
from builder.errors import UserError
from builder.render import baked as bake
from builder.render import paths
from builder.render.context import render_context
from builder.spec.model import LoadedSpec, load_spec
from tests.unit.pems import tls_files
from tests.unit.test_boundary import Data, one_line_error, set_dest, write_spec


@pytest.fixture
def images(repo: Path, tmp_path: Path) -> Path:
    out = tmp_path / "images"
    shutil.copytree(repo / "images", out)
    return out


def set_app_name(name: str) -> typing.Callable[[Data], None]:
    def mutate(d: Data) -> None:
        d["app"]["name"] = name

    return mutate


# --- 2. a spec may not replace or change meshbake's own units and paths -------------------

#: (field, value) -> the render (and validate) refuses it naming the field.
CLAIMS: list[tuple[str, str]] = [
    *(("app.name", unit.removesuffix(".service")) for unit in paths.MESHBAKE_UNITS),
    ("app.name", "cloud-init"),
    ("app.name", "systemd-tmpfiles-setup"),
    ("app.name", "meshbake-extra"),
    ("app.name", "envoy-"),
    ("files[0].dest", "/etc/systemd/system/consul.service.d/override.conf"),
    ("files[0].dest", "/etc/systemd/system/envoy-sidecar.service.d/10-x.conf"),
    ("files[0].dest", "/etc/systemd/system/meshbake-imds.service.d/x.conf"),
    ("files[0].dest", "/etc/systemd/system/meshbake-fail-closed.service"),
    ("files[0].dest", "/etc/systemd/system/cloud-init.service.d/99-x.conf"),
    ("files[0].dest", "/usr/lib/systemd/system/consul.service.d/x.conf"),
    ("files[0].dest", "/lib/systemd/system/consul.service.d/x.conf"),
    ("files[0].dest", "/etc/systemd/system/service.d/x.conf"),
    ("files[0].dest", "/etc/systemd/system/envoy-.service.d/x.conf"),
    ("files[0].dest", "/etc/systemd/system/meshbake-.service.d/x.conf"),
    ("files[0].dest", "/etc/systemd/system.control/consul.service.d/x.conf"),
    ("files[0].dest", "/etc/tmpfiles.d/open.conf"),
    ("files[0].dest", "/usr/lib/tmpfiles.d/zz.conf"),
    ("files[0].dest", "/lib/tmpfiles.d/meshbake.conf"),
    ("files[0].dest", "/etc/sysctl.d/99-x.conf"),
    ("files[0].dest", "/etc/sysctl.conf"),
    ("files[0].dest", "/etc/systemd/system.conf.d/env.conf"),
    ("files[0].dest", "/etc/systemd/resolved.conf.d/other.conf"),
    ("files[0].dest", "/etc/cloud/cloud.cfg.d/99-x.cfg"),
    ("files[0].dest", "/etc/consul.d/tls/ca.pem"),
    ("files[0].dest", "/etc/envoy/bootstrap.json"),
    ("files[0].dest", "/var/lib/meshbake/x"),
    ("files[0].dest", "/var/lib/consul/x"),
    ("files[0].dest", "/bin/consul"),
    ("files[0].dest", "/usr/libexec/meshbake/extra"),
    ("files[0].dest", "/etc/environment"),
]


@pytest.mark.parametrize(("field", "value"), CLAIMS, ids=[v for _, v in CLAIMS])
def test_a_spec_cannot_claim_what_meshbake_installs(
    images: Path, capsys: pytest.CaptureFixture[str], field: str, value: str
) -> None:
    mutate = set_app_name(value) if field == "app.name" else set_dest(value)
    spec = write_spec(images, mutate)
    out = images.parent / "out"
    line = one_line_error(["render", str(spec), "--out", str(out)], capsys)
    assert f"{field}:" in line, line
    assert not out.exists()
    assert cli.main(["validate", str(spec)]) == 1


@pytest.mark.parametrize(
    "dest",
    [
        "/etc/systemd/system/web.service.d/10-limits.conf",
        "/etc/systemd/system/other.service",
        "/etc/consul.dx",
        "/srv/web/extra.html",
        "/etc/tmpfiles.dx",
    ],
)
def test_neighbours_of_what_meshbake_installs_are_allowed(images: Path, dest: str) -> None:
    loaded = load_spec(write_spec(images, set_dest(dest)))
    assert dest in [f.dest for f in bake.baked_files(loaded)]


def test_validate_fails_when_the_rendered_units_differ_from_the_spec(
    example: LoadedSpec, images: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    folder = render_context(example, tmp_path / "ctx")
    ok = gates.gate_units(folder, example, None, tmp_path)  # type: ignore[arg-type]
    assert ok.ok, ok.detail
    # One unit missing, one extra: each is a failure.
    unit_dir = folder.rootfs / paths.rel(paths.UNIT_DIR)
    (unit_dir / "meshbake-warm.service").unlink()
    gone = gates.gate_units(folder, example, None, tmp_path)  # type: ignore[arg-type]
    assert not gone.ok and "meshbake-warm.service" in gone.detail
    # An app that takes a meshbake unit's name, had the name check let it through.
    monkeypatch.setattr(paths, "app_unit_problem", lambda name: None)
    taken = load_spec(write_spec(images, set_app_name("consul")))
    folder = render_context(taken, tmp_path / "ctx2")
    report = gates.gate_units(folder, taken, None, tmp_path)  # type: ignore[arg-type]
    assert not report.ok and "consul.service would be rendered twice" in report.detail


# --- 3. render --out: resolved and owned before anything is created or removed ------------

#: (--out as typed, from the folder ``work``) -> refused, and nothing changes on disk.
#: ``ctx`` is a bake folder meshbake rendered, ``victim`` a folder of someone else's.
OUTS: list[tuple[str, str]] = [
    ("nosuch/../victim", "work"),
    ("nosuch/../../work/victim", "work"),
    ("victim/../victim", "work"),
    ("link/../victim", "work"),
    ("link", "work"),
    ("victim/sub/..", "work"),
    (".", "work/ctx"),
    ("..", "work/ctx/stage"),
    ("../ctx", "work/ctx"),
    ("./", "work/victim"),
    ("ctx/../victim", "work"),
]


def _tree(root: Path) -> dict[str, bytes | None]:
    found: dict[str, bytes | None] = {}
    for path in sorted(root.rglob("*")):
        found[str(path.relative_to(root))] = path.read_bytes() if path.is_file() else None
    return found


@pytest.mark.parametrize(("out", "cwd"), OUTS)
def test_render_out_never_removes_a_folder_meshbake_did_not_make(
    example: LoadedSpec,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    out: str,
    cwd: str,
) -> None:
    work = tmp_path / "work"
    work.mkdir()
    render_context(example, work / "ctx")
    victim = work / "victim"
    (victim / "sub").mkdir(parents=True)
    (victim / "thesis.tex").write_text("years of work")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (work / "link").symlink_to(elsewhere)
    before = _tree(tmp_path)
    monkeypatch.chdir(tmp_path / cwd)
    line = one_line_error(["render", str(example.path), "--out", out], capsys)
    assert str(Path(out)) in line, line
    assert _tree(tmp_path) == before


def test_render_out_through_dotdot_into_our_own_folder_replaces_only_it(
    example: LoadedSpec, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    render_context(example, tmp_path / "ctx")
    (tmp_path / "ctx" / "stale").write_text("x")
    monkeypatch.chdir(tmp_path)
    assert cli.main(["render", str(example.path), "--out", "nosuch/../ctx"]) == 0
    assert not (tmp_path / "nosuch").exists()
    assert not (tmp_path / "ctx" / "stale").exists()
    assert (tmp_path / "ctx" / "meshbake.json").is_file()


# --- 4. every file, variable and argument: one line and exit 1, never a traceback or a hang


def _curve_pems(tmp: Path, curve: str) -> tuple[Path, Path]:
    """A key and a self-signed certificate on ``curve`` (openssl knows curves that
    ``cryptography`` does not)."""
    key, crt = tmp / f"{curve}.key", tmp / f"{curve}.crt"
    subprocess.run(
        ["openssl", "ecparam", "-name", curve, "-genkey", "-noout", "-out", key], check=True
    )
    subprocess.run(
        ["openssl", "req", "-new", "-x509", "-key", key, "-subj", "/CN=x", "-days", "1"]
        + ["-out", crt],
        check=True,
        capture_output=True,
    )
    return key, crt


def _manifest(content: str | None, kind: str = "file") -> typing.Callable[[Path], list[str]]:
    """``verify IMAGE`` beside a manifest.json that is ``content`` or a FIFO or a link."""

    def make(tmp: Path) -> list[str]:
        image = tmp / "img" / "disk.qcow2"
        image.parent.mkdir()
        image.write_bytes(b"")
        manifest = image.parent / "manifest.json"
        if kind == "fifo":
            os.mkfifo(manifest)
        elif kind == "link":
            manifest.symlink_to(content or "/dev/zero")
        else:
            manifest.write_text(content or "")
        return ["verify", str(image), "--phase", "baked"]

    return make


def _with_tls(tmp: Path, curve: str) -> list[str]:
    key, crt = _curve_pems(tmp, curve)
    spec = write_spec(tmp / "images", lambda d: d["consul"].update(tls={"enabled": True}))
    token = tmp / "token"
    token.write_text("4d3c2b1a-0000-4000-8000-000000000000\n")
    return ["userdata", str(spec), "--token-file", str(token), "--tls-ca-file", str(crt)]


def _with_key(tmp: Path, curve: str) -> list[str]:
    key, crt = _curve_pems(tmp, curve)
    _, good = _curve_pems(tmp, "prime256v1")
    spec = write_spec(
        tmp / "images", lambda d: d["consul"].update(tls={"enabled": True, "client_cert": True})
    )
    token = tmp / "token"
    token.write_text("4d3c2b1a-0000-4000-8000-000000000000\n")
    return [
        "userdata", str(spec), "--token-file", str(token), "--tls-ca-file", str(good),
        "--tls-cert-file", str(crt), "--tls-key-file", str(key),
    ]  # fmt: skip


def _many_sources(tmp: Path) -> list[str]:
    big = tmp / "images" / "files" / "big.bin"
    with big.open("wb") as f:  # sparse: the size is real, the disk use is not
        f.truncate(200 * 1024 * 1024)

    def listed(d: Data) -> None:
        d["files"] = [{"dest": f"/opt/big/{i}", "source": "files/big.bin"} for i in range(4)]

    return ["render", str(write_spec(tmp / "images", listed)), "--out", str(tmp / "out")]


def _afile(tmp: Path) -> Path:
    path = tmp / "a-file"
    path.write_text("x")
    return path


#: id -> (environment, argv maker, what the one line must say). Each ends in exit 1.
INPUTS: dict[str, tuple[dict[str, str], typing.Callable[[Path], list[str]], str]] = {
    "manifest-list": ({}, _manifest("[]"), "is a JSON list, not an object"),
    "manifest-string": ({}, _manifest('"x"'), "is a JSON str, not an object"),
    "manifest-not-json": ({}, _manifest("{"), "not JSON"),
    "manifest-deep": ({}, _manifest("[" * 100000), "not JSON"),
    "manifest-fifo": ({}, _manifest(None, "fifo"), "is a FIFO"),
    "manifest-dev-zero": ({}, _manifest("/dev/zero", "link"), "is a character device"),
    "manifest-folder": ({}, _manifest("/", "link"), "is a folder"),
    "manifest-hash-int": (
        {},
        _manifest('{"spec": "images/web.yaml", "spec_hash": 5}'),
        "spec_hash is int",
    ),
    "manifest-hash-null": (
        {},
        _manifest('{"spec": "images/web.yaml", "spec_hash": null}'),
        "spec_hash is NoneType",
    ),
    "manifest-hash-list": (
        {},
        _manifest('{"spec": "images/web.yaml", "spec_hash": []}'),
        "spec_hash",
    ),
    "region-space": ({}, lambda t: ["images", "web", "--region", "us east 1"], "AWS region"),
    "region-dots": ({}, lambda t: ["prune", "web", "--keep", "1", "--region", ".."], "AWS region"),
    "region-empty": ({}, lambda t: ["images", "web", "--region", ""], "AWS region"),
    "region-launch": (
        {},
        lambda t: ["launch", str(t / "images" / "web.yaml"), "--ami", "ami-1", "--region", "x"],
        "AWS region",
    ),
    "cache-env-file": ({"MESHBAKE_CACHE": "@afile"}, lambda t: ["base"], "must be a folder"),
    "cache-env-dev": ({"MESHBAKE_CACHE": "/dev/null"}, lambda t: ["base"], "character device"),
    "cache-arg-file": ({}, lambda t: ["base", "--cache", str(_afile(t))], "must be a folder"),
    "cache-build-file": (
        {},
        lambda t: ["build", str(t / "images" / "web.yaml"), "--cache", str(_afile(t))],
        "must be a folder",
    ),
    "tls-ca-secp112r1": ({}, lambda t: _with_tls(t, "secp112r1"), "is not supported"),
    "tls-ca-sect113r1": ({}, lambda t: _with_tls(t, "sect113r1"), "is not supported"),
    "tls-key-brainpoolP160r1": ({}, lambda t: _with_key(t, "brainpoolP160r1"), "not supported"),
    "same-big-source-listed-4-times": ({}, _many_sources, "over the limit"),
    "token-dev-zero": (
        {},
        lambda t: ["userdata", str(t / "images" / "web.yaml"), "--token-file", "/dev/zero"],
        "character device",
    ),
}


@pytest.mark.parametrize("case", list(INPUTS))
def test_every_input_is_one_line_and_exit_1(
    images: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    case: str,
) -> None:
    env, make, fragment = INPUTS[case]
    tmp = images.parent
    for key, value in env.items():
        monkeypatch.setenv(key, str(_afile(tmp)) if value == "@afile" else value)
    monkeypatch.chdir(tmp)
    line = one_line_error(make(tmp), capsys)
    assert fragment in line, line


# --- 5. a tampered build folder: meshbake writes only inside it, never through a link ----


def _plant(kind: str, at: Path, victim: Path) -> None:
    at.parent.mkdir(parents=True, exist_ok=True)
    if kind == "link":
        at.symlink_to(victim)
    elif kind == "fifo":
        os.mkfifo(at)


#: (what is planted, where in the build folder) -> the build refuses before writing.
TAMPERED: list[tuple[str, str]] = [
    ("link", "."),
    ("link", ".manifest.json.tmp"),
    ("link", "manifest.json"),
    ("link", "logs"),
    ("link", "logs/packer.log"),
    ("link", "logs/packer-aws.log"),
    ("link", "logs/render-packer.log"),
    ("link", "web.qcow2"),
    ("fifo", "manifest.json"),
    ("fifo", "logs/packer.log"),
]


@pytest.mark.parametrize(("kind", "where"), TAMPERED)
@pytest.mark.parametrize("target", ["qemu", "aws"])
def test_build_refuses_a_tampered_build_folder(
    example: LoadedSpec, tmp_path: Path, kind: str, where: str, target: str
) -> None:
    from builder.bake import run as build

    victim = tmp_path / "victim"
    victim.mkdir()
    (victim / "keep").write_text("mine")
    out = tmp_path / "build" / "web"
    out.parent.mkdir()
    if where == ".":
        _plant(kind, out, victim)
    else:
        out.mkdir()
        _plant(kind, out / where, victim / "keep" if kind == "link" and "." in where else victim)
    options = build.BuildOptions(target=target, out=out, cache=tmp_path / "cache")
    with pytest.raises(UserError) as info:
        build.build_image(example.path, options, progress=lambda m: None)
    assert "symbolic link" in str(info.value) or "FIFO" in str(info.value)
    assert sorted(p.name for p in victim.iterdir()) == ["keep"]
    assert (victim / "keep").read_text() == "mine"


@pytest.mark.parametrize(
    ("kind", "where"),
    [("link", "logs"), ("link", "logs/verify-baked-serial.log"), ("fifo", "logs/x")],
)
def test_verify_refuses_a_tampered_log_folder(
    example: LoadedSpec, tmp_path: Path, kind: str, where: str
) -> None:
    from builder.verify import runner

    victim = tmp_path / "victim"
    victim.mkdir()
    image = tmp_path / "img" / "web.qcow2"
    image.parent.mkdir()
    image.write_bytes(b"")
    _plant(kind, image.parent / where, victim)
    with pytest.raises(UserError):
        runner.verify_image(image, spec=example.path, phases=("baked",))
    assert list(victim.iterdir()) == []


@pytest.mark.parametrize("kind", ["link", "fifo", "link-to-fifo", "link-to-missing"])
def test_outputs_are_never_written_through_a_link_or_into_a_fifo(tmp_path: Path, kind: str) -> None:
    from builder.errors import CommandError
    from builder.spec import boundary

    victim = tmp_path / "victim"
    victim.write_text("mine")
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    for name in ("out", "log"):
        at = tmp_path / name
        if kind == "link":
            at.symlink_to(victim)
        elif kind == "fifo":
            os.mkfifo(at)
        elif kind == "link-to-fifo":
            at.symlink_to(fifo)
        else:
            at.symlink_to(tmp_path / "nothing-yet")
    with pytest.raises(UserError):
        boundary.write_output(tmp_path / "out", "pwned")
    CommandError(["false"], 1, "", "").write_log(tmp_path / "log")  # best effort: no raise
    assert victim.read_text() == "mine"
    assert not (tmp_path / "nothing-yet").exists()


# --- 6. smaller holes ------------------------------------------------------------------------

FIRSTBOOT = Path(__file__).parents[2] / "builder" / "image" / "scripts" / "meshbake-firstboot"


def _firstboot_pem(value_b64: str, kind: str) -> str | None:
    """Run the ``pem`` function of meshbake-firstboot (with its ``decode_b64``) on
    ``value_b64``: the PEM it writes, or None when it refuses the carrier."""
    script = FIRSTBOOT.read_text()
    functions = "".join(
        re.search(rf"^{name}\(\) {{\n.*?^}}\n", script, re.S | re.M).group(0)  # type: ignore[union-attr]
        for name in ("decode_b64", "pem")
    )
    program = f'set -u\ndie() {{ echo "$*" >&2; exit 1; }}\n{functions}\npem X "$1" "$2"\n'
    done = subprocess.run(
        ["bash", "-c", program, "pem", value_b64, kind], capture_output=True, text=True
    )
    return done.stdout if done.returncode == 0 else None


def _pem_cases() -> dict[str, tuple[str, bytes]]:
    files = tls_files()
    cert, key = files["cert"], files["key"]
    crlf = cert.replace(b"\n", b"\r\n")
    bag = b"Bag Attributes\n    localKeyID: 01 02 03\nsubject=/CN=client\nissuer=/CN=ca\n" + cert
    key_bag = b"Bag Attributes\n    friendlyName: client\nKey Attributes: <No Attributes>\n" + key
    lines = key.decode().splitlines()
    encrypted = "\n".join([lines[0], "Proc-Type: 4,ENCRYPTED", "", *lines[1:]]) + "\n"
    return {
        "cert": ("cert", cert),
        "cert-crlf": ("cert", crlf),
        "cert-bag-attributes": ("cert", bag),
        "cert-trailing-text": ("cert", cert + b"trailing words\n"),
        "cert-chain": ("cert", cert + files["ca"]),
        "cert-no-final-newline": ("cert", cert.rstrip(b"\n")),
        "key": ("key", key),
        "key-crlf": ("key", key.replace(b"\n", b"\r\n")),
        "key-bag-attributes": ("key", key_bag),
        "key-encrypted-header": ("key", encrypted.encode()),
        "key-two-keys": ("key", key + files["other_key"]),
        "key-in-cert-slot": ("cert", key),
        "cert-in-key-slot": ("key", cert),
        "cert-unterminated": ("cert", cert.rsplit(b"-----END", 1)[0]),
        "cert-mismatched-end": ("cert", cert.replace(b"END CERTIFICATE", b"END X509 CRL")),
        "cert-space-in-body": ("cert", cert.replace(b"\n", b" \n", 2)),
        "no-pem": ("cert", b"just text\n"),
        "empty": ("cert", b""),
        "not-ascii": ("cert", "é".encode() + cert),
    }


PEM_CASES = _pem_cases()


@pytest.mark.parametrize("case", list(PEM_CASES))
def test_userdata_and_firstboot_accept_the_same_key_material(case: str) -> None:
    """What ``userdata`` accepts, first boot accepts as the same PEM; what ``userdata``
    refuses, first boot refuses too (given the file as it is)."""
    from builder.render import cloudconfig

    kind, raw = PEM_CASES[case]
    normal = cloudconfig.normal_pem(raw, kind)
    if isinstance(normal, bytes):
        assert _firstboot_pem(base64.b64encode(normal).decode(), kind) == normal.decode()
        # and first boot reads the file as it is the same way
        assert _firstboot_pem(base64.b64encode(raw).decode(), kind) == normal.decode()
    else:
        assert raw == b"" or _firstboot_pem(base64.b64encode(raw).decode(), kind) is None, normal


def _port(port: int) -> typing.Callable[[Data], None]:
    def mutate(d: Data) -> None:
        d["service"]["port"] = port
        d["service"]["check"] = {"tcp": f"127.0.0.1:{port}"}

    return mutate


def _tags(tags: dict[str, str]) -> typing.Callable[[Data], None]:
    def mutate(d: Data) -> None:
        d["targets"]["aws"]["tags"] = tags

    return mutate


#: (field, mutation, what the line says): each a spec error naming the field.
SMALL: dict[str, tuple[str, typing.Callable[[Data], None], str]] = {
    "port-envoy-admin": ("service.port", _port(19000), "admin"),
    "port-sidecar-public": ("service.port", _port(21000), "public listener"),
    "port-tproxy-outbound": ("service.port", _port(15001), "outbound listener"),
    "port-consul-http": ("service.port", _port(8500), "HTTP API"),
    "port-consul-grpc": ("service.port", _port(8502), "gRPC"),
    "port-dns": ("service.port", _port(8600), "DNS"),
    "tag-aws-prefix": ("targets.aws.tags", _tags({"aws:cloudformation:x": "y"}), "aws:"),
    "tag-aws-prefix-upper": ("targets.aws.tags", _tags({"AWS:x": "y"}), "aws:"),
    "tag-meshbake-own": ("targets.aws.tags", _tags({"meshbake:spec-hash": "0"}), "itself"),
    "tag-name": ("targets.aws.tags", _tags({"Name": "other"}), "itself"),
    "tags-44": ("targets.aws.tags", _tags({f"k{i}": "v" for i in range(44)}), "at most 43"),
    "tags-51": ("targets.aws.tags", _tags({f"k{i}": "v" for i in range(51)}), "at most 43"),
}


@pytest.mark.parametrize("case", list(SMALL))
def test_small_holes_are_spec_errors(
    images: Path, capsys: pytest.CaptureFixture[str], case: str
) -> None:
    field, mutate, fragment = SMALL[case]
    spec = write_spec(images, mutate)
    line = one_line_error(["userdata", str(spec), "--token-file", "/dev/null"], capsys)
    assert f"{field}:" in line and fragment in line, line


def test_43_tags_are_the_most_ec2_takes_beside_meshbakes(images: Path) -> None:
    from builder.render.hcl import image_tags
    from builder.spec.model import EC2_MAX_TAGS, OWN_TAGS

    tags = {f"k{i}": "v" for i in range(EC2_MAX_TAGS - OWN_TAGS)}
    loaded = load_spec(write_spec(images, _tags(tags)))
    assert len(image_tags(loaded)) == EC2_MAX_TAGS
    assert len(image_tags(loaded)) - len(tags) == OWN_TAGS  # the model counts them right


@pytest.mark.parametrize(
    ("after", "text"),
    [
        ("", "<<: {name: evil}\n"),
        ("app:\n", "  <<: {name: consul}\n"),
        ("app:\n", "  <<: {user: root}\n"),
        ("consul:\n", "  <<: {version: 1.0.0}\n  <<: {version: 2.0.0}\n"),
        ("", "extra: {a: 1, <<: {a: 2}}\n"),
    ],
)
def test_yaml_merge_keys_are_refused(images: Path, after: str, text: str) -> None:
    from builder.errors import SpecError
    from builder.spec.model import parse_spec

    base = (images / "web.yaml").read_text()
    assert after in base
    spliced = base.replace(after, after + text, 1) if after else base + text
    with pytest.raises(SpecError) as info:
        parse_spec(spliced, images / "m.yaml")
    assert "merge keys (<<) are not allowed" in str(info.value)
