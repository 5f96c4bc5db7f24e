"""Golden renders: every ``images/*.yaml`` renders into ``tests/golden/<name>/``.

The context is rendered without a Packer binary (``packer_version`` 1.6.6), so the
HCL is the Builder's output before ``packer fmt``; nothing else is normalised. After a
deliberate change, rewrite the folders with ``pytest tests/unit/test_golden.py
--update-golden`` and read the diff before committing it.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from builder.render.context import render_context
from builder.spec.model import load_spec
from builder.tools.packer import PackerVersion
from tests.paths import REPO

GOLDEN = REPO / "tests" / "golden"
SPECS = sorted((REPO / "images").glob("*.yaml"))


def tree(root: Path) -> dict[str, bytes]:
    """Relative path -> content of every file under ``root``."""
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in root.rglob("*") if p.is_file()}


def render(spec: Path, out: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, bytes]:
    # Load by the path relative to the checkout, as a user would, so meshbake.json
    # records "images/<name>.yaml" and not this machine's checkout path.
    monkeypatch.chdir(REPO)
    loaded = load_spec(spec.relative_to(REPO))
    ctx = render_context(loaded, out, packer_version=PackerVersion(1, 6, 6))
    return tree(ctx.root)


def test_there_is_a_spec_to_render() -> None:
    assert any(spec.name == "web.yaml" for spec in SPECS)


@pytest.mark.parametrize("spec", SPECS, ids=lambda p: p.stem)
def test_render_matches_golden(
    spec: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, request: pytest.FixtureRequest
) -> None:
    rendered = render(spec, tmp_path / "ctx", monkeypatch)
    golden = GOLDEN / spec.stem
    if request.config.getoption("--update-golden"):
        shutil.rmtree(golden, ignore_errors=True)  # drops stale files too
        shutil.copytree(tmp_path / "ctx", golden)
    assert golden.is_dir(), f"{golden} is missing: run pytest with --update-golden"
    expected = tree(golden)
    missing = sorted(set(expected) - set(rendered))
    extra = sorted(set(rendered) - set(expected))
    assert not missing, f"golden files no longer rendered: {missing}"
    assert not extra, f"rendered files not in {golden}: {extra} (run with --update-golden)"
    for name in sorted(expected):
        if rendered[name] != expected[name]:
            # Compare as text first, so pytest shows a line diff.
            assert rendered[name].decode(errors="replace") == expected[name].decode(
                errors="replace"
            ), name
            assert rendered[name] == expected[name], name


def test_every_golden_folder_has_a_spec() -> None:
    stems = {spec.stem for spec in SPECS}
    folders = {p.name for p in GOLDEN.iterdir() if p.is_dir()} if GOLDEN.is_dir() else set()
    assert folders <= stems, f"golden folders without a spec: {sorted(folders - stems)}"
