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


# --- issue 16: CLI arguments, environment variables and build folders ------------------------
#
# Whatever the arguments, variables or build folder, meshbake ends in a result or a
# one-line ``UserError`` (the CLI: exit 0, 1, or argparse's 2), never a traceback (exit 3),
# and writes nothing outside the folders it was given. Nothing here reaches a network or
# boots a VM: verify always gets an image that is not a regular file or a spec that does
# not load, and the AWS commands get no valid region.

import contextlib  # noqa: E402
import io  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import re  # noqa: E402
import shutil  # noqa: E402
import tempfile  # noqa: E402
from collections.abc import Iterator  # noqa: E402

from builder.cli import main as cli  # noqa: E402
from builder.errors import UserError  # noqa: E402

FUZZ = settings(max_examples=120, deadline=None, suppress_health_check=list(HealthCheck))

#: Paths (relative to the scratch folder the CLI runs in) of every kind that matters.
ODD_PATHS = [
    "spec.yaml", "missing.yaml", "folder", "fifo", "/dev/zero", "/dev/null", "loop",
    "link-to-victim", "junk.json", "list.json", "out", ".", "..", "nosuch/../victim",
    "victim", "out/..", "/", "/proc/self/x", "a\tb", "-", "--", "folder/", "spec.yaml/x",
]  # fmt: skip
#: For build: nothing that names or holds a spec, so no build ever starts (downloads).
NO_SPEC_PATHS = [p for p in ODD_PATHS if p not in ("spec.yaml", ".", "..", "out/..", "/")]
words = st.one_of(st.text(max_size=12), st.sampled_from(["1", "-1", "0", "99999999999999999999"]))
not_a_region = st.one_of(
    st.text(max_size=16), st.sampled_from(["us-east-1x", "", "US-EAST-1", "us east 1"])
).filter(lambda r: re.match(r"^[a-z]{2}(-gov)?-[a-z]+-\d$", r) is None)
#: Image names (not spec files), so the AWS commands never read a spec's regions.
names = st.one_of(st.just("web"), words.filter(lambda w: not w.endswith((".yaml", ".yml"))))

COMMANDS: dict[str, list[st.SearchStrategy[list[str]]]] = {
    "render": [
        st.sampled_from(ODD_PATHS).map(lambda p: [p]),
        st.sampled_from(ODD_PATHS).map(lambda p: ["--out", p]),
    ],
    "userdata": [
        st.sampled_from(ODD_PATHS).map(lambda p: [p]),
        st.tuples(
            st.sampled_from(["", "agent=", "service=", "x="]), st.sampled_from(ODD_PATHS)
        ).map(lambda t: ["--token-file", t[0] + t[1]]),
        st.tuples(
            st.sampled_from(
                ["--gossip-key-file", "--tls-ca-file", "--tls-cert-file", "--tls-key-file"]
            ),
            st.sampled_from(ODD_PATHS),
        ).map(list),
    ],
    "verify": [
        # never a regular file as the image, so no VM boots
        st.sampled_from(["folder", "fifo", "/dev/null", "missing.qcow2", "loop"]).map(
            lambda p: [p]
        ),
        st.sampled_from(ODD_PATHS).map(lambda p: ["--spec", p]),
        st.sampled_from(["baked", "firstboot", "x"]).map(lambda p: ["--phase", p]),
        st.sampled_from(ODD_PATHS).map(lambda p: ["--report", p]),
        st.just(["--allow-spec-drift"]),
    ],
    "images": [names.map(lambda w: [w]), not_a_region.map(lambda r: ["--region", r])],
    "prune": [
        names.map(lambda w: [w]),
        not_a_region.map(lambda r: ["--region", r]),
        words.map(lambda w: ["--keep", w]),
    ],
    "build": [
        st.sampled_from(NO_SPEC_PATHS).map(lambda p: [p]),
        st.sampled_from(ODD_PATHS).map(lambda p: ["--cache", p]),
        st.just(["--dry-run"]),  # qemu is the default target: refused before any work
        words.map(lambda w: ["-j", w]),
    ],
}


@contextlib.contextmanager
def scratch() -> Iterator[Path]:
    """A folder with one file of every kind, the CLI's working folder meanwhile."""
    root = Path(tempfile.mkdtemp(prefix="meshbake-fuzz-"))
    before = Path.cwd()
    try:
        shutil.copy(EXAMPLE_PATH, root / "spec.yaml")
        shutil.copytree(EXAMPLE_PATH.parent / "files", root / "files")
        (root / "folder").mkdir()
        os.mkfifo(root / "fifo")
        (root / "loop").symlink_to("loop")
        (root / "victim").mkdir()
        (root / "victim" / "keep").write_text("mine")
        (root / "link-to-victim").symlink_to(root / "victim")
        (root / "junk.json").write_text("{")
        (root / "list.json").write_text("[]")
        os.chdir(root)
        yield root
    finally:
        os.chdir(before)
        shutil.rmtree(root, ignore_errors=True)


