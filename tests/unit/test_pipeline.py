"""One pass through the pipeline: load once, render once, gate what Packer builds.

A qemu build runs end to end here against a TEST DOUBLE of Packer (tests/fixtures/
fake_packer.py) with the download and the base image stubbed out, and spies count what
the pipeline does. Only the Packer gates run: the cloud-init, shellcheck and
systemd-analyze gates are shown on real tools in tests/integration/test_gates.py.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from builder.bake import gates
from builder.bake import run as build
from builder.cli.main import main
from builder.errors import UserError
from builder.render.context import BakeFolder
from builder.spec import compat
from builder.spec.model import Accelerator, LoadedSpec, load_spec
from builder.tools.packer import Packer
from builder.verify import runner as verify
from tests.fixtures.fake_packer import FakePacker, install_fake_packer


@dataclass
class Spy:
    """Counts the calls of one function, wherever the pipeline reaches it from."""

    calls: list[tuple[Any, ...]] = field(default_factory=list)

    def wrap(self, real: Callable[..., Any]) -> Callable[..., Any]:
        def spy(*args: Any, **kwargs: Any) -> Any:
            self.calls.append(args)
            return real(*args, **kwargs)

        return spy


@dataclass
class Pipeline:
    packer: FakePacker
    loads: Spy
    renders: Spy
    pairs: Spy
    gated: list[BakeFolder]
    built: list[Path]
    out: Path

    def build(self, spec: Path) -> build.BuildResult:
        options = build.BuildOptions(
            out=self.out, cache=self.out.parent / "cache", accelerator=Accelerator.TCG
        )
        return build.build_image(spec, options, progress=lambda _: None)


def make_pipeline(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, packer_version: str) -> Pipeline:
    packer = install_fake_packer(tmp_path, monkeypatch, packer_version)
    loads, renders, pairs = Spy(), Spy(), Spy()
    # Every module that can load or render gets the same spy.
    for module in (build, gates):
        monkeypatch.setattr(module, "load_spec", loads.wrap(load_spec))
        monkeypatch.setattr(module, "render_context", renders.wrap(module.render_context))
    monkeypatch.setattr(compat, "check_pair", pairs.wrap(compat.check_pair))

    gated: list[BakeFolder] = []
    real_check = gates.check_folder

    def check_folder(loaded: LoadedSpec, folder: BakeFolder, *rest: Any) -> gates.Report:
        gated.append(folder)
        return real_check(loaded, folder, *rest)

    monkeypatch.setattr(gates, "check_folder", check_folder)
    monkeypatch.setattr(gates, "GATES", (gates.gate_packer_fmt, gates.gate_packer_validate))

    built: list[Path] = []
    real_build = Packer.build

    def packer_build(self: Packer, folder: Path, **kwargs: Any) -> Any:
        # What Packer builds from, and what the gates saw there at that moment.
        built.append(folder)
        return real_build(self, folder, **kwargs)

    monkeypatch.setattr(Packer, "build", packer_build)
    base_image = tmp_path / "base.qcow2"
    base_image.write_text("a stand-in base\n")
    monkeypatch.setattr(build, "_fetch_artifacts", lambda run, arch: [])
    monkeypatch.setattr(
        build.QemuBuild, "_base", lambda self, run, ref, arch: (base_image, "0" * 64)
    )
    return Pipeline(packer, loads, renders, pairs, gated, built, tmp_path / "out")


def test_a_build_loads_renders_and_checks_the_pair_once(
    repo: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    pipeline = make_pipeline(tmp_path, monkeypatch, "1.6.6")
    result = pipeline.build(repo / "images" / "web.yaml")
    assert result.status == "built" and result.output is not None and result.output.is_file()
    assert len(pipeline.loads.calls) == 1
    assert len(pipeline.renders.calls) == 1
    assert len(pipeline.pairs.calls) == 1


def test_the_gates_check_the_folder_packer_builds(
    repo: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    pipeline = make_pipeline(tmp_path, monkeypatch, "1.6.6")
    pipeline.build(repo / "images" / "web.yaml")
    assert len(pipeline.gated) == 1 and len(pipeline.built) == 1
    assert pipeline.built[0] == pipeline.gated[0].packer_dir
    # Packer validate ran on that same folder too, not on a twin.
    validated = [c for c in pipeline.packer.calls() if c[0] == "validate"]
    assert [c[-1] for c in validated] == [str(pipeline.built[0])]


def test_a_failing_gate_stops_the_build_before_packer(
    repo: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    pipeline = make_pipeline(tmp_path, monkeypatch, "1.6.6")

    def refuse(folder: BakeFolder, *_: Any) -> gates.Gate:
        return gates.Gate("stand-in", False, f"refused {folder.root.name}")

    monkeypatch.setattr(gates, "GATES", (refuse,))
    monkeypatch.setitem(gates.GATE_NAMES, refuse, "stand-in")
    with pytest.raises(build.BuildFailed, match="validate: FAIL  stand-in: refused context"):
        pipeline.build(repo / "images" / "web.yaml")
    assert pipeline.built == []


def test_the_packer_version_is_read_once_per_process(
    repo: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    pipeline = make_pipeline(tmp_path, monkeypatch, "1.6.6")
    pipeline.build(repo / "images" / "web.yaml")
    pipeline.build(repo / "images" / "web.yaml")  # up to date by now
    assert Packer().version() == Packer().version()
    assert pipeline.packer.verbs().count("version") == 1


@pytest.mark.parametrize("version", ["1.7.0", "1.9.4"])
def test_packer_init_runs_before_validate_and_build_from_1_7(
    repo: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, version: str
) -> None:
    pipeline = make_pipeline(tmp_path, monkeypatch, version)
    pipeline.build(repo / "images" / "web.yaml")
    verbs = [v for v in pipeline.packer.verbs() if v in ("init", "validate", "build")]
    assert verbs == ["init", "validate", "build"]
    init = next(c for c in pipeline.packer.calls() if c[0] == "init")
    assert init[-1] == str(pipeline.built[0])


def test_packer_1_6_gets_no_init(
    repo: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    pipeline = make_pipeline(tmp_path, monkeypatch, "1.6.6")
    pipeline.build(repo / "images" / "web.yaml")
    assert "init" not in pipeline.packer.verbs()
    assert "build" in pipeline.packer.verbs()


def test_validate_loads_and_renders_once(
    repo: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    pipeline = make_pipeline(tmp_path, monkeypatch, "1.9.4")
    report = gates.validate_spec(repo / "images" / "web.yaml")
    assert report.ok, report.failures()
    assert (len(pipeline.loads.calls), len(pipeline.renders.calls)) == (1, 1)
    assert len(pipeline.pairs.calls) == 1
    assert pipeline.packer.verbs().index("init") < pipeline.packer.verbs().index("validate")


# --- verify refuses an image built from another spec -------------------------------


@pytest.fixture
def built_image(repo: Path, tmp_path: Path) -> Path:
    """A stand-in image with a manifest as ``build`` writes it, for images/web.yaml."""
    shutil.copytree(repo / "images", tmp_path / "images")
    spec = tmp_path / "images" / "web.yaml"
    image = tmp_path / "out" / "web.qcow2"
    image.parent.mkdir()
    image.write_text("not really a qcow2\n")
    manifest = {"spec": str(spec), "spec_hash": load_spec(spec).digest}
    (image.parent / "manifest.json").write_text(json.dumps(manifest))
    return image


@pytest.fixture
def no_boot(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Phases that record themselves instead of booting a VM."""
    booted: list[str] = []

    def phase(image: Path, loaded: LoadedSpec, phase: str, *_: Any) -> list[verify.PhaseResult]:
        booted.append(phase)
        return [verify.PhaseResult(phase, (verify.CheckResult("stand-in", "passed", 0.0),))]

    monkeypatch.setattr(verify, "_phase", phase)
    return booted


