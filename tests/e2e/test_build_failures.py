"""A failed or interrupted bake leaves nothing behind: no qemu, no partial image that
looks good, no work folder (Packer's TMPDIR with the seed, the ephemeral SSH key); the
error names the stage and the log."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from builder.build.run import BuildOptions, build_image
from builder.errors import UserError

from .conftest import REPO


def _qemus_under(folder: Path) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                cmdline = (entry / "cmdline").read_bytes()
            except OSError:
                continue
            if b"qemu-system" in cmdline and str(folder).encode() in cmdline:
                found.append(int(entry.name))
    return found


def _spec_with(tmp_path: Path, **changes: object) -> Path:
    images = tmp_path / "images"
    shutil.copytree(REPO / "images", images)
    spec = images / "web.yaml"
    data = yaml.safe_load(spec.read_text())
    data.update(changes)
    spec.write_text(yaml.safe_dump(data))
    return spec


def _assert_clean(out: Path) -> None:
    assert _qemus_under(out) == []
    assert not (out / "web.qcow2").exists()
    assert not (out / "manifest.json").exists()
    assert [p.name for p in out.iterdir() if p.name.startswith(".work-")] == []


def test_failed_bake_names_stage_and_log_and_leaves_nothing(
    tmp_path: Path, e2e_options: BuildOptions
) -> None:
    spec = _spec_with(tmp_path, packages=["meshbake-no-such-package"])
    # Deep on purpose: Packer's plugin sockets must not end up in it (108-byte limit).
    out = tmp_path / ("deep-" * 15) / "out"
    options = BuildOptions(**{**e2e_options.__dict__, "out": out})
    with pytest.raises(UserError) as caught:
        build_image(spec, options)
    message = str(caught.value)
    assert "bake failed" in message
    assert str(out / "logs" / "packer.log") in message
    # The failure came from inside the VM (apt), so Packer itself ran properly.
    assert "meshbake-no-such-package" in (out / "logs" / "packer.log").read_text()
    _assert_clean(out)


def test_ctrl_c_during_bake_stops_qemu_and_cleans_up(
    tmp_path: Path, e2e_options: BuildOptions
) -> None:
    out = tmp_path / "out"
    argv = [
        sys.executable,
        "-m",
        "builder",
        "build",
        str(REPO / "images" / "web.yaml"),
        "--out",
        str(out),
        "--force",
        "--consul-mirror",
        str(e2e_options.consul_mirror),
    ]
    if e2e_options.consul_key is not None:
        argv += [
            "--consul-key",
            str(e2e_options.consul_key.path),
            "--consul-key-fingerprint",
            e2e_options.consul_key.fingerprint,
        ]
    if e2e_options.consul_zip is not None:
        argv += ["--consul-zip", str(e2e_options.consul_zip)]
    child = subprocess.Popen(argv, stderr=subprocess.PIPE, text=True, cwd=REPO)
    try:
        assert child.stderr is not None
        seen = []
        for line in child.stderr:
            seen.append(line)
            if "booting the build VM" in line:
                break
        assert any("booting the build VM" in line for line in seen), "".join(seen)
        deadline = time.monotonic() + 120
        while not _qemus_under(out) and time.monotonic() < deadline:
            time.sleep(1)
        assert _qemus_under(out), "qemu never started"
        child.send_signal(signal.SIGINT)
        child.wait(timeout=120)
    finally:
        if child.poll() is None:
            os.kill(child.pid, signal.SIGKILL)
            child.wait()
    assert child.returncode == 130
    _assert_clean(out)
