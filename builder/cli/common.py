"""What the ``meshbake`` subcommands share: progress and warnings on stderr, loading a
spec once with its warnings shown, and the first-boot secret options.

>>> spec_paths([Path("images/web.yaml")])
[PosixPath('images/web.yaml')]
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from builder.errors import UserError
from builder.render import cloudconfig
from builder.spec.model import LoadedSpec, load_spec


def warn(message: str) -> None:
    print(f"meshbake: warning: {message}", file=sys.stderr)


def note(message: str) -> None:
    """A line worth reading that is neither a problem nor progress."""
    print(f"meshbake: note: {message}", file=sys.stderr)


def progress(message: str) -> None:
    print(f"meshbake: {message}", file=sys.stderr, flush=True)


def load(path: Path) -> LoadedSpec:
    loaded = load_spec(path)
    for problem in loaded.warnings:
        warn(str(problem))
    return loaded


def spec_paths(targets: Sequence[Path]) -> list[Path]:
    """Expand folders into their ``*.yaml`` specs, keeping files as given."""
    found: list[Path] = []
    for target in targets:
        if target.is_dir():
            specs = sorted([*target.glob("*.yaml"), *target.glob("*.yml")])
            if not specs:
                raise UserError(f"{target}: no *.yaml image specs in this folder")
            found += specs
        else:
            found.append(target)
    return found


#: The roles ``--token-file ROLE=FILE`` takes.
TOKEN_ROLES = ("agent", "service", "dns")


def token_args(values: Sequence[str]) -> dict[str, str]:
    """``--token-file [ROLE=]FILE`` options -> {role: token}.

    A plain FILE is the agent's token (with ``tokens.shared`` the one token); a role
    given twice is an error, never a silent choice between the two.
    """
    given: dict[str, tuple[str, str]] = {}
    for value in values:
        role, sep, file = value.partition("=")
        if not sep:
            role, file = "agent", value
        elif role not in TOKEN_ROLES:
            raise UserError(f"--token-file {value}: the role must be agent=, service= or dns=")
        if role in given:
            raise UserError(
                f"--token-file {value}: the {role} token is already given"
                f" (--token-file {given[role][0]}); give each role once"
            )
        what = f"{role} token" if sep else "ACL token"
        given[role] = (value, cloudconfig.read_secret(Path(file), what))
    return {role: token for role, (_, token) in given.items()}


def add_secret_args(p: argparse.ArgumentParser) -> None:
    """The options that deliver first-boot secrets (``userdata`` and ``launch``)."""
    p.add_argument(
        "--token-file",
        action="append",
        default=[],
        metavar="[ROLE=]FILE",
        help="ACL token file; ROLE is agent, service (separate tokens) or dns",
    )
    p.add_argument("--gossip-key-file", type=Path)
    p.add_argument("--tls-ca-file", type=Path)
    p.add_argument("--tls-cert-file", type=Path)
    p.add_argument("--tls-key-file", type=Path)


def user_data_from_args(
    loaded: LoadedSpec, args: argparse.Namespace, joins: Sequence[str] = ()
) -> str:
    """The minimal first-boot user data from ``add_secret_args`` options, size-checked;
    ``joins`` are server addresses the agent joins too (``userdata --join``)."""
    tokens = token_args(args.token_file)

    def read(path: Path | None, what: str) -> str | None:
        return None if path is None else cloudconfig.read_secret(path, what)

    def pem(path: Path | None, what: str) -> bytes | None:
        text = read(path, what)
        return None if text is None else text.encode()

    secrets = cloudconfig.Secrets(
        agent_token=tokens.get("agent"),
        service_token=tokens.get("service"),
        dns_token=tokens.get("dns"),
        gossip_key=read(args.gossip_key_file, "gossip key"),
        tls_ca=pem(args.tls_ca_file, "TLS CA"),
        tls_cert=pem(args.tls_cert_file, "TLS certificate"),
        tls_key=pem(args.tls_key_file, "TLS key"),
    )
    notes: list[str] = []
    user_data = cloudconfig.user_data_for(
        loaded.spec, secrets, joins=joins, where=str(loaded.path), notes=notes
    )
    for note in notes:
        warn(note)
    return user_data
