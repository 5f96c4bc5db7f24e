"""Property tests: whatever goes in, ``parse_spec`` either succeeds or raises ``SpecError``
whose problems each read as one line naming the file."""

from __future__ import annotations

import copy
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from builder.errors import SpecError
from builder.spec.model import ImageSpec, parse_spec
from tests.paths import REPO

EXAMPLE_PATH = REPO / "images" / "web.yaml"
EXAMPLE: dict[str, Any] = yaml.safe_load(EXAMPLE_PATH.read_text())

SETTINGS = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])

#: Names the model knows, so random mappings reach past the first unknown-field check.
FIELD_NAMES = sorted(
    {"name", "version", "source", "port", "files", "dest", "content", "enabled"}
    | set(ImageSpec.model_fields)
)

scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=False),
    st.text(max_size=20),
)
keys = st.one_of(st.sampled_from(FIELD_NAMES), st.text(max_size=10), st.integers(), st.booleans())
yaml_data = st.recursive(
    scalars,
    lambda children: st.one_of(
        st.lists(children, max_size=4),
        st.dictionaries(keys, children, max_size=5),
    ),
    max_leaves=25,
)


def check_outcome(text: str, path: Path) -> None:
    """Succeed, or raise SpecError whose every problem is one non-empty line."""
    try:
        parse_spec(text, path)
    except SpecError as exc:
        assert exc.problems
        for problem in exc.problems:
            assert problem.file == str(path)
            assert problem.message.strip()
            line = str(problem)
            assert line.startswith(f"{path}: ")
            assert "\n" not in line and "\r" not in line


@SETTINGS
@given(st.one_of(st.dictionaries(keys, yaml_data, max_size=8), yaml_data))
def test_random_yaml_data_gives_only_spec_errors(data: Any) -> None:
    check_outcome(yaml.safe_dump(data), Path("images/random.yaml"))


# --- corrupting the worked example --------------------------------------------------------

Key = str | int


def key_paths(node: Any, prefix: tuple[Key, ...] = ()) -> list[tuple[Key, ...]]:
    """Every path into ``node`` (mappings and lists), not counting the root."""
    found: list[tuple[Key, ...]] = []
    items: list[tuple[Key, Any]] = []
    if isinstance(node, dict):
        items = list(node.items())
    elif isinstance(node, list):
        items = list(enumerate(node))
    for key, child in items:
        found.append((*prefix, key))
        found += key_paths(child, (*prefix, key))
    return found


PATHS = key_paths(EXAMPLE)


def get(node: Any, path: tuple[Key, ...]) -> Any:
    for key in path:
        node = node[key]
    return node


MAPPING_PATHS: list[tuple[Key, ...]] = [()] + [
    p for p in PATHS if isinstance(get(EXAMPLE, p), dict)
]
LEAF_PATHS = [p for p in PATHS if not isinstance(get(EXAMPLE, p), dict | list)]


def drop_key(data: Any, path: tuple[Key, ...]) -> None:
    del get(data, path[:-1])[path[-1]]


def set_value(data: Any, path: tuple[Key, ...], value: Any) -> None:
    get(data, path[:-1])[path[-1]] = value


def of_another_type(old: Any) -> Callable[[Any], bool]:
    return lambda value: type(value) is not type(old)


@st.composite
def corrupted_example(draw: st.DrawFn) -> dict[str, Any]:
    data = copy.deepcopy(EXAMPLE)
    for _ in range(draw(st.integers(min_value=1, max_value=3))):
        action = draw(st.sampled_from(["drop", "retype", "extra"]))
        if action == "drop":
            live = key_paths(data)
            drop_key(data, draw(st.sampled_from(live)))
        elif action == "retype":
            live = [p for p in key_paths(data) if p in LEAF_PATHS]
            if not live:
                continue
            path = draw(st.sampled_from(live))
            old = get(data, path)
            new = draw(yaml_data.filter(of_another_type(old)))
            set_value(data, path, new)
        else:
            live = [p for p in MAPPING_PATHS if _has(data, p)]
            path = draw(st.sampled_from(live))
            name = draw(st.text(min_size=1, max_size=10))
            get(data, path).setdefault(name, draw(yaml_data))
    return data


def _has(data: Any, path: tuple[Key, ...]) -> bool:
    try:
        return isinstance(get(data, path), dict)
    except (KeyError, IndexError, TypeError):
        return False


@SETTINGS
@given(corrupted_example())
def test_corrupted_example_gives_only_spec_errors(data: dict[str, Any]) -> None:
    # The real path, so the example's source file resolves and later checks run too.
    check_outcome(yaml.safe_dump(data), EXAMPLE_PATH)


def test_the_corruption_strategy_starts_from_a_valid_example() -> None:
    # Without this, every corrupted example failing would prove nothing.
    parse_spec(yaml.safe_dump(EXAMPLE), EXAMPLE_PATH)
    assert ("consul", "version") in LEAF_PATHS
    assert ("app", "files") in PATHS
    assert ("targets", "aws") in MAPPING_PATHS


# --- raw text --------------------------------------------------------------------------

yaml_punctuation = st.sampled_from(list(":-[]{}!&*#|>'\"%@`?,\n\t ") + ["!!binary ", "---", "..."])
raw_text = st.one_of(
    st.text(max_size=200),
    st.lists(st.one_of(yaml_punctuation, st.text(max_size=5)), max_size=60).map("".join),
)


@SETTINGS
@given(raw_text)
def test_raw_text_gives_only_spec_errors(text: str) -> None:
    check_outcome(text, Path("images/raw.yaml"))
