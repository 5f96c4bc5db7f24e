"""A broken image fails as fast as a good one passes: once consul or the sidecar is
down for good, verify stops waiting for it, and the checks that need the sidecar fail
at once, naming that cause, instead of each waiting out its own deadline.

No VM here: the suite's functions run against a stand-in host that answers from
``systemctl show`` text (the format of systemd's ``show`` verb: ``Name=value`` lines,
a blank line between units) and counts what it was asked. tests/e2e runs the same
code against real images (tests/e2e/test_broken_image.py).
"""

from __future__ import annotations

import importlib
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from builder.verify import runner
from builder.verify.imagetests import helpers
from tests.unit.test_imagetests_collect import EXPECT

firstboot: Any = importlib.import_module("builder.verify.imagetests.test_firstboot")

SIDECAR = "envoy-sidecar.service"


def show(**units: dict[str, str | int]) -> str:
    """``systemctl show -p Id -p ActiveState ...`` text for ``units`` (name -> props)."""
    blocks = []
    for name, props in units.items():
        lines = [f"Id={name.replace('_', '-')}.service"]
        lines += [f"{key}={value}" for key, value in props.items()]
        blocks.append("\n".join(lines))
    return "\n\n".join(blocks) + "\n"


CONSUL_UP = {"ActiveState": "active", "SubState": "running", "Result": "success", "NRestarts": 0}
#: A fenced sidecar (IPAddressDeny=any): every start waits out meshbake-redirect's
#: tries, fails, and Restart=on-failure starts it again, forever.
FENCED = {"ActiveState": "activating", "SubState": "auto-restart", "Result": "exit-code"}
STARTING = {"ActiveState": "activating", "SubState": "start-pre", "Result": "success"}


def fenced(restarts: int) -> str:
    return show(consul=CONSUL_UP, envoy_sidecar={**FENCED, "NRestarts": restarts})


# --- the rule ----------------------------------------------------------------------


def test_a_unit_restarting_without_end_is_down_for_good_after_three_failed_starts() -> None:
    assert helpers.down_for_good(fenced(2)) == []
    assert helpers.down_for_good(fenced(3)) == [
        "envoy-sidecar.service restarted 3 times without becoming active (last: exit-code)"
    ]


def test_failed_and_skipped_units_are_down_for_good_starting_and_active_ones_are_not() -> None:
    text = show(
        consul={"ActiveState": "failed", "SubState": "failed", "Result": "timeout"},
        envoy_sidecar={"ActiveState": "inactive", "SubState": "dead", "Result": "exec-condition"},
    )
    assert helpers.down_for_good(text) == [
        "consul.service failed (timeout)",
        "envoy-sidecar.service did not start (exec-condition)",
    ]
    # Not yet started, starting, or active after many restarts: it may still come up.
    waiting = {"ActiveState": "inactive", "SubState": "dead", "Result": "success"}
    assert helpers.down_for_good(show(consul=waiting, envoy_sidecar=STARTING)) == []
    active_again = {**CONSUL_UP, "NRestarts": 7}
    assert helpers.down_for_good(show(consul=CONSUL_UP, envoy_sidecar=active_again)) == []


def test_restarts_before_a_manual_start_do_not_count() -> None:
    before = helpers.restarts(fenced(5))
    assert before == {"consul.service": 0, "envoy-sidecar.service": 5}
    assert helpers.down_for_good(fenced(6), since=before) == []
    assert helpers.down_for_good(fenced(8), since=before) != []


def test_the_command_asks_systemctl_for_what_the_rule_reads() -> None:
    command = helpers.unit_state_command("consul.service", SIDECAR)
    assert command.startswith("systemctl show ")
    for name in helpers.UNIT_PROPERTIES:
        assert f"-p {name}" in command
    assert command.endswith(f"consul.service {SIDECAR}")


# --- the suite, against a stand-in host ----------------------------------------------


@dataclass
class Result:
    stdout: str
    rc: int = 0
    stderr: str = ""

    @property
    def succeeded(self) -> bool:
        return self.rc == 0


