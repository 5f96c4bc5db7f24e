"""The input boundary (issue 11): every string field of the spec model, sent through
every rendered output with hostile values, is either refused with a ``SpecError`` that
names the field, or reaches each output that carries it exactly and adds nothing.

The outputs are read back the way their real readers read them: units with a parser
that follows systemd's rules (``src/core/load-fragment.c`` and ``src/basic/extract-word.c``
in systemd/systemd: line continuation, quoting, C escapes, ``%`` specifiers and ``$``
expansion in ``ExecStart=``), env files by ``sh`` itself, HCL by python-hcl2 (with the
HCL spec's string escapes), YAML and JSON by their parsers.
"""

from __future__ import annotations

import copy
import enum
import json
import os
import re
import shlex
import subprocess
import types
import typing
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import hcl2
import pydantic
import pytest
import yaml

from builder.cli import main as cli
from builder.errors import SpecError, UserError
from builder.render import baked as bake
from builder.render import cloudconfig, escape
from builder.render.cloudconfig import Secrets
from builder.render.context import MARKER, render_context
from builder.spec import boundary
from builder.spec.model import File, ImageSpec, LoadedSpec, load_spec, parse_spec
from builder.tools.packer import PackerVersion
from tests.unit.pems import tls_files

PACKER = PackerVersion(1, 6, 6)
AGENT = "4d3c2b1a-0000-4000-8000-000000000000"
ED25519 = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIOMqqnkVzrm0SdG6UOoqKLsabgH5C9okWi0dh2l9GKJl"

Data = dict[str, Any]


# --- reading outputs back as their readers do ----------------------------------------------


_C_ESCAPES = {"n": "\n", "t": "\t", "r": "\r", "\\": "\\", '"': '"', "'": "'", " ": " "}


def systemd_words(text: str) -> list[str]:
    """Split like systemd's extract_first_word(EXTRACT_UNQUOTE|EXTRACT_CUNESCAPE)."""
    words: list[str] = []
    i, n = 0, len(text)
    while i < n:
        while i < n and text[i] in " \t":
            i += 1
        if i >= n:
            break
        word, quote, started = "", "", False
        while i < n:
            c = text[i]
            if c == "\\":
                nxt = text[i + 1] if i + 1 < n else ""
                if nxt not in _C_ESCAPES:
                    raise ValueError(f"unknown escape \\{nxt} in {text!r}")
                word += _C_ESCAPES[nxt]
                i += 2
                started = True
                continue
            if quote:
                if c == quote:
                    quote = ""
                else:
                    word += c
            elif c in "\"'":
                quote = c
            elif c in " \t":
                break
            else:
                word += c
            started = True
            i += 1
        if quote:
            raise ValueError(f"unbalanced quote in {text!r}")
        if started:
            words.append(word)
    return words


def specifiers(value: str) -> str:
    """Resolve ``%%``; any other specifier stays visible as ``<%x>``."""
    return re.sub(r"%(.)", lambda m: "%" if m.group(1) == "%" else f"<%{m.group(1)}>", value)


def exec_variables(word: str) -> str:
    """ExecStart's ``$$`` -> ``$``; a ``$NAME`` or ``${NAME}`` stays visible as ``<$>``."""
    return re.sub(
        r"\$(\$|\{[^}]*\}|[A-Za-z_][A-Za-z0-9_]*)",
        lambda m: "$" if m.group(1) == "$" else "<$>",
        word,
    )


@dataclass
class Unit:
    directives: list[tuple[str, str, str]]  # (section, key, raw value)

    def values(self, key: str) -> list[str]:
        return [v for _, k, v in self.directives if k == key]


def parse_unit(text: str) -> Unit:
    """systemd's config parser: comments, sections, ``Key=Value``, a line ending in a
    backslash continues on the next line (src/shared/conf-parser.c)."""
    directives: list[tuple[str, str, str]] = []
    section = ""
    pending = ""
    for raw in text.split("\n"):
        line = pending + raw
        if line.endswith("\\"):
            pending = line[:-1] + " "
            continue
        pending = ""
        stripped = line.strip()
        if not stripped or stripped[0] in "#;":
            continue
        if stripped.startswith("[") and stripped.endswith("]"):
            section = stripped[1:-1]
            continue
        key, sep, value = stripped.partition("=")
        assert sep, f"not a directive: {stripped!r}"
        directives.append((section, key.strip(), value.strip()))
    return Unit(directives)


def unit_leaves(unit: Unit) -> list[str]:
    leaves = []
    for _, key, value in unit.directives:
        if key.startswith("Exec"):
            argv = [exec_variables(specifiers(w)) for w in systemd_words(value.lstrip("+-@!:"))]
            leaves += argv
            leaves.append("\0".join(argv))
        elif key == "Environment":
            for word in systemd_words(value):
                assignment = specifiers(word)
                leaves += [assignment, assignment.partition("=")[2]]
        else:
            leaves.append(specifiers(value))
    return leaves


def source_env(path: Path) -> dict[str, str]:
    """What ``sh`` gets from sourcing ``path`` (``set -a`` so ``env`` shows it)."""
    done = subprocess.run(
        ["env", "-i", "/bin/sh", "-c", 'set -a; . "$1"; env -0', "sh", str(path)],
        capture_output=True,
        check=True,
    )
    env = {}
    for item in done.stdout.decode().split("\0"):
        key, sep, value = item.partition("=")
        if sep and key not in ("PWD", "SHLVL", "_", "OLDPWD"):
            env[key] = value
    return env


