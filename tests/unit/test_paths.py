"""The one table of in-image paths: what the scripts source, and who may spell a path."""

from __future__ import annotations

import ast
import re
import subprocess
from collections import Counter
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


# --- git grep: each in-image path is spelled once across builder/ ----------------------

#: A table path followed by something that ends it (so "/etc/consul.d/service-web.json"
#: spells /etc/consul.d); the longest path wins, so each spelling counts once.
_SPELLED = re.compile(
    "|".join(
        re.escape(p) + r"(?![A-Za-z0-9._-])"
        for p in sorted((row.path for row in paths.TABLE), key=len, reverse=True)
    )
)

#: The one line each script reads the table with. It has to name the table's own place
#: in the image: that is where the scripts learn every other path.
BOOTSTRAP = f"paths_env=${{MESHBAKE_PATHS_ENV:-{paths.PATHS_ENV}}}"

#: Spellings left in prose (docstrings, doctests, comments) of modules this check does
#: not own, by (file, path): how many. The test fails when one appears and when one goes,
#: so this only shrinks.
PROSE: dict[tuple[str, str], int] = {
    ("builder/render/baked.py", paths.UNIT_DIR): 2,  # module doctest output
    ("builder/render/baked.py", paths.LIBEXEC): 1,  # runtime_scripts() docstring
    ("builder/render/baked.py", paths.MESH_ENV): 1,  # mesh_env() docstring
    ("builder/render/context.py", paths.BAKE_STAGE): 1,  # the layout in the docstring
    ("builder/render/escape.py", paths.MESHBAKE_CONFIG_DIR): 4,  # a doctest's example
    ("builder/spec/boundary.py", paths.MESHBAKE_CONFIG_DIR): 4,  # doctest examples
}


def _git_grep_spellings() -> Counter[tuple[str, str]]:
    """(file, path) -> how often ``git grep`` finds the path spelled in the file, for
    every file under builder/ (Python, scripts, templates, data), tracked or not."""
    argv = ["git", "grep", "--untracked", "-I", "-n", "--no-color", "-F"]
    for row in paths.TABLE:
        argv += ["-e", row.path]
    done = subprocess.run(
        [*argv, "--", "builder/"], cwd=REPO, capture_output=True, text=True, check=False
    )
    assert done.returncode in (0, 1), done.stderr  # 1: nothing found
    found: Counter[tuple[str, str]] = Counter()
    for line in done.stdout.splitlines():
        name, _, text = line.split(":", 2)
        for match in _SPELLED.finditer(text):
            found[name, match.group()] += 1
    return found


def test_git_grep_finds_each_in_image_path_defined_once() -> None:
    found = _git_grep_spellings()
    table = "builder/render/paths.py"
    source = (REPO / table).read_text()
    for row in paths.TABLE:
        definitions = re.findall(rf'^[A-Z_]+ = "{re.escape(row.path)}"$', source, re.M)
        assert len(definitions) == 1, f"{row.path}: defined {len(definitions)} times in {table}"
    scripts = REPO / "builder" / "image" / "scripts"
    bootstraps = Counter(
        f"builder/image/scripts/{s.name}"
        for s in scripts.iterdir()
        for line in s.read_text().splitlines()
        if line.strip() == BOOTSTRAP
    )
    stray: dict[tuple[str, str], int] = {}
    for (name, path), count in found.items():
        if name == table or name in PENDING:  # the table; PENDING is checked above
            continue
        if path == paths.PATHS_ENV:
            count -= bootstraps[name]
        if count != PROSE.get((name, path), 0):
            stray[name, path] = count
    missing = {key: 0 for key in PROSE if key not in found}
    assert not stray, f"use builder.render.paths (or paths.env in a script) instead: {stray}"
    assert not missing, f"no longer spelled, drop them from PROSE: {sorted(missing)}"


def test_the_check_sees_a_path_spelled_the_ways_scripts_do() -> None:
    text = (
        'f=${X:-$root/etc/envoy/token}; cp /etc/consul.d/tls/ca.pem "/etc/consul.d"/x /etc/envoyx'
    )
    assert [m.group() for m in _SPELLED.finditer(text)] == [
        paths.SIDECAR_TOKEN,
        paths.CONSUL_TLS_DIR,
        paths.CONSUL_CONFIG_DIR,
    ]


def _table_scripts() -> list[Path]:
    """The shipped scripts that read a path from the table."""
    variables = re.compile(
        r"\$\{?(" + "|".join(re.escape(r.variable) for r in paths.TABLE) + r")\b"
    )
    scripts = sorted((REPO / "builder" / "image" / "scripts").iterdir())
    # The sourced library (no shebang) is tested on its own in test_script_lib.py.
    return [
        s for s in scripts if s.read_bytes().startswith(b"#!") and variables.search(s.read_text())
    ]


def test_every_script_that_reads_a_path_sources_the_table_first() -> None:
    readers = _table_scripts()
    assert {s.name for s in readers} >= {"meshbake-bake", "meshbake-firstboot", "meshbake-check"}
    for script in readers:
        lines = script.read_text().splitlines()
        if script.name == "meshbake-bake":  # the build VM has the staged copy
            assert "paths_env=${MESHBAKE_PATHS_ENV:-$STAGE/paths.env}" in lines
            assert any(line.startswith('source_env "$paths_env"') for line in lines)
        elif "load_paths" in lines:  # the shared library's loader
            continue
        else:
            assert BOOTSTRAP in lines, script.name
            assert '. "$paths_env"' in lines, script.name
    library = (REPO / "builder" / "image" / "scripts" / "meshbake-lib.sh").read_text()
    assert BOOTSTRAP in [line.strip() for line in library.splitlines()]


def test_the_units_take_every_path_from_the_table(
    example: LoadedSpec, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Move every path of the table: no unit may still name an old one."""
    old = {row.path for row in paths.TABLE}
    mesh_env = paths.MESH_ENV
    for name, value in vars(paths).copy().items():
        if name.isupper() and isinstance(value, str) and value in old:
            monkeypatch.setattr(paths, name, "/moved" + value)
    units = baked.units(example.spec)
    for unit, text in units.items():
        left = [m.group() for m in _SPELLED.finditer(text.replace("/moved/", "/moved-"))]
        assert left == [], f"{unit} names {left} itself"
    assert f"EnvironmentFile=/moved{mesh_env}\n" in units["envoy-sidecar.service"]


def test_the_scripts_refuse_to_run_without_the_table(tmp_path: Path) -> None:
    """From the checkout there is no paths.env: each reader says so and stops."""
    missing = tmp_path / "no-paths.env"
    for script in _table_scripts():
        argv = ["sh", str(script), *(["consul"] if script.name == "meshbake-check" else [])]
        env = {"PATH": "/usr/bin:/bin", "MESHBAKE_PATHS_ENV": str(missing)}
        if script.name == "meshbake-firstboot":
            argv[0] = "bash"
        done = subprocess.run(argv, env=env, capture_output=True, text=True, check=False)
        assert done.returncode != 0, script.name
        assert f"cannot read {missing}, the table of in-image paths" in done.stderr, script.name
