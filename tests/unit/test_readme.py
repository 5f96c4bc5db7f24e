"""The README's table of in-image paths is generated from builder/render/paths.py, the
same table the image's scripts source; ``--update-golden`` rewrites it."""

from __future__ import annotations

import re

import pytest

from builder.render import paths
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