@dataclass
class StandInHost:
    """A TEST DOUBLE of testinfra's ``Host``: answers ``systemctl`` from ``units`` text,
    and records every command. After ``budget`` commands it raises, so that code which
    would wait out a deadline fails the test instead of hanging it."""

    units: str
    budget: int = 50
    commands: list[str] = field(default_factory=list)

    def run(self, command: str, *args: object) -> Result:
        line = command % tuple(args) if args else command
        self.commands.append(line)
        if len(self.commands) > self.budget:
            raise AssertionError(f"still asking after {self.budget} commands: {line}")
        if line == "true":
            return Result("")
        if line.startswith("systemctl show "):
            return Result(self.units)
        match = re.fullmatch(r"systemctl is-active (\S+)", line)
        if match:
            state = helpers.unit_states(self.units)[match.group(1)]["ActiveState"]
            return Result(state + "\n", 0 if state == "active" else 3)
        return Result("", 1)

    def check_output(self, command: str, *args: object) -> str:
        return self.run(command, *args).stdout


@pytest.fixture
def no_sleep(monkeypatch: pytest.MonkeyPatch) -> list[float]:
    """Waits cost nothing here; what the code would have slept is recorded."""
    slept: list[float] = []
    monkeypatch.setattr(helpers.time, "sleep", slept.append)
    return slept


def test_waiting_for_the_mesh_ends_once_the_sidecar_is_down_for_good(no_sleep: list[float]) -> None:
    host = StandInHost(fenced(4))
    # An hour's deadline: only the rule can end this wait before the host's budget.
    # Restarts counted from boot, as the suite's first wait (mesh_up) counts them.
    mesh = firstboot.wait_mesh(host, timeout=3600, since={})
    assert mesh == {"consul.service": True, SIDECAR: False, "Envoy LIVE": False}
    assert no_sleep == []


def test_a_later_wait_counts_only_the_restarts_it_sees(no_sleep: list[float]) -> None:
    """After a check's own stop or restart, the restarts from boot are history."""
    host = StandInHost(fenced(4))
    with pytest.raises(AssertionError, match="still asking"):
        firstboot.wait_mesh(host, timeout=3600)
    assert len(no_sleep) > 3


def test_waiting_for_the_mesh_goes_on_while_the_sidecar_may_still_come_up(
    no_sleep: list[float],
) -> None:
    host = StandInHost(show(consul=CONSUL_UP, envoy_sidecar={**STARTING, "NRestarts": 1}))
    with pytest.raises(AssertionError, match="still asking"):
        firstboot.wait_mesh(host, timeout=3600)
    assert len(no_sleep) > 3


DOWN = {"consul.service": True, SIDECAR: False, "Envoy LIVE": False}
EXPECT_WITH_ENDS = {**EXPECT, "phase": "firstboot"}


def _record(name: str, value: object) -> None:
    raise AssertionError(f"a check that was not tried recorded {name}={value}")


@pytest.mark.parametrize(
    ("check", "kwargs"),
    [
        ("test_inbound_crosses_the_sidecar", {"expect": EXPECT_WITH_ENDS}),
        ("test_outbound_crosses_the_sidecar", {"expect": EXPECT_WITH_ENDS}),
        ("test_consul_user_bypasses_the_sidecar", {"expect": EXPECT_WITH_ENDS}),
        ("test_ssh_bypasses_the_sidecar", {"connect": None}),
        ("test_sidecar_down", {"expect": EXPECT_WITH_ENDS, "connect": None}),
        ("test_reboot_keeps_the_mesh", {"expect": EXPECT_WITH_ENDS, "connect": None}),
    ],
)
def test_a_check_that_needs_the_sidecar_fails_at_once_naming_the_cause(
    check: str, kwargs: dict[str, Any], no_sleep: list[float]
) -> None:
    host = StandInHost(fenced(4))
    with pytest.raises(helpers.CheckFailed) as caught:
        getattr(firstboot, check)(host=host, mesh_up=DOWN, record_property=_record, **kwargs)
    seen = caught.value.seen
    assert "the sidecar is down (not up: envoy-sidecar.service, Envoy LIVE)" in seen
    assert "Envoy's admin at 127.0.0.1:19000" in seen
    # Nothing was stopped, rebooted or probed: at most the suite's own "true".
    assert [c for c in host.commands if c != "true"] == []
    assert no_sleep == []