_HCL_ESCAPE = re.compile(r'\\(?:u([0-9a-fA-F]{4})|U([0-9a-fA-F]{8})|(["\\nrt]))')


def hcl_unquote(token: str) -> str:
    """An HCL quoted string as Packer reads it (hashicorp/hcl hclsyntax spec: escapes
    ``\\n \\r \\t \\" \\\\ \\uNNNN \\UNNNNNNNN``, and ``$${``/``%%{`` for a literal ``${``/``%{``);
    an interpolation shows as ``<${>``."""
    assert token.startswith('"') and token.endswith('"'), token
    body = token[1:-1]

    def unescape(m: re.Match[str]) -> str:
        if m.group(1) or m.group(2):
            return chr(int(m.group(1) or m.group(2), 16))
        return {"n": "\n", "r": "\r", "t": "\t", '"': '"', "\\": "\\"}[m.group(3)]

    body = re.sub(r"(?<!\$)\$\{", "<${>", body)
    body = re.sub(r"(?<!%)%\{", "<%{>", body)
    body = body.replace("$${", "${").replace("%%{", "%{")
    return _HCL_ESCAPE.sub(unescape, body)


def walk(value: Any, path: str = "") -> Iterator[tuple[str, Any]]:
    if isinstance(value, dict):
        for k, v in value.items():
            yield f"{path}.{{key}}", k
            yield from walk(v, f"{path}.*")
    elif isinstance(value, list):
        for v in value:
            yield from walk(v, f"{path}[]")
    else:
        yield path, value


@dataclass
class Rendered:
    """Every output of one render, read back: leaves (values a reader gets) and a
    shape (what a reader would see as structure: directives, variables, lines)."""

    leaves: set[str]
    shape: dict[str, Any]
    exec_starts: dict[str, list[str]]


def read_back(root: Path) -> Rendered:
    leaves: set[str] = set()
    shape: dict[str, Any] = {}
    exec_starts: dict[str, list[str]] = {}
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        rel = str(path.relative_to(root))
        data = path.read_bytes()
        if rel.startswith("stage/rootfs/usr/libexec") or rel.startswith("stage/scripts"):
            continue  # shipped as they are
        if path.suffix == ".service" or rel.endswith(".service.d/10-meshbake.conf"):
            unit = parse_unit(data.decode())
            shape[rel] = Counter((s, k) for s, k, _ in unit.directives)
            leaves |= set(unit_leaves(unit))
            exec_starts[path.name] = (
                [exec_variables(specifiers(w)) for w in systemd_words(unit.values("ExecStart")[0])]
                if unit.values("ExecStart")
                else []
            )
        elif path.name in ("bake.env", "mesh.env", "paths.env"):
            env = source_env(path)
            shape[rel] = sorted(env)
            for value in env.values():
                leaves.add(value)
                leaves |= set(value.split(" "))
        elif path.suffix == ".hcl":
            document = hcl2.loads(data.decode())
            keys = []
            for where, value in walk(document):
                if where.endswith("{key}"):
                    keys.append(re.sub(r"\{key\}$", "k", where))
                    if isinstance(value, str) and value.startswith('"'):
                        leaves.add(hcl_unquote(value))
                elif isinstance(value, str) and value.startswith('"'):
                    leaves.add(hcl_unquote(value))
            shape[rel] = Counter(keys)
        elif path.suffix == ".json":
            document = json.loads(data)
            shape[rel] = sorted(w for w, _ in walk(document))
            leaves |= {v for _, v in walk(document) if isinstance(v, str)}
        elif rel.startswith("cloudinit/") or path.suffix == ".cfg":
            document = yaml.safe_load(data)
            shape[rel] = sorted(w for w, _ in walk(document))
            for _, v in walk(document):
                if isinstance(v, str):
                    leaves.add(v)
                    leaves |= {line.partition("=")[2] for line in v.splitlines()}
        elif path.name in ("files.tsv", "users.list", "groups.list"):
            sep = "\t" if path.suffix == ".tsv" else "|"
            lines = data.decode().split("\n")
            shape[rel] = [line.count(sep) for line in lines]
            for line in lines:
                fields = line.split(sep)
                leaves |= set(fields)
                if path.name == "users.list" and len(fields) == 5:
                    leaves |= set(fields[4].split(","))
        elif rel.startswith("stage/keys/"):
            lines = data.decode().split("\n")
            shape[rel] = len(lines)
            leaves |= set(lines)
        elif rel.startswith("stage/rootfs/"):
            leaves.add(data.decode("utf-8", "replace"))
            leaves.add("/" + rel.removeprefix("stage/rootfs/"))
            shape["rootfs files"] = shape.get("rootfs files", 0) + 1
        else:
            shape[rel] = "other"
    return Rendered(leaves, shape, exec_starts)


# --- every string field of the model ---------------------------------------------------------


@dataclass(frozen=True)
class Slot:
    """Where a string lives: the data path, and whether it is a value, a list item,
    a mapping key or a mapping value."""

    path: tuple[str | int, ...]
    kind: str  # "value", "item", "key", "dict-value"

    @property
    def field(self) -> str:
        out = ""
        for part in self.path:
            out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else part)
        return out

    def __str__(self) -> str:
        return f"{self.field}:{self.kind}"


def _is_string(tp: Any) -> bool:
    tp = _strip(tp)
    if tp is str:
        return True
    if isinstance(tp, type) and issubclass(tp, enum.Enum):
        return all(isinstance(m.value, str) for m in tp)
    if typing.get_origin(tp) is typing.Literal:
        return all(isinstance(a, str) for a in typing.get_args(tp))
    return False


