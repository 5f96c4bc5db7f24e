"""qemu as build and verify both drive it: which accelerator really works here.

>>> choose_accelerator(Accelerator.TCG)
<Accelerator.TCG: 'tcg'>
"""

from __future__ import annotations

import os
from pathlib import Path

from builder.spec.model import Accelerator


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


def choose_accelerator(choice: Accelerator) -> Accelerator:
    if choice is Accelerator.AUTO:
        return Accelerator.KVM if kvm_usable() else Accelerator.TCG
    return choice
