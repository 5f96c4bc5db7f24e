"""proc: children never outlive meshbake, signals unwind like Ctrl-C, and a failed
tool is one line (exit 1) naming the tool, the stage and the log."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from importlib.abc import MetaPathFinder
from pathlib import Path

import pytest

from builder import proc
from builder.__main__ import run as run_cli
from builder.errors import CommandError, Interrupted, UserError
from tests.fixtures.signals import dispositions
from tests.paths import REPO


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z"


def _wait_dead(pids: list[int], seconds: float = 15) -> list[int]:
    deadline = time.monotonic() + seconds
    while any(_alive(p) for p in pids) and time.monotonic() < deadline:
        time.sleep(0.1)
    return [p for p in pids if _alive(p)]


def _pids_from(path: Path, count: int) -> list[int]:
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        if path.is_file():
            pids = path.read_text().split()
            if len(pids) >= count:
                return [int(p) for p in pids]
        time.sleep(0.05)
    raise AssertionError(f"{path} never listed {count} pids")


# --- a failed tool --------------------------------------------------------------------


def test_a_failed_tool_is_a_user_error_naming_tool_stage_and_log(tmp_path: Path) -> None:
    with pytest.raises(CommandError) as caught:
        proc.run(
            [
                "unshare", "--", "sh", "-c",
                "echo 'Get:1 http://deb.debian.org' ; echo 'E: mirror down' >&2; exit 4",
            ]
        )  # fmt: skip
    exc = caught.value
    assert isinstance(exc, UserError)
    exc.stage = "base"
    exc.write_log(tmp_path / "logs" / "base-sh.log")
    message = str(exc)
    assert "\n" not in message
    assert message.startswith("sh failed (exit 4) in stage base: E: mirror down")
    assert message.endswith(f"see {tmp_path / 'logs' / 'base-sh.log'}")
    # The log keeps everything the one line leaves out.
    log = (tmp_path / "logs" / "base-sh.log").read_text()
    assert "Get:1 http://deb.debian.org" in log
    assert "return code: 4" in log


def test_cli_exits_1_with_one_line_when_packer_fails(tmp_path: Path) -> None:
    """A Packer that cannot even say its version: exit 1, not 3, and no traceback."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    packer = bin_dir / "packer"
    packer.write_text("#!/bin/sh\necho 'packer: plugin directory is unreadable' >&2\nexit 2\n")
    packer.chmod(0o755)
    done = subprocess.run(
        [sys.executable, "-m", "builder", "render", "images/web.yaml", "--out", tmp_path / "ctx"],
        cwd=REPO,
        env={**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}"},
        capture_output=True,
        text=True,
        check=False,
    )
    assert done.returncode == 1, done.stderr
    assert "Traceback" not in done.stderr
    lines = done.stderr.strip().splitlines()
    assert lines[-1].startswith("meshbake: error: packer failed (exit 2)"), done.stderr
    assert "plugin directory is unreadable" in lines[-1]


# --- the guard --------------------------------------------------------------------------


def test_terminate_group_ends_the_whole_group(tmp_path: Path) -> None:
    pids = tmp_path / "pids"
    tree = f"sleep 300 & echo $! > {pids}; sleep 301"
    child = proc.spawn(["sh", "-c", tree], log_file=tmp_path / "log")
    (grandchild,) = _pids_from(pids, 1)
    proc.terminate_group(child)
    assert child.returncode is not None
    assert _wait_dead([grandchild]) == []


def test_a_sigkilled_meshbake_takes_its_children_down(tmp_path: Path) -> None:
    """PR_SET_PDEATHSIG on the guard: the parent dies outright, the group goes too."""
    pids = tmp_path / "pids"
    parent = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys, time; from pathlib import Path; from builder import proc\n"
            "proc.stream(['sh', '-c', 'sleep 300 & echo $! > ' + sys.argv[1] + '; sleep 301'],"
            " on_line=print)\n",
            str(pids),
        ],
        cwd=REPO,
    )
    try:
        (grandchild,) = _pids_from(pids, 1)
        assert _alive(grandchild)
        parent.kill()
        parent.wait()
        assert _wait_dead([grandchild]) == []
    finally:
        if parent.poll() is None:
            parent.kill()