def run_cli(argv: list[str]) -> tuple[int, str]:
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        try:
            code = cli.main(argv)
        except SystemExit as exc:  # argparse: usage errors (2) and --help (0)
            code = exc.code if isinstance(exc.code, int) else 2
    return code, err.getvalue()


@st.composite
def command_lines(draw: st.DrawFn) -> list[str]:
    command = draw(st.sampled_from(sorted(COMMANDS)))
    argv = [command]
    for _ in range(draw(st.integers(min_value=0, max_value=4))):
        argv += draw(st.sampled_from(COMMANDS[command]).flatmap(lambda s: s))
    return argv


@FUZZ
@given(command_lines())
def test_cli_arguments_never_end_in_a_traceback(argv: list[str]) -> None:
    with scratch() as root:
        os.environ["AWS_EC2_METADATA_DISABLED"] = "true"
        code, err = run_cli(argv)
        assert code in (0, 1, 2), (argv, err)
        assert "Traceback" not in err and "internal error" not in err, (argv, err)
        assert (root / "victim" / "keep").read_text() == "mine"
        assert sorted(p.name for p in (root / "victim").iterdir()) == ["keep"]


env_values = st.one_of(
    st.sampled_from(ODD_PATHS), st.text(max_size=20).filter(lambda t: "\0" not in t)
)


@FUZZ
@given(env_values)
def test_the_cache_variable_gives_a_folder_or_one_line(value: str) -> None:
    from builder.bake import base

    with scratch():
        os.environ["MESHBAKE_CACHE"] = value
        try:
            folder = base.cache_folder(None)
        except UserError as exc:
            assert "\n" not in str(exc)
        else:
            assert not folder.exists() or folder.is_dir()
        finally:
            del os.environ["MESHBAKE_CACHE"]


# --- build folders ---------------------------------------------------------------------------

BUILD_ENTRIES = ["manifest.json", ".manifest.json.tmp", "logs", "logs/packer.log", "web.qcow2"]
manifest_texts = st.one_of(
    st.sampled_from(["[]", "{", '"x"', "null", "{}", '{"spec_hash": 5}', '{"output": []}']),
    st.dictionaries(
        st.sampled_from(["spec", "spec_hash", "content_key", "output"]),
        st.one_of(st.none(), st.integers(), st.text(max_size=8), st.just({"path": "../x"})),
        max_size=4,
    ).map(json.dumps),
)
entry_kinds = st.sampled_from(["file", "folder", "link", "fifo", "missing"])


@FUZZ
@given(st.dictionaries(st.sampled_from(BUILD_ENTRIES), entry_kinds, max_size=5), manifest_texts)
def test_a_tampered_build_folder_never_ends_in_a_traceback_or_a_write_outside(
    entries: dict[str, str], manifest: str
) -> None:
    from builder.bake import run as build
    from builder.spec import boundary
    from builder.verify import runner

    with scratch() as root:
        folder = root / "build" / "web"
        folder.mkdir(parents=True)
        for name, kind in sorted(entries.items()):
            path = folder / name
            if path.parent != folder and (path.parent.is_symlink() or not path.parent.is_dir()):
                continue  # logs/ is not a folder of its own this time
            if kind == "file":
                path.write_text(manifest)
            elif kind == "folder":
                path.mkdir(exist_ok=True)
            elif kind == "link":
                path.symlink_to(root / "victim" / "keep" if "." in name else root / "victim")
            elif kind == "fifo":
                os.mkfifo(path)
        image = folder / "web.qcow2"
        loaded = parse_spec(EXAMPLE_PATH.read_text(), EXAMPLE_PATH)
        steps = [
            lambda: boundary.own_folder(folder, "build folder", create=False),
            lambda: build._up_to_date(folder / "manifest.json", "key"),
            lambda: runner.spec_for(image),
            lambda: runner.check_spec_drift(image, loaded),
            lambda: boundary.own_folder(runner.report_folder(image), "verify's logs"),
        ]
        for step in steps:
            try:
                step()
            except UserError as exc:
                assert "\n" not in str(exc), exc
        # Writing the manifest only after the folder passed, as build does.
        try:
            boundary.own_folder(folder, "build folder", create=False)
            build._write_json(folder / "manifest.json", {"image": "web"})
        except UserError:
            pass
        assert (root / "victim" / "keep").read_text() == "mine"
        assert sorted(p.name for p in (root / "victim").iterdir()) == ["keep"]
        assert not re.search("web", "".join(p.name for p in root.iterdir() if p.name != "build"))
