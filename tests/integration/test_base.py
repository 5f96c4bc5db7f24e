"""The Debian base image: a real build (as root), the cache, the errors, and a boot.

The build takes about 90 s and happens once per session (tests/conftest.py builds the
session's one base, which the e2e bakes use too); the boot under TCG adds about 80 s.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from builder.bake import base
from builder.bake.base import BASE_PACKAGES, BaseImage, base_key, build_base
from builder.errors import MeshbakeError, ToolNotFound, UserError
from builder.proc import run

needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="building a base image needs root")

# Generous: TCG takes about 75 s to cloud-init's end here. Not a pass/fail threshold on
# speed, only a bound so a hung guest fails the test instead of hanging it.
BOOT_TIMEOUT_S = 480

_ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")
_FINISHED = re.compile(r"Cloud-init v\. \S+ finished at .*Datasource (\S+)")
_SMOKE = re.compile(r"meshbake-smoke: (.*)")
# Ends the wait early: the guest will not get any further.
_STUCK = re.compile(r"grub rescue>|Kernel panic|end Kernel panic")

# What the guest reports about itself, on the serial console, from runcmd.
_USER_DATA = """\
#cloud-config
runcmd:
  - - sh
    - -c
    - >-
      echo "meshbake-smoke:
      services=$(systemctl is-active systemd-networkd systemd-resolved ssh | paste -sd, -)
      machine-id=$(wc -c < /etc/machine-id)
      root=$(findmnt -no OPTIONS / | cut -d, -f1)
      resolv=$(readlink /etc/resolv.conf)
      hostkey=$(test -s /etc/ssh/ssh_host_ed25519_key && echo yes || echo no)"
      > /dev/ttyS0
