"""The input boundary: what every untrusted text, path and file must satisfy.

Spec files, token files and the strings inside a spec are untrusted. This module
holds the checks the spec model and the secret readers share; escaping for each
output (systemd, shell, HCL, YAML, paths on disk) lives in ``builder.render.escape``.

>>> printable_problem("web\\nExecStartPre=+/bin/sh")
'contains a control character (U+000A, a line feed); only printable text is allowed'
>>> normal_path("/etc//meshbake/./x")
'/etc/meshbake/x'
"""

from __future__ import annotations

import errno
import ipaddress
import json
import os
import posixpath
import re
import stat
import unicodedata
from pathlib import Path
from typing import Any

import yaml

from builder.errors import UserError, reason

#: Largest spec file read, in bytes (the worked example is under 2 KiB).
MAX_SPEC_BYTES = 1024 * 1024
#: Largest secret file (token, gossip key, PEM) read: user data itself is capped at 16 KiB.
MAX_SECRET_BYTES = 64 * 1024
#: Largest file baked from ``files[].source``.
MAX_SOURCE_BYTES = 256 * 1024 * 1024
#: Largest sum of every ``files[].source`` of one spec, a file listed twice counted twice
#: (each listing is read into the image).
MAX_SOURCES_TOTAL = 512 * 1024 * 1024
#: Largest state file meshbake itself writes and reads back (manifests, markers, indexes).
MAX_STATE_BYTES = 1024 * 1024
#: Longest string field (file ``content`` aside); the tighter limits are per field.
MAX_TEXT = 4096
#: Linux's NAME_MAX (bytes per path component) and PATH_MAX (bytes, with the NUL).
NAME_MAX = 255
PATH_MAX = 4096

_NAMES = {
    "\n": "a line feed",
    "\r": "a carriage return",
    "\0": "a NUL",
    "\t": "a tab",
    "\x7f": "a DEL",
    "\x1b": "an escape",
}


def printable_problem(text: str) -> str | None:
    """Why ``text`` may not reach a unit, an env file or the shell, or None.

    Only printable characters and the plain space pass: no C0/C1 control (newline,
    CR, NUL, tab, ...), DEL, line or paragraph separator, format or surrogate code.
    """
    for ch in text:
        if ch == " " or ch.isprintable():
            continue
        category = unicodedata.category(ch)
        kind = "control" if category == "Cc" else "non-printable"
        name = _NAMES.get(ch) or unicodedata.name(ch, "").lower() or category
        return (
            f"contains a {kind} character (U+{ord(ch):04X}, {name}); only printable text is allowed"
        )
    return None


def length_problem(text: str, limit: int = MAX_TEXT) -> str | None:
    if len(text) > limit:
        return f"is {len(text)} characters long, over the limit of {limit}"
    return None


def normal_path(value: str) -> str:
    """``value`` as a normalised absolute path; ``ValueError`` when it cannot be one.

    Redundant ``/`` and ``.`` segments are removed; a ``..`` segment, a relative path,
    a trailing ``/`` (a folder) and names over Linux's limits are refused.
    """
    if not value.startswith("/"):
        raise ValueError(f"{value!r} is not an absolute path")
    problem = printable_problem(value)
    if problem is not None:
        raise ValueError(problem)
    parts = value.split("/")
    if ".." in parts:
        raise ValueError(f"{value!r} has a '..' segment; give the path without it")
    if value != "/" and value.endswith("/"):
        raise ValueError(f"{value!r} ends with '/', so it names a folder, not a file")
    normal = posixpath.normpath(value)
    if normal.startswith("//"):  # POSIX keeps a leading '//'; Linux does not care
        normal = "/" + normal.lstrip("/")
    for part in normal.split("/"):
        if len(part.encode()) > NAME_MAX:
            raise ValueError(f"has a name of {len(part.encode())} bytes, over the limit of 255")
    if len(normal.encode()) >= PATH_MAX:
        raise ValueError(f"is {len(normal.encode())} bytes long, over the limit of 4095")
    return normal


def is_under(path: str, folder: str) -> bool:
    """Whether normalised ``path`` is ``folder`` or inside it (by segments, not prefix).

    >>> is_under("/etc/meshbake/x", "/etc/meshbake"), is_under("/etc/meshbakery", "/etc/meshbake")
    (True, False)
    """
    return path == folder or path.startswith(folder.rstrip("/") + "/")


# --- reading untrusted files ---------------------------------------------------------

_KINDS = {
    stat.S_IFDIR: "a folder",
    stat.S_IFCHR: "a character device",
    stat.S_IFBLK: "a block device",
    stat.S_IFIFO: "a FIFO",
    stat.S_IFSOCK: "a socket",
}


class UnreadableFile(ValueError):
    """A file that is not a regular file, too big, or named with a NUL."""


