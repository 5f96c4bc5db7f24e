"""The image scripts' shared library, ``meshbake-lib.sh``, tested once on its own, the
way openstack/diskimage-builder tests its ``lib/die`` and ``lib/common-functions``: a
small script sources it in each shell the scripts use and checks what it does."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

from builder.render import escape, paths
from tests.paths import REPO

SCRIPTS = REPO / "builder" / "image" / "scripts"
LIB = SCRIPTS / "meshbake-lib.sh"
#: The scripts are dash (/bin/sh) and bash; meshbake-firstboot runs bash with pipefail.
SHELLS = ("sh", "bash", "bash -o pipefail")

#: Values that must come back exactly, never run: what escape.shell_env_file quotes.
HOSTILE_VALUES = {
    "MESHBAKE_A": "$(touch {canary})",
    "MESHBAKE_B": "`touch {canary}`",
    "MESHBAKE_C": 'it\'s; touch {canary} \\ "x" $HOME %s *',
    "MESHBAKE_D": "",
}

#: Env files the loader must refuse before sourcing them (one per line of attack).
HOSTILE_FILES = {
    "command substitution": "MESHBAKE_X=$(touch {canary})\n",
    "backticks": "MESHBAKE_X=`touch {canary}`\n",
    "double quotes expand": 'MESHBAKE_X="$(touch {canary})"\n',
    "a second command": "MESHBAKE_X=a; touch {canary}\n",
    "a bare command": "# fine\ntouch {canary}\n",
    "not meshbake's variable": "PATH=/nonexistent\n",
    "a function": "say() {{ touch {canary}; }}\n",
    "a trailing quote": "MESHBAKE_X='a'b'\n",
    "a line continuation": "MESHBAKE_X=a\\\ntouch {canary}\n",
}


def run(shell: str, body: str, **env: str) -> subprocess.CompletedProcess[str]:
    """Source the library in ``shell`` as a script does, then run ``body``."""
    script = f'set -eu\nprog=meshbake-test\n. "{LIB}"\n{body}\n'
    return subprocess.run(
        [*shell.split(), "-c", script],
        env={"PATH": "/usr/bin:/bin", **env},
        capture_output=True,
        text=True,
        check=False,
    )


@pytest.mark.parametrize("shell", SHELLS)
def test_say_writes_one_line_to_stderr(shell: str) -> None:
    done = run(shell, "say 'two words' again")
    assert (done.returncode, done.stdout) == (0, "")
    assert done.stderr == "meshbake-test: two words again\n"


@pytest.mark.parametrize("shell", SHELLS)
def test_die_says_it_and_exits_1_or_the_scripts_code(shell: str) -> None:
    done = run(shell, "die 'it broke'; echo after")
    assert (done.returncode, done.stdout, done.stderr) == (1, "", "meshbake-test: it broke\n")
    assert run(shell, "die_code=255; die no").returncode == 255


@pytest.mark.parametrize("shell", SHELLS)
def test_without_an_env_file_load_env_does_nothing(shell: str) -> None:
    done = run(shell, 'load_env; echo "${MESHBAKE_A-unset}"')
    assert (done.returncode, done.stdout, done.stderr) == (0, "unset\n", "")


@pytest.mark.parametrize("shell", SHELLS)
def test_a_rendered_env_file_gives_back_every_value_and_runs_nothing(
    shell: str, tmp_path: Path
) -> None:
    canary = tmp_path / "ran"
    values = {key: value.format(canary=canary) for key, value in HOSTILE_VALUES.items()}
    env_file = tmp_path / "mesh.env"
    env_file.write_text(escape.shell_env_file(values, "a header"))
    show = "; ".join(f"printf '%s\\0' \"${key}\"" for key in values)
    done = run(shell, f"load_env; {show}", MESHBAKE_ENV_FILE=str(env_file))
    assert done.returncode == 0, done.stderr
    assert done.stdout.split("\0")[:-1] == list(values.values())
    assert not canary.exists()


@pytest.mark.parametrize("shell", SHELLS)
@pytest.mark.parametrize("attack", list(HOSTILE_FILES))
def test_a_hostile_env_file_is_refused_before_it_is_sourced(
    shell: str, attack: str, tmp_path: Path
) -> None:
    canary = tmp_path / "ran"
    env_file = tmp_path / "mesh.env"
    env_file.write_text(HOSTILE_FILES[attack].format(canary=canary))
    done = run(shell, "load_env; echo loaded", MESHBAKE_ENV_FILE=str(env_file))
    assert (done.returncode, done.stdout) == (1, "")
    assert re.fullmatch(
        rf"meshbake-test: {re.escape(str(env_file))}:\d+: not a MESHBAKE_NAME=value"
        r" assignment; refusing to source it\n",
        done.stderr,
    ), done.stderr
    assert not canary.exists()


@pytest.mark.parametrize("shell", SHELLS)
def test_an_unreadable_env_file_is_named(shell: str, tmp_path: Path) -> None:
    for missing in (tmp_path / "absent.env", tmp_path):  # nothing there; a folder
        done = run(shell, "load_env", MESHBAKE_ENV_FILE=str(missing))
        assert done.returncode == 1
        assert done.stderr == f"meshbake-test: cannot read MESHBAKE_ENV_FILE={missing}\n"


@pytest.mark.parametrize("shell", SHELLS)
def test_load_paths_reads_the_rendered_table(shell: str, tmp_path: Path) -> None:
    table = tmp_path / "paths.env"
    table.write_text(paths.paths_env())
    done = run(shell, 'load_paths; echo "$MESHBAKE_LIB"', MESHBAKE_PATHS_ENV=str(table))
    assert (done.returncode, done.stdout, done.stderr) == (0, paths.LIB + "\n", "")
    missing = tmp_path / "absent.env"
    done = run(shell, "load_paths", MESHBAKE_PATHS_ENV=str(missing))
    assert done.returncode == 1
    assert f"cannot read {missing}, the table of in-image paths" in done.stderr


def test_the_scripts_share_the_library_instead_of_copying_it() -> None:
    """No script defines say/die or sources MESHBAKE_ENV_FILE itself any more."""
    copies = []
    for script in sorted(SCRIPTS.iterdir()):
        if script == LIB:
            continue
        text = script.read_text()
        if re.search(r"^(say|die)\(\)", text, re.M) or '. "$MESHBAKE_ENV_FILE"' in text:
            copies.append(script.name)
    assert copies == []