def _strip(tp: Any) -> Any:
    """Drop Annotated and Optional."""
    while True:
        if typing.get_origin(tp) is typing.Annotated:
            tp = typing.get_args(tp)[0]
            continue
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if typing.get_origin(tp) in (typing.Union, types.UnionType) and len(args) == 1:
            tp = args[0]
            continue
        return tp


def string_slots(model: type[pydantic.BaseModel], prefix: tuple[str | int, ...] = ()) -> list[Slot]:
    """Every string the model can hold, found from its annotations: a field added later
    is covered without touching this test."""
    slots: list[Slot] = []
    for name, info in model.model_fields.items():
        tp = _strip(info.annotation)
        path = (*prefix, name)
        origin = typing.get_origin(tp)
        if _is_string(tp):
            slots.append(Slot(path, "value"))
        elif isinstance(tp, type) and issubclass(tp, pydantic.BaseModel):
            slots += string_slots(tp, path)
        elif origin is tuple:
            item = _strip(typing.get_args(tp)[0])
            if _is_string(item):
                slots.append(Slot(path, "item"))
            elif isinstance(item, type) and issubclass(item, pydantic.BaseModel):
                slots += string_slots(item, (*path, 0))
        elif origin is dict:
            key, value = typing.get_args(tp)
            if _is_string(key):
                slots.append(Slot(path, "key"))
            if _is_string(value):
                slots.append(Slot(path, "dict-value"))
    return slots


SLOTS = string_slots(ImageSpec)

#: A spec that sets every optional string, so each one has a value to attack.
PUBKEY = ED25519 + " ops@example"


def full_data(example_path: Path) -> Data:
    data: Data = yaml.safe_load(example_path.read_text())
    data["groups"] = [{"name": "ops"}]
    data["users"] = [
        {"name": "ops", "groups": ["ops"], "shell": "/bin/bash", "ssh_authorized_keys": [PUBKEY]}
    ]
    data["files"] = [{"dest": "/opt/motd", "content": "hello\n", "owner": "root", "group": "root"}]
    data["app"]["environment"] = {"GREETING": "hello"}
    data["app"]["packages"] = ["python3"]
    data["consul"]["source"] = {"mirror": "https://mirror.example/consul"}
    data["tokens"] = {
        "shared": True,
        "source": "userdata",
        "ssm_parameter": "/mesh/token",
        "secret_id": "mesh/token",
    }
    data["envoy"]["source"] = "pypi"
    data["service"]["tags"] = ["v1"]
    data["service"]["meta"] = {"team": "platform"}
    data["service"]["transparent_proxy"] = {"exclude_outbound_cidrs": ["10.0.0.0/8"]}
    data["imds"] = {"allow_users": ["web"]}
    data["targets"]["qemu"]["base_image"] = {"path": "base.qcow2"}
    data["targets"]["qemu"]["arch"] = ["amd64"]
    aws = data["targets"]["aws"]
    # Two architectures (in both spellings), so each AMI source carries every value.
    aws.pop("instance_type")
    aws["arch"] = ["x86_64", "arm64"]
    aws["source_ami"] = {
        "owners": ["136693071363"],
        "name": "debian-12-*",
        "architecture": ["amd64", "arm64"],
    }
    aws["ami_regions"] = ["eu-west-1"]
    aws["share"] = {
        "accounts": ["123456789012"],
        "orgs": ["arn:aws:organizations::123456789012:organization/o-abcdefghij"],
        "ous": ["arn:aws:organizations::123456789012:ou/o-abc/ou-abc-def"],
    }
    aws["kms_key_id"] = "alias/meshbake"
    aws["subnet_id"] = "subnet-0123"
    aws["ssh_username"] = "admin"
    return data


#: Fields the rendered context does not carry (they steer the build, or only matter
#: for another setting); with a hostile value they must still be refused or harmless.
NOT_RENDERED = {
    "consul.source.mirror": "where build downloads Consul from",
    "envoy.source": "where build gets Envoy from",
    "tokens.ssm_parameter": "only with tokens.source ssm (not the base spec's)",
    "tokens.secret_id": "only with tokens.source secretsmanager",
    "targets.qemu.base_image.path": "a build input, passed to Packer as a variable",
    "targets.qemu.base_image.url": "a build input",
    "targets.qemu.base_image.sha256": "a build input",
    "app.files[0].source": "names the file whose bytes are baked",
    "files[0].source": "names the file whose bytes are baked",
    "imds.allow_users": "rendered as user names checked against the model",
}

PAYLOADS = {
    "newline": "\nExecStartPre=+/bin/sh -c id",
    "cr": "\rExecStartPre=+/bin/sh",
    "nul": "\0id",
    "quotes": "\"'",
    "backslash": "\\",
    "backslash-n": "a\\nb",
    "command": "$(id)`id`",
    "percent": "%n%%",
    "template": "${HOME}%{x}",
    "dotdot": "/../../../../tmp/meshbake-escape",
    "separators": "|,:; x",
    "emoji": "\U0001f600\u00e9",
    "del": "\x7f",
    "long": "x" * 5000,
}

#: Fields that must be set together (exactly one of two).
_ONE_OF = {"tcp": "http", "http": "tcp", "url": "path", "source": "content", "content": "source"}


