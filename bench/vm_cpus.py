"""How many vCPUs each of two VMs that run at once should get. Not a test.

    sudo .venv/bin/python bench/vm_cpus.py --image web=build/web/web.qcow2 \\
        --image api=build/api/api.qcow2 [--cpus 1 --cpus 2]

For each ``--cpus`` value, in turn: the firstboot phase of each image verified at the
same time (as the e2e tests' pool runs them: two at once, the reboot left out, as the
broken copies do), each VM with that many vCPUs. While they run, every second, the CPU
time of each verify VM (``qemu-system-*`` whose command line names a
``meshbake-verify-`` folder) is read from ``/proc/PID/stat``. The figures are the wall
time of the pair, each verify's time to mesh ready, and the CPU seconds each VM used:
on a machine the VMs keep busy, CPU seconds per verify is what limits how many fit in
an hour. Each image needs its build folder (manifest) and the artifact cache it was
baked with. Results go to stdout as a Markdown table and to ``--out`` as JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from builder.bake.base import default_cache_dir  # noqa: E402
from builder.cli.main import mesh_inputs  # noqa: E402
from builder.verify import runner  # noqa: E402

TICKS = os.sysconf("SC_CLK_TCK")


def say(message: str) -> None:
    print(f"bench: {message}", file=sys.stderr, flush=True)


class CpuWatch:
    """The CPU seconds of each verify VM seen while it runs, by pid."""

    def __init__(self) -> None:
        self.seconds: dict[int, float] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, daemon=True)

    def __enter__(self) -> CpuWatch:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def _watch(self) -> None:
        while not self._stop.wait(1):
            for entry in Path("/proc").iterdir():
                if not entry.name.isdigit():
                    continue
                try:
                    argv = (entry / "cmdline").read_bytes().split(b"\0")
                    if not (
                        argv[0].startswith(b"qemu-system")
                        and b"meshbake-verify-" in b" ".join(argv)
                    ):
                        continue
                    fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
                except OSError:
                    continue
                # utime and stime: fields 14 and 15 of /proc/PID/stat.
                self.seconds[int(entry.name)] = (int(fields[11]) + int(fields[12])) / TICKS


def one_round(images: dict[str, Path], cpus: int) -> dict[str, Any]:
    def verify(name: str) -> dict[str, Any]:
        image = images[name]
        started = time.monotonic()
        report = runner.verify_image(
            image,
            phases=("firstboot",),
            progress=lambda m: say(f"[{name}, {cpus} vCPU] {m}"),
            leave_out=("test_reboot_keeps_the_mesh",),
            mesh_inputs=mesh_inputs(image, None, None, default_cache_dir()),
            cpus=cpus,
        )
        (phase,) = report.phases
        return {
            "ok": report.ok,
            "seconds": round(time.monotonic() - started, 1),
            "mesh_ready_s": phase.first_boot,
        }

    started = time.monotonic()
    with CpuWatch() as watch, ThreadPoolExecutor(len(images)) as pool:
        results = dict(zip(images, pool.map(verify, images), strict=True))
    return {
        "cpus": cpus,
        "wall_s": round(time.monotonic() - started, 1),
        "verifies": results,
        "vm_cpu_s": sorted(round(s, 1) for s in watch.seconds.values()),
    }


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--image", action="append", required=True, metavar="NAME=QCOW2")
    parser.add_argument("--cpus", action="append", type=int)
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results-vm-cpus.json")
    args = parser.parse_args()
    images = {n: Path(p) for n, _, p in (i.partition("=") for i in args.image)}
    rounds = [one_round(images, cpus) for cpus in args.cpus or [1, 2]]
    args.out.write_text(json.dumps({"cores": os.cpu_count(), "rounds": rounds}, indent=2) + "\n")
    print("| vCPUs each | pair's wall (s) | mesh ready (s) | CPU per VM (s) | all passed |")
    print("|---|---|---|---|---|")
    for r in rounds:
        ready = ", ".join(str(v["mesh_ready_s"]) for v in r["verifies"].values())
        cpu = ", ".join(str(s) for s in r["vm_cpu_s"])
        ok = all(v["ok"] for v in r["verifies"].values())
        print(f"| {r['cpus']} | {r['wall_s']} | {ready} | {cpu} | {ok} |")
    return 0 if all(v["ok"] for r in rounds for v in r["verifies"].values()) else 1


if __name__ == "__main__":
    raise SystemExit(main())
