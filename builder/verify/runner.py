"""``meshbake verify``: boot a golden image as a user would and prove it with Testinfra.

Phase ``baked`` boots the image with no token and checks what the bake left behind;
phase ``firstboot`` boots it with the minimal first-boot user data (from the same
code as ``meshbake userdata``) and checks that the mesh came up. Each boot runs on a
throwaway qcow2 overlay, so the image itself is never touched; SSH is forwarded on
127.0.0.1 only; the VM is always shut down.

>>> image = Path("build/web/web.qcow2")
>>> report = verify_image(image, spec=Path("images/web.yaml"))  # doctest: +SKIP
>>> report.ok
True
"""

from __future__ import annotations

import json
import logging
import shutil
import socket
import sys
import tempfile
import time
import uuid
import xml.etree.ElementTree as ET
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, suppress
from dataclasses import asdict, dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import paramiko

from builder import proc
from builder.errors import UserError
from builder.render import cloudconfig
from builder.spec.model import Accelerator, LoadedSpec, load_spec
from builder.tools.qemu import choose_accelerator

Progress = Callable[[str], None]
PHASES = ("baked", "firstboot")
VERIFY_USER = "meshbake-verify"


def _stderr(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


@dataclass(frozen=True)
class CheckResult:
    name: str
    outcome: str  # passed | failed | error | skipped
    seconds: float
    message: str = ""


@dataclass(frozen=True)
class PhaseResult:
    phase: str
    checks: tuple[CheckResult, ...]
    boot_to_ssh: float | None = None
    first_boot: float | None = None
    error: str | None = None

    @property
    def ok(self) -> bool:
        return (
            self.error is None
            and bool(self.checks)
            and all(c.outcome in ("passed", "skipped") for c in self.checks)
        )


@dataclass(frozen=True)
class VerifyReport:
    image: str
    phases: tuple[PhaseResult, ...]

    @property
    def ok(self) -> bool:
        return bool(self.phases) and all(p.ok for p in self.phases)

    def to_json(self) -> dict[str, Any]:
        return {
            "image": self.image,
            "ok": self.ok,
            "phases": [{**asdict(p), "ok": p.ok} for p in self.phases],
        }

    def summary(self) -> str:
        lines = [f"verify {self.image}"]
        for phase in self.phases:
            timing = []
            if phase.boot_to_ssh is not None:
                timing.append(f"boot to SSH {phase.boot_to_ssh:.0f}s")
            if phase.first_boot is not None:
                timing.append(f"VM start to mesh ready {phase.first_boot:.0f}s")
            passed = sum(c.outcome == "passed" for c in phase.checks)
            head = f"phase {phase.phase}: {passed}/{len(phase.checks)} checks passed"
            lines.append(head + (f" ({', '.join(timing)})" if timing else ""))
            if phase.error:
                lines.append(f"  ERROR  {phase.error}")
            for check in phase.checks:
                mark = {"passed": "ok  ", "skipped": "skip"}.get(check.outcome, "FAIL")
                lines.append(f"  {mark}  {check.name} ({check.seconds:.1f}s)")
                if check.outcome in ("failed", "error") and check.message:
                    lines.append(f"        {check.message.splitlines()[0][:200]}")
        lines.append("ALL CHECKS PASSED" if self.ok else "SOME CHECKS FAILED")
        return "\n".join(lines)


# --- expectations --------------------------------------------------------------


def expectations(loaded: LoadedSpec, phase: str, token: str, fixture: bool) -> dict[str, Any]:
    """What the Testinfra suites check, derived from the spec (see tests/image)."""
    spec = loaded.spec
    tproxy = spec.service.transparent_proxy
    return {
        "phase": phase,
        "image": spec.name,
        "service": spec.service.name,
        "port": spec.service.port,
        "proxy_id": spec.service.proxy_id,
        "consul_version": spec.consul.version,
        "envoy_version": spec.envoy.version,
        "app_user": spec.app.run_as,
        "app_unit": f"{spec.app.name}.service",
        "units": [
            "consul.service",
            "envoy-sidecar.service",
            "meshbake-firstboot.service",
            f"{spec.app.name}.service",
        ],
        "acl": spec.consul.acl.enabled,
        "tokens": "shared" if spec.tokens.shared else "separate",
        "inbound_exclusions": list(tproxy.inbound_exclusions),
        "outbound_ports": list(tproxy.exclude_outbound_ports),
        "outbound_cidrs": list(tproxy.exclude_outbound_cidrs),
        "exclude_uids": list(tproxy.exclude_uids),
        "dns_forward": spec.consul.dns.forward,
        "token": token,
        "fixture": fixture,
    }


# --- the VM ---------------------------------------------------------------------


@dataclass(frozen=True)
class Vm:
    port: int
    key_file: Path
    started: float
    serial_log: Path

    @property
    def uri(self) -> str:
        return f"paramiko://{VERIFY_USER}@127.0.0.1:{self.port}?ssh_identity_file={self.key_file}"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def _seed_iso(work: Path, user_data: str, instance: str) -> Path:
    seed = work / "seed"
    seed.mkdir()
    (seed / "user-data").write_text(user_data)
    (seed / "meta-data").write_text(f"instance-id: {instance}\nlocal-hostname: {instance}\n")
    iso = work / "seed.iso"
    files = [seed / "user-data", seed / "meta-data"]
    if shutil.which("genisoimage"):
        argv: list[str | Path] = ["genisoimage", "-quiet", "-output", iso]
    else:
        argv = ["xorriso", "-as", "genisoimage", "-quiet", "-output", iso]
    proc.run([*argv, "-volid", "cidata", "-joliet", "-rock", *files])
    return iso


def verify_user_data(public_key: str, extra: dict[str, Any] | None = None) -> str:
    """The seed for a verify boot: SSH access for the checks, plus ``extra`` user data."""
    document: dict[str, Any] = {
        "users": [
            {
                "name": VERIFY_USER,
                "sudo": "ALL=(ALL) NOPASSWD:ALL",
                "shell": "/bin/bash",
                "lock_passwd": True,
                "ssh_authorized_keys": [public_key.strip()],
            }
        ]
    }
    document |= extra or {}
    return cloudconfig.dump(document)


def ssh_run(vm: Vm, command: str, timeout: float = 30.0) -> tuple[int, str]:
    """Run ``command`` in the VM over SSH (a fresh connection each time)."""
    client = paramiko.SSHClient()
    client.set_missing_host_key_policy(paramiko.AutoAddPolicy())  # a throwaway VM
    try:
        client.connect(
            "127.0.0.1",
            port=vm.port,
            username=VERIFY_USER,
            key_filename=str(vm.key_file),
            timeout=timeout,
            banner_timeout=timeout,
            auth_timeout=timeout,
            allow_agent=False,
            look_for_keys=False,
        )
        _, stdout, _ = client.exec_command(command, timeout=timeout)
        output = stdout.read().decode(errors="replace")
        return stdout.channel.recv_exit_status(), output
    finally:
        client.close()


def _wait_ssh(vm: Vm, qemu: Any, deadline: float) -> float:
    # Until sshd is up every attempt fails by design; paramiko's transport thread would
    # log each one with a traceback.
    logging.getLogger("paramiko.transport").setLevel(logging.CRITICAL)
    while time.monotonic() < deadline:
        if qemu.poll() is not None:
            raise UserError(f"the VM exited before SSH answered; see {vm.serial_log}")
        try:
            code, _ = ssh_run(vm, "true", timeout=10)
            if code == 0:
                return time.monotonic() - vm.started
        except (OSError, paramiko.SSHException, EOFError):
            pass
        time.sleep(3)
    raise UserError(f"SSH did not answer within the timeout; see {vm.serial_log}")


def _poll(vm: Vm, command: str, want: str, deadline: float) -> bool:
    while time.monotonic() < deadline:
        try:
            _, out = ssh_run(vm, command)
            if out.strip() == want:
                return True
        except (OSError, paramiko.SSHException, EOFError):
            pass
        time.sleep(2)
    return False


@contextmanager
def boot_vm(
    image: Path,
    work: Path,
    user_data: Callable[[str], str],
    accelerator: Accelerator,
    progress: Progress,
    memory: int = 1024,
    timeout: float = 420.0,
) -> Iterator[Vm]:
    """Boot ``image`` on an overlay in ``work`` and yield once SSH answers.

    ``user_data`` receives the ephemeral public key and returns the seed's user data.
    The VM is powered off (then killed, if it must be) on the way out.
    """
    key = work / "verify_ed25519"
    proc.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "meshbake-verify", "-f", key])
    overlay = work / "overlay.qcow2"
    proc.run(
        ["qemu-img", "create", "-q", "-f", "qcow2", "-F", "qcow2", "-b", image.resolve(), overlay]
    )
    iso = _seed_iso(
        work, user_data(key.with_suffix(".pub").read_text()), f"verify-{uuid.uuid4().hex[:8]}"
    )
    port = _free_port()
    serial = work / "serial.log"
    accel = choose_accelerator(accelerator)
    argv: list[str | Path] = [
        "qemu-system-x86_64",
        "-accel",
        accel.value,
        "-cpu",
        "host" if accel is Accelerator.KVM else "max",
        "-m",
        str(memory),
        "-smp",
        "2",
        "-display",
        "none",
        "-monitor",
        "none",
        "-serial",
        f"file:{serial}",
        "-drive",
        f"file={overlay},if=virtio,format=qcow2",
        "-drive",
        f"file={iso},media=cdrom,readonly=on",
        "-netdev",
        f"user,id=n0,hostfwd=tcp:127.0.0.1:{port}-:22",
        "-device",
        "virtio-net,netdev=n0",
    ]
    progress(f"verify: booting {image.name} ({accel.value}, SSH on 127.0.0.1:{port})")
    started = time.monotonic()
    qemu = proc.spawn(argv, log_file=work / "qemu.log")
    vm = Vm(port, key, started, serial)
    try:
        _wait_ssh(vm, qemu, started + timeout)
        yield vm
    finally:
        with suppress(OSError, paramiko.SSHException, EOFError):
            ssh_run(vm, "sudo systemctl poweroff", timeout=10)
        proc.terminate_group(qemu, grace=60)


