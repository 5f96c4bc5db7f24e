"""A wheel works, not only a checkout: scripts/, cloudinit/, the pinned key, the
templates and the Testinfra suites ship inside it, and an installed meshbake renders."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def wheel(repo: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    # Build from a copy of the tracked files, so nothing lands in the checkout's build/.
    src = tmp_path_factory.mktemp("src")
    files = subprocess.run(
        ["git", "ls-files", "-z"], cwd=repo, check=True, capture_output=True
    ).stdout.split(b"\0")
    for name in filter(None, files):
        target = src / name.decode()
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes((repo / name.decode()).read_bytes())
        target.chmod((repo / name.decode()).stat().st_mode)
    out = tmp_path_factory.mktemp("wheel")
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(out), str(src)],
        check=True,
        capture_output=True,
    )
    (built,) = out.glob("meshbake-*.whl")
    return built


def test_wheel_carries_the_shipped_files(wheel: Path) -> None:
    names = set(zipfile.ZipFile(wheel).namelist())
    scripts = ("meshbake-bake", "meshbake-firstboot", "meshbake-redirect", "meshbake-cleanup")
    for script in (*scripts, "meshbake-lib.sh"):
        assert f"builder/image/scripts/{script}" in names
    assert "builder/image/cloud.cfg.d/90-meshbake.cfg" in names
    assert "builder/build/keys/hashicorp.asc" in names
    assert "builder/render/templates/envoy-sidecar.service.j2" in names
    assert {
        "builder/verify/imagetests/test_baked.py",
        "builder/verify/imagetests/conftest.py",
    } <= names
    assert not any(n.startswith("tests/") for n in names)


def test_installed_wheel_renders_a_context(wheel: Path, repo: Path, tmp_path: Path) -> None:
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    # With its dependencies from the package index: a clean install, as a user gets it.
    pip = [str(venv / "bin" / "python"), "-m", "pip", "install", "-q"]
    subprocess.run([*pip, str(wheel)], check=True, capture_output=True)
    out = tmp_path / "ctx"
    # Run from elsewhere, so that nothing can come from the checkout.
    done = subprocess.run(
        [
            str(venv / "bin" / "meshbake"),
            "render",
            str(repo / "images" / "web.yaml"),
            "--out",
            str(out),
        ],
        cwd=tmp_path,
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stderr
    script = out / "stage/rootfs/usr/libexec/meshbake/meshbake-redirect"
    assert (
        script.read_bytes()
        == (repo / "builder" / "image" / "scripts" / "meshbake-redirect").read_bytes()
    )
    assert (out / "stage/rootfs/etc/cloud/cloud.cfg.d/90-meshbake.cfg").is_file()