def read_regular(path: Path, limit: int) -> bytes:
    """Read a regular file of at most ``limit`` bytes.

    A device, FIFO or socket is refused before it is opened (so ``/dev/zero`` or a FIFO
    never hangs), the open is non-blocking and the size is checked again on what was
    opened. Raises ``UnreadableFile`` for those and ``OSError`` when the file system
    says no.
    """
    if "\0" in str(path):
        raise UnreadableFile("has a NUL character in its name")
    kind = _kind(path.stat().st_mode)
    if kind is not None:
        raise UnreadableFile(f"is {kind}, not a regular file")
    flags = os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC
    fd = os.open(path, flags)
    try:
        info = os.fstat(fd)
        kind = _kind(info.st_mode)
        if kind is not None:
            raise UnreadableFile(f"is {kind}, not a regular file")
        if info.st_size > limit:
            raise UnreadableFile(f"is {info.st_size} bytes, over the limit of {limit}")
        chunks: list[bytes] = []
        size = 0
        while size <= limit:
            chunk = os.read(fd, min(1 << 20, limit + 1 - size))
            if not chunk:
                break
            chunks.append(chunk)
            size += len(chunk)
    finally:
        os.close(fd)
    if size > limit:
        raise UnreadableFile(f"is over the limit of {limit} bytes")
    return b"".join(chunks)


def regular_size(path: Path, limit: int) -> int:
    """The size of regular file ``path`` (at most ``limit``), checked as ``read_regular``
    checks it but without reading it; the same errors."""
    if "\0" in str(path):
        raise UnreadableFile("has a NUL character in its name")
    info = path.stat()
    kind = _kind(info.st_mode)
    if kind is not None:
        raise UnreadableFile(f"is {kind}, not a regular file")
    if info.st_size > limit:
        raise UnreadableFile(f"is {info.st_size} bytes, over the limit of {limit}")
    return info.st_size


# --- every other input: files, folders and values named by arguments or the environment -


def read_input(path: Path, limit: int, what: str) -> bytes:
    """The one way meshbake reads a file it is told about (an argument, an environment
    variable, a build folder): a regular file of at most ``limit`` bytes, or a one-line
    ``UserError`` naming the file and what it was meant to be."""
    try:
        return read_regular(path, limit)
    except (OSError, ValueError) as exc:  # UnreadableFile is a ValueError
        raise UserError(f"{path}: cannot read the {what}: {reason(exc)}") from None


def read_json_object(path: Path, what: str, limit: int = MAX_STATE_BYTES) -> dict[str, Any]:
    """A JSON object from ``path`` (through ``read_input``); anything else is a one-line
    ``UserError``, so a list or a string never passes for an empty object."""
    raw = read_input(path, limit, what)
    try:
        data = json.loads(raw.decode("utf-8"))
    except (ValueError, RecursionError) as exc:
        raise UserError(f"{path}: the {what} is not JSON: {reason(exc)[:80]}") from None
    if not isinstance(data, dict):
        raise UserError(f"{path}: the {what} is a JSON {type(data).__name__}, not an object")
    return data


def folder_input(path: Path, what: str) -> Path:
    """A folder named by an argument or an environment variable (made later if missing):
    refused with one line when it names a file, a device, or holds a NUL."""
    shown = str(path)
    if "\0" in shown or not shown:
        raise UserError(f"{shown!r}: the {what} must be a folder path")
    try:
        info = path.stat()
    except FileNotFoundError:
        return path
    except OSError as exc:
        raise UserError(f"{path}: cannot use it as the {what}: {reason(exc)}") from None
    if not stat.S_ISDIR(info.st_mode):
        kind = _kind(info.st_mode) or "a file"
        raise UserError(f"{path}: the {what} must be a folder, but it is {kind}")
    return path


# --- writing into a folder someone else may have tampered with ---------------------------


def own_folder(folder: Path, what: str, *, create: bool = True) -> Path:
    """``folder`` (made when missing and ``create``) once it is a real folder, not a
    symbolic link, and holds no symbolic link, FIFO or device at its top or in
    ``logs/``: a tampered build folder would make meshbake write (or block) wherever
    those point."""
    try:
        if not create and not os.path.lexists(folder):
            return folder
        if not folder.is_symlink():
            folder.mkdir(parents=True, exist_ok=True)
        if folder.is_symlink() or not folder.is_dir():
            raise UserError(f"{folder}: the {what} is not a folder of its own (a link?)")
        entries = list(folder.iterdir())
        logs = folder / "logs"
        if logs.is_dir() and not logs.is_symlink():
            entries += list(logs.iterdir())
        for entry in entries:
            mode = entry.lstat().st_mode
            if stat.S_ISLNK(mode):
                raise UserError(
                    f"{entry}: is a symbolic link in the {what}, which holds none; remove it"
                )
            if not (stat.S_ISREG(mode) or stat.S_ISDIR(mode)):
                raise UserError(f"{entry}: is {_kind(mode)} in the {what}; remove it")
    except OSError as exc:
        raise UserError(f"{folder}: cannot use the {what}: {reason(exc)}") from None
    return folder