# --- running the suites -------------------------------------------------------------


def suite_dir() -> Path:
    return Path(str(resources.files("builder.verify.imagetests")))


def run_suite(
    uri: str, expect: dict[str, Any], work: Path, sudo: bool = False
) -> list[CheckResult]:
    """Run the shipped Testinfra suite for ``expect['phase']`` against ``uri``."""
    expect_file = work / f"expect-{expect['phase']}.json"
    expect_file.write_text(json.dumps(expect))
    expect_file.chmod(0o600)
    junit = work / f"junit-{expect['phase']}.xml"
    argv: list[str | Path] = [
        sys.executable,
        "-m",
        "pytest",
        suite_dir(),
        "-p",
        "no:cacheprovider",
        f"--rootdir={suite_dir()}",
        f"--hosts={uri}",
        f"--expect={expect_file}",
        f"--junitxml={junit}",
        "-q",
    ]
    if sudo:
        argv.append("--sudo")
    done = proc.run(argv, check=False, cwd=work)
    (work / f"pytest-{expect['phase']}.log").write_text(done.stdout + done.stderr)
    if not junit.is_file():
        raise UserError(f"the Testinfra suite did not run: {(done.stdout + done.stderr)[-500:]}")
    return parse_junit(junit)


def parse_junit(path: Path) -> list[CheckResult]:
    results = []
    for case in ET.parse(path).getroot().iter("testcase"):
        # "test_x[paramiko://127.0.0.1]" -> "test_x": the host is the same for all.
        name = case.get("name", "?").split("[", 1)[0]
        seconds = float(case.get("time", "0") or 0)
        outcome, message = "passed", ""
        for tag in ("failure", "error", "skipped"):
            node = case.find(tag)
            if node is not None:
                outcome = {"failure": "failed", "error": "error", "skipped": "skipped"}[tag]
                message = node.get("message", "") or (node.text or "")
                break
        results.append(CheckResult(name, outcome, round(seconds, 2), message.strip()))
    return results