def _edit_spec(image: Path) -> Path:
    spec = Path(json.loads((image.parent / "manifest.json").read_text())["spec"])
    spec.write_text(spec.read_text().replace("port: 8080", "port: 8081", 1))
    assert "8081" in spec.read_text()
    return spec


def test_verify_accepts_the_spec_the_image_was_built_from(
    built_image: Path, no_boot: list[str]
) -> None:
    assert verify.verify_image(built_image).ok
    assert no_boot == list(verify.PHASES)


def test_verify_refuses_a_spec_that_changed_since_the_build(
    built_image: Path, no_boot: list[str]
) -> None:
    spec = _edit_spec(built_image)
    with pytest.raises(UserError, match="--allow-spec-drift") as caught:
        verify.verify_image(built_image)
    assert str(spec) in str(caught.value) and "\n" not in str(caught.value)
    assert no_boot == []
    # Given explicitly, the changed spec is refused all the same.
    with pytest.raises(UserError, match="hashes to"):
        verify.verify_image(built_image, spec=spec)


def test_allow_spec_drift_verifies_anyway(built_image: Path, no_boot: list[str]) -> None:
    _edit_spec(built_image)
    assert verify.verify_image(built_image, allow_spec_drift=True).ok
    assert no_boot == list(verify.PHASES)


def test_cli_verify_spec_drift_is_one_line_and_the_flag_overrides_it(
    built_image: Path, no_boot: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    _edit_spec(built_image)
    assert main(["verify", str(built_image)]) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"meshbake: error: {built_image}: built from a spec with hash ")
    assert err.count("\n") == 1
    # The local mesh's Consul and Envoy: the manifest names none, so they are given.
    consul, envoy = built_image.parent / "consul.zip", built_image.parent / "envoy"
    consul.write_bytes(b"PK")
    envoy.write_bytes(b"\x7fELF")
    assert main(["verify", str(built_image), "--allow-spec-drift"]) == 1
    assert "no consul entry" in capsys.readouterr().err
    given = ["--consul-zip", str(consul), "--envoy", str(envoy)]
    assert main(["verify", str(built_image), "--allow-spec-drift", *given]) == 0
    assert no_boot == list(verify.PHASES)