def test_the_guard_ends_what_the_command_left_in_its_group(tmp_path: Path) -> None:
    pids = tmp_path / "pids"
    lines: list[str] = []
    code = proc.stream(
        ["sh", "-c", f"sleep 300 >/dev/null 2>&1 & echo $! > {pids}; echo done; exit 3"],
        on_line=lines.append,
    )
    assert (code, lines) == (3, ["done\n"])
    assert _wait_dead(_pids_from(pids, 1)) == []


# --- signals ----------------------------------------------------------------------------


def _stream_under_signals(
    tmp_path: Path, *sent: signal.Signals, ignored: frozenset[signal.Signals] = frozenset()
) -> int:
    """A child Python that streams a long command under ``handle_signals``, started with
    ``ignored`` ignored and the other signals at their default; send it ``sent`` in turn
    and return its exit code, once it and its command are gone."""
    pids = tmp_path / "pids"
    script = (
        "import sys\n"
        "from builder import proc\n"
        "from builder.errors import Interrupted\n"
        "try:\n"
        "    with proc.handle_signals():\n"
        "        proc.stream(['sh', '-c', 'sleep 300 & echo $! > ' + sys.argv[1] + '; wait'],"
        " on_line=print)\n"
        "except Interrupted as exc:\n"
        "    sys.exit(exc.exit_code)\n"
    )
    child = subprocess.Popen(
        [sys.executable, "-c", script, str(pids)], cwd=REPO, preexec_fn=dispositions(ignored)
    )
    try:
        (sleeper,) = _pids_from(pids, 1)
        for sig in sent:
            child.send_signal(sig)
        code = child.wait(timeout=30)
        assert _wait_dead([sleeper]) == []
        return code
    finally:
        if child.poll() is None:
            child.kill()


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM, signal.SIGHUP])
def test_each_signal_ends_the_child_and_exits_128_plus_signal(
    tmp_path: Path, sig: signal.Signals
) -> None:
    assert _stream_under_signals(tmp_path, sig) == 128 + sig


def test_sigint_is_handled_even_when_inherited_as_ignored(tmp_path: Path) -> None:
    """The cause of the Ctrl-C "hang": a background job of a script inherits SIGINT
    ignored, Python keeps it so, and the bake ran on."""
    code = _stream_under_signals(tmp_path, signal.SIGINT, ignored=frozenset({signal.SIGINT}))
    assert code == 128 + signal.SIGINT


def test_sighup_stays_ignored_under_nohup(tmp_path: Path) -> None:
    """``nohup meshbake build`` must outlive the terminal. The SIGTERM sent after the
    SIGHUP decides the exit: had SIGHUP been handled, it would have come first (pending
    signals are handled lowest number first) and the code would be 129."""
    code = _stream_under_signals(
        tmp_path, signal.SIGHUP, signal.SIGTERM, ignored=frozenset({signal.SIGHUP})
    )
    assert code == 128 + signal.SIGTERM


def test_handle_signals_restores_the_previous_handlers() -> None:
    before = {s: signal.getsignal(s) for s in proc.HANDLED_SIGNALS}
    with proc.handle_signals():
        assert signal.getsignal(signal.SIGTERM) is not before[signal.SIGTERM]
    assert {s: signal.getsignal(s) for s in proc.HANDLED_SIGNALS} == before


def test_an_interrupt_waits_for_a_shielded_cleanup() -> None:
    done = []
    with pytest.raises(Interrupted) as caught, proc.handle_signals():
        with proc.shielded():
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(0.05)  # the handler has run by now, and held back
            done.append("cleanup")
        done.append("not reached")
    assert done == ["cleanup"]
    assert caught.value.exit_code == 143


# --- imports ---------------------------------------------------------------------------


class _InterruptingFinder(MetaPathFinder):
    def find_spec(self, name: str, path: object, target: object = None) -> None:
        if name == "builder.cli.main":
            raise KeyboardInterrupt
        return None


@pytest.fixture
def ctrl_c_during_import(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    for name in [m for m in sys.modules if m == "builder.cli.main"]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setattr(sys, "meta_path", [_InterruptingFinder(), *sys.meta_path])
    yield


@pytest.mark.usefixtures("ctrl_c_during_import")
def test_ctrl_c_during_imports_exits_130_quietly(capsys: pytest.CaptureFixture[str]) -> None:
    assert run_cli() == 130
    err = capsys.readouterr().err
    assert err == "meshbake: interrupted\n"