# --- the runner ----------------------------------------------------------------------


def test_the_runner_stops_waiting_for_a_sidecar_that_is_down_for_good(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    answers = iter([fenced(1), fenced(2), fenced(3)])
    asked: list[str] = []

    def ssh_run(vm: runner.Vm, command: str, timeout: float = 30.0) -> tuple[int, str]:
        asked.append(command)
        return 0, next(answers)

    monkeypatch.setattr(runner, "ssh_run", ssh_run)
    monkeypatch.setattr(runner.time, "sleep", lambda seconds: None)
    vm = runner.Vm(22, Path("/nonexistent"), 0.0, Path("/nonexistent"))
    deadline = runner.time.monotonic() + 3600
    causes = runner.wait_sidecar(vm, deadline)
    assert causes == [
        "envoy-sidecar.service restarted 3 times without becoming active (last: exit-code)"
    ]
    assert len(asked) == 3


def test_the_runner_sees_an_active_sidecar_at_once(monkeypatch: pytest.MonkeyPatch) -> None:
    up = show(consul=CONSUL_UP, envoy_sidecar=CONSUL_UP)
    monkeypatch.setattr(runner, "ssh_run", lambda vm, command, timeout=30.0: (0, up))
    vm = runner.Vm(22, Path("/nonexistent"), 0.0, Path("/nonexistent"))
    assert runner.wait_sidecar(vm, runner.time.monotonic() + 3600) == []


# --- a failure's evidence ------------------------------------------------------------

TOKEN = "4d3c2b1a-0000-4000-8000-000000000000"
SERVICE_TOKEN = "9f8e7d6c-0000-4000-8000-000000000000"
#: The part of Envoy's config_dump that carries the sidecar's token (Consul's bootstrap
#: template: hashicorp/consul command/connect/envoy/bootstrap_tpl.go).
CONFIG_DUMP = (
    '{"configs": [{"bootstrap": {"dynamic_resources": {"ads_config": {"grpc_services": [\n'
    '  {"initial_metadata": [\n    {\n     "key": "x-consul-token",\n'
    f'     "value": "{SERVICE_TOKEN}"\n    }}\n   ]}}]}}}}}}]}}\n'
)


def test_a_failed_check_keeps_envoys_snapshot_and_the_journal_beside_the_report(
    tmp_path: Path,
) -> None:
    answers = {
        "/config_dump": (0, CONFIG_DUMP),
        "/clusters": (0, '{"cluster_statuses": [{"name": "local_app"}]}\n'),
        "/stats": (3, "ERROR <urlopen error [Errno 111] Connection refused>\n"),
        "journalctl": (0, f"consul[1]: agent token {TOKEN} set\nenvoy-sidecar: started\n"),
    }
    asked: list[str] = []

    def run(command: str) -> tuple[int, str]:
        asked.append(command)
        return next(answer for key, answer in answers.items() if key in command)

    units = ["consul.service", "envoy-sidecar.service", "web.service"]
    kept = runner.keep_evidence(run, units, tmp_path / "logs", "firstboot", secrets=[TOKEN])
    names = sorted(p.name for p in kept)
    assert names == [
        "verify-firstboot-envoy-clusters.json",
        "verify-firstboot-envoy-config_dump.json",
        "verify-firstboot-envoy-stats.txt",
        "verify-firstboot-journal.txt",
    ]
    assert sorted(p.name for p in (tmp_path / "logs").iterdir()) == names
    folder = tmp_path / "logs"
    dump = (folder / "verify-firstboot-envoy-config_dump.json").read_text()
    assert SERVICE_TOKEN not in dump and '"value": "<redacted>"' in dump
    journal = (folder / "verify-firstboot-journal.txt").read_text()
    assert TOKEN not in journal and "envoy-sidecar: started" in journal
    # What could not be read says why, instead of leaving a hole.
    stats = (folder / "verify-firstboot-envoy-stats.txt").read_text()
    assert stats.startswith("could not read it (exit 3)") and "Connection refused" in stats
    # The journal is of exactly the units involved.
    (journal_command,) = [c for c in asked if "journalctl" in c]
    assert all(f"-u {unit}" in journal_command for unit in units)
