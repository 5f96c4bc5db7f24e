"""The one place that escapes text for each destination meshbake writes.

The spec model (``builder.spec.boundary``) already refused control characters and
over-long values; what is left is printable text, which each function here writes so
that its reader gets back exactly the original value and nothing more:

- systemd unit values: ``%`` specifiers, quoting and ``$`` expansion (``unit_*``);
- files a shell sources (``bake.env``, ``mesh.env``): ``shlex.quote`` (``shell_*``);
- the line records the bake script reads (``record``);
- the first-boot carrier, which ``meshbake-firstboot`` parses (``carrier_file``);
- HCL strings (``hcl_string``, ``hcl_literal``);
- YAML documents (``yaml_document``);
- paths inside the image and inside an output folder (``image_rel``, ``inside``), and
  the paths meshbake renders itself, which a spec's files may not replace
  (``protected_conflict``).

A value that cannot be represented raises ``Unrepresentable``: the model lets none
through, so reaching it is a bug, not bad input.

>>> unit_exec(["/bin/echo", "50%", "$HOME", "a b", ";"])
'/bin/echo "50%%" "$$HOME" "a b" ";"'
>>> shell_assign("MESHBAKE_SERVICE", "it's")
'MESHBAKE_SERVICE=\\'it\\'"\\'"\\'s\\''
"""

from __future__ import annotations

import json
import posixpath
import re
import shlex
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml

from builder.errors import UserError
from builder.spec import boundary


class Unrepresentable(UserError, ValueError):
    """A value the destination cannot carry exactly. The model refuses such values
    first; this is the last line, so nothing is written when one slips through."""


def _printable(value: str, where: str) -> None:
    problem = boundary.printable_problem(value)
    if problem is not None:
        raise Unrepresentable(f"{where}: {value!r} {problem}")


# --- systemd units ---------------------------------------------------------------------

#: Words that need no quoting in a unit: nothing systemd unquotes, unescapes, expands
#: or treats as a prefix or separator (``;``, ``%``, ``$``, quotes, ``\\``, spaces).
_UNIT_PLAIN = re.compile(r"^[A-Za-z0-9/._:=,+@-]+$")


def _specifiers(value: str) -> str:
    """Double ``%`` so systemd's specifier expansion gives back the text."""
    return value.replace("%", "%%")


def _line_value(value: str, where: str) -> str:
    """A value systemd takes verbatim after stripping it: the rest of the line."""
    _printable(value, where)
    if value != value.strip():
        raise Unrepresentable(f"{where}: {value!r} has surrounding spaces systemd would drop")
    if value.endswith("\\"):
        raise Unrepresentable(f"{where}: {value!r} ends with '\\', a line continuation")
    return _specifiers(value)


def unit_text(value: str) -> str:
    """A free-text value such as ``Description=`` (specifiers expanded, nothing else).

    >>> unit_text("100% static")
    '100%% static'
    """
    return _line_value(value, "Description=")


def unit_path(value: str) -> str:
    """An absolute path value such as ``WorkingDirectory=``.

    >>> unit_path("/srv/50%")
    '/srv/50%%'
    """
    if not value.startswith("/"):
        raise Unrepresentable(f"{value!r} is not an absolute path")
    return _line_value(value, "WorkingDirectory=")


def _quoted(value: str) -> str:
    escaped = value.replace("\\", "\\\\").replace('"', '\\"')
    return f'"{escaped}"'


def unit_word(word: str) -> str:
    """One ``ExecStart=`` argument: systemd unquotes, C-unescapes, expands ``%``
    specifiers and ``$VAR``; a lone ``;`` separates commands. All are neutralised.

    >>> unit_word("-sidecar-for=web"), unit_word("it's 5$")
    ('-sidecar-for=web', '"it\\'s 5$$"')
    """
    _printable(word, "ExecStart=")
    if _UNIT_PLAIN.match(word):
        return word
    return _quoted(_specifiers(word).replace("$", "$$"))


def unit_exec(argv: Sequence[str]) -> str:
    """A whole ``ExecStart=`` command line; the executable is an absolute path, so no
    prefix (``+``, ``-``, ``@``, ``!``, ``:``) can be smuggled in front of it."""
    if not argv or not argv[0].startswith("/"):
        raise Unrepresentable(f"ExecStart=: {argv[:1]!r} is not an absolute path")
    return " ".join(unit_word(word) for word in argv)


def unit_environment(key: str, value: str) -> str:
    """One ``Environment=`` assignment. systemd unquotes, C-unescapes and expands ``%``
    specifiers there, but never ``$``: a ``$`` stays as it is.

    >>> unit_environment("GREETING", 'say "hi" $USER 100%')
    '"GREETING=say \\\\"hi\\\\" $USER 100%%"'
    """
    if not re.match(r"^[A-Za-z_][A-Za-z0-9_]*$", key):
        raise Unrepresentable(f"Environment=: {key!r} is not a variable name")
    _printable(value, f"Environment={key}")
    return _quoted(_specifiers(f"{key}={value}"))


# --- shell -------------------------------------------------------------------------------


def shell_assign(key: str, value: str) -> str:
    """``KEY=value`` for a file that ``sh`` sources and systemd reads as an
    ``EnvironmentFile=``: both give back ``value`` exactly from ``shlex.quote``."""
    if not re.match(r"^[A-Za-z_][A-Za-z0-9_]*$", key):
        raise Unrepresentable(f"{key!r} is not a variable name")
    _printable(value, key)
    return f"{key}={shlex.quote(value)}"


