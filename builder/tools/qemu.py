"""qemu as build and verify both drive it: the machine each architecture boots on, and
which accelerator really works here.

The per-architecture facts (binary, machine, firmware, console) live here and only
here: the Packer template (``builder.render.hcl``) and verify's VM
(``builder.verify.runner``) both take them from ``machine_for``.

>>> choose_accelerator(Accelerator.TCG)
<Accelerator.TCG: 'tcg'>
>>> machine_for(Arch.ARM64).binary
'qemu-system-aarch64'
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from pathlib import Path

from builder.errors import ToolNotFound
from builder.spec.model import Accelerator, Arch


@dataclass(frozen=True)
class Firmware:
    """UEFI as pflash: the read-only code and the template of the writable variables,
    which each VM gets its own copy of."""

    code: Path
    vars_template: Path
    package: str


@dataclass(frozen=True)
class QemuMachine:
    """How qemu boots one architecture's guest.

    >>> machine_for(Arch.AMD64).console, machine_for(Arch.ARM64).console
    ('ttyS0', 'ttyAMA0')
    """

    arch: Arch
    binary: str
    #: The Debian package that has ``binary``.
    package: str
    #: ``-machine`` type; None keeps qemu's default (``pc`` on x86, as ever).
    machine: str | None
    #: The guest kernel's name of the serial console qemu's ``-serial`` is wired to.
    console: str
    #: UEFI firmware; None boots the machine's built-in BIOS.
    firmware: Firmware | None
    #: ``uname -m`` of a host that runs this architecture natively.
    uname: str
    #: ``-cpu`` under TCG: everything qemu emulates.
    tcg_cpu: str = "max"


MACHINES: dict[Arch, QemuMachine] = {
    Arch.AMD64: QemuMachine(
        arch=Arch.AMD64,
        binary="qemu-system-x86_64",
        package="qemu-system-x86",
        machine=None,
        console="ttyS0",
        firmware=None,
        uname="x86_64",
    ),
    # qemu's virt board has no BIOS: it boots UEFI (Debian's AAVMF build of EDK2) from
    # pflash, and its serial port is a PL011.
    Arch.ARM64: QemuMachine(
        arch=Arch.ARM64,
        binary="qemu-system-aarch64",
        package="qemu-system-arm",
        machine="virt",
        console="ttyAMA0",
        firmware=Firmware(
            code=Path("/usr/share/AAVMF/AAVMF_CODE.fd"),
            vars_template=Path("/usr/share/AAVMF/AAVMF_VARS.fd"),
            package="qemu-efi-aarch64",
        ),
        uname="aarch64",
        # Pointer authentication's architected hash (QARMA) is slow to emulate, and
        # Debian's arm64 kernel and userland use it everywhere; the guest cannot tell.
        tcg_cpu="max,pauth-impdef=on",
    ),
}


def machine_for(arch: Arch | str) -> QemuMachine:
    """The qemu facts of ``arch`` (an ``Arch`` or Debian's name of one)."""
    return MACHINES[Arch(arch)]


def host_arch() -> Arch | None:
    """This machine's architecture, or None when it is neither amd64 nor arm64.

    >>> host_arch() in (Arch.AMD64, Arch.ARM64, None)
    True
    """
    machine = os.uname().machine
    return next((m.arch for m in MACHINES.values() if m.uname == machine), None)


def kvm_usable() -> bool:
    """KVM only where it really works: /dev/kvm usable *and* the CPU shows vmx or svm.

    A nested paravirtual /dev/kvm without those flags hangs a Debian kernel.
    """
    if not os.access("/dev/kvm", os.R_OK | os.W_OK):
        return False
    try:
        cpuinfo = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    flags = {f for line in cpuinfo.splitlines() if line.startswith("flags") for f in line.split()}
    return bool(flags & {"vmx", "svm"})


def choose_accelerator(choice: Accelerator, arch: Arch = Arch.AMD64) -> Accelerator:
    """``auto`` -> KVM only for a guest of the host's own architecture where KVM really
    works, else TCG; a guest of another architecture is always TCG, whatever was asked.

    >>> choose_accelerator(Accelerator.KVM, Arch.ARM64) if host_arch() is Arch.AMD64 else 'tcg'
    <Accelerator.TCG: 'tcg'>
    """
    if host_arch() is not arch:
        return Accelerator.TCG
    if choice is Accelerator.AUTO:
        return Accelerator.KVM if kvm_usable() else Accelerator.TCG
    return choice


def cpu_model(accel: Accelerator, arch: Arch = Arch.AMD64) -> str:
    """``-cpu``: the host's with KVM, else the machine's TCG model.

    >>> cpu_model(Accelerator.TCG), cpu_model(Accelerator.TCG, Arch.ARM64)
    ('max', 'max,pauth-impdef=on')
    """
    return "host" if accel is Accelerator.KVM else machine_for(arch).tcg_cpu


def check_tools(arch: Arch) -> QemuMachine:
    """The facts of ``arch`` once its qemu and firmware are installed; else one line
    naming the package to install (``ToolNotFound``).

    >>> check_tools(Arch.AMD64).binary  # doctest: +SKIP
    'qemu-system-x86_64'
    """
    facts = machine_for(arch)
    if shutil.which(facts.binary) is None:
        raise ToolNotFound(
            f"{facts.binary} not found: {arch.value} images boot with it; install it with"
            f" 'apt-get install {facts.package}'"
        )
    firmware = facts.firmware
    if firmware is not None:
        for path in (firmware.code, firmware.vars_template):
            if not path.is_file():
                raise ToolNotFound(
                    f"{path} not found: {arch.value} images boot UEFI from it; install it"
                    f" with 'apt-get install {firmware.package}'"
                )
    return facts


def machine_args(facts: QemuMachine, accel: str, vars_file: Path | str | None) -> list[str]:
    """``-machine`` (with the firmware as pflash) and the block nodes it names; empty for
    a machine that keeps qemu's defaults (x86: ``pc`` and its BIOS).

    The firmware goes in through ``-blockdev`` and ``-machine pflash0=/pflash1=`` rather
    than ``-drive if=pflash``: Packer's qemu builder drops its own disk and CD drives
    when its ``qemuargs`` hold any ``-drive``.

    ``accel`` is the accelerator's name (or the template's variable that holds it).

    >>> machine_args(machine_for(Arch.ARM64), "tcg", "/w/vars.fd")[:2]
    ['-machine', 'virt,accel=tcg,pflash0=efi-code,pflash1=efi-vars']
    >>> machine_args(machine_for(Arch.AMD64), "tcg", None)
    []
    """
    if facts.machine is None:
        return []
    machine = f"{facts.machine},accel={accel}"
    args: list[str] = []
    if facts.firmware is not None:
        if vars_file is None:
            raise ValueError(f"{facts.arch.value} boots UEFI: give the VM's copy of its vars")
        machine += ",pflash0=efi-code,pflash1=efi-vars"
        code = _option_value(facts.firmware.code)
        args += [
            "-blockdev",
            f"node-name=efi-code,driver=file,filename={code},read-only=on",
            "-blockdev",
            f"node-name=efi-vars,driver=file,filename={_option_value(vars_file)}",
        ]
    return ["-machine", machine, *args]


def accel_args(facts: QemuMachine, accel: Accelerator, vars_file: Path | None) -> list[str]:
    """The start of a VM's qemu argv: the binary, the machine (or ``-accel`` where the
    default machine stays) and the CPU.

    >>> accel_args(machine_for(Arch.AMD64), Accelerator.TCG, None)
    ['qemu-system-x86_64', '-accel', 'tcg', '-cpu', 'max']
    >>> accel_args(machine_for(Arch.ARM64), Accelerator.TCG, Path("/w/v.fd"))[:3]
    ['qemu-system-aarch64', '-machine', 'virt,accel=tcg,pflash0=efi-code,pflash1=efi-vars']
    """
    machine = machine_args(facts, accel.value, vars_file) or ["-accel", accel.value]
    return [facts.binary, *machine, "-cpu", cpu_model(accel, facts.arch)]


def patience(arch: Arch) -> float:
    """How much longer than a native guest's a guest of ``arch`` may take to boot and
    settle here: every instruction of another architecture is translated (TCG). The
    factor is a ceiling for deadlines, never a figure to report.

    >>> patience(host_arch() or Arch.AMD64)
    1.0
    """
    return 1.0 if host_arch() is arch else 3.0


def _option_value(path: Path | str) -> str:
    """A path inside a qemu ``key=value,...`` option: a comma is doubled.

    >>> _option_value("/a,b")
    '/a,,b'
    """
    return os.fspath(path).replace(",", ",,")