def write_output(path: Path, data: bytes | str, mode: int = 0o644) -> None:
    """Write ``path`` without following a link at it or blocking on a FIFO there; its
    folder must be one ``own_folder`` checked (or one meshbake made). One-line errors."""
    if isinstance(data, str):
        data = data.encode("utf-8")
    flags = os.O_WRONLY | os.O_CREAT | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
    try:
        if path.parent.is_symlink():
            raise UserError(f"{path.parent}: is a symbolic link; refusing to write into it")
        fd = os.open(path, flags, mode)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise UserError(f"{path}: is a symbolic link; refusing to write through it") from None
        raise UserError(f"{path}: cannot write it: {reason(exc)}") from None
    try:
        kind = _kind(os.fstat(fd).st_mode)
        if kind is not None:
            raise UserError(f"{path}: is {kind}, not a regular file; refusing to write it")
        os.ftruncate(fd, 0)
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
    except OSError as exc:
        raise UserError(f"{path}: cannot write it: {reason(exc)}") from None
    finally:
        os.close(fd)


#: An AWS region name (``us-east-1``, ``us-gov-west-1``); the spec model uses it too.
AWS_REGION = r"^[a-z]{2}(-gov)?-[a-z]+-\d$"


def aws_region(value: str, where: str = "--region") -> str:
    """``value`` when it is an AWS region name, else a one-line ``UserError``."""
    if not re.match(AWS_REGION, value):
        raise UserError(f"{where} {value!r}: not an AWS region like us-east-1")
    return value


#: One DNS label (RFC 1123 2.1): letters, digits and inner hyphens, at most 63.
_DNS_LABEL = r"[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
_DNS_NAME = re.compile(rf"^({_DNS_LABEL}\.)*{_DNS_LABEL}$")
#: RFC 1035 2.3.4: 255 octets on the wire, so 253 characters written.
MAX_DNS_NAME = 253


def join_address(value: str, where: str = "--join") -> str:
    """``value`` when it is an IPv4 or IPv6 address or a DNS name for Consul's
    ``retry_join``; else a one-line ``UserError`` naming ``where``.

    An address comes back in its canonical form. No port, no zone id, no brackets and no
    cloud auto-join (``provider=...``): the grammar is the one ``meshbake-firstboot``
    applies again in the image (``join_address()`` there), and nothing in it needs
    escaping in JSON, YAML or the carrier.

    >>> join_address("198.18.0.1"), join_address("2001:DB8::1"), join_address("consul.example")
    ('198.18.0.1', '2001:db8::1', 'consul.example')
    """
    shown = f"{where} {value[:100]!r}"
    problem = printable_problem(value)
    if problem is not None:
        raise UserError(f"{shown}: {problem}")
    if ":" in value:
        try:
            if "%" in value or "." in value.rpartition(":")[2]:
                raise ValueError  # a zone id, or an IPv4 tail (::ffff:1.2.3.4)
            return str(ipaddress.IPv6Address(value))
        except ValueError:
            raise UserError(
                f"{shown}: not an IPv6 address (give the address alone: no port, brackets"
                " or zone id)"
            ) from None
    labels = value.split(".")
    if labels[-1].isdigit():
        try:
            return str(ipaddress.IPv4Address(value))
        except ValueError:
            raise UserError(f"{shown}: not an IPv4 address such as 198.18.0.1") from None
    if len(value) > MAX_DNS_NAME or not _DNS_NAME.match(value):
        raise UserError(
            f"{shown}: not an IP address or a DNS name (letters, digits, '-' and '.',"
            f" at most {MAX_DNS_NAME} characters; no port or provider=)"
        )
    return value


def _kind(mode: int) -> str | None:
    if stat.S_ISREG(mode):
        return None
    return _KINDS.get(stat.S_IFMT(mode), "not a regular file")


# --- YAML ------------------------------------------------------------------------------


class StrictLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` that refuses aliases (no alias bombs), merge keys and
    duplicate keys."""

    def compose_node(self, parent: Any, index: Any) -> Any:
        if self.check_event(yaml.AliasEvent):
            event = self.peek_event()  # type: ignore[no-untyped-call]
            raise yaml.composer.ComposerError(
                None, None, "aliases (*name) are not allowed in a spec", event.start_mark
            )
        return super().compose_node(parent, index)

    def construct_mapping(self, node: Any, deep: bool = False) -> dict[Any, Any]:
        seen: set[Any] = set()
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                # A merge brings keys in beside the written ones, where a duplicate is
                # silently dropped: a spec spells out every key instead.
                raise yaml.constructor.ConstructorError(
                    None, None, "merge keys (<<) are not allowed in a spec", key_node.start_mark
                )
            key = self.construct_object(key_node, deep=True)
            try:
                duplicate = key in seen
                seen.add(key)
            except TypeError:  # an unhashable key: the constructor says so below
                continue
            if duplicate:
                raise yaml.constructor.ConstructorError(
                    None, None, f"duplicate key {key!r}", key_node.start_mark
                )
        return super().construct_mapping(node, deep=deep)


def load_yaml(text: str) -> Any:
    """Parse one YAML document with ``StrictLoader``."""
    return yaml.load(text, Loader=StrictLoader)  # noqa: S506 - a SafeLoader subclass