"""


# The build is the session's one base image (tests/conftest.py), shared with the e2e
# layer; these names keep this module's view of it.


@pytest.fixture(scope="module")
def cache_dir(base_cache: Path) -> Path:
    return base_cache


@pytest.fixture(scope="module")
def both_builds(base_builds: list[BaseImage]) -> list[BaseImage]:
    """Two builds of the same key started together (see ``base_builds``)."""
    return base_builds


@pytest.fixture(scope="module")
def built(session_base: BaseImage) -> BaseImage:
    return session_base


# --- pure: no build ---------------------------------------------------------------


def test_key_is_a_sha256_and_ignores_package_order() -> None:
    key = base_key()
    assert re.fullmatch(r"[0-9a-f]{64}", key)
    assert base_key(packages=tuple(reversed(BASE_PACKAGES))) == key


def test_key_changes_with_packages_and_suite() -> None:
    key = base_key()
    assert base_key(packages=(*BASE_PACKAGES, "curl")) != key
    assert base_key(packages=BASE_PACKAGES[1:]) != key
    assert base_key(suite="trixie") != key


def test_key_changes_with_recipe_version(monkeypatch: pytest.MonkeyPatch) -> None:
    key = base_key()
    monkeypatch.setattr(base, "RECIPE_VERSION", base.RECIPE_VERSION + 1)
    assert base_key() != key


def test_default_cache_dir(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("MESHBAKE_CACHE", str(tmp_path))
    assert base.default_cache_dir() == tmp_path
    monkeypatch.delenv("MESHBAKE_CACHE")
    monkeypatch.setattr(os, "geteuid", lambda: 0)
    assert base.default_cache_dir() == Path("/var/cache/meshbake")
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    monkeypatch.setenv("HOME", str(tmp_path))
    assert base.default_cache_dir() == tmp_path / ".cache" / "meshbake"


def test_not_root_is_a_user_error(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    with pytest.raises(UserError, match="needs root") as caught:
        build_base(tmp_path)
    assert "\n" not in str(caught.value)
    assert list(tmp_path.iterdir()) == []


def test_missing_tool_names_the_debian_package(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setattr(os, "geteuid", lambda: 0)
    empty = tmp_path / "empty-bin"
    empty.mkdir()
    monkeypatch.setenv("PATH", str(empty))
    with pytest.raises(ToolNotFound, match=r"mmdebstrap not found: install it with 'apt-get"):
        build_base(tmp_path / "cache")
    assert not (tmp_path / "cache").exists()


@pytest.mark.parametrize(
    ("suite", "packages", "disk_size_gib", "message"),
    [
        ("Bookworm; rm", BASE_PACKAGES, 4, "not a Debian suite name"),
        ("bookworm", ("systemd", "bad,name"), 4, "not Debian package names"),
        ("bookworm", (), 4, "package list is empty"),
        ("bookworm", BASE_PACKAGES, 1, "disk size"),
    ],
)
def test_bad_inputs_are_user_errors(
    tmp_path: Path, suite: str, packages: tuple[str, ...], disk_size_gib: int, message: str
) -> None:
    with pytest.raises(UserError, match=message):
        build_base(tmp_path, suite=suite, packages=packages, disk_size_gib=disk_size_gib)


def test_dirty_root_file_system_is_refused(tmp_path: Path) -> None:
    raw = tmp_path / "disk.raw"
    superblock = bytearray(1024)
    superblock[0x38:0x3A] = (0xEF53).to_bytes(2, "little")
    raw.write_bytes(bytes(4096 + 1024) + superblock)
    base._check_clean_ext4(raw, 4096)  # clean: no error
    superblock[0x60:0x64] = (0x0004 | 0x0002).to_bytes(4, "little")  # recover + filetype
    raw.write_bytes(bytes(4096 + 1024) + superblock)
    with pytest.raises(MeshbakeError, match="not cleanly unmounted"):
        base._check_clean_ext4(raw, 4096)


# --- real tools, as root ----------------------------------------------------------


@pytest.mark.integration
@pytest.mark.root
@needs_root
def test_no_free_loop_device_is_a_user_error_and_leaves_nothing(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    # A stand-in losetup that fails like the real one does when no device is free.
    fake_bin = tmp_path / "bin"
    fake_bin.mkdir()
    fake_losetup = fake_bin / "losetup"
    fake_losetup.write_text(
        "#!/bin/sh\necho 'losetup: cannot find an unused loop device' >&2\nexit 1\n"
    )
    fake_losetup.chmod(0o755)
    monkeypatch.setenv("PATH", f"{fake_bin}:{os.environ['PATH']}")
    cache = tmp_path / "cache"
    with pytest.raises(UserError, match="no free loop device") as caught:
        build_base(cache, progress=lambda _: None)
    assert "\n" not in str(caught.value)
    # Only the lock file remains: no work dir, no partial image.
    assert [p.name for p in (cache / "base").iterdir()] == [f"debian-bookworm-{base_key()}-4g.lock"]


@pytest.mark.integration
@pytest.mark.root
@pytest.mark.image
def test_build_makes_a_qcow2_of_the_asked_size(built: BaseImage, cache_dir: Path) -> None:
    assert not built.reused
    assert built.key == base_key()
    assert built.path.is_file()
    assert built.path.parent == cache_dir / "base"
    info = json.loads(run(["qemu-img", "info", "--output=json", built.path]).stdout)
    assert info["format"] == "qcow2"
    assert info["virtual-size"] == 4 * 1024**3
    assert "backing-filename" not in info
    assert run(["sha256sum", built.path]).stdout.split()[0] == built.sha256


@pytest.mark.integration
@pytest.mark.root
@pytest.mark.image
def test_build_leaves_no_work_dir_mount_or_loop_device(built: BaseImage, cache_dir: Path) -> None:
    base_dir = cache_dir / "base"
    assert sorted(p.name for p in base_dir.iterdir()) == sorted(
        [built.path.name, built.path.with_suffix(".lock").name]
    )
    assert os.fspath(cache_dir) not in Path("/proc/self/mountinfo").read_text()
    assert os.fspath(cache_dir) not in run(["losetup", "--list", "--output", "BACK-FILE"]).stdout


@pytest.mark.integration
@pytest.mark.root
@pytest.mark.image
def test_concurrent_builds_of_one_key_build_once(both_builds: list[BaseImage]) -> None:
    assert sorted(image.reused for image in both_builds) == [False, True]
    first, second = both_builds
    assert (first.path, first.key, first.sha256) == (second.path, second.key, second.sha256)


@pytest.mark.integration
@pytest.mark.root
@pytest.mark.image
def test_second_build_is_reused(built: BaseImage, cache_dir: Path) -> None:
    messages: list[str] = []
    again = build_base(cache_dir, progress=messages.append)
    assert again.reused
    assert (again.path, again.key, again.sha256) == (built.path, built.key, built.sha256)
    assert messages == []


@pytest.mark.integration
@pytest.mark.root
@pytest.mark.image
def test_base_boots_and_cloud_init_finishes(built: BaseImage, tmp_path: Path) -> None:
    overlay = tmp_path / "overlay.qcow2"
    run(["qemu-img", "create", "-q", "-f", "qcow2", "-F", "qcow2", "-b", built.path, overlay])
    seed_dir = tmp_path / "seed"
    seed_dir.mkdir()
    (seed_dir / "user-data").write_text(_USER_DATA)
    (seed_dir / "meta-data").write_text("instance-id: base-smoke-1\nlocal-hostname: smoke\n")
    seed = tmp_path / "seed.iso"
    run(
        [
            "genisoimage", "-quiet", "-output", seed, "-volid", "cidata", "-joliet", "-rock",
            seed_dir / "user-data", seed_dir / "meta-data",
        ]
    )  # fmt: skip
    serial = tmp_path / "serial.log"

    started = time.monotonic()
    with _running_qemu(overlay, seed, serial, tmp_path / "qemu.out") as qemu:
        finished = None
        while time.monotonic() - started < BOOT_TIMEOUT_S:
            log = _serial_text(serial)
            finished = _FINISHED.search(log)
            if finished or _STUCK.search(log) or qemu.poll() is not None:
                break
            time.sleep(2)
        boot_seconds = time.monotonic() - started
        log = _serial_text(serial)

    tail = "\n".join(log.splitlines()[-40:])
    assert "Linux version" in log, f"the kernel never started:\n{tail}"
    assert finished is not None, f"cloud-init did not finish in {BOOT_TIMEOUT_S} s:\n{tail}"
    print(f"base boot: cloud-init finished after {boot_seconds:.0f} s")
    assert finished.group(1) == "DataSourceNoCloud"
    assert "Started ssh.service" in log, "sshd did not start without baked host keys"
    # The initramfs carries fsck, and the root it checks was left clean by the build.
    assert "fsck not present" not in log
    assert re.search(r"^root: clean, ", log, re.MULTILINE), f"no root file system check:\n{tail}"
    failures = [line for line in log.splitlines() if re.search(r"Running module .* failed", line)]
    assert failures == []

    smoke = _SMOKE.search(log)
    assert smoke is not None, f"the runcmd from the NoCloud user data did not run:\n{tail}"
    facts = dict(item.split("=", 1) for item in smoke.group(1).split())
    assert facts == {
        "services": "active,active,active",
        "machine-id": "33",  # 32 hex digits and a newline, made at first boot
        "root": "rw",
        "resolv": "../run/systemd/resolve/stub-resolv.conf",
        "hostkey": "yes",
    }


@contextlib.contextmanager
def _running_qemu(
    overlay: Path, seed: Path, serial: Path, output: Path
) -> Iterator[subprocess.Popen[bytes]]:
    """Start qemu on ``overlay`` with the seed ISO; always kill it by its PID on exit."""
    argv = [
        "qemu-system-x86_64", "-accel", "tcg", "-cpu", "max", "-m", "1024", "-smp", "2",
        "-nographic", "-monitor", "none", "-no-reboot",
        "-serial", f"file:{serial}",
        "-drive", f"file={overlay},if=virtio,format=qcow2",
        "-drive", f"file={seed},if=virtio,format=raw,readonly=on",
        "-netdev", "user,id=n0", "-device", "virtio-net-pci,netdev=n0",
    ]  # fmt: skip
    with output.open("wb") as out:
        process = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=out, stderr=out)
    try:
        yield process
    finally:
        if process.poll() is None:
            process.kill()
        process.wait(timeout=30)


def _serial_text(serial: Path) -> str:
    if not serial.exists():
        return ""
    return _ANSI.sub("", serial.read_bytes().decode(errors="replace"))