def attack(base: Data, slot: Slot, payload: str) -> Data:
    data = copy.deepcopy(base)
    *parents, last = slot.path
    node: Any = data
    for part in parents:
        node = node[part]
    if slot.kind == "value":
        other = _ONE_OF.get(str(last))
        if other is not None:
            node.pop(other, None)
            if last == "url":
                node["sha256"] = "0" * 64
        current = node.get(last)
        node[last] = (current if isinstance(current, str) else "x") + payload
    elif slot.kind == "item":
        items = node.get(last) or ["x"]
        node[last] = [items[0] + payload]
    elif slot.kind == "key":
        (key, value), *_ = (node.get(last) or {"X": "y"}).items()
        node[last] = {key + payload: value}
    else:
        (key, value), *_ = (node.get(last) or {"X": "y"}).items()
        node[last] = {key: value + payload}
    return data


@pytest.fixture(scope="module")
def base_data(repo: Path) -> Data:
    return full_data(repo / "images" / "web.yaml")


@pytest.fixture(scope="module")
def baseline(repo: Path, base_data: Data, tmp_path_factory: pytest.TempPathFactory) -> Rendered:
    loaded = parse_spec(yaml.safe_dump(base_data), repo / "images" / "web.yaml")
    out = tmp_path_factory.mktemp("baseline") / "ctx"
    render_context(loaded, out, packer_version=PACKER)
    return read_back(out)


def test_the_walk_finds_the_fields_it_must(base_data: Data) -> None:
    found = {s.field for s in SLOTS}
    for field in (
        "targets.qemu.arch",
        "targets.aws.arch",
        "targets.aws.source_ami.architecture",
        "app.description",
        "app.exec_start",
        "app.environment",
        "files[0].dest",
        "users[0].shell",
        "service.meta",
        "targets.aws.tags",
        "description",
    ):
        assert field in found
    # and every one of them exists in the attacked data, so no slot is silently skipped
    for slot in SLOTS:
        attack(base_data, slot, "x")


@pytest.mark.parametrize("payload", list(PAYLOADS))
@pytest.mark.parametrize("slot", SLOTS, ids=str)
def test_every_string_field_is_refused_or_reaches_every_output_exactly(
    repo: Path, base_data: Data, baseline: Rendered, tmp_path: Path, slot: Slot, payload: str
) -> None:
    data = attack(base_data, slot, PAYLOADS[payload])
    text = yaml.safe_dump(data, allow_unicode=True)
    spec_path = repo / "images" / "web.yaml"
    try:
        loaded = parse_spec(text, spec_path)
    except SpecError as exc:
        named = [p for p in exc.problems if p.path.startswith(slot.field)]
        assert named, f"refused, but no problem names {slot.field}: {exc}"
        for problem in exc.problems:
            assert "\n" not in str(problem) and "\r" not in str(problem)
        return
    out = tmp_path / "ctx"
    try:
        render_context(loaded, out, packer_version=PACKER)
    except SpecError as exc:  # refused at render time (a path meshbake renders itself)
        assert any(p.path.startswith(slot.field) for p in exc.problems), str(exc)
        assert not out.exists()
        return
    got = read_back(out)
    assert got.shape == baseline.shape, f"{slot} with {payload}: the outputs changed shape"
    value = _value_at(data, slot)
    if slot.field in NOT_RENDERED:
        return
    if slot.field == "app.exec_start":
        assert got.exec_starts["web.service"] == shlex.split(value)
        return
    assert value in got.leaves, f"{slot} = {value!r} did not reach the outputs exactly"


def _value_at(data: Data, slot: Slot) -> str:
    node: Any = data
    for part in slot.path:
        node = node[part]
    if slot.kind == "item":
        return str(node[0])
    if slot.kind == "key":
        return str(next(iter(node)))
    if slot.kind == "dict-value":
        return str(next(iter(node.values())))
    return str(node)


def test_the_readers_see_an_unescaped_injection(tmp_path: Path) -> None:
    """The table would catch a renderer that skipped escaping: the readers see it."""
    unit = parse_unit(
        "[Service]\nDescription=x\nExecStartPre=+/bin/sh\nExecStart=/bin/true a\\\nUser=root\n"
    )
    assert Counter(k for _, k, _ in unit.directives) == {
        "Description": 1,
        "ExecStartPre": 1,
        "ExecStart": 1,
    }
    assert specifiers("50%n") == "50<%n>"
    assert exec_variables("$HOME") == "<$>"
    env = tmp_path / "env"
    env.write_text('A="x"\nB="$(echo injected)"\n')
    assert source_env(env)["B"] == "injected"
    assert hcl_unquote('"${x}"') == "<${>x}"


# --- nothing outside --out ---------------------------------------------------------------------


