"""How long ``meshbake up`` takes to bring images into a local mesh, and to tear it down.
Not a test.

    sudo .venv/bin/python bench/up.py IMAGE [IMAGE...] [--cache DIR] [--out FILE]

Runs ``python -m builder up IMAGE... --json`` as a user runs it, and times the start
until its JSON line (every sidecar up: the server, the boots, the first boots), then
SIGTERM until it exited with everything removed. The figures (and the ``ready_after_s``
that ``up`` reports itself) go to stdout as a Markdown table and to ``--out`` as JSON.
Needs root (the network namespace) and the images' manifests and artifact cache (the
server runs the first image's own Consul zip).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("images", nargs="+", type=Path)
    parser.add_argument("--cache", type=Path)
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results-up.json")
    args = parser.parse_args()
    argv = [sys.executable, "-m", "builder", "up", *map(str, args.images), "--json"]
    if args.cache:
        argv += ["--cache", str(args.cache)]
    started = time.monotonic()
    child = subprocess.Popen(
        argv, cwd=REPO, stdout=subprocess.PIPE, text=True, env=dict(os.environ)
    )
    assert child.stdout is not None
    line = child.stdout.readline()
    ready = time.monotonic() - started
    if not line:
        print("bench: up printed nothing", file=sys.stderr)
        return 1
    summary = json.loads(line)
    stopping = time.monotonic()
    child.send_signal(signal.SIGTERM)
    code = child.wait(timeout=300)
    stopped = time.monotonic() - stopping
    result = {
        "images": [str(i) for i in args.images],
        "up_to_json_line_s": round(ready, 1),
        "ready_after_s_reported": summary.get("ready_after_s"),
        "sigterm_to_exit_s": round(stopped, 1),
        "exit_code": code,
        "command": " ".join(argv[1:]),
    }
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print("| images | up → JSON line (s) | SIGTERM → exit (s) | exit |")
    print("|---|---|---|---|")
    names = ", ".join(i.name for i in args.images)
    print(f"| {names} | {result['up_to_json_line_s']} | {result['sigterm_to_exit_s']} | {code} |")
    return 0 if code == 128 + signal.SIGTERM else 1


if __name__ == "__main__":
    raise SystemExit(main())
