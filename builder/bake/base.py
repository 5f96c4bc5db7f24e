"""Build the Debian base qcow2 that the qemu target bakes on top of.

The base is made from Debian packages only: ``mmdebstrap`` fills an ext4 file system on
an offset loop device, grub is installed by hand (loop partition devices do not work on
the build machines), and ``qemu-img`` compresses the result. Images are cached under a
content key, so a second build with the same inputs is a no-op.

One recipe serves both architectures. amd64 boots BIOS-style: an MBR, grub-pc's boot
code written by hand. arm64 boots UEFI (qemu's ``virt`` machine has no BIOS): a GPT
with an EFI system partition that carries grub as the removable-media binary
``EFI/BOOT/BOOTAA64.EFI``. On an x86 host the arm64 root is made through qemu-user
(binfmt), several times slower than a native one.

>>> image = build_base()  # doctest: +SKIP
>>> image.reused, image.path.suffix  # doctest: +SKIP
(False, '.qcow2')
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import re
import shutil
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from builder import __version__
from builder.digest import sha256_file
from builder.errors import CommandError, MeshbakeError, UserError
from builder.proc import run, shielded, which
from builder.progress import Progress, to_stderr
from builder.render import paths
from builder.render.cloudconfig import cloud_cfg_dropin
from builder.spec import boundary
from builder.spec.model import Arch
from builder.tools.qemu import host_arch, machine_for

#: Bump when the recipe below changes in a way that changes the image, so cached
#: bases built by an older recipe are not reused.
RECIPE_VERSION = 2

#: What goes into the base. Recommends stay off (mmdebstrap's default).
BASE_PACKAGES: tuple[str, ...] = (
    "linux-image-cloud-amd64",
    "systemd",
    "systemd-sysv",
    "systemd-resolved",
    "udev",
    "dbus",
    "cloud-init",
    # growpart, so cloud-init can grow the root partition when a bake asks for a
    # bigger disk than the base has.
    "cloud-guest-utils",
    "openssh-server",
    "iptables",
    "sudo",
    "grub-pc",
    "ca-certificates",
    "python3",
)

#: The kernel and boot loader each architecture's base carries in place of amd64's.
_BOOT_PACKAGES: dict[Arch, tuple[str, str]] = {
    Arch.AMD64: ("linux-image-cloud-amd64", "grub-pc"),
    Arch.ARM64: ("linux-image-cloud-arm64", "grub-efi-arm64"),
}


def base_packages(arch: Arch = Arch.AMD64) -> tuple[str, ...]:
    """The packages of ``arch``'s base: ``BASE_PACKAGES`` with that arch's kernel and grub.

    >>> [p for p in base_packages(Arch.ARM64) if p not in BASE_PACKAGES]
    ['linux-image-cloud-arm64', 'grub-efi-arm64']
    >>> base_packages(Arch.AMD64) == BASE_PACKAGES
    True
    """
    if arch is Arch.AMD64:
        return BASE_PACKAGES
    common = tuple(p for p in BASE_PACKAGES if p not in _BOOT_PACKAGES[Arch.AMD64])
    return (*_BOOT_PACKAGES[arch], *common)


#: Host tools the recipe calls. grub-mkimage is not here: it runs inside the new
#: root, so core.img always matches the grub modules the image carries.
_HOST_TOOLS = (
    "mmdebstrap",
    "sfdisk",
    "losetup",
    "mkfs.ext4",
    "mount",
    "umount",
    "unshare",
    "chroot",
    "systemctl",
    "fstrim",
    "qemu-img",
)
#: What an arm64 base needs besides: the EFI system partition is made and filled
#: without a loop device.
_EFI_HOST_TOOLS = ("mkfs.vfat", "mmd", "mcopy")

_SECTOR = 512
_PARTITION_START_SECTOR = 2048
_PARTITION_OFFSET = _PARTITION_START_SECTOR * _SECTOR  # 1 MiB
_MBR_BOOT_CODE_BYTES = 440  # boot.img stops before the disk signature and partition table
_GRUB_PREFIX = "(hd0,msdos1)/boot/grub"
_GRUB_MODULES = ("biosdisk", "part_msdos", "ext2", "search", "search_fs_uuid")
#: arm64: the EFI system partition comes first, the root second (both 1 MiB aligned).
_ESP_SECTORS = 64 * 1024 * 1024 // _SECTOR
_EFI_ROOT_START_SECTOR = _PARTITION_START_SECTOR + _ESP_SECTORS
#: Room left after the root for GPT's backup header (33 sectors), rounded to 1 MiB.
_GPT_TAIL_SECTORS = 2048
_EFI_GRUB_PREFIX = "(hd0,gpt2)/boot/grub"
_EFI_GRUB_MODULES = ("part_gpt", "ext2", "fat", "search", "search_fs_uuid")
#: Where the firmware looks when its boot variables name nothing (a fresh VM).
_REMOVABLE_EFI_BINARY = "EFI/BOOT/BOOTAA64.EFI"
#: The disk the guest sees (Packer's default virtio interface); grub-pc reinstalls
#: its boot code there when the package is upgraded inside the guest.
_GUEST_DISK = "/dev/vda"
#: Seconds (one try a second) to wait for the new file system to be let go.
_RELEASE_TRIES = 30
_EXT4_INCOMPAT_RECOVER = 0x0004

_SUITE_RE = re.compile(r"[a-z][a-z0-9.-]*")
_PACKAGE_RE = re.compile(r"[a-z0-9][a-z0-9+.-]+")

# Docs, man pages and translations are most of what a minimal root carries and
# nothing on a mesh node reads them. Kept as dpkg config in the image, so later
# installs during a bake stay small too.
_DPKG_EXCLUDES = (
    "path-exclude=/usr/share/man/*",
    "path-exclude=/usr/share/info/*",
    "path-exclude=/usr/share/doc/*",
    "path-include=/usr/share/doc/*/copyright",
    "path-exclude=/usr/share/locale/*",
    "path-include=/usr/share/locale/locale.alias",
    "path-exclude=/usr/share/lintian/*",
)

_NETWORK_DHCP = """\
# Written by meshbake. cloud-init's own file (10-cloud-init-*) wins when it writes one.
[Match]
Name=en* eth*

