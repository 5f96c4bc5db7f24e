"""What a break costs: a boot of its own (a broken copy, as the suite did before) against
a round in a VM that is already up (``verify_image(rounds=...)``, as the suite does
now). Not a test.

    sudo .venv/bin/python bench/break_rounds.py [--spec images/web.yaml] [--image IMAGE]

Times two verifies of the same good image, each one VM with one vCPU, into verify's
local mesh, the reboot left out (as for the breaks): phase firstboot once, which is what
one copy per break costs (a boot and the whole suite), and phase firstboot with every
break of tests/e2e/test_broken_image.py that the spec's example takes as rounds. Prints
a Markdown table (and ``--out`` JSON): each verify's seconds, the rounds' per break
(their boot shared), and what the same breaks would cost as copies (one such verify
each). Each round must fail exactly its
checks, or the times compare nothing. Without ``--image`` the spec is baked first (into
build/bench/), as bench/firstboot.py does.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

from firstboot import golden_image  # noqa: E402

from builder.cli.main import mesh_inputs  # noqa: E402
from builder.spec.model import load_spec  # noqa: E402
from builder.verify import runner  # noqa: E402
from tests.e2e.test_broken_image import (  # noqa: E402
    BREAKS,
    FIRSTBOOT_BREAKS,
    LEFT_OUT,
    ROUNDS,
    app_unit,
    check_name,
)
from tests.fixtures.release import make_fixture_release  # noqa: E402


def say(message: str) -> None:
    print(f"bench: {message}", file=sys.stderr, flush=True)


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--spec", type=Path, default=REPO / "images" / "web.yaml")
    parser.add_argument("--image", type=Path, help="a golden image of --spec (default: bake it)")
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results-break-rounds.json")
    args = parser.parse_args()
    loaded = load_spec(args.spec)
    example = args.spec.stem
    if example not in ROUNDS:
        parser.error(f"--spec: the breaks are written for {sorted(ROUNDS)}, not {example}")
    good: Path = args.image
    if good is None:
        version = loaded.spec.consul.version
        release = make_fixture_release(Path(tempfile.mkdtemp(prefix="bench-fixture-")), version)
        good = golden_image(args.spec, None, release)
    mesh = mesh_inputs(good, None, None, None)
    names = ROUNDS[example]
    rounds = [BREAKS[n][0](loaded).round(n, app_unit(loaded)) for n in names]
    timings = {}
    reports = {}
    for label, given in (("one boot, no round", ()), (f"one boot, {len(rounds)} rounds", rounds)):
        say(f"verify {good}: {label}")
        started = time.monotonic()
        reports[label] = runner.verify_image(
            good,
            spec=args.spec,
            phases=("firstboot",),
            progress=say,
            leave_out=LEFT_OUT,
            mesh_inputs=mesh,
            cpus=1,
            rounds=given,
        )
        timings[label] = round(time.monotonic() - started, 1)
    plain, with_rounds = (timings[k] for k in timings)
    wrong = []
    for name, phase in zip(names, reports[f"one boot, {len(rounds)} rounds"].phases, strict=True):
        failed = {check_name(c.name) for c in phase.checks if c.outcome in ("failed", "error")}
        if phase.error or failed != FIRSTBOOT_BREAKS[f"{example}/{name}"][0]:
            wrong.append(f"{name}: {phase.error or sorted(failed)}")
    result = {
        "image": str(good),
        "breaks": list(names),
        "seconds": timings,
        "per_break_s": round(with_rounds / len(rounds), 1),
        "as_copies_s": round(plain * len(rounds), 1),
        "good_boot_ok": reports["one boot, no round"].ok,
        "rounds_failing_other_checks": wrong,
    }
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print("| what | seconds |")
    print("|---|---|")
    for label, seconds in timings.items():
        print(f"| {label} | {seconds} |")
    print(f"| per break in rounds (the boot shared) | {result['per_break_s']} |")
    print(f"| the same breaks as copies ({len(rounds)} boots) | {result['as_copies_s']} |")
    return 0 if result["good_boot_ok"] and not wrong else 1


if __name__ == "__main__":
    raise SystemExit(main())
