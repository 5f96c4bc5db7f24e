"""The one table of in-image paths: what the scripts source, and who may spell a path."""

from __future__ import annotations

import ast
import subprocess
from pathlib import Path

import pytest

from builder.render import baked, paths, tags
from builder.render.context import render_context
from builder.render.hcl import image_tags
from builder.spec.model import LoadedSpec
from builder.tools.packer import PackerVersion
from tests.paths import REPO

#: Modules that still spell an in-image path themselves, each with its reason. The test
#: below also fails when one of them no longer does, so this list only shrinks.
#: The spec layer sits below render and cannot import the table.
PENDING: dict[str, str] = {
    "builder/spec/model.py": "spec layer: managed destinations",
    "builder/verify/imagetests/test_baked.py": "the image suites: to move onto paths.py",
    "builder/verify/imagetests/test_firstboot.py": "the image suites: to move onto paths.py",
}


def test_paths_env_sources_to_the_table(tmp_path: Path) -> None:
    env = tmp_path / "paths.env"
    env.write_text(paths.paths_env())
    names = [row.variable for row in paths.TABLE]
    script = f'. "{env}"; ' + "; ".join(f'printf "%s\\n" "${name}"' for name in names)
    done = subprocess.run(["sh", "-c", script], capture_output=True, text=True, check=True)
    assert done.stdout.splitlines() == [row.path for row in paths.TABLE]


def test_every_variable_and_path_is_in_the_table_once() -> None:
    variables = [row.variable for row in paths.TABLE]
    locations = [row.path for row in paths.TABLE]
    assert len(set(variables)) == len(variables)
    assert len(set(locations)) == len(locations)


def test_a_path_that_needs_quoting_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    bad = paths.ImagePath("MESHBAKE_BAD", "/etc/a b", "needs quoting")
    monkeypatch.setattr(paths, "TABLE", (*paths.TABLE, bad))
    with pytest.raises(ValueError, match="MESHBAKE_BAD"):
        paths.paths_env()


def test_the_image_and_the_stage_get_the_paths_file(example: LoadedSpec, tmp_path: Path) -> None:
    folder = render_context(example, tmp_path / "ctx", packer_version=PackerVersion(1, 6, 6))
    rendered = folder.rootfs / paths.rel(paths.PATHS_ENV)
    assert rendered.read_text() == paths.paths_env()
    assert (folder.stage_dir / "paths.env").read_text() == paths.paths_env()
    # The sidecar unit and mesh.env name the same token file the table does.
    assert f"-token-file={paths.SIDECAR_TOKEN}" in baked.sidecar_argv(example.spec)


def test_markdown_table_has_one_row_per_path() -> None:
    lines = paths.markdown_table().splitlines()
    assert lines[:2] == ["| path | variable | what |", "|---|---|---|"]
    assert len(lines) == 2 + len(paths.TABLE)
    for row, line in zip(paths.TABLE, lines[2:], strict=True):
        assert line.startswith(f"| `{row.path}` | `{row.variable}` |")


def _string_constants(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    return {
        n.value for n in ast.walk(tree) if isinstance(n, ast.Constant) and isinstance(n.value, str)
    }


def test_only_paths_py_spells_an_in_image_path() -> None:
    spelled: dict[str, set[str]] = {}
    for module in sorted((REPO / "builder").rglob("*.py")):
        if module.name == "paths.py" and module.parent.name == "render":
            continue
        found = {row.path for row in paths.TABLE} & _string_constants(module)
        if found:
            spelled[str(module.relative_to(REPO))] = found
    unexpected = {m: p for m, p in spelled.items() if m not in PENDING}
    assert not unexpected, f"use builder.render.paths instead of: {unexpected}"
    stale = sorted(set(PENDING) - set(spelled))
    assert not stale, f"no longer spell a path, drop them from PENDING: {stale}"


def test_the_aws_client_takes_tag_names_from_one_place(example: LoadedSpec) -> None:
    client = REPO / "builder" / "aws" / "client.py"
    literals = {s for s in _string_constants(client) if s.startswith("meshbake:")}
    assert literals == set()
    # What the template writes is what the client reads back.
    from builder.aws.client import AmiRecord

    written = image_tags(example)
    record = AmiRecord("ami-1", "us-east-1", "web", None, "available", written, ())  # type: ignore[arg-type]
    assert (record.spec_hash, record.consul, record.envoy) == (
        example.digest,
        example.spec.consul.version,
        example.spec.envoy.version,
    )
    assert {tags.IMAGE, tags.SPEC_HASH, tags.BUILD_TIME} <= set(written)