def _phase(
    image: Path,
    loaded: LoadedSpec,
    phase: str,
    accelerator: Accelerator,
    progress: Progress,
    token: str | None,
) -> PhaseResult:
    token = token or str(uuid.uuid4())
    extra: dict[str, Any] | None = None
    if phase == "firstboot":
        secrets = cloudconfig.Secrets(
            agent_token=token,
            service_token=None if loaded.spec.tokens.shared else str(uuid.uuid4()),
        )
        values = cloudconfig.carrier_values(loaded.spec, secrets, where="verify")
        extra = cloudconfig.first_boot_document(values)
    with tempfile.TemporaryDirectory(prefix="meshbake-verify-") as tmp:
        work = Path(tmp)
        boot_to_ssh = first_boot = None
        try:
            with boot_vm(
                image, work, lambda key: verify_user_data(key, extra), accelerator, progress
            ) as vm:
                boot_to_ssh = round(time.monotonic() - vm.started, 1)
                progress(f"verify: {phase}: SSH answered after {boot_to_ssh:.0f}s")
                _poll(
                    vm,
                    "cloud-init status --wait >/dev/null; echo done",
                    "done",
                    time.monotonic() + 300,
                )
                if phase == "firstboot":
                    ready = _poll(
                        vm,
                        "systemctl is-active envoy-sidecar.service",
                        "active",
                        time.monotonic() + 240,
                    )
                    first_boot = round(time.monotonic() - vm.started, 1) if ready else None
                    progress(
                        f"verify: firstboot: mesh ready after {first_boot}s"
                        if ready
                        else "verify: firstboot: the sidecar did not become active"
                    )
                _, version = ssh_run(vm, "/usr/bin/consul version 2>/dev/null | head -n 2")
                expect = expectations(loaded, phase, token, "Revision fixture" in version)
                progress(f"verify: {phase}: running the Testinfra checks")
                checks = run_suite(vm.uri, expect, work)
        except UserError as exc:
            return PhaseResult(phase, (), boot_to_ssh, first_boot, error=str(exc))
        finally:
            _keep_logs(work, image, phase)
    return PhaseResult(phase, tuple(checks), boot_to_ssh, first_boot)


