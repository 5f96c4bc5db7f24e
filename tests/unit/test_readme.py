"""The README's table of in-image paths is generated from builder/render/paths.py, the
same table the image's scripts source; ``--update-golden`` rewrites it."""

from __future__ import annotations

import re
import typing
from collections.abc import Iterator
from enum import Enum
from typing import Any

import pytest
from pydantic import BaseModel
from pydantic_core import PydanticUndefined

from builder.render import paths
from builder.spec.model import ImageSpec
from tests.paths import REPO

README = REPO / "README.md"
SECTION = re.compile(r"(<!-- paths:begin -->\n)(.*?)(<!-- paths:end -->)", re.S)


def test_readme_path_table_is_generated(request: pytest.FixtureRequest) -> None:
    text = README.read_text()
    match = SECTION.search(text)
    assert match is not None, "README.md lost its <!-- paths:begin/end --> markers"
    if request.config.getoption("--update-golden"):
        README.write_text(text[: match.start(2)] + paths.markdown_table() + text[match.end(2) :])
        return
    assert match.group(2) == paths.markdown_table(), "stale: run make golden"


# --- the spec's field table ------------------------------------------------------------

FIELDS_HEADING = "### Every field, with its default"


def _field_rows() -> dict[str, str]:
    """The table under FIELDS_HEADING: each dotted path of its first cell -> the row."""
    text = README.read_text()
    assert FIELDS_HEADING in text.splitlines(), f"README.md lost its heading {FIELDS_HEADING!r}"
    section = text.split(FIELDS_HEADING, 1)[1].split("\n#", 1)[0]
    rows = {}
    for line in section.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|", 1)]
        if len(cells) == 2 and cells[0].startswith("`"):
            for key in re.findall(r"`([^`]+)`", cells[0]):
                rows[key.removesuffix("[]")] = cells[1]
    assert rows, f"no table under {FIELDS_HEADING!r}"
    return rows


def _model_of(annotation: object) -> type[BaseModel] | None:
    for candidate in (annotation, *typing.get_args(annotation)):
        for kind in (candidate, *typing.get_args(candidate)):
            if isinstance(kind, type) and issubclass(kind, BaseModel):
                return kind
    return None


def _leaf_fields(model: type[BaseModel], prefix: str = "") -> Iterator[tuple[str, Any]]:
    """(dotted path, default) of every leaf field; ``None`` as the default where there is
    none worth writing down (required, unset, empty)."""
    for name, info in model.model_fields.items():
        path = prefix + (info.alias or name)
        sub = _model_of(info.annotation)
        if sub is not None:
            yield from _leaf_fields(sub, path + ".")
            continue
        default = info.default if info.default is not PydanticUndefined else None
        yield path, default


def _shown(default: Any) -> str | None:
    """How the README writes a default (YAML's spelling), or None for no default."""
    if isinstance(default, Enum):
        return str(default.value)
    if isinstance(default, bool):
        return "true" if default else "false"
    if isinstance(default, int | str) and default != "":
        return str(default)
    return None


def test_the_field_table_names_every_model_field_with_its_default() -> None:
    """Every leaf field of the spec model is in the table (its own row, or named in the
    row of the nearest enclosing field), and a default is written right after it."""
    rows = _field_rows()
    problems = []
    for path, default in _leaf_fields(ImageSpec):
        owner = max((k for k in rows if path == k or path.startswith(k + ".")), key=len, default="")
        if not owner:
            problems.append(f"{path}: no row")
            continue
        meaning = rows[owner]
        shown = _shown(default)
        if path == owner:
            if shown is not None and not re.search(rf"\(`?\"?{re.escape(shown)}\b", meaning):
                problems.append(f"{path}: default {shown} not written as ({shown}...)")
            continue
        rest = path[len(owner) + 1 :].split(".")
        missing = [part for part in rest if f"`{part}`" not in meaning]
        if missing:
            problems.append(f"{path}: {', '.join(missing)} not named in the {owner} row")
        elif shown is not None:
            after = rf"`{re.escape(rest[-1])}`\s*\(`?\"?{re.escape(shown)}\b"
            if not re.search(after, meaning):
                problems.append(f"{path}: default {shown} not written after `{rest[-1]}`")
    assert problems == [], "\n".join(problems)