def _tree(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*")}


def test_render_and_validate_with_a_traversing_dest_write_nothing_outside_out(
    repo: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    images = tmp_path / "images"
    import shutil

    shutil.copytree(repo / "images", images)
    target = tmp_path / "escaped"
    depth = "/.." * (len(target.parts) + 2)
    data = yaml.safe_load((images / "web.yaml").read_text())
    data["files"] = [{"dest": f"{depth}{target}", "content": "pwned\n", "mode": "0777"}]
    spec = images / "evil.yaml"
    spec.write_text(yaml.safe_dump(data))
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    monkeypatch.setenv("TMPDIR", str(scratch))
    monkeypatch.setattr("tempfile.tempdir", None)
    before = _tree(tmp_path)
    out = tmp_path / "out"
    assert cli.main(["render", str(spec), "--out", str(out)]) == 1
    assert cli.main(["validate", str(spec)]) == 1
    err = capsys.readouterr().err
    assert "files[0].dest" in err and "'..'" in err
    assert not target.exists()
    assert _tree(tmp_path) == before


def test_the_render_guard_holds_even_if_the_model_let_a_traversal_through(
    example: LoadedSpec, tmp_path: Path
) -> None:
    """Defence in depth: a dest that skipped validation still cannot leave --out."""
    evil = File.model_construct(
        dest="/../../../../../../tmp/meshbake-guard",
        content="x",
        source=None,
        mode="0644",
        owner="root",
        group="root",
    )
    app = example.spec.app.model_copy(update={"files": (evil,)})
    loaded = LoadedSpec(example.spec.model_copy(update={"app": app}), example.path, (), "0" * 64)
    before = _tree(tmp_path)
    with pytest.raises(UserError):
        render_context(loaded, tmp_path / "out", packer_version=PACKER)
    assert _tree(tmp_path) == before
    assert not Path("/tmp/meshbake-guard").exists()


# --- the listed cases, one by one --------------------------------------------------------------


@pytest.fixture
def images(repo: Path, tmp_path: Path) -> Path:
    import shutil

    out = tmp_path / "images"
    shutil.copytree(repo / "images", out)
    return out


def write_spec(images: Path, mutate: typing.Callable[[Data], None], name: str = "v.yaml") -> Path:
    data = yaml.safe_load((images / "web.yaml").read_text())
    mutate(data)
    path = images / name
    path.write_text(yaml.safe_dump(data, allow_unicode=True))
    return path


def one_line_error(argv: list[str], capsys: pytest.CaptureFixture[str]) -> str:
    """Run the CLI; it must exit 1 with exactly one ``meshbake: error:`` line."""
    code = cli.main(argv)
    err = capsys.readouterr().err
    assert code == 1, err
    lines = [line for line in err.splitlines() if not line.startswith("meshbake: warning")]
    assert len(lines) == 1, err
    assert "Traceback" not in err
    return lines[0]


def set_dest(dest: str) -> typing.Callable[[Data], None]:
    def mutate(d: Data) -> None:
        d["files"] = [{"dest": dest, "content": "x\n"}]

    return mutate


@pytest.mark.parametrize(
    ("dest", "fragment"),
    [
        ("/", "root folder"),
        ("/etc/", "ends with '/'"),
        ("/etc", "system folder"),
        ("/usr/bin", "system folder"),
        ("/opt/" + "n" * 256, "over the limit of 255"),
        ("/../../tmp/x", "'..'"),
        ("/proc/sys/kernel/core_pattern", "under /proc"),
        ("/etc/x\n/etc/y", "control character"),
        ("/etc/x\ty", "control character"),
    ],
)
def test_bad_dest_is_one_clear_line(
    images: Path, capsys: pytest.CaptureFixture[str], dest: str, fragment: str
) -> None:
    spec = write_spec(images, set_dest(dest))
    line = one_line_error(["render", str(spec), "--out", str(images.parent / "out")], capsys)
    assert "files[0].dest" in line and fragment in line, line


@pytest.mark.parametrize(
    "dest",
    [
        "/etc//meshbake/x",
        "/etc/meshbake/./mesh.env",
        "/etc/meshbake",
        "/usr/bin/consul",
        "/usr/bin/envoy",
        "/usr/bin/consul/x",
        "/etc/consul.d/extra.json",
        "/etc/envoy/token",
        "/usr/libexec/meshbake/meshbake-firstboot",
        "/etc/cloud/cloud.cfg.d/90-meshbake.cfg",
        "/etc/systemd/resolved.conf.d/consul.conf",
        "/var/lib/meshbake/firstboot.done",
        "/etc/systemd/system/web.service",
        "/etc/systemd/system/consul.service",
        "/etc/systemd/system/envoy-sidecar.service",
    ],
)
def test_paths_meshbake_renders_are_protected(
    images: Path, capsys: pytest.CaptureFixture[str], dest: str
) -> None:
    spec = write_spec(images, set_dest(dest))
    out = images.parent / "out"
    line = one_line_error(["render", str(spec), "--out", str(out)], capsys)
    assert "files[0].dest" in line and "meshbake" in line, line
    assert not out.exists()
    report_code = cli.main(["validate", str(spec)])
    assert report_code == 1


def test_protection_is_derived_from_what_is_rendered(example: LoadedSpec) -> None:
    own = [f.dest for f in bake.baked_files(example)]
    protected = bake.protected_paths(own)
    for dest in own:
        assert escape.protected_conflict(dest, protected) is not None
    # neighbours that only share a prefix are not protected
    for dest in ("/etc/consul.dx", "/etc/meshbakery/x", "/etc/systemd/system/other.service"):
        assert escape.protected_conflict(dest, protected) is None, dest


def test_a_dest_under_another_file_or_twice_is_refused(images: Path) -> None:
    def nested(d: Data) -> None:
        d["files"] = [
            {"dest": "/opt/a", "content": "x"},
            {"dest": "/opt/a/b", "content": "y"},
            {"dest": "/opt/c", "content": "1"},
            {"dest": "/opt//c", "content": "2"},
        ]

    with pytest.raises(SpecError) as info:
        load_spec(write_spec(images, nested))
    text = str(info.value)
    assert "files[0].dest: /opt/a is a folder: files[1].dest (/opt/a/b) is under it" in text
    assert "files[3].dest: /opt/c is also files[2].dest" in text


def test_nul_in_source_is_one_clear_line(images: Path, capsys: pytest.CaptureFixture[str]) -> None:
    def nul(d: Data) -> None:
        d["app"]["files"][0]["source"] = "files/web/index.html\0.txt"

    spec = write_spec(images, nul)
    line = one_line_error(["render", str(spec), "--out", str(images.parent / "o")], capsys)
    assert "app.files[0].source" in line and "NUL" in line


@pytest.mark.parametrize(
    ("command", "fragment"),
    [
        ('/bin/echo "unbalanced', "check its quotes"),
        ("/bin/echo trailing\\", "check its quotes"),
        ("/bin/sh\nExecStartPre=+/bin/id", "not a command starting with an absolute path"),
        ("relative/bin", "absolute path"),
    ],
)
def test_bad_exec_start_is_one_clear_line(
    images: Path, capsys: pytest.CaptureFixture[str], command: str, fragment: str
) -> None:
    def mutate(d: Data) -> None:
        d["app"]["exec_start"] = command

    line = one_line_error(
        ["render", str(write_spec(images, mutate)), "--out", str(images.parent / "o")], capsys
    )
    assert "app.exec_start" in line and fragment in line, line


@pytest.mark.parametrize(
    ("package", "ok"),
    [
        ("python3", True),
        ("libc6=2.36-9+deb12u4", True),
        ("openssl=1:3.0.11-1~deb12u2", True),
        ("g++", True),
        ("-oDPkg::Pre-Invoke::=id", False),
        ("python3*", False),
        ("python3/bookworm", False),
        ("Python3", False),
        ("python3 curl", False),
        ("python3=", False),
        ("python3=latest", False),
    ],
)
@pytest.mark.parametrize("where", [("packages",), ("app", "packages")])
def test_packages_follow_debian_grammar(
    images: Path, package: str, ok: bool, where: tuple[str, ...]
) -> None:
    def mutate(d: Data) -> None:
        node = d
        for part in where[:-1]:
            node = node[part]
        node[where[-1]] = [package]

    path = write_spec(images, mutate)
    if ok:
        load_spec(path)
    else:
        with pytest.raises(SpecError, match=r"packages\[0\]: .* is not a Debian package name"):
            load_spec(path)


@pytest.mark.parametrize("cidr", ["fe80::%eth0/64", "fe80::%0a/64", "10.0.0.0/8%x"])
def test_cidrs_refuse_zone_ids(images: Path, cidr: str) -> None:
    def mutate(d: Data) -> None:
        d["service"]["transparent_proxy"] = {"exclude_outbound_cidrs": [cidr]}

    with pytest.raises(SpecError, match="exclude_outbound_cidrs"):
        load_spec(write_spec(images, mutate))


@pytest.mark.parametrize(
    "shell",
    [
        "/bin/bash|sudo",
        "/bin/sh,sudo",
        "/bin/sh:x",
        "bash",
        "/bin/../bin/sh",
        "/bin/ba sh",
        "/bin/",
    ],
)
def test_user_shell_is_a_plain_absolute_path(images: Path, shell: str) -> None:
    def mutate(d: Data) -> None:
        d["users"] = [{"name": "ops", "shell": shell}]

    with pytest.raises(SpecError, match=r"users\[0\]\.shell"):
        load_spec(write_spec(images, mutate))


PUTTY = (
    "PuTTY-User-Key-File-3: ssh-ed25519 Encryption: none Comment: x Public-Lines: 2 "
    "AAAAC3NzaC1lZDI1NTE5AAAAIOMqqnkVzrm0SdG6UOoqKLsabgH5C9okWi0dh2l9GKJl Private-Lines: 1 AAAA"
)


@pytest.mark.parametrize(
    ("key", "fragment"),
    [
        (f"{ED25519} me {PUTTY}", "private key"),
        (f"{ED25519}\n{PUTTY}", "private key"),
        (f"{ED25519} me {ED25519}", "more than one key"),
        ("ssh-ed25519 AAAAnotbase64!!", "not a valid ssh-ed25519 public key"),
        ("ssh-rsa " + ED25519.split()[1], "not a valid ssh-rsa public key"),
        ('command="/bin/sh" ' + ED25519, "is not an OpenSSH public key"),
    ],
)
def test_each_authorized_key_is_exactly_one_public_key(
    images: Path, key: str, fragment: str
) -> None:
    def mutate(d: Data) -> None:
        d["users"] = [{"name": "ops", "ssh_authorized_keys": [key]}]

    with pytest.raises(SpecError) as info:
        load_spec(write_spec(images, mutate))
    assert "users[0].ssh_authorized_keys" in str(info.value)
    assert fragment in str(info.value)


def test_a_real_public_key_is_accepted(images: Path) -> None:
    def mutate(d: Data) -> None:
        d["users"] = [{"name": "ops", "ssh_authorized_keys": [ED25519 + " ops@laptop"]}]

    assert load_spec(write_spec(images, mutate)).spec.users[0].ssh_authorized_keys


# --- input size and kind -----------------------------------------------------------------------


def test_spec_that_is_a_device_or_fifo_or_huge_is_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    fifo = tmp_path / "spec.fifo"
    os.mkfifo(fifo)
    big = tmp_path / "big.yaml"
    big.write_text("name: web\n" + "#" * boundary.MAX_SPEC_BYTES)
    cases = {
        "/dev/zero": "character device",
        str(fifo): "FIFO",
        str(big): "over the limit",
        str(tmp_path): "is a folder",
    }
    for path, fragment in cases.items():
        line = one_line_error(["userdata", path], capsys)
        assert path in line and fragment in line, line


def test_fifo_spec_does_not_hang_the_cli(tmp_path: Path) -> None:
    """Through the real entry point; the timeout only guards against a hang."""
    fifo = tmp_path / "spec.yaml"
    os.mkfifo(fifo)
    done = subprocess.run(
        [os.sys.executable, "-m", "builder", "validate", str(fifo)],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=Path(__file__).parents[2],
    )
    assert done.returncode == 1
    assert "FIFO" in done.stdout + done.stderr
    assert "Traceback" not in done.stderr


def test_token_file_that_is_a_device_fifo_or_huge_is_one_line(
    repo: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    fifo = tmp_path / "token.fifo"
    os.mkfifo(fifo)
    big = tmp_path / "token.big"
    big.write_text("x" * (boundary.MAX_SECRET_BYTES + 1))
    web = str(repo / "images" / "web.yaml")
    for path, fragment in {
        "/dev/zero": "character device",
        str(fifo): "FIFO",
        str(big): "over the limit",
    }.items():
        line = one_line_error(["userdata", web, "--token-file", path], capsys)
        assert path in line and fragment in line, line


def test_duplicate_keys_are_an_error(repo: Path, tmp_path: Path) -> None:
    text = (repo / "images" / "web.yaml").read_text() + "\nname: other\n"
    with pytest.raises(SpecError, match="duplicate key 'name'"):
        parse_spec(text, repo / "images" / "web.yaml")


def test_yaml_alias_bombs_are_refused(
    repo: Path, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    lines = ['a0: &a0 ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]']
    lines += [f"a{i}: &a{i} [{','.join([f'*a{i - 1}'] * 9)}]" for i in range(1, 10)]
    bomb = tmp_path / "bomb.yaml"
    bomb.write_text("\n".join(lines) + "\nname: web\n")
    with pytest.raises(SpecError, match="aliases"):
        load_spec(bomb)
    code = cli.main(["userdata", str(bomb)])
    assert code == 1
    assert "aliases (*name) are not allowed" in capsys.readouterr().err


def test_ami_description_and_meta_limits(images: Path) -> None:
    def long_description(d: Data) -> None:
        d["description"] = "d" * 256

    with pytest.raises(SpecError, match="description: String should have at most 255"):
        load_spec(write_spec(images, long_description))

    def long_meta(d: Data) -> None:
        d["service"]["meta"] = {"team": "m" * 513}

    with pytest.raises(SpecError, match=r"service\.meta\.team: String should have at most 512"):
        load_spec(write_spec(images, long_meta))

    def reserved_meta(d: Data) -> None:
        d["service"]["meta"] = {"consul-version": "x"}

    with pytest.raises(SpecError, match="reserved by Consul"):
        load_spec(write_spec(images, reserved_meta))


def test_emoji_reaches_hcl_as_itself(images: Path, tmp_path: Path) -> None:
    def emoji(d: Data) -> None:
        d["description"] = "web \U0001f600 caf\u00e9"
        d["targets"]["aws"]["tags"] = {"team": "\U0001f680"}

    loaded = load_spec(write_spec(images, emoji))
    ctx = render_context(loaded, tmp_path / "ctx", packer_version=PACKER)
    got = read_back(ctx.root)
    assert "web \U0001f600 caf\u00e9" in got.leaves
    assert "\U0001f680" in got.leaves
    sources = (ctx.packer_dir / "sources.pkr.hcl").read_text(encoding="utf-8")
    assert "\\ud83d" not in sources  # no JSON surrogate pairs, which HCL cannot read


# --- --out ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("where", ["under-file", "proc", "symlink", "foreign-marker", "root"])
def test_out_that_is_not_a_folder_of_ours_is_one_line(
    repo: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], where: str
) -> None:
    web = str(repo / "images" / "web.yaml")
    a_file = tmp_path / "a-file"
    a_file.write_text("x")
    precious = tmp_path / "precious"
    precious.mkdir()
    (precious / MARKER).write_text('{"not": "ours"}\n')
    (precious / "thesis.tex").write_text("years of work")
    link = tmp_path / "link"
    link.symlink_to(precious)
    out = {
        "under-file": a_file / "ctx",
        "proc": Path("/proc/self/meshbake-ctx"),
        "symlink": link,
        "foreign-marker": precious,
        "root": Path("/"),
    }[where]
    line = one_line_error(["render", web, "--out", str(out)], capsys)
    assert str(out) in line
    assert (precious / "thesis.tex").read_text() == "years of work"
    assert a_file.read_text() == "x"


def test_out_with_our_marker_is_replaced(example: LoadedSpec, tmp_path: Path) -> None:
    out = tmp_path / "ctx"
    render_context(example, out, packer_version=PACKER)
    marker = json.loads((out / MARKER).read_text())
    assert marker["kind"] == "meshbake bake folder"
    render_context(example, out, packer_version=PACKER)
    assert (out / MARKER).is_file()


# --- userdata: mismatched inputs ---------------------------------------------------------


def _variant(repo: Path, mutate: typing.Callable[[Data], None]) -> LoadedSpec:
    data = yaml.safe_load((repo / "images" / "web.yaml").read_text())
    mutate(data)
    return parse_spec(yaml.safe_dump(data), repo / "images" / "web.yaml")


def _tls(d: Data) -> None:
    d["consul"]["tls"] = {"enabled": True, "client_cert": True}


def test_swapped_tls_key_and_cert_are_refused(repo: Path) -> None:
    pems = tls_files()
    spec = _variant(repo, _tls).spec
    swapped = Secrets(
        agent_token=AGENT, tls_ca=pems["ca"], tls_cert=pems["key"], tls_key=pems["cert"]
    )
    with pytest.raises(UserError, match="swapped") as info:
        cloudconfig.carrier_values(spec, swapped)
    assert "\n" not in str(info.value)
    wrong = Secrets(
        agent_token=AGENT, tls_ca=pems["ca"], tls_cert=pems["cert"], tls_key=pems["other_key"]
    )
    with pytest.raises(UserError, match="is not the key of the certificate"):
        cloudconfig.carrier_values(spec, wrong)
    right = Secrets(
        agent_token=AGENT, tls_ca=pems["ca"], tls_cert=pems["cert"], tls_key=pems["key"]
    )
    assert "MESHBAKE_TLS_KEY_B64" in cloudconfig.carrier_values(spec, right)


def test_secrets_the_spec_does_not_take_are_refused(repo: Path, example: LoadedSpec) -> None:
    gossip = "pUqJrVyVRj5jsiYEkM/tFQYfWyJIv4s3XkvDwy7Cu5s="
    with pytest.raises(UserError, match="gossip encryption off"):
        cloudconfig.carrier_values(example.spec, Secrets(agent_token=AGENT, gossip_key=gossip))
    with pytest.raises(UserError, match="TLS off, so it takes no --tls-ca-file"):
        cloudconfig.carrier_values(
            example.spec, Secrets(agent_token=AGENT, tls_ca=tls_files()["ca"])
        )

    def ssm(d: Data) -> None:
        d["tokens"] = {"source": "ssm", "ssm_parameter": "/mesh/token"}

    with pytest.raises(UserError, match="tokens.source is ssm.*give no --token-file"):
        cloudconfig.carrier_values(_variant(repo, ssm).spec, Secrets(agent_token=AGENT))


def test_two_values_for_one_role_is_one_line(
    repo: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    first = tmp_path / "first"
    first.write_text(AGENT)
    second = tmp_path / "second"
    second.write_text(AGENT.replace("4d", "5e"))
    web = str(repo / "images" / "web.yaml")
    for argv in (
        ["--token-file", str(first), "--token-file", f"agent={second}"],
        ["--token-file", f"agent={first}", "--token-file", f"agent={second}"],
        ["--token-file", f"service={first}", "--token-file", f"service={second}"],
    ):
        line = one_line_error(["userdata", web, *argv], capsys)
        assert "already given" in line, line


# --- userdata --join: the server addresses first boot writes as retry_join ---------------

#: What ``--join`` refuses besides the hostile payloads: ports, brackets, zone ids, cloud
#: auto-join (the baked ``consul.retry_join`` carries that), and malformed names.
JOIN_REFUSED = [
    "provider=aws tag_key=consul-role",
    "198.18.0.1:8301",
    "[2001:db8::1]",
    "fe80::1%eth0",
    "::ffff:198.18.0.1",
    "1.2.3.999",
    "198.018.0.1",
    "a..example",
    "-a.example",
    "a" * 64 + ".example",
    "consul.example.",
    "",
]


def _join_argv(repo: Path, tmp_path: Path, *joins: str) -> list[str]:
    token = tmp_path / "token"
    token.write_text(AGENT + "\n")
    argv = ["userdata", str(repo / "images" / "web.yaml"), "--token-file", str(token)]
    return argv + [f"--join={join}" for join in joins]


@pytest.mark.parametrize(
    "value",
    [
        *(PAYLOADS[p] for p in PAYLOADS),
        *("198.18.0.1" + PAYLOADS[p] for p in PAYLOADS),
        *JOIN_REFUSED,
    ],
    ids=[*PAYLOADS, *(f"after-an-address-{p}" for p in PAYLOADS), *JOIN_REFUSED],
)
def test_every_hostile_join_value_is_one_line_naming_join(
    repo: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], value: str
) -> None:
    code = cli.main(_join_argv(repo, tmp_path, "198.18.0.2", value))
    out, err = capsys.readouterr()
    assert code == 1
    assert out == ""
    (line,) = err.splitlines()
    assert line.startswith("meshbake: error: --join "), line
    assert "Traceback" not in err


@pytest.mark.parametrize(
    ("given", "carried"),
    [
        ("198.18.0.1", "198.18.0.1"),
        ("2001:DB8:0:0::1", "2001:db8::1"),
        ("consul-server.mesh.example", "consul-server.mesh.example"),
        ("server1", "server1"),
    ],
)
def test_a_join_address_reaches_the_carrier_as_itself(
    repo: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], given: str, carried: str
) -> None:
    assert cli.main(_join_argv(repo, tmp_path, given)) == 0
    (entry,) = yaml.safe_load(capsys.readouterr().out)["write_files"]
    assert f"\nMESHBAKE_RETRY_JOIN={carried}\n" in entry["content"]


@pytest.mark.parametrize("payload", list(PAYLOADS))
def test_the_carrier_gives_back_each_value_or_refuses_it(payload: str) -> None:
    """Read the line as meshbake-firstboot does: the rest of the line, a CR and one
    layer of matching quotes dropped."""
    value = "x" + PAYLOADS[payload]
    for candidate in (value, f'"{value}"', f" {value}"):
        try:
            text = escape.carrier_file({"MESHBAKE_X": candidate})
        except escape.Unrepresentable:
            continue
        (line,) = text.splitlines()
        got = line.partition("=")[2].removesuffix("\r")
        if len(got) >= 2 and got[0] == got[-1] and got[0] in "\"'":
            got = got[1:-1]
        assert got == candidate