def _keep_logs(work: Path, image: Path, phase: str) -> None:
    """Keep the serial console and pytest logs next to the image for a post-mortem."""
    logs = image.parent / "logs"
    try:
        logs.mkdir(exist_ok=True)
        for name in ("serial.log", f"pytest-{phase}.log"):
            if (work / name).is_file():
                shutil.copyfile(work / name, logs / f"verify-{phase}-{name}")
    except OSError:
        pass


def spec_for(image: Path) -> Path:
    """The spec an image was built from, read from the manifest beside it."""
    manifest = image.parent / "manifest.json"
    try:
        return Path(json.loads(manifest.read_text())["spec"])
    except (OSError, ValueError, KeyError):
        raise UserError(
            f"{image}: no manifest.json beside it names the spec; pass --spec"
        ) from None


def verify_image(
    image: Path,
    *,
    spec: Path | None = None,
    phases: Sequence[str] = PHASES,
    accelerator: Accelerator = Accelerator.AUTO,
    progress: Progress = _stderr,
    token: str | None = None,
) -> VerifyReport:
    """Boot ``image`` once per phase and run the checks; never raises for a failed check.

    ``token`` is the test token delivered in phase firstboot and searched for in phase
    baked (a fresh random one by default).
    """
    if not image.is_file():
        raise UserError(f"{image}: no such image")
    for phase in phases:
        if phase not in PHASES:
            raise UserError(f"unknown phase {phase!r}; choose from {', '.join(PHASES)}")
    loaded = load_spec(spec or spec_for(image))
    results = [_phase(image, loaded, phase, accelerator, progress, token) for phase in phases]
    return VerifyReport(loaded.spec.name, tuple(results))


def verify_host(uri: str, *, spec: Path, phase: str, token: str, sudo: bool = True) -> PhaseResult:
    """Run one phase's checks against any reachable host, e.g. an EC2 instance.

    ``uri`` is a Testinfra host such as ``ssh://admin@203.0.113.7``; ``token`` is the
    token that host was given (phase firstboot) or must not contain (phase baked).
    """
    loaded = load_spec(spec)
    with tempfile.TemporaryDirectory(prefix="meshbake-verify-") as tmp:
        expect = expectations(loaded, phase, token, fixture=False)
        checks = run_suite(uri, expect, Path(tmp), sudo=sudo)
    return PhaseResult(phase, tuple(checks))