[Network]
DHCP=yes
"""

# sshd -t fails without host keys, so the key generation has to come first: the
# empty ExecStartPre= clears Debian's list before both are set again.
_SSH_DROPIN = """\
# Written by meshbake: the image ships without host keys; make any that are missing.
[Service]
ExecStartPre=
ExecStartPre=/usr/bin/ssh-keygen -A
ExecStartPre=/usr/sbin/sshd -t
"""

_GRUB_DEFAULTS = """\
# Written by meshbake: keep the serial console when update-grub runs in the guest.
GRUB_TIMEOUT=1
GRUB_TERMINAL="console serial"
GRUB_SERIAL_COMMAND="serial --unit=0 --speed=115200"
GRUB_CMDLINE_LINUX="console=tty0 console=ttyS0,115200n8"
"""

# Under UEFI grub's console is the firmware's, which qemu's virt machine puts on its
# PL011 UART; the kernel calls that ttyAMA0.
_EFI_GRUB_DEFAULTS = """\
# Written by meshbake: keep the serial console when update-grub runs in the guest.
GRUB_TIMEOUT=1
GRUB_TERMINAL=console
GRUB_CMDLINE_LINUX="console=tty0 console=ttyAMA0,115200n8"
"""


@dataclass(frozen=True)
class BaseImage:
    """A finished base image in the cache."""

    path: Path
    key: str
    sha256: str
    reused: bool


def base_key(
    suite: str = "bookworm",
    packages: Sequence[str] | None = None,
    arch: Arch = Arch.AMD64,
) -> str:
    """Return the content key of a base image: a hex sha256 of what goes into it.

    The package order does not matter; the meshbake and recipe versions and the
    architecture do (amd64's key is what it was before there were several).

    >>> base_key() == base_key(packages=tuple(reversed(BASE_PACKAGES)))
    True
    >>> base_key() == base_key(packages=(*BASE_PACKAGES, "curl"))
    False
    >>> base_key(arch=Arch.ARM64) == base_key(packages=base_packages(Arch.ARM64))
    False
    """
    if packages is None:
        packages = base_packages(arch)
    document: dict[str, object] = {
        "suite": suite,
        "packages": sorted(set(packages)),
        "meshbake": __version__,
        "recipe": RECIPE_VERSION,
    }
    if arch is not Arch.AMD64:
        document["arch"] = arch.value
    encoded = json.dumps(document, sort_keys=True, separators=(",", ":")).encode()
    return hashlib.sha256(encoded).hexdigest()


def default_cache_dir() -> Path:
    """Return where base images are cached.

    ``$MESHBAKE_CACHE`` when set, else ``/var/cache/meshbake`` for root, else
    ``~/.cache/meshbake``.

    >>> default_cache_dir()  # doctest: +SKIP
    PosixPath('/var/cache/meshbake')
    """
    configured = os.environ.get("MESHBAKE_CACHE")
    if configured:
        return boundary.folder_input(Path(configured), "cache folder ($MESHBAKE_CACHE)")
    if os.geteuid() == 0:
        return Path("/var/cache/meshbake")
    return Path.home() / ".cache" / "meshbake"


def cache_folder(given: Path | None) -> Path:
    """The cache folder: ``given`` (``--cache``) or the default, checked to be a folder."""
    if given is None:
        return default_cache_dir()
    return boundary.folder_input(given, "cache folder (--cache)")


def base_name(
    suite: str = "bookworm",
    packages: Sequence[str] | None = None,
    arch: Arch = Arch.AMD64,
    disk_size_gib: int = 4,
) -> str:
    """The cached base's file name without ``.qcow2``; other architectures than amd64
    carry their name.

    >>> base_name(arch=Arch.ARM64).startswith("debian-bookworm-arm64-")
    True
    """
    key = base_key(suite, packages, arch)
    label = suite if arch is Arch.AMD64 else f"{suite}-{arch.value}"
    return f"debian-{label}-{key}-{disk_size_gib}g"


def build_base(
    cache_dir: Path | None = None,
    *,
    suite: str = "bookworm",
    packages: Sequence[str] | None = None,
    arch: Arch = Arch.AMD64,
    disk_size_gib: int = 4,
    progress: Progress = to_stderr,
) -> BaseImage:
    """Build (or reuse from the cache) a bootable Debian base qcow2 and return it.

    Needs root for the loop device and the mounts. The image lands at
    ``<cache>/base/debian-<suite>[-<arch>]-<key>-<size>g.qcow2`` only when the build
    succeeded. ``packages`` defaults to ``base_packages(arch)``.

    >>> image = build_base(Path("/var/cache/meshbake"))  # doctest: +SKIP
    >>> build_base(Path("/var/cache/meshbake")).reused  # doctest: +SKIP
    True
    """
    if packages is None:
        packages = base_packages(arch)
    _check_inputs(suite, packages, disk_size_gib)
    key = base_key(suite, packages, arch)
    base_dir = cache_folder(cache_dir) / "base"
    name = base_name(suite, packages, arch, disk_size_gib)
    final = base_dir / f"{name}.qcow2"

    # Reuse needs neither root nor the build tools.
    if final.is_file():
        return BaseImage(final, key, sha256_file(final), reused=True)

    _check_host(arch)
    base_dir.mkdir(parents=True, exist_ok=True)
    with _locked(base_dir / f"{name}.lock", progress):
        # Another build of the same key may have finished while we waited.
        if final.is_file():
            return BaseImage(final, key, sha256_file(final), reused=True)
        _remove_stale_builds(base_dir, name, progress)
        work = Path(tempfile.mkdtemp(prefix=f".build-{name}-", dir=base_dir))
        try:
            qcow2 = _build(work, suite, packages, arch, disk_size_gib, progress)
            digest = sha256_file(qcow2)
            qcow2.replace(final)
        except CommandError as exc:
            # mmdebstrap with a mirror down, say: name the tool, the stage and the log.
            if exc.stage is None:
                exc.stage = "base"
                exc.write_log(base_dir / "logs" / f"{name}-{exc.tool}.log")
            raise
        finally:
            with shielded():  # an interrupt must not leave the loop device or the mount
                _remove_work_dir(work, progress)
    return BaseImage(final, key, digest, reused=False)


def _check_inputs(suite: str, packages: Sequence[str], disk_size_gib: int) -> None:
    if not _SUITE_RE.fullmatch(suite):
        raise UserError(f"base image: {suite!r} is not a Debian suite name")
    bad = [p for p in packages if not _PACKAGE_RE.fullmatch(p)]
    if bad:
        raise UserError(f"base image: not Debian package names: {', '.join(map(repr, bad))}")
    if not packages:
        raise UserError("base image: the package list is empty")
    # An MBR partition table cannot address more than 2 TiB.
    if not 2 <= disk_size_gib <= 2047:
        raise UserError(f"base image: disk size must be 2 to 2047 GiB, not {disk_size_gib}")


def _check_host(arch: Arch) -> None:
    if os.geteuid() != 0:
        raise UserError(
            "building the base image needs root (loop devices and mounts): run meshbake as root"
        )
    for tool in _HOST_TOOLS:
        which(tool)
    if machine_for(arch).firmware is not None:
        for tool in _EFI_HOST_TOOLS:
            which(tool)
    _check_foreign_exec(arch)
    if not Path("/dev/loop-control").exists():
        raise UserError(
            "building the base image needs loop devices, but /dev/loop-control is missing"
            " (load the loop module: modprobe loop)"
        )


def _check_foreign_exec(arch: Arch) -> None:
    """The new root's programs (its maintainer scripts, grub-mkimage) must run here:
    natively, or through qemu-user registered with binfmt_misc."""
    if host_arch() is arch:
        return
    # qemu-user-static registers each architecture as qemu-<uname -m>.
    entry = Path("/proc/sys/fs/binfmt_misc") / f"qemu-{machine_for(arch).uname}"
    try:
        enabled = entry.read_text().splitlines()[:1] == ["enabled"]
    except OSError:
        enabled = False
    if not enabled:
        raise UserError(
            f"building the {arch.value} base image needs qemu-user through binfmt_misc, but"
            f" {entry} is not enabled: install it with 'apt-get install qemu-user-static"
            " binfmt-support', then (without systemd) 'mount -t binfmt_misc binfmt_misc"
            f" /proc/sys/fs/binfmt_misc' and 'update-binfmts --enable {entry.name}'"
        )


@contextlib.contextmanager
def _locked(lock_path: Path, progress: Callable[[str], None]) -> Iterator[None]:
    with lock_path.open("a") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            progress("base: waiting for another build of the same image")
            fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


@dataclass(frozen=True)
class _Disk:
    """Where the partitions of a base image's raw disk lie, in bytes."""

    root_offset: int
    root_size: int
    #: The EFI system partition (arm64): offset and size; None on a BIOS disk.
    esp: tuple[int, int] | None


def _partition(raw: Path, size: int, arch: Arch) -> _Disk:
    """Write the partition table: MBR with one root for amd64 (as ever), GPT with an
    EFI system partition and then the root for arm64."""
    if arch is Arch.AMD64:
        run(
            ["sfdisk", "--quiet", "--no-reread", "--no-tell-kernel", raw],
            input=f"label: dos\nstart={_PARTITION_START_SECTOR}, type=83, bootable\n",
        )
        return _Disk(_PARTITION_OFFSET, size - _PARTITION_OFFSET, None)
    root_sectors = size // _SECTOR - _EFI_ROOT_START_SECTOR - _GPT_TAIL_SECTORS
    run(
        ["sfdisk", "--quiet", "--no-reread", "--no-tell-kernel", raw],
        input=(
            "label: gpt\n"
            f"start={_PARTITION_START_SECTOR}, size={_ESP_SECTORS}, type=U, name=esp\n"
            f"start={_EFI_ROOT_START_SECTOR}, size={root_sectors}, type=L, name=root\n"
        ),
    )
    return _Disk(
        _EFI_ROOT_START_SECTOR * _SECTOR,
        root_sectors * _SECTOR,
        (_PARTITION_OFFSET, _ESP_SECTORS * _SECTOR),
    )


def _mmdebstrap_note(arch: Arch) -> str:
    """How long mmdebstrap takes, as measured on the 2-core build machine."""
    if host_arch() is arch:
        return "(about 70 s)"
    # Measured on the 2-core build machine: mmdebstrap alone 9 min 9 s; the whole arm64
    # base 629 s beside two running VMs (bench/results-arm64.json).
    return "through qemu-user (about 9 min here; amd64 takes about 70 s)"


def _build(
    work: Path,
    suite: str,
    packages: Sequence[str],
    arch: Arch,
    disk_size_gib: int,
    progress: Callable[[str], None],
) -> Path:
    raw = work / "disk.raw"
    root = work / "root"
    root.mkdir()
    size = disk_size_gib * 1024**3
    with raw.open("wb") as handle:
        handle.truncate(size)  # sparse
    disk = _partition(raw, size, arch)
    root_uuid = str(uuid.uuid4())
    # FAT's volume serial, which fstab names the EFI system partition by (XXXX-XXXX).
    esp_serial = uuid.uuid4().hex[:8].upper()

    loop: str | None = None
    mounted = False
    try:
        loop = _attach_loop(raw, disk.root_offset, disk.root_size)
        # Features newer than the guest's grub 2.06 and e2fsprogs are turned off, in
        # case the host's mke2fs defaults are newer than the guest's.
        run(
            [
                "mkfs.ext4", "-q", "-F", "-U", root_uuid, "-L", "root",
                "-O", "^metadata_csum_seed,^orphan_file", loop,
            ]
        )  # fmt: skip
        run(["mount", loop, root])
        mounted = True

        progress(f"base: mmdebstrap {suite} {arch.value} {_mmdebstrap_note(arch)}")
        esp_fstab = None if disk.esp is None else f"{esp_serial[:4]}-{esp_serial[4:]}"
        preinstall = _stage_preinstall(work / "preinstall", root_uuid, esp_fstab)
        _mmdebstrap(root, suite, packages, preinstall, arch)
        progress("base: configuring")
        _configure(root, arch)
        progress("base: installing grub")
        if disk.esp is None:
            core = _install_grub(root, root_uuid)
        else:
            efi_binary = _install_grub_efi(root, root_uuid)
        # Blocks freed by the build (downloaded .debs, apt lists) would otherwise end
        # up in the qcow2; trimming a loop device punches holes in its backing file.
        run(["fstrim", root])
        _unmount(root)
        mounted = False
        _detach(loop, raw)
        loop = None
    finally:
        # Only reached with work left when something failed: clean up, best effort.
        with shielded():
            if mounted:
                run(["umount", "--recursive", "--lazy", root], check=False)
            if loop is not None:
                run(["losetup", "--detach", loop], check=False)
    _check_clean_ext4(raw, disk.root_offset)

    if disk.esp is None:
        _write_boot_code(raw, root_boot_img=work / "boot.img", core_img=core)
    else:
        _write_esp(raw, disk.esp, esp_serial, efi_binary)
    progress("base: compressing")
    qcow2 = work / "disk.qcow2"
    run(["qemu-img", "convert", "-q", "-f", "raw", "-O", "qcow2", "-c", raw, qcow2])
    raw.unlink()
    with qcow2.open("rb") as handle:
        os.fsync(handle.fileno())
    return qcow2


def _attach_loop(raw: Path, offset: int, size_limit: int) -> str:
    try:
        result = run(
            [
                "losetup", "--find", "--show",
                "--offset", str(offset), "--sizelimit", str(size_limit), raw,
            ]
        )  # fmt: skip
    except CommandError as exc:
        reason = exc.stderr.strip().splitlines()[-1] if exc.stderr.strip() else "no reason given"
        raise UserError(f"base image: no free loop device ({reason})") from exc
    return result.stdout.strip()


def _stage_preinstall(tree: Path, root_uuid: str, esp: str | None = None) -> Path:
    """Files the root needs before the kernel package builds the initramfs.

    ``esp``: the EFI system partition's FAT serial (``XXXX-XXXX``) on a UEFI disk, so
    a grub upgrade in the guest finds ``/boot/efi`` mounted."""
    etc = tree / "etc"
    conf_d = etc / "initramfs-tools" / "conf.d"
    conf_d.mkdir(mode=0o755, parents=True)
    for directory in (tree, etc, etc / "initramfs-tools", conf_d):
        directory.chmod(0o755)
    fstab = f"UUID={root_uuid} / ext4 rw,errors=remount-ro 0 1\n"
    if esp is not None:
        fstab += f"UUID={esp} /boot/efi vfat umask=0077,nofail 0 2\n"
    (etc / "fstab").write_text(fstab)
    # Inside the build the root device cannot be probed, so the fsck hook would
    # leave fsck out of the initramfs without being told the type.
    (conf_d / "meshbake-fstype.conf").write_text("# Written by meshbake.\nFSTYPE=ext4\n")
    return tree


def _mmdebstrap(
    root: Path, suite: str, packages: Sequence[str], preinstall: Path, arch: Arch
) -> None:
    # mmdebstrap mounts /proc, /sys and /dev under the target. In a private mount
    # namespace those mounts die with it, even when it is killed halfway through, and
    # unmounting them can never propagate back to the host. The pid namespace takes
    # down any daemon a maintainer script leaves behind, which would otherwise keep
    # that namespace, and with it the new file system, alive.
    argv: list[str | Path] = [
        "unshare", "--mount", "--propagation", "private",
        "--pid", "--fork", "--kill-child", "--mount-proc", "--",
        "mmdebstrap", "--quiet", "--mode=root", "--variant=apt",
        f"--include={','.join(sorted(set(packages)))}",
    ]  # fmt: skip
    if host_arch() is not arch:
        # A foreign root runs its maintainer scripts through qemu-user (binfmt).
        argv.append(f"--architectures={arch.value}")
    argv += [f"--dpkgopt={option}" for option in _DPKG_EXCLUDES]
    # The staged files go in before the kernel is installed (see _stage_preinstall).
    # The path travels in the environment, so the hook stays static shell text.
    argv += ['--essential-hook=cp -a "$MESHBAKE_PREINSTALL/." "$1/"']
    # No mirror argument: mmdebstrap's default Debian mirror, plus the updates and
    # security suites it adds for a stable release.
    argv += [suite, root]
    env = {"DEBIAN_FRONTEND": "noninteractive", "MESHBAKE_PREINSTALL": os.fspath(preinstall)}
    run(argv, env=env)


def _configure(root: Path, arch: Arch = Arch.AMD64) -> None:
    etc = root / "etc"
    # mmdebstrap copies the host's hostname and resolv.conf; neither belongs in an image.
    (etc / "hostname").write_text("localhost\n")
    (etc / "hosts").write_text("127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost ip6-loopback\n")
    resolv = etc / "resolv.conf"
    resolv.unlink(missing_ok=True)
    resolv.symlink_to("../run/systemd/resolve/stub-resolv.conf")
    # Empty, so systemd makes a new id on the first boot of every copy.
    (etc / "machine-id").write_text("")

    dropin = root / paths.rel(paths.BASE_CLOUD_CFG_DROPIN)
    dropin.write_bytes(cloud_cfg_dropin(paths.BASE_CLOUD_CFG_DROPIN))
    (etc / "systemd" / "network" / "90-meshbake-dhcp.network").write_text(_NETWORK_DHCP)
    ssh_dropin = etc / "systemd" / "system" / "ssh.service.d"
    ssh_dropin.mkdir(parents=True, exist_ok=True)
    (ssh_dropin / "meshbake-hostkeys.conf").write_text(_SSH_DROPIN)
    for key in (etc / "ssh").glob("ssh_host_*"):
        key.unlink()

    grub_defaults = etc / "default" / "grub.d"
    grub_defaults.mkdir(parents=True, exist_ok=True)
    if arch is Arch.AMD64:
        (grub_defaults / "50-meshbake.cfg").write_text(_GRUB_DEFAULTS)
        # grub-pc reinstalls its boot code on upgrade only where these point.
        selections = (
            f"grub-pc grub-pc/install_devices multiselect {_GUEST_DISK}\n"
            "grub-pc grub-pc/install_devices_empty boolean false\n"
        )
    else:
        (grub_defaults / "50-meshbake.cfg").write_text(_EFI_GRUB_DEFAULTS)
        (root / "boot" / "efi").mkdir(parents=True, exist_ok=True)
        # An upgrade in the guest reinstalls grub as the removable binary the firmware
        # boots, and leaves the VM's boot variables alone.
        package = _BOOT_PACKAGES[arch][1]
        selections = (
            f"{package} grub2/force_efi_extra_removable boolean true\n"
            f"{package} grub2/update_nvram boolean false\n"
        )
    run(["chroot", root, "debconf-set-selections"], input=selections)
    run(["chroot", root, "passwd", "--lock", "root"])
    run(
        [
            "systemctl", f"--root={root}", "enable",
            "systemd-networkd.service", "systemd-resolved.service", "ssh.service",
        ]
    )  # fmt: skip


def _make_grub_image(
    root: Path, platform: str, image: str, prefix: str, modules: Sequence[str]
) -> Path:
    """Copy grub's ``platform`` modules into ``/boot/grub/<platform>`` (the core image
    loads normal.mod, linux.mod and the rest from the prefix at boot), then make the
    core image there with the root's own grub-mkimage; return its path."""
    modules_src = root / "usr" / "lib" / "grub" / platform
    grub_dir = root / "boot" / "grub"
    modules_dst = grub_dir / platform
    grub_dir.mkdir(parents=True, exist_ok=True)
    if modules_dst.exists():
        shutil.rmtree(modules_dst)
    shutil.copytree(
        modules_src,
        modules_dst,
        ignore=shutil.ignore_patterns("*.image", "*.exec", "*.img", "*.efi"),
    )
    inside = f"/boot/grub/{platform}/{image}"
    run(["chroot", root, "grub-mkimage", "-O", platform, "-o", inside, "-p", prefix, *modules])
    return modules_dst / image


def _install_grub(root: Path, root_uuid: str) -> Path:
    made = _make_grub_image(root, "i386-pc", "core.img", _GRUB_PREFIX, _GRUB_MODULES)
    (root / "boot" / "grub" / "grub.cfg").write_text(_grub_cfg(root_uuid))
    # Both images leave the root before it is unmounted; they go into the raw disk.
    boot_img = root / "usr" / "lib" / "grub" / "i386-pc" / "boot.img"
    shutil.copyfile(boot_img, root.parent / "boot.img")
    core = root.parent / "core.img"
    shutil.copyfile(made, core)
    return core


def _install_grub_efi(root: Path, root_uuid: str) -> Path:
    """grub as an EFI binary, made inside the new root (through qemu-user on another
    architecture) so it matches the modules it loads from ``/boot/grub`` at boot."""
    made = _make_grub_image(root, "arm64-efi", "core.efi", _EFI_GRUB_PREFIX, _EFI_GRUB_MODULES)
    (root / "boot" / "grub" / "grub.cfg").write_text(_grub_cfg(root_uuid, efi=True))
    # The binary leaves the root before it is unmounted; it goes onto the ESP.
    binary = root.parent / "BOOTAA64.EFI"
    shutil.copyfile(made, binary)
    return binary


def _write_esp(raw: Path, esp: tuple[int, int], serial: str, efi_binary: Path) -> None:
    """Make the FAT EFI system partition inside the raw disk and put grub on it, through
    mtools at a byte offset (loop partition devices do not work here)."""
    offset, size = esp
    # One sector per cluster: FAT32 needs at least 65525 clusters, which 64 MiB only
    # gives with 512-byte clusters (mkfs.fat's own choice leaves mtools unable to read it).
    run(
        [
            "mkfs.vfat", "-F", "32", "-s", "1", "-n", "EFI", "-i", serial,
            "--offset", str(offset // _SECTOR), raw, str(size // 1024),
        ]
    )  # fmt: skip
    image = f"{os.fspath(raw)}@@{offset}"
    run(["mmd", "-i", image, "::/EFI", "::/EFI/BOOT"])
    run(["mcopy", "-i", image, efi_binary, f"::/{_REMOVABLE_EFI_BINARY}"])


def _grub_cfg(root_uuid: str, *, efi: bool = False) -> str:
    # BIOS: grub drives the serial port itself. UEFI: the firmware's console already
    # is the virt board's PL011 (ttyAMA0 to the kernel).
    terminal = (
        "terminal_input console\nterminal_output console\n"
        if efi
        else "serial --unit=0 --speed=115200\n"
        "terminal_input serial console\nterminal_output serial console\n"
    )
    console = "ttyAMA0" if efi else "ttyS0"
    return f"""\
# Written by meshbake. update-grub in the guest replaces it, keeping the serial
# console from /etc/default/grub.d/50-meshbake.cfg.
{terminal}set timeout=1
set default=0
search --no-floppy --fs-uuid --set=root {root_uuid}
menuentry "Debian GNU/Linux" {{
    linux /vmlinuz root=UUID={root_uuid} ro console=tty0 console={console},115200n8
    initrd /initrd.img
}}
"""


def _write_boot_code(raw: Path, *, root_boot_img: Path, core_img: Path) -> None:
    boot = root_boot_img.read_bytes()[:_MBR_BOOT_CODE_BYTES]
    core = core_img.read_bytes()
    room = (_PARTITION_START_SECTOR - 1) * _SECTOR
    if len(core) > room:
        raise UserError(f"base image: grub core.img is {len(core)} bytes, only {room} fit")
    with raw.open("r+b") as disk:
        disk.write(boot)  # the partition table after byte 440 stays
        disk.seek(_SECTOR)  # boot.img loads core.img from sector 1
        disk.write(core)


def _unmount(root: Path) -> None:
    # Something scanning the disk can hold the mount point for a moment; a lazy
    # unmount is no answer, since the raw file is read right after.
    for _ in range(_RELEASE_TRIES - 1):
        if run(["umount", "--recursive", root], check=False).returncode == 0:
            return
        time.sleep(1)
    run(["umount", "--recursive", root])


def _detach(loop: str, raw: Path) -> None:
    run(["losetup", "--detach", loop])
    # The kernel only frees a busy loop device once its last user lets go. A mount
    # namespace created by anyone while the file system was mounted holds a copy of
    # the mount, and until that copy goes, the file system is not flushed.
    for _ in range(_RELEASE_TRIES):
        if not run(["losetup", "--associated", raw]).stdout.strip():
            return
        time.sleep(1)
    holders = _mount_holders(loop)
    raise MeshbakeError(
        f"base image: the new root file system on {loop} is still mounted in another"
        f" mount namespace (processes {', '.join(holders) or 'unknown'}); nothing was cached"
    )


def _mount_holders(loop: str) -> list[str]:
    try:
        rdev = Path(loop).stat().st_rdev
    except OSError:
        return []
    device = f"{os.major(rdev)}:{os.minor(rdev)}"
    holders = []
    for mountinfo in Path("/proc").glob("[0-9]*/mountinfo"):
        with contextlib.suppress(OSError):
            if any(line.split()[2] == device for line in mountinfo.read_text().splitlines()):
                holders.append(mountinfo.parent.name)
    return sorted(holders, key=int)[:10]


def _check_clean_ext4(raw: Path, offset: int) -> None:
    # The ext4 superblock sits 1024 bytes into the file system. A journal that still
    # needs recovery means the file system was not flushed, and grub (which does not
    # replay journals) would miss files.
    with raw.open("rb") as disk:
        disk.seek(offset + 1024)
        superblock = disk.read(1024)
    magic = int.from_bytes(superblock[0x38:0x3A], "little")
    incompat = int.from_bytes(superblock[0x60:0x64], "little")
    if magic != 0xEF53 or incompat & _EXT4_INCOMPAT_RECOVER:
        raise MeshbakeError(
            "base image: the root file system was not cleanly unmounted; nothing was cached"
        )


def _mounts_under(path: Path) -> list[str]:
    prefix = os.fspath(path.resolve())
    found = []
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        # Field 5 is the mount point, with spaces and the like octal-escaped.
        point = line.split()[4].encode().decode("unicode_escape")
        if point == prefix or point.startswith(prefix + "/"):
            found.append(point)
    return found


def _remove_work_dir(work: Path, progress: Callable[[str], None]) -> None:
    # Never delete through a mount point: a leftover bind mount of /dev would take
    # the host's device nodes with it.
    still_mounted = _mounts_under(work)
    if still_mounted:
        progress(f"base: left {work} in place, still mounted: {', '.join(still_mounted)}")
        return
    shutil.rmtree(work, ignore_errors=True)


def _remove_stale_builds(base_dir: Path, name: str, progress: Callable[[str], None]) -> None:
    # Called under the lock: any work dir of this name is from a build that died.
    for stale in base_dir.glob(f".build-{name}-*"):
        if not stale.is_dir():
            continue
        progress(f"base: removing {stale.name} left by an interrupted build")
        # A killed build (SIGKILL, power loss) may have left its mount and loop device.
        if _mounts_under(stale):
            run(["umount", "--recursive", stale / "root"], check=False)
        raw = stale / "disk.raw"
        if raw.is_file():
            for line in run(["losetup", "--associated", raw]).stdout.splitlines():
                run(["losetup", "--detach", line.split(":", 1)[0]], check=False)
        _remove_work_dir(stale, progress)
