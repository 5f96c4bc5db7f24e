"""The baked-phase checks can fail: break a copy of a good image offline, verify it.

Three things are broken in the copy, the way a bad bake or a careless hand would:

- a secrets file holding the token is baked in (``zz-meshbake-secrets.json``);
- the ``envoy`` user is gone (passwd, shadow, group, gshadow);
- ``envoy-sidecar.service`` is disabled (its ``multi-user.target.wants`` link removed).

The report must fail exactly the checks that see those, and pass the rest. The baked
secrets file also lets consul start without first boot (its ExecCondition only looks
for that file), so the "consul is down until first boot" check must fail too: that is
the check doing its job, not a side effect to hide.

The good image is ``MESHBAKE_E2E_IMAGE`` when set, else the session's ``golden_image``
(tests/e2e/conftest.py bakes it).
"""

from __future__ import annotations

import json
import os
import subprocess
import uuid
from pathlib import Path

import pytest

from builder.verify import runner as verify
from tests.paths import REPO

pytestmark = [pytest.mark.image, pytest.mark.root]

SPEC = REPO / "images" / "web.yaml"

#: The token the verify run searches for; the broken image carries it.
TOKEN = uuid.UUID("5e1f0c1a-7a1e-4b0d-9c3e-b20ce4ba5e11")

#: The baked-phase checks the three breaks must fail, and only these.
MUST_FAIL = {
    "test_token_nowhere",
    "test_no_secret_files",
    "test_envoy_user_is_system_nologin",
    "test_units_enabled",
    "test_consul_not_running_and_journal_says_why",
}

#: A few checks the breaks do not touch: they must still pass.
MUST_PASS = {
    "test_consul_binary",
    "test_envoy_binary",
    "test_consul_user_is_system_nologin",
    "test_consul_config",
    "test_no_consul_chains",
    "test_machine_id_fresh",
}


@pytest.fixture(scope="session")
def good_image(request: pytest.FixtureRequest) -> Path:
    """A good golden web image: ``MESHBAKE_E2E_IMAGE``, else the session's bake."""
    given = os.environ.get("MESHBAKE_E2E_IMAGE")
    if given:
        path = Path(given)
        if not path.is_file():
            pytest.fail(f"MESHBAKE_E2E_IMAGE={given}: no such file")
        return path
    try:
        image: Path = request.getfixturevalue("golden_image")
    except pytest.FixtureLookupError:
        pytest.skip("no good image: set MESHBAKE_E2E_IMAGE or provide a golden_image fixture")
    return image


def run(*argv: str | Path) -> str:
    done = subprocess.run(
        [str(a) for a in argv], check=True, capture_output=True, text=True, timeout=600
    )
    return done.stdout


def first_partition(raw: Path) -> tuple[int, int]:
    """(offset, size) in bytes of the image's first (root) partition."""
    table = json.loads(run("sfdisk", "-J", raw))["partitiontable"]
    sector = int(table.get("sectorsize", 512))
    part = table["partitions"][0]
    return int(part["start"]) * sector, int(part["size"]) * sector


def drop_user_lines(path: Path, name: str) -> None:
    lines = path.read_text().splitlines(keepends=True)
    kept = [line for line in lines if not line.startswith(f"{name}:")]
    assert len(kept) < len(lines), f"{path} has no {name} entry"
    path.write_text("".join(kept))


def break_image(root: Path) -> None:
    secrets = root / "etc/consul.d/zz-meshbake-secrets.json"
    secrets.write_text(json.dumps({"acl": {"tokens": {"agent": str(TOKEN)}}}) + "\n")
    secrets.chmod(0o600)
    for name in ("passwd", "shadow", "group"):
        drop_user_lines(root / "etc" / name, "envoy")
    gshadow = root / "etc/gshadow"
    if gshadow.is_file() and any(
        line.startswith("envoy:") for line in gshadow.read_text().splitlines()
    ):
        drop_user_lines(gshadow, "envoy")
    wants = root / "etc/systemd/system/multi-user.target.wants/envoy-sidecar.service"
    assert wants.is_symlink(), "the good image does not enable envoy-sidecar.service"
    wants.unlink()


@pytest.fixture
def broken_image(good_image: Path, tmp_path: Path) -> Path:
    """A qcow2 copy of the good image with the three breaks in it."""
    raw = tmp_path / "broken.raw"
    run("qemu-img", "convert", "-O", "raw", good_image, raw)
    offset, size = first_partition(raw)
    assert offset == 1048576, f"the root partition starts at byte {offset}, not 1 MiB"
    loop = run(
        "losetup", "--find", "--show", "--offset", str(offset), "--sizelimit", str(size), raw
    ).strip()
    root = tmp_path / "root"
    root.mkdir()
    mounted = False
    try:
        run("mount", loop, root)
        mounted = True
        break_image(root)
    finally:
        if mounted:
            subprocess.run(["umount", str(root)], check=False)
        subprocess.run(["losetup", "-d", loop], check=False)
    out = tmp_path / "broken.qcow2"
    run("qemu-img", "convert", "-O", "qcow2", raw, out)
    raw.unlink()
    return out


def check_name(name: str) -> str:
    """``test_x[paramiko://127.0.0.1]`` -> ``test_x``."""
    return name.split("[", 1)[0]


def test_broken_image_fails_exactly_the_broken_checks(broken_image: Path) -> None:
    # The token baked in above is the one phase baked must not find anywhere.
    report = verify.verify_image(
        broken_image, spec=SPEC, phases=("baked",), progress=lambda message: None, token=str(TOKEN)
    )
    (phase,) = report.phases
    assert phase.error is None, phase.error
    outcomes = {check_name(c.name): c.outcome for c in phase.checks}
    failed = {name for name, outcome in outcomes.items() if outcome in ("failed", "error")}
    assert failed == MUST_FAIL, report.summary()
    assert all(outcomes.get(name) == "passed" for name in MUST_PASS), report.summary()
    assert not report.ok
