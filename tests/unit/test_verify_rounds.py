"""builder/verify/runner.py ``_rounds``: each round is applied, checked and undone in
turn; a round whose change fails is an error, and once an undo fails (or the node does
not come back passing) no later round runs on a VM that is no longer the good one.

The VM, SSH and the suite are stand-ins here; tests/e2e/test_broken_image.py runs the
rounds in a real VM.
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import pytest

from builder.errors import UserError
from builder.verify import runner
from builder.verify.runner import CheckResult, Round, Vm

Checks = list[CheckResult]


class FakeVm:
    """What the stand-ins saw, in order, and what they answer."""

    def __init__(self, failing: set[str], passing: list[str | None]) -> None:
        self.calls: list[str] = []
        self.failing = failing
        self.passing = passing

    def as_root(self, vm: Vm, script: str, timeout: float) -> tuple[int, str]:
        self.calls.append(script)
        return (1, f"{script}: no") if script in self.failing else (0, "")

    def suite(self, uri: str, expect: dict[str, Any], work: Path, **_: Any) -> list[CheckResult]:
        self.calls.append(f"suite {expect['round']}")
        return [CheckResult("test_x", "passed", 0.1)]

    def node_passing(self) -> str | None:
        self.calls.append("passing?")
        return self.passing.pop(0)


@pytest.fixture
def vm() -> Vm:
    return Vm(port=1, key_file=Path("/nonexistent"), started=0.0, serial_log=Path("/nonexistent"))


def run(
    monkeypatch: pytest.MonkeyPatch,
    vm: Vm,
    fake: FakeVm,
    rounds: list[Round],
    stop: threading.Event | None = None,
) -> list[runner.PhaseResult]:
    monkeypatch.setattr(runner, "_as_root", fake.as_root)
    monkeypatch.setattr(runner, "run_suite", fake.suite)
    monkeypatch.setattr(runner, "wait_sidecar", lambda vm, deadline: [])
    monkeypatch.setattr(runner, "ROUND_SETTLE", 0.0)
    names = iter(r.name for r in rounds if f"{r.name}+" not in fake.failing)
    return runner._rounds(
        vm,
        rounds,
        "firstboot",
        lambda down: {"round": next(names), "down": list(down)},
        Path("/nonexistent"),
        (),
        fake.node_passing,
        lambda message: None,
        1.0,
        stop,
    )


def rounds(*names: str) -> list[Round]:
    return [Round(name, f"{name}+", f"{name}-") for name in names]


def test_each_round_is_applied_checked_and_undone_in_turn(
    monkeypatch: pytest.MonkeyPatch, vm: Vm
) -> None:
    fake = FakeVm(failing=set(), passing=[None, None])
    results = run(monkeypatch, vm, fake, rounds("a", "b"))
    assert [r.phase for r in results] == ["firstboot/a", "firstboot/b"]
    assert all(r.error is None and len(r.checks) == 1 for r in results)
    assert fake.calls == ["a+", "suite a", "a-", "passing?", "b+", "suite b", "b-", "passing?"]


def test_a_change_that_fails_is_that_rounds_error_and_the_rest_do_not_run(
    monkeypatch: pytest.MonkeyPatch, vm: Vm
) -> None:
    fake = FakeVm(failing={"a+"}, passing=[])
    results = run(monkeypatch, vm, fake, rounds("a", "b"))
    assert results[0].error is not None and "the change failed (1)" in results[0].error
    assert results[1].error == "not run: round a's change failed"
    assert fake.calls == ["a+"]


@pytest.mark.parametrize(
    ("failing", "passing", "why"),
    [
        ({"a-"}, [], "after round a: undoing it failed (1): a-: no"),
        (set(), ["node n not passing on the server: ['web: critical']"], "after round a: node n"),
    ],
)
def test_no_round_runs_after_one_that_did_not_come_back(
    monkeypatch: pytest.MonkeyPatch,
    vm: Vm,
    failing: set[str],
    passing: list[str | None],
    why: str,
) -> None:
    fake = FakeVm(failing=failing, passing=passing)
    results = run(monkeypatch, vm, fake, rounds("a", "b", "c"))
    assert results[0].error is None and results[0].checks
    for later in results[1:]:
        assert later.error is not None and later.error.startswith(f"not run: {why}")
        assert not later.checks
    assert "b+" not in fake.calls and "c+" not in fake.calls


def test_once_stopped_no_further_round_starts(monkeypatch: pytest.MonkeyPatch, vm: Vm) -> None:
    stop = threading.Event()
    fake = FakeVm(failing=set(), passing=[None, None])
    original = fake.suite

    def suite_then_stop(*args: Any, **kwargs: Any) -> list[CheckResult]:
        stop.set()  # as a Ctrl-C in the main thread would, while round a runs
        return original(*args, **kwargs)

    fake.suite = suite_then_stop  # type: ignore[method-assign]
    results = run(monkeypatch, vm, fake, rounds("a", "b"), stop)
    assert results[0].error is None and results[0].checks
    assert results[1].error == "not run: verify was stopped"
    assert "b+" not in fake.calls


def test_a_suite_that_did_not_run_is_that_rounds_error_and_the_undo_still_runs(
    monkeypatch: pytest.MonkeyPatch, vm: Vm
) -> None:
    fake = FakeVm(failing=set(), passing=[None, None])
    original = fake.suite

    def no_suite_for_a(
        uri: str, expect: dict[str, Any], work: Path, **kw: Any
    ) -> list[CheckResult]:
        if expect["round"] == "a":
            fake.calls.append("suite a")
            raise UserError("the Testinfra suite did not run: boom")
        return original(uri, expect, work, **kw)

    fake.suite = no_suite_for_a  # type: ignore[method-assign]
    results = run(monkeypatch, vm, fake, rounds("a", "b"))
    assert results[0].error == "the Testinfra suite did not run: boom"
    assert results[1].error is None and results[1].checks
    assert fake.calls == ["a+", "suite a", "a-", "passing?", "b+", "suite b", "b-", "passing?"]