def shell_env_file(values: Mapping[str, str], header: str = "") -> str:
    """A sourced env file: an optional ``# header`` line, then one assignment a line."""
    lines = [f"# {header}"] if header else []
    lines += [shell_assign(key, value) for key, value in values.items()]
    return "\n".join(lines) + "\n"


def record(fields: Iterable[str], separator: str) -> str:
    """One line of a ``separator``-separated list the bake script reads with ``read``.

    >>> record(["0644", "root", "root", "/etc/motd"], "\\t")
    '0644\\troot\\troot\\t/etc/motd\\n'
    """
    out = list(fields)
    for field in out:
        _printable(field, "record")
        if separator in field:
            raise Unrepresentable(f"{field!r} holds the separator {separator!r}")
    return separator.join(out) + "\n"


# --- the first-boot carrier ------------------------------------------------------------


def carrier_file(values: Mapping[str, str]) -> str:
    """The carrier's ``KEY=VALUE`` lines as ``meshbake-firstboot`` parses them (never
    sources them): the value is the rest of the line, one layer of matching quotes
    around it is dropped, a CR at its end too. So a value must be printable, without
    surrounding spaces and not wrapped in quotes, to come back exactly.

    >>> carrier_file({"MESHBAKE_RETRY_JOIN": "198.18.0.1 consul.example"})
    'MESHBAKE_RETRY_JOIN=198.18.0.1 consul.example\\n'
    """
    lines = []
    for key, value in values.items():
        if not re.match(r"^MESHBAKE_[A-Z0-9_]+$", key):
            raise Unrepresentable(f"carrier: {key!r} is not a MESHBAKE_ name")
        _printable(value, key)
        quoted = len(value) >= 2 and value[0] == value[-1] and value[0] in "\"'"
        if value != value.strip() or quoted:
            raise Unrepresentable(f"{key}: {value!r} would not come back exactly from the carrier")
        lines.append(f"{key}={value}\n")
    return "".join(lines)


# --- HCL ---------------------------------------------------------------------------------


def hcl_string(value: str) -> str:
    """Quote meshbake's own text for HCL, as python-hcl2's Builder expects; it may
    interpolate on purpose (``${path.root}``). Non-ASCII text stays UTF-8: JSON's
    ``\\ud83d`` surrogate pairs are not HCL.

    >>> hcl_string('a "b"')
    '"a \\\\"b\\\\""'
    """
    _printable(value, "HCL")
    return json.dumps(value, ensure_ascii=False)


def hcl_literal(value: str) -> str:
    """Quote spec text for HCL so Packer reads it literally, never as a template.

    >>> hcl_literal("costs ${x} 😀")
    '"costs $${x} 😀"'
    """
    return hcl_string(value.replace("${", "$${").replace("%{", "%%{"))


# --- YAML --------------------------------------------------------------------------------


class _Dumper(yaml.SafeDumper):
    """Writes multi-line strings as ``|`` blocks, so files read as they will be written."""


def _str(dumper: yaml.SafeDumper, data: str) -> yaml.ScalarNode:
    # PyYAML falls back to a quoted style when a block cannot keep the text exactly.
    style = "|" if "\n" in data else None
    return dumper.represent_scalar("tag:yaml.org,2002:str", data, style=style)


_Dumper.add_representer(str, _str)


def yaml_document(document: Mapping[str, Any], header: str = "") -> str:
    """Dump ``document`` with the safe dumper (every string quoted as YAML needs it)."""
    body = yaml.dump(
        dict(document), Dumper=_Dumper, sort_keys=False, default_flow_style=False, width=4096
    )
    return header + body


# --- paths -------------------------------------------------------------------------------


def image_rel(dest: str) -> str:
    """An absolute in-image path as a path relative to the image's root, normalised.

    >>> image_rel("/etc//meshbake/./mesh.env")
    'etc/meshbake/mesh.env'
    """
    try:
        normal = boundary.normal_path(dest)
    except ValueError as exc:
        raise Unrepresentable(str(exc)) from None
    if normal == "/":
        raise Unrepresentable("'/' is not a file")
    return normal.lstrip("/")


def inside(root: Path, rel: str) -> Path:
    """``root / rel``, refused unless it stays inside ``root`` (no ``..``, not absolute).

    >>> inside(Path("/out"), "stage/rootfs/etc/motd")
    PosixPath('/out/stage/rootfs/etc/motd')
    """
    if "\0" in rel or rel.startswith("/") or ".." in rel.split("/"):
        raise Unrepresentable(f"{rel!r} would leave {root}")
    path = Path(posixpath.normpath(posixpath.join(str(root), rel)))
    if not path.is_relative_to(root) or path == root:
        raise Unrepresentable(f"{rel!r} would leave {root}")
    return path


def protected_conflict(dest: str, own: Iterable[str]) -> str | None:
    """Why a spec file at ``dest`` would replace something meshbake renders into the
    image (a file, or a folder it owns whole), or None. Compared after normalisation,
    segment by segment, so ``/etc//meshbake/x`` is ``/etc/meshbake/x``.

    >>> protected_conflict("/etc//meshbake/x", ["/etc/meshbake"])
    '/etc/meshbake/x is under /etc/meshbake, which meshbake renders itself'
    """
    try:
        path = boundary.normal_path(dest)
    except ValueError as exc:
        raise Unrepresentable(str(exc)) from None
    for mine in own:
        mine = boundary.normal_path(mine)
        if path == mine:
            return f"{path} is rendered by meshbake itself"
        if boundary.is_under(mine, path):
            return f"{path} is a folder meshbake renders into ({mine})"
        if boundary.is_under(path, mine):
            return f"{path} is under {mine}, which meshbake renders itself"
    return None
