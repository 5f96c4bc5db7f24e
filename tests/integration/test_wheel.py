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
        source, target = repo / name.decode(), src / name.decode()
        target.parent.mkdir(parents=True, exist_ok=True)
        if source.is_symlink():  # the top-level scripts/ and cloudinit/ point into builder/
            target.symlink_to(source.readlink())
            continue
        target.write_bytes(source.read_bytes())
        target.chmod(source.stat().st_mode)
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
    assert "builder/bake/keys/hashicorp.asc" in names
    assert "builder/render/templates/envoy-sidecar.service.j2" in names
    assert {
        "builder/verify/imagetests/test_baked.py",
        "builder/verify/imagetests/conftest.py",
    } <= names
    assert not any(n.startswith("tests/") for n in names)


@pytest.fixture(scope="module")
def venv(wheel: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    venv = tmp_path_factory.mktemp("venv")
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    # With its dependencies from the package index: a clean install, as a user gets it.
    pip = [str(venv / "bin" / "python"), "-m", "pip", "install", "-q"]
    subprocess.run([*pip, str(wheel)], check=True, capture_output=True)
    return venv


def test_installed_wheel_runs_its_scripts_with_their_library(venv: Path, tmp_path: Path) -> None:
    where = subprocess.run(
        [
            str(venv / "bin" / "python"),
            "-c",
            "import importlib.resources as r; print(r.files('builder.image') / 'scripts')",
        ],
        cwd=tmp_path,
        check=True,
        capture_output=True,
        text=True,
    ).stdout.strip()
    scripts = Path(where)
    assert str(scripts).startswith(str(venv)), scripts  # the wheel's copy, not the checkout's
    # A planted env file: the script runs from the wheel, sources the library beside it,
    # and the library refuses the file before sourcing it.
    planted = tmp_path / "mesh.env"
    planted.write_text("MESHBAKE_SERVICE=web; touch pwned\n")
    done = subprocess.run(
        ["sh", str(scripts / "meshbake-redirect")],
        cwd=tmp_path,
        env={"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "MESHBAKE_ENV_FILE": str(planted)},
        capture_output=True,
        text=True,
    )
    assert done.returncode == 1
    assert done.stderr == (
        f"meshbake-redirect: {planted}:1: not a MESHBAKE_NAME=value assignment;"
        " refusing to source it\n"
    )
    assert not (tmp_path / "pwned").exists()


def test_the_top_level_scripts_and_cloudinit_are_the_packages_own(repo: Path) -> None:
    # One way to find them: the design's top-level names lead into the package's folders.
    assert (repo / "scripts").resolve() == repo / "builder" / "image" / "scripts"
    assert (repo / "cloudinit").resolve() == repo / "builder" / "image" / "cloud.cfg.d"


def test_installed_wheel_renders_a_context(venv: Path, repo: Path, tmp_path: Path) -> None:
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
