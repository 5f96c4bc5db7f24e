"""Several specs at once: bounded parallelism, one failure loses no other result, and a
summary table ends the run. The bake itself is replaced by a stub target registered in
``TARGETS`` (the real bake is covered by tests/e2e); this checks the orchestration only.
"""

from __future__ import annotations

import shutil
import threading
import time
from pathlib import Path

import pytest
import yaml

from builder.bake import run as build
from builder.bake.run import BuildOptions, BuildResult, BuildRun, build_many, summary_table
from builder.cli import main as cli
from builder.errors import UserError


class StubTarget:
    """A test double for a build target: fails for specs named ``bad-*``."""

    name = "qemu"

    def __init__(self) -> None:
        self.running = 0
        self.peak = 0
        self.lock = threading.Lock()

    def build(self, run: BuildRun) -> BuildResult:
        with self.lock:
            self.running += 1
            self.peak = max(self.peak, self.running)
        try:
            time.sleep(0.2)
            if run.loaded.spec.name.startswith("bad-"):
                raise UserError(f"{run.loaded.spec.name}: bake failed; see {run.out_dir}/logs")
            return BuildResult(run.loaded.spec.name, run.loaded.path, "built", run.out_dir / "x")
        finally:
            with self.lock:
                self.running -= 1


@pytest.fixture
def specs(repo: Path, tmp_path: Path) -> Path:
    folder = tmp_path / "images"
    shutil.copytree(repo / "images", folder)
    base = yaml.safe_load((folder / "web.yaml").read_text())
    (folder / "web.yaml").unlink()
    for name in ("api", "bad-db", "cache", "web"):
        (folder / f"{name}.yaml").write_text(yaml.safe_dump({**base, "name": name}))
    return folder


@pytest.fixture
def stub(monkeypatch: pytest.MonkeyPatch) -> StubTarget:
    target = StubTarget()
    monkeypatch.setitem(build.TARGETS, "qemu", target)
    return target


def test_parallel_builds_keep_every_result(specs: Path, stub: StubTarget, tmp_path: Path) -> None:
    options = BuildOptions(cache=tmp_path / "cache")
    results = build_many(sorted(specs.glob("*.yaml")), options, jobs=2, progress=lambda m: None)
    assert [r.image for r in results] == ["api", "bad-db", "cache", "web"]
    assert {r.image: r.status for r in results} == {
        "api": "built",
        "bad-db": "failed",
        "cache": "built",
        "web": "built",
    }
    assert "bake failed" in (results[1].error or "")
    assert stub.peak == 2  # bounded by -j, and really parallel


def test_one_job_runs_one_at_a_time(specs: Path, stub: StubTarget, tmp_path: Path) -> None:
    build_many(sorted(specs.glob("*.yaml")), BuildOptions(), jobs=1, progress=lambda m: None)
    assert stub.peak == 1


def test_summary_table_lists_each_image(specs: Path, stub: StubTarget) -> None:
    results = build_many(sorted(specs.glob("*.yaml")), BuildOptions(), 2, lambda m: None)
    table = summary_table(results).splitlines()
    assert table[0].split()[:3] == ["IMAGE", "STATUS", "SECONDS"]
    assert [line.split()[:2] for line in table[1:]] == [
        ["api", "built"],
        ["bad-db", "failed"],
        ["cache", "built"],
        ["web", "built"],
    ]


def test_cli_builds_a_folder_and_exits_1_when_one_failed(
    specs: Path, stub: StubTarget, capsys: pytest.CaptureFixture[str]
) -> None:
    assert cli.main(["build", str(specs), "-j", "2"]) == 1
    out = capsys.readouterr().out
    assert "bad-db" in out and "failed" in out and "web" in out


def test_out_is_refused_for_several_specs(specs: Path, stub: StubTarget, tmp_path: Path) -> None:
    with pytest.raises(UserError, match="--out"):
        build_many(sorted(specs.glob("*.yaml")), BuildOptions(out=tmp_path / "o"), 2)
