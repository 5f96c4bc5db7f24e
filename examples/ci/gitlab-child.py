#!/usr/bin/env python3
"""Turn 'meshbake plan --json' into a GitLab child pipeline: one build job per planned
job (AWS copy regions have no command: the home region's job copies), then collect
and promote to dev. JSON is YAML, so the output is the pipeline file as it is.

Usage: gitlab-child.py plan.json > child-pipeline.yml
"""

import json
import shlex
import sys
from pathlib import Path

#: The job runs as root in a Debian 12 container: the Debian packages, then .venv.
SETUP = ["tools/setup", 'export PATH="$PWD/.venv/bin:$PATH"']


def main(plan_file: str) -> int:
    plan = json.loads(Path(plan_file).read_text(encoding="utf-8"))
    pipeline: dict[str, object] = {"stages": ["build", "collect", "promote"]}
    builds = []
    for job in plan:
        if job["command"] is None:
            continue
        name = f"build:{job['id']}"
        builds.append(name)
        script = [*SETUP, shlex.join(job["command"])]
        out = shlex.quote(job["out"])
        if job["target"] == "qemu":
            qcow2 = shlex.quote(job["output"])  # <name>.qcow2, or <name>-arm64.qcow2
            script.append(f"meshbake verify {qcow2} --junit {out}/verify.xml")
        else:
            script.append(f"meshbake images {shlex.quote(job['spec'])}")
        pipeline[name] = {
            "stage": "build",
            "image": "debian:12",
            "tags": [f"meshbake-{job['arch']}"],
            "script": script,
            "artifacts": {"when": "always", "paths": [f"{job['out']}/"]},
        }
    pipeline["collect"] = {
        "stage": "collect",
        "image": "python:3.11",
        "needs": builds,
        "script": ["pip install .", "meshbake collect build/*/ --out release"],
        "artifacts": {"paths": ["release/"]},
    }
    pipeline["promote-dev"] = {
        "stage": "promote",
        "image": "python:3.11",
        "needs": ["collect"],
        "environment": {"name": "dev"},
        "script": [
            "pip install .",
            'python3 -c \'import json; [print(b["image"], b["manifest"])'
            ' for b in json.load(open("release/release.json"))["builds"]'
            ' if b["target"] == "aws"]\' | while read -r image manifest; do'
            ' meshbake promote "$image" --channel dev --build "release/$manifest"; done',
        ],
    }
    json.dump(pipeline, sys.stdout, indent=2)
    sys.stdout.write("\n")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
