"""The guard: leader of the process group of each long-running child (Packer, a VM).

``proc`` starts it as ``python -I guard.py PARENT_PID GRACE COMMAND...``; it runs
COMMAND as its own child, in its own new session. It imports nothing from meshbake,
so it starts fast and works from any install.

- It asks the kernel for SIGTERM when meshbake dies (``PR_SET_PDEATHSIG``) and checks
  right after that meshbake is still its parent, so a death in between is not missed.
  So even a SIGKILLed meshbake leaves no Packer and no VM running.
- On SIGTERM or SIGHUP it sends SIGTERM to every other member of its group, gives
  them GRACE seconds, SIGKILLs what is left and exits ``128 + signal``.
- When COMMAND exits it SIGKILLs whatever COMMAND left in the group (a qemu whose
  Packer plugin died, say) and exits with COMMAND's status.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import FrameType

_PR_SET_PDEATHSIG = 1


def members() -> list[int]:
    """The live processes in our process group, other than us."""
    me = os.getpid()
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == me:
            continue
        try:
            stat = (entry / "stat").read_bytes()
        except OSError:
            continue
        # pid (comm) state ppid pgrp ...: comm may hold spaces and parentheses.
        fields = stat[stat.rindex(b")") + 2 :].split()
        if fields[0] != b"Z" and int(fields[2]) == me:
            found.append(int(entry.name))
    return found


def signal_members(sig: int) -> None:
    for pid in members():
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, sig)


def main(argv: list[str]) -> int:
    parent, grace, command = int(argv[0]), float(argv[1]), argv[2:]
    child: subprocess.Popen[bytes] | None = None

    def stop(signum: int, frame: FrameType | None) -> None:
        for sig in (signal.SIGTERM, signal.SIGHUP):
            signal.signal(sig, signal.SIG_IGN)
        signal_members(signal.SIGTERM)
        deadline = time.monotonic() + grace
        while time.monotonic() < deadline:
            if child is not None:
                child.poll()  # reap it, or it counts as alive
            if not members():
                break
            time.sleep(0.1)
        signal_members(signal.SIGKILL)
        os._exit(128 + signum)

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGHUP, stop)
    ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
    if os.getppid() != parent:
        stop(signal.SIGTERM, None)
    try:
        child = subprocess.Popen(command)
    except OSError as exc:
        sys.stderr.write(f"{command[0]}: {exc.strerror}\n")
        return 127
    code = child.wait()
    signal_members(signal.SIGKILL)
    return code if code >= 0 else 128 - code


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
