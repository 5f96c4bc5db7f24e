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
import os
import re
import shlex
import shutil
import socket
import sys
import tempfile
import threading
import time
import urllib.parse
import uuid
import xml.etree.ElementTree as ET
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import ExitStack, contextmanager, suppress
from dataclasses import asdict, dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import paramiko

from builder import proc
from builder.errors import UserError
from builder.mesh.localnet import LocalNetwork
from builder.progress import Progress, to_stderr
from builder.render import baked, cloudconfig
from builder.render.hcl import arch_suffix, manifest_name, qcow2_arch
from builder.spec import boundary
from builder.spec.model import Accelerator, Arch, LoadedSpec, load_spec
from builder.tools.qemu import accel_args, check_tools, choose_accelerator, patience
from builder.verify.imagetests import helpers
from builder.verify.imagetests.helpers import (
    HTTP_PROBE,
    down_for_good,
    parse_stats,
    stats_command,
    tcp_exchange,
    unit_state_command,
    unit_states,
)
from builder.verify.localmesh import MeshInputs, VerifyMesh

PHASES = ("baked", "firstboot")
VERIFY_USER = "meshbake-verify"
SIDECAR_UNIT = "envoy-sidecar.service"


@dataclass(frozen=True)
class CheckResult:
    name: str
    outcome: str  # passed | failed | error | skipped
    seconds: float
    message: str = ""
    #: What the check measured (``record_property`` in the suites), e.g. connection counts.
    figures: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class PhaseResult:
    phase: str
    checks: tuple[CheckResult, ...]
    boot_to_ssh: float | None = None
    first_boot: float | None = None
    error: str | None = None
    #: Phase-wide figures, e.g. ``vm_start_to_first_proxied_s`` (seconds, host clock).
    figures: dict[str, Any] = field(default_factory=dict)
    #: Seconds on the guest's CLOCK_MONOTONIC (0 = kernel start) when each first-boot
    #: milestone was reached; ``None`` where it was not (see :func:`first_boot_timeline`).
    timeline: dict[str, float | None] = field(default_factory=dict)
    #: ``systemd-analyze plot`` of the first boot, kept in the report folder.
    plot: str | None = None

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
            first = phase.figures.get("vm_start_to_first_proxied_s")
            if first is not None:
                timing.append(f"VM start to first proxied connection {first:.1f}s")
            passed = sum(c.outcome == "passed" for c in phase.checks)
            head = f"phase {phase.phase}: {passed}/{len(phase.checks)} checks passed"
            lines.append(head + (f" ({', '.join(timing)})" if timing else ""))
            if phase.error:
                lines.append(f"  ERROR  {phase.error}")
            for check in phase.checks:
                mark = {"passed": "ok  ", "skipped": "skip"}.get(check.outcome, "FAIL")
                figures = "".join(f", {k}={v}" for k, v in check.figures.items())
                lines.append(f"  {mark}  {check.name} ({check.seconds:.1f}s{figures})")
                if check.outcome in ("failed", "error") and check.message:
                    lines += [f"        {line[:300]}" for line in failure_lines(check.message)]
            if phase.plot:
                lines.append(f"  first boot plot: {phase.plot}")
        lines.append("ALL CHECKS PASSED" if self.ok else "SOME CHECKS FAILED")
        return "\n".join(lines)

    def to_junit(self) -> str:
        """One JUnit XML document with a ``<testsuite>`` per phase (for CI)."""
        root = ET.Element("testsuites", name=f"meshbake verify {self.image}")
        for phase in self.phases:
            cases = list(phase.checks)
            if phase.error:
                cases.append(CheckResult("phase", "error", 0.0, phase.error))
            suite = ET.SubElement(
                root,
                "testsuite",
                name=phase.phase,
                tests=str(len(cases)),
                failures=str(sum(c.outcome == "failed" for c in cases)),
                errors=str(sum(c.outcome == "error" for c in cases)),
                skipped=str(sum(c.outcome == "skipped" for c in cases)),
                time=f"{sum(c.seconds for c in cases):.2f}",
            )
            figures = {**phase.figures, **{f"timeline.{k}": v for k, v in phase.timeline.items()}}
            if phase.plot:
                figures["plot"] = phase.plot
            _junit_properties(suite, figures)
            for check in cases:
                case = ET.SubElement(
                    suite,
                    "testcase",
                    classname=f"meshbake.verify.{phase.phase}",
                    name=check.name,
                    time=f"{check.seconds:.2f}",
                )
                _junit_properties(case, check.figures)
                if check.outcome in ("failed", "error", "skipped"):
                    tag = {"failed": "failure", "error": "error", "skipped": "skipped"}
                    node = ET.SubElement(case, tag[check.outcome])
                    node.set("message", " | ".join(failure_lines(check.message)))
                    node.text = check.message
        ET.indent(root)
        return ET.tostring(root, encoding="unicode", xml_declaration=True) + "\n"


def _junit_properties(parent: ET.Element, figures: dict[str, Any]) -> None:
    if figures:
        node = ET.SubElement(parent, "properties")
        for name, value in figures.items():
            ET.SubElement(node, "property", name=name, value="" if value is None else str(value))


def failure_lines(message: str) -> list[str]:
    """The readable part of a failure: ``expected: ...`` / ``seen: ...`` when the check
    worded it so (``helpers.CheckFailed``), else its first line.

    >>> failure_lines("CheckFailed: expected: 1 reply\\nseen: none\\n\\nTraceback ...")
    ['expected: 1 reply', 'seen: none']
    """
    lines = [line.strip() for line in message.strip().splitlines()]
    if lines:
        # "builder.verify.imagetests.helpers.CheckFailed: expected: ..." -> "expected: ..."
        lines[0] = re.sub(r"^[\w.]*(CheckFailed|AssertionError): ", "", lines[0])
    worded = [line for line in lines[:6] if line.startswith(("expected: ", "seen: "))]
    return worded or lines[:1]


# --- expectations --------------------------------------------------------------


def expectations(
    loaded: LoadedSpec,
    phase: str,
    token: str,
    traffic: dict[str, Any] | None = None,
    dns_token: str | None = None,
    sidecar_down: Sequence[str] = (),
) -> dict[str, Any]:
    """What the Testinfra suites check, derived from the spec (see imagetests/conftest.py).

    ``sidecar_down``: why the sidecar was found down for good before the checks (empty
    when it came up or was not waited for); the checks then do not wait for it again.

    ``traffic`` holds the outside ends of the first-boot traffic checks: ``inbound``
    (address and port reaching the service port) and ``outbound`` (see
    :class:`HostListener`), either ``None`` where nothing can reach, and ``mesh``, the
    control plane's side (:meth:`VerifyMesh.expect`), ``None`` where there is none.
    """
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
        "wait_for_mesh": spec.app.wait_for_mesh,
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
        "outbound_cidrs": list(baked.outbound_cidr_exclusions(spec)),
        "exclude_uids": list(tproxy.exclude_uids),
        "dns_forward": spec.consul.dns.forward,
        "token": token,
        "dns_token": dns_token,
        "redirect_backend": spec.consul.release.backend.value,
        "dns_token_key": spec.consul.release.dns_token_key,
        "fail_closed": tproxy.fail_closed,
        "imds_restricted": spec.imds_restricted,
        "imds_allow_users": list(spec.imds_users),
        "traffic": {
            "inbound": (traffic or {}).get("inbound"),
            "outbound": (traffic or {}).get("outbound"),
        },
        "mesh": (traffic or {}).get("mesh"),
        "sidecar_down": list(sidecar_down),
    }


# --- the VM ---------------------------------------------------------------------


@dataclass(frozen=True)
class Vm:
    port: int
    key_file: Path
    started: float
    serial_log: Path
    #: The guest's address on the local mesh network (None on qemu's user-mode network).
    address: str | None = None

    @property
    def uri(self) -> str:
        return f"paramiko://{VERIFY_USER}@127.0.0.1:{self.port}?ssh_identity_file={self.key_file}"


@dataclass(frozen=True)
class Round:
    """A change made as root in the booted VM once its first boot is done, checked with
    the whole firstboot suite, then undone before the next round
    (``verify_image(rounds=...)``): one boot for many changes. The broken-image tests
    apply most of their breaks this way (tests/e2e/test_broken_image.py).

    ``apply`` and ``undo`` are shell scripts run with ``sudo sh -c``; each must start
    again, and wait for, what it changed (e.g. ``systemctl restart`` in boot order).
    """

    name: str
    apply: str
    undo: str


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def _seed_iso(work: Path, user_data: str, instance: str, network_config: str | None) -> Path:
    seed = work / "seed"
    seed.mkdir()
    (seed / "user-data").write_text(user_data)
    (seed / "meta-data").write_text(f"instance-id: {instance}\nlocal-hostname: {instance}\n")
    iso = work / "seed.iso"
    files = [seed / "user-data", seed / "meta-data"]
    if network_config is not None:
        (seed / "network-config").write_text(network_config)
        files.append(seed / "network-config")
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


def ssh_client(vm: Vm, timeout: float = 30.0) -> paramiko.SSHClient:
    """A connected SSH client to the VM as the verify user; close it when done."""
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
    except BaseException:
        client.close()
        raise
    return client


def ssh_run(vm: Vm, command: str, timeout: float = 30.0) -> tuple[int, str]:
    """Run ``command`` in the VM over SSH (a fresh connection each time)."""
    client = ssh_client(vm, timeout)
    try:
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


#: Seconds the sidecar has to become active once consul.service is: the agent is ready
#: then (it joined), and a good sidecar follows within seconds even under TCG.
SIDECAR_GRACE = 90.0


def sidecar_late(states: Mapping[str, Mapping[str, str]]) -> str | None:
    """Why the sidecar is down for good when it is still not active ``SIDECAR_GRACE``
    after consul.service became active (the agent is ready then: it joined, so the
    sidecar is not waiting for it), by the VM's clock (``uptime``); else None."""
    consul, sidecar = states.get("consul.service", {}), states.get(SIDECAR_UNIT, {})
    now = float(states.get("uptime", {}).get("Seconds") or 0)
    since = int(consul.get("ActiveEnterTimestampMonotonic") or 0) / 1e6
    if sidecar.get("ActiveState") == "active" or consul.get("ActiveState") != "active":
        return None
    if not since or now - since <= SIDECAR_GRACE:
        return None
    return (
        f"{SIDECAR_UNIT} not active {SIDECAR_GRACE:.0f}s after consul.service was"
        f" ({sidecar.get('ActiveState')}/{sidecar.get('SubState')}, restarted"
        f" {sidecar.get('NRestarts') or 0} times)"
    )


def wait_sidecar(vm: Vm, deadline: float) -> list[str]:
    """Wait for the sidecar to become active; why it is down ([] once it is active).

    Gives up before ``deadline`` once consul or the sidecar is down for good
    (:func:`helpers.down_for_good`): a fenced or broken sidecar restarts forever, and
    each of its starts may spend a while retrying the redirect; so also once the
    sidecar is still not active ``SIDECAR_GRACE`` after consul.service became active.
    """
    # The VM's own clock: how long consul has been active (CLOCK_MONOTONIC, in µs, and
    # /proc/uptime, which is the same clock while nothing suspends).
    command = (
        f"{unit_state_command('consul.service', SIDECAR_UNIT)}"
        " -p ActiveEnterTimestampMonotonic; echo; echo Id=uptime;"
        " echo Seconds=$(cut -d' ' -f1 /proc/uptime)"
    )
    while time.monotonic() < deadline:
        with suppress(OSError, paramiko.SSHException, EOFError, ValueError):
            _, out = ssh_run(vm, command)
            states = unit_states(out)
            sidecar = states.get(SIDECAR_UNIT, {})
            if sidecar.get("ActiveState") == "active":
                return []
            causes = down_for_good(out)
            if causes:
                return causes
            late = sidecar_late(states)
            if late:
                return [late]
        time.sleep(2)
    return [f"{SIDECAR_UNIT} did not become active within the deadline"]


def vm_cpus(at_once: int = 1) -> int:
    """The vCPUs to give each of ``at_once`` VMs that run together: two, or this
    machine's share of its cores, at least one.

    Under TCG each vCPU is a host thread that keeps a core busy. More vCPUs than cores
    cost more CPU for the same work: two firstboot verifies at once on 2 cores took 315 s
    with 2 vCPUs each (258 s and 273 s of CPU), 263 s with one each (212 s and 216 s;
    ``bench/vm_cpus.py``, ``bench/results-vm-cpus.json``).

    >>> vm_cpus(10 * (os.cpu_count() or 1))
    1
    """
    return max(1, min(2, (os.cpu_count() or 1) // max(1, at_once)))


@contextmanager
def boot_vm(
    image: Path,
    work: Path,
    user_data: Callable[[str], str],
    accelerator: Accelerator,
    progress: Progress,
    memory: int = 1024,
    timeout: float = 420.0,
    forwards: Mapping[int, int] | None = None,
    network: LocalNetwork | None = None,
    instance: str | None = None,
    cpus: int = 2,
    arch: Arch = Arch.AMD64,
) -> Iterator[Vm]:
    """Boot ``image`` on an overlay in ``work`` and yield once SSH answers.

    ``arch`` picks qemu, its machine and firmware (``builder.tools.qemu``); a UEFI guest
    gets its own copy of the firmware's variables in ``work``, gone with it.
    ``user_data`` receives the ephemeral public key and returns the seed's user data.
    ``instance`` is the instance id and host name (thus Consul's node name), random by
    default. On qemu's user-mode network (the default), ``forwards`` maps more ports on
    the host's 127.0.0.1 to guest ports (TCP), as SSH's. On a ``network`` (the local
    mesh), the VM gets a tap on its bridge and a static address (``Vm.address``); SSH
    and any other port are reached through the network's forwards on 127.0.0.1.
    ``cpus`` is its number of vCPUs (see :func:`vm_cpus`). The VM is powered off (then
    killed, if it must be) on the way out.
    """
    key = work / "verify_ed25519"
    public = proc.ssh_keygen(key, "meshbake-verify")
    overlay = work / "overlay.qcow2"
    proc.run(
        ["qemu-img", "create", "-q", "-f", "qcow2", "-F", "qcow2", "-b", image.resolve(), overlay]
    )
    instance = instance or f"verify-{uuid.uuid4().hex[:8]}"
    tap = None if network is None else network.add_tap(instance)
    iso = _seed_iso(
        work,
        user_data(public.read_text()),
        instance,
        None if tap is None else tap.network_config,
    )
    if tap is None or network is None:
        port = _free_port()
        nic = [
            "-netdev",
            f"user,id=n0,hostfwd=tcp:127.0.0.1:{port}-:22"
            + "".join(f",hostfwd=tcp:127.0.0.1:{h}-:{g}" for h, g in (forwards or {}).items()),
            "-device",
            "virtio-net,netdev=n0",
        ]
    else:
        if forwards:
            raise ValueError("on a local network, forward ports with LocalNetwork.forward")
        port = network.forward(tap.lease.address.ip, 22)
        nic = tap.qemu_args
    serial = work / "serial.log"
    facts = check_tools(arch)
    accel = choose_accelerator(accelerator, arch)
    vars_file = None
    if facts.firmware is not None:
        vars_file = work / "efi-vars.fd"
        shutil.copyfile(facts.firmware.vars_template, vars_file)
    argv: list[str | Path] = [
        *accel_args(facts, accel, vars_file),
        "-m",
        str(memory),
        "-smp",
        str(cpus),
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
        *nic,
    ]
    progress(f"verify: booting {image.name} ({arch.value}, {accel.value}, SSH on 127.0.0.1:{port})")
    started = time.monotonic()
    if network is None:
        qemu = proc.spawn(argv, log_file=work / "qemu.log")
    else:
        qemu = network.run_in(argv, log_file=work / "qemu.log")
    address = None if tap is None else str(tap.lease.address.ip)
    vm = Vm(port, key, started, serial, address)
    try:
        _wait_ssh(vm, qemu, started + timeout * patience(arch))
        yield vm
    except BaseException:
        # Failed or interrupted (SIGINT, SIGTERM): no polite poweroff, the overlay is
        # thrown away anyway. The VM and its guard go now, before the work folder.
        proc.terminate_group(qemu)
        raise
    finally:
        try:
            if qemu.poll() is None:
                with suppress(OSError, paramiko.SSHException, EOFError):
                    ssh_run(vm, "sudo systemctl poweroff", timeout=10)
        finally:
            proc.terminate_group(qemu)


# --- running the suites -------------------------------------------------------------


def suite_dir() -> Path:
    return Path(str(resources.files("builder.verify.imagetests")))


def run_suite(
    uri: str,
    expect: dict[str, Any],
    work: Path,
    sudo: bool = False,
    leave_out: Sequence[str] = (),
) -> list[CheckResult]:
    """Run the shipped Testinfra suite for ``expect['phase']`` against ``uri``.

    ``leave_out`` names checks not to run at all (they are not in the report).
    """
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
        # xunit1 keeps each check's record_property figures in the file.
        "-o",
        "junit_family=xunit1",
        "-q",
    ]
    if sudo:
        argv.append("--sudo")
    if leave_out:
        argv += ["-k", " and ".join(f"not {name}" for name in leave_out)]
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
                message = _crash_message(node) if tag != "skipped" else node.get("message", "")
                break
        figures = {
            prop.get("name", "?"): _number(prop.get("value", ""))
            for prop in case.iterfind("properties/property")
        }
        results.append(CheckResult(name, outcome, round(seconds, 2), message.strip(), figures))
    return results


def _crash_message(node: ET.Element) -> str:
    r"""The whole message of a failed check. pytest shortens the ``message`` attribute
    to a budget; its ``E`` lines in the element's text carry all of it.

    >>> node = ET.fromstring('<failure message="short">x\nE   expected: a\nE   seen: b</failure>')
    >>> _crash_message(node)
    'expected: a\nseen: b'
    """
    run: list[str] = []
    last: list[str] = []
    for line in (node.text or "").splitlines():
        if line.startswith("E "):
            run.append(line[1:].strip())
        elif run:
            last, run = run, []
    last = run or last
    return "\n".join(last) if last else node.get("message", "") or (node.text or "")


def _number(text: str) -> int | float | str:
    """A figure from JUnit text: ``"3"`` -> 3, ``"0.5"`` -> 0.5, anything else as it is."""
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


# --- first boot: the outside ends of the traffic, the timeline, the plot ---------------


class HostListener:
    """A TCP listener on the host side for the outbound check.

    By default it listens on the host's 127.0.0.1, which a VM on qemu's user-mode
    network reaches as ``10.0.2.2``; a VM on the local mesh network reaches a listener
    made in that network's namespace (``LocalNetwork.listen``) at the bridge's address,
    given as ``sock`` and ``guest_address``. Each connection's first line goes into
    ``log``, one line each, and is answered with ``banner`` and the line, so a check can
    tell that its connection arrived here, and nowhere else.
    """

    GUEST_ADDRESS = "10.0.2.2"

    def __init__(
        self, log: Path, sock: socket.socket | None = None, guest_address: str | None = None
    ) -> None:
        self.log = log
        self.banner = f"meshbake-listener {uuid.uuid4().hex[:12]}"
        self.guest_address = guest_address or self.GUEST_ADDRESS
        if sock is None:
            sock = socket.socket()
            sock.bind(("127.0.0.1", 0))
            sock.listen(16)
        self._sock = sock
        self._sock.settimeout(0.5)
        self.port: int = self._sock.getsockname()[1]
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self.log.touch()

    def __enter__(self) -> HostListener:
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._thread.join(5)
        self._sock.close()

    def outbound(self) -> dict[str, Any]:
        """The ``traffic.outbound`` entry of expect.json."""
        return {
            "address": self.guest_address,
            "port": self.port,
            "banner": self.banner,
            "log": str(self.log),
        }

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self._sock.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            threading.Thread(target=self._answer, args=(conn,), daemon=True).start()

    def _answer(self, conn: socket.socket) -> None:
        with conn, suppress(OSError):
            conn.settimeout(10)
            data = b""
            while b"\n" not in data and len(data) < 1024:
                chunk = conn.recv(1024)
                if not chunk:
                    break
                data += chunk
            line = data.split(b"\n", 1)[0].decode("utf-8", "replace").strip()
            with self._lock, self.log.open("a", encoding="utf-8") as out:
                out.write(line + "\n")
            conn.sendall(f"{self.banner} {line}\n".encode())


class ServiceProbe:
    """Connects to the service port (through a forward) every ``interval`` s from VM
    start, and keeps the host's monotonic time of each connection the app answered.

    Verify's first boot gives it a mesh client's exchange (mutual TLS with a leaf of the
    mesh CA), which only the sidecar's public listener answers, so its first answer is
    the first connection that crossed the sidecar; by default it is plain TCP.
    """

    def __init__(
        self,
        port: int,
        interval: float = 0.5,
        exchange: Callable[[], helpers.Exchange] | None = None,
    ) -> None:
        self.port = port
        #: One probe connection; by default plain TCP. On the mesh it is a mesh client's
        #: mutual-TLS exchange, which only the sidecar's public listener answers.
        self.exchange = exchange or (lambda: tcp_exchange("127.0.0.1", port, HTTP_PROBE, timeout=2))
        self.interval = interval
        self.answered: list[float] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> ServiceProbe:
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self.stop()

    def stop(self) -> list[float]:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(10)
        return list(self.answered)

    def _run(self) -> None:
        while not self._stop.is_set():
            sent = time.monotonic()
            if self.exchange().answered:
                self.answered.append(sent)
            self._stop.wait(self.interval)


#: Milestones of the first boot -> the unit whose ActiveEnterTimestampMonotonic marks it.
TIMELINE_UNITS = {
    "cloud_init_network_done": "cloud-init.service",
    "meshbake_firstboot_done": "meshbake-firstboot.service",
    "consul_active": "consul.service",
    "sidecar_active": "envoy-sidecar.service",
}


def _envoy_counter(vm: Vm, name: str) -> int | None:
    with suppress(OSError, paramiko.SSHException, EOFError):
        # As root: meshbake-imds closes Envoy's admin port to other users.
        code, out = ssh_run(vm, f"sudo {stats_command((name,))}")
        if code == 0:
            return parse_stats(out).get(name)
    return None


def _guest_clock_offset(vm: Vm) -> tuple[float, float]:
    """(offset, uncertainty): host monotonic = guest CLOCK_MONOTONIC + offset.

    Reads the guest's /proc/uptime a few times over one SSH connection and keeps the
    quickest round trip; the uncertainty is half of it.
    """
    client = ssh_client(vm)
    best: tuple[float, float] | None = None
    try:
        for _ in range(5):
            sent = time.monotonic()
            _, stdout, _ = client.exec_command("cat /proc/uptime", timeout=30)
            uptime = float(stdout.read().split()[0])
            back = time.monotonic()
            candidate = ((sent + back) / 2 - uptime, (back - sent) / 2)
            if best is None or candidate[1] < best[1]:
                best = candidate
    finally:
        client.close()
    assert best is not None
    return best


def first_boot_timeline(vm: Vm, first_proxied: float | None) -> dict[str, float | None]:
    """When each first-boot milestone was reached, in seconds on the guest's monotonic
    clock (systemd's own timestamps; 0 is the kernel's start). ``vm_start`` (qemu's
    start, before firmware and the boot loader) and ``first_proxied_connection`` are
    host times moved onto that clock."""
    units = " ".join(TIMELINE_UNITS.values())
    _, out = ssh_run(
        vm,
        f"for u in {units}; do"
        ' echo "$u=$(systemctl show -p ActiveEnterTimestampMonotonic --value "$u")"; done',
    )
    entered: dict[str, float] = {}
    for line in out.splitlines():
        unit, _, value = line.partition("=")
        if value.isdigit() and int(value) > 0:  # microseconds; 0: never active
            entered[unit] = int(value) / 1e6
    offset, uncertainty = _guest_clock_offset(vm)
    timeline: dict[str, float | None] = {"vm_start": round(vm.started - offset, 2)}
    for milestone, name in TIMELINE_UNITS.items():
        seconds = entered.get(name)
        timeline[milestone] = None if seconds is None else round(seconds, 2)
    timeline["first_proxied_connection"] = (
        None if first_proxied is None else round(first_proxied - offset, 2)
    )
    timeline["clock_uncertainty"] = round(uncertainty, 3)
    return timeline


def _keep_plot(vm: Vm, folder: Path, *, wait: bool = True) -> Path | None:
    """``systemd-analyze plot`` of this (first) boot, saved as ``folder/firstboot.svg``;
    after the boot has finished when ``wait`` (a boot whose sidecar is down for good
    may never finish, so its plot is taken at once)."""
    settle = "timeout 120 systemctl is-system-running --wait >/dev/null 2>&1; " if wait else ""
    with suppress(OSError, paramiko.SSHException, EOFError):
        code, svg = ssh_run(vm, f"{settle}systemd-analyze plot 2>&1", timeout=180)
        if code == 0 and "<svg" in svg:
            path = folder / "firstboot.svg"
            boundary.write_output(path, svg)
            return path
    return None


def _first_boot_figures(
    vm: Vm, probe: ServiceProbe, ready: bool, progress: Progress
) -> tuple[dict[str, Any], dict[str, float | None]]:
    """Stop ``probe`` once one of its connections was answered; the figures and the
    timeline of the first boot.

    The probe is a mesh client (mutual TLS with a leaf of the mesh CA), which only the
    sidecar's public listener answers: its first answered connection is the first that
    crossed the sidecar. (Envoy's inbound counter would not tell: the agent's own TCP
    check of the sidecar, every 10 s, connects to that listener too.)

    The sidecar is active once Envoy runs; its listeners come from the agent a few
    seconds later (a good image's probe was answered 6 s after the sidecar became
    active, in the timeline of ``tools/run-demo``'s verify under TCG). A probe still
    unanswered 30 s after that stops, and the checks say what is wrong."""
    deadline = time.monotonic() + 30
    while ready and time.monotonic() < deadline and not probe.answered:
        time.sleep(1)
    answered = probe.stop()
    proxied = len(answered)
    first = answered[0] if answered else None
    figures: dict[str, Any] = {
        "probe_connections_answered": len(answered),
        "probe_connections_proxied": proxied,
        "vm_start_to_first_proxied_s": None if first is None else round(first - vm.started, 2),
    }
    try:
        timeline = first_boot_timeline(vm, first)
    except (OSError, paramiko.SSHException, EOFError, ValueError) as exc:
        progress(f"verify: firstboot: no timeline: {exc}")
        timeline = {}
    network = timeline.get("cloud_init_network_done")
    crossed = timeline.get("first_proxied_connection")
    if network is not None and crossed is not None:
        figures["network_stage_to_first_proxied_s"] = round(crossed - network, 2)
    if first is None:
        progress("verify: firstboot: no connection crossed the sidecar before the checks")
    else:
        progress(
            f"verify: firstboot: first proxied connection {first - vm.started:.1f}s after VM start"
        )
    return figures, timeline


def _phase(
    image: Path,
    loaded: LoadedSpec,
    phase: str,
    accelerator: Accelerator,
    progress: Progress,
    token: str | None,
    leave_out: Sequence[str] = (),
    mesh_inputs: MeshInputs | None = None,
    cpus: int = 2,
    arch: Arch = Arch.AMD64,
    rounds: Sequence[Round] = (),
    stop: threading.Event | None = None,
) -> list[PhaseResult]:
    """One boot of ``image`` and its checks: one result, or with ``rounds`` one per
    round (named ``<phase>/<round>``) and none for the boot itself."""
    token = token or str(uuid.uuid4())
    slow = patience(arch)
    if phase == "firstboot" and mesh_inputs is None:
        raise UserError(
            "verify's first boot joins a local mesh made of the image's own Consul and"
            " Envoy: give --consul-zip and --envoy, or keep the build folder's manifest"
            " and the artifact cache that made the image"
        )
    with tempfile.TemporaryDirectory(prefix="meshbake-verify-") as tmp, ExitStack() as ends:
        work = Path(tmp)
        boot_to_ssh = first_boot = None
        figures: dict[str, Any] = {}
        timeline: dict[str, float | None] = {}
        plot: Path | None = None
        traffic: dict[str, Any] | None = None
        probe: ServiceProbe | None = None
        extra: dict[str, Any] | None = None
        mesh: VerifyMesh | None = None
        network: LocalNetwork | None = None
        secret_values = [token]
        try:
            if phase == "firstboot" and mesh_inputs is not None:
                # The mesh first: the server, the upstreams, the tokens and the VM's
                # address. Then the outside ends of the traffic checks: a forward to the
                # service port (probed by a mesh client from VM start on, for the first
                # proxied connection), and a listener the VM reaches on its network.
                mesh = ends.enter_context(VerifyMesh(loaded, mesh_inputs, work, progress))
                network = mesh.network
                assert network is not None
                token = mesh.secrets.agent_token or token
                secret_values = [
                    value
                    for value in (
                        token,
                        mesh.secrets.service_token,
                        mesh.secrets.dns_token,
                        mesh.control.management_token if mesh.control else None,
                    )
                    if value
                ]
                values = cloudconfig.carrier_values(
                    loaded.spec, mesh.secrets, where="verify"
                ) | cloudconfig.join_values([mesh.server_address])
                extra = cloudconfig.first_boot_document(values)
                guest = network.lease(mesh.node).address.ip
                inbound = network.forward(guest, loaded.spec.service.port)
                listener = ends.enter_context(
                    HostListener(work / "listener.log", network.listen(), mesh.server_address)
                )
                mesh_expect = mesh.expect(str(guest))
                allowed = helpers.MeshIdentity.from_expect(mesh_expect["clients"]["allowed"])
                probe = ends.enter_context(
                    ServiceProbe(
                        inbound,
                        exchange=lambda: helpers.tls_exchange(
                            "127.0.0.1",
                            inbound,
                            HTTP_PROBE,
                            allowed,
                            mesh_expect["server_name"],
                            timeout=5,
                        )[0],
                    )
                )
                traffic = {
                    "inbound": {"address": "127.0.0.1", "port": inbound},
                    "outbound": listener.outbound(),
                    "mesh": mesh_expect,
                }
            with boot_vm(
                image,
                work,
                lambda key: verify_user_data(key, extra),
                accelerator,
                progress,
                network=network,
                instance=None if mesh is None else mesh.node,
                cpus=cpus,
                arch=arch,
            ) as vm:
                boot_to_ssh = round(time.monotonic() - vm.started, 1)
                progress(f"verify: {phase}: SSH answered after {boot_to_ssh:.0f}s")
                _poll(
                    vm,
                    "cloud-init status --wait >/dev/null; echo done",
                    "done",
                    time.monotonic() + 300 * slow,
                )
                down: list[str] = []
                if probe is not None:
                    down = wait_sidecar(vm, time.monotonic() + 240 * slow)
                    ready = not down
                    first_boot = round(time.monotonic() - vm.started, 1) if ready else None
                    progress(
                        f"verify: firstboot: mesh ready after {first_boot}s"
                        if ready
                        else f"verify: firstboot: the sidecar is down: {'; '.join(down)}"
                    )
                    figures, timeline = _first_boot_figures(vm, probe, ready, progress)
                    if not rounds:
                        plot = _keep_plot(vm, report_folder(image), wait=ready)
                dns_token = None if mesh is None else mesh.secrets.dns_token
                if rounds:
                    if down or mesh is None:
                        raise UserError(
                            f"no rounds: the first boot did not bring the mesh up ({down})"
                        )
                    joined = mesh
                    return _rounds(
                        vm,
                        rounds,
                        phase,
                        lambda why: expectations(loaded, phase, token, traffic, dns_token, why),
                        work,
                        leave_out,
                        lambda: _node_passing(joined, slow),
                        progress,
                        slow,
                        stop,
                    )
                expect = expectations(loaded, phase, token, traffic, dns_token, down)
                progress(f"verify: {phase}: running the Testinfra checks")
                checks = run_suite(vm.uri, expect, work, leave_out=leave_out)
                if any(c.outcome in ("failed", "error") for c in checks):
                    keep_evidence(
                        lambda command: ssh_run(vm, command, timeout=60),
                        expect["units"],
                        report_folder(image),
                        phase,
                        secrets=secret_values,
                    )
        except UserError as exc:
            names = [f"{phase}/{r.name}" for r in rounds] or [phase]
            return [
                PhaseResult(
                    name,
                    (),
                    boot_to_ssh,
                    first_boot,
                    error=str(exc),
                    figures=figures,
                    timeline=timeline,
                    plot=None if plot is None else str(plot),
                )
                for name in names
            ]
        finally:
            _keep_logs(work, image, phase, secret_values)
    return [
        PhaseResult(
            phase,
            tuple(checks),
            boot_to_ssh,
            first_boot,
            figures=figures,
            timeline=timeline,
            plot=None if plot is None else str(plot),
        )
    ]


#: Seconds after a round's change before its checks: every health check of the agent
#: has run again by then (Consul runs the sidecar's TCP check every 10 s,
#: agent/sidecar_service.go; the examples' own checks too), so the catalog shows the
#: change.
ROUND_SETTLE = 13.0


def _as_root(vm: Vm, script: str, timeout: float) -> tuple[int, str]:
    """``script`` run as root in the VM: (exit code, output); 255 when SSH failed."""
    try:
        return ssh_run(vm, f"sudo sh -c {shlex.quote(script)} 2>&1", timeout=timeout)
    except (OSError, paramiko.SSHException, EOFError) as exc:
        return 255, f"SSH: {exc}"


def _rounds(
    vm: Vm,
    rounds: Sequence[Round],
    phase: str,
    expect_for: Callable[[Sequence[str]], dict[str, Any]],
    work: Path,
    leave_out: Sequence[str],
    passing: Callable[[], str | None],
    progress: Progress,
    slow: float,
    stop: threading.Event | None = None,
) -> list[PhaseResult]:
    """Each round in turn: apply it, wait for the sidecar and for the agent's checks,
    run the suite, undo it and wait until the server sees this node passing again. A
    round whose change or undo fails is an error, and so is every round after a failed
    undo (the VM is no longer the good one). Once ``stop`` is set, no round starts."""
    results: list[PhaseResult] = []
    broken: str | None = None
    for each in rounds:
        name = f"{phase}/{each.name}"
        if broken is None and stop is not None and stop.is_set():
            broken = "verify was stopped"
        if broken is not None:
            results.append(PhaseResult(name, (), error=f"not run: {broken}"))
            continue
        progress(f"verify: {name}: applying the change")
        code, out = _as_root(vm, each.apply, 240 * slow)
        if code != 0:
            results.append(PhaseResult(name, (), error=f"the change failed ({code}): {out[-500:]}"))
            broken = f"round {each.name}'s change failed"
            continue
        down = wait_sidecar(vm, time.monotonic() + 240 * slow)
        time.sleep(ROUND_SETTLE)
        progress(f"verify: {name}: running the Testinfra checks")
        try:
            checks = run_suite(vm.uri, expect_for(down), work, leave_out=leave_out)
            results.append(PhaseResult(name, tuple(checks)))
        except UserError as exc:  # the suite did not run; the undo still must
            results.append(PhaseResult(name, (), error=str(exc)))
        code, out = _as_root(vm, each.undo, 240 * slow)
        why = f"undoing it failed ({code}): {out[-500:]}" if code else None
        if why is None and wait_sidecar(vm, time.monotonic() + 240 * slow):
            why = "the sidecar did not come back after undoing it"
        try:
            why = why or passing()
        except UserError as exc:
            why = str(exc)
        if why is not None:
            broken = f"after round {each.name}: {why}"
    return results


def _node_passing(mesh: VerifyMesh, slow: float) -> str | None:
    """Wait until the server holds this VM's service and its sidecar on this node with
    every health check passing (what the catalog check asks); what is still not passing
    after a while (None once all are)."""
    if mesh.control is None:
        raise RuntimeError("the verify mesh is not open")
    spec = mesh.loaded.spec
    deadline = time.monotonic() + 120 * slow
    while True:
        bad = []
        for service in (spec.service.name, spec.service.proxy_id):
            path = f"/v1/health/service/{urllib.parse.quote(service, safe='')}"
            entries = mesh.control.call("GET", path)
            states = [
                str(check.get("Status"))
                for entry in (entries if isinstance(entries, list) else [])
                if entry.get("Node", {}).get("Node") == mesh.node
                for check in entry.get("Checks", [])
            ]
            if not states or any(state != "passing" for state in states):
                bad.append(f"{service}: {states or 'not on the node'}")
        if not bad:
            return None
        if time.monotonic() > deadline:
            return f"not passing on the server: {'; '.join(bad)}"
        time.sleep(2)


#: Envoy's admin snapshot kept when a check fails (path -> file suffix), as Consul's own
#: Envoy suite keeps config_dump and clusters (hashicorp/consul
#: test/integration/connect/envoy/helpers.bash, snapshot_envoy_admin); stats as well.
ADMIN_SNAPSHOT = {
    "/config_dump": "config_dump.json",
    "/clusters?format=json": "clusters.json",
    "/stats": "stats.txt",
}

#: Envoy's bootstrap sends the token as gRPC metadata (hashicorp/consul
#: command/connect/envoy/bootstrap_tpl.go, initial_metadata x-consul-token), and
#: config_dump would show it.
_TOKEN_METADATA = re.compile(r'("key":\s*"x-consul-token",\s*"value":\s*")[^"]*(")')


def redact(text: str, secrets: Sequence[str]) -> str:
    """``text`` without the ``secrets`` and without Consul's token in Envoy's metadata.

    >>> redact('{"key": "x-consul-token", "value": "t-1"} t-2', ["t-2"])
    '{"key": "x-consul-token", "value": "<redacted>"} <redacted>'
    """
    for secret in secrets:
        if secret:
            text = text.replace(secret, "<redacted>")
    return _TOKEN_METADATA.sub(r"\1<redacted>\2", text)


def keep_evidence(
    run: Callable[[str], tuple[int, str]],
    units: Sequence[str],
    folder: Path,
    phase: str,
    secrets: Sequence[str] = (),
) -> list[Path]:
    """Keep what explains a failed check beside the report: Envoy's admin snapshot and
    the journal of ``units`` (``verify-<phase>-envoy-config_dump.json``, ...,
    ``verify-<phase>-journal.txt``). ``run`` runs a command in the VM and returns (exit
    code, output); what could not be read says why in its file. Secrets are redacted.
    """
    # As root: meshbake-imds closes Envoy's admin port to every user but root and envoy.
    commands = {
        f"envoy-{name}": f"sudo {helpers.admin_command(path)}"
        for path, name in ADMIN_SNAPSHOT.items()
    }
    journal = " ".join(f"-u {shlex.quote(unit)}" for unit in units)
    commands["journal.txt"] = f"sudo journalctl --no-pager -o short-monotonic {journal}"
    kept = []
    folder.mkdir(parents=True, exist_ok=True)
    for name, command in commands.items():
        try:
            code, out = run(command)
            text = out if code == 0 else f"could not read it (exit {code}):\n{out}"
        except (OSError, paramiko.SSHException, EOFError) as exc:
            text = f"could not read it: {type(exc).__name__}: {exc}\n"
        path = folder / f"verify-{phase}-{name}"
        path.write_text(redact(text, secrets))
        kept.append(path)
    return kept


def report_folder(image: Path) -> Path:
    """Where verify keeps what a person reads after a run: logs and the first-boot plot."""
    return image.parent / "logs"


def _keep_logs(work: Path, image: Path, phase: str, secrets: Sequence[str] = ()) -> None:
    """Keep the serial console, the pytest log and the local mesh's logs (the server's,
    the upstreams' apps and Envoys') next to the image for a post-mortem, redacted."""
    logs = report_folder(image)
    # Another architecture's qcow2 shares the folder: its logs carry its name.
    arch = qcow2_arch(image.name)
    try:
        for path in sorted(work.glob("*.log")):
            if path.is_file() and not path.is_symlink():
                text = redact(path.read_text(errors="replace"), secrets)
                boundary.write_output(logs / f"verify{arch_suffix(arch)}-{phase}-{path.name}", text)
    except (OSError, UserError):
        pass  # a post-mortem aid: never written through a link, never fatal


def manifest_path(image: Path) -> Path:
    """The build manifest of ``image``, beside it: ``manifest.json`` for amd64's qcow2,
    ``manifest-<arch>.json`` for another architecture's (``web-arm64.qcow2``)."""
    return image.parent / manifest_name(qcow2_arch(image.name))


def _manifest(image: Path) -> dict[str, Any]:
    """The manifest beside ``image``: {} when there is none; one that is there but is
    not a JSON object in a regular file (a FIFO, a device, a list) is a ``UserError``."""
    path = manifest_path(image)
    if not os.path.lexists(path):
        return {}
    return boundary.read_json_object(path, "build manifest")


def image_arch(image: Path) -> Arch:
    """The architecture ``image`` boots: its manifest's ``arch``, else its file name's."""
    recorded = _manifest(image).get("arch")
    if recorded is None:
        return qcow2_arch(image.name)
    if recorded not in {a.value for a in Arch}:
        raise UserError(
            f"{manifest_path(image)}: arch: {str(recorded)[:40]!r} is not amd64 or arm64"
        )
    return Arch(recorded)


def spec_for(image: Path) -> Path:
    """The spec an image was built from, read from the manifest beside it."""
    spec = _manifest(image).get("spec")
    if not isinstance(spec, str):
        raise UserError(
            f"{image}: no {manifest_path(image).name} beside it names the spec; pass --spec"
        )
    return Path(spec)


def check_spec_drift(image: Path, loaded: LoadedSpec, *, allow: bool = False) -> None:
    """Refuse to check ``image`` against a spec other than the one it was built from.

    The manifest's ``spec_hash`` must equal the hash of the spec given now; ``allow``
    (``--allow-spec-drift``) skips the comparison. An image with no manifest has
    nothing to compare.
    """
    if allow:
        return
    manifest = _manifest(image)
    if not manifest:
        return
    built = manifest.get("spec_hash")
    if not isinstance(built, str):
        raise UserError(
            f"{manifest_path(image)}: spec_hash is {type(built).__name__}, not the"
            " spec's hash; rebuild the image, or pass --allow-spec-drift"
        )
    if built == loaded.digest:
        return
    raise UserError(
        f"{image}: built from a spec with hash {built[:12]}, but {loaded.path} hashes to"
        f" {loaded.digest[:12]} now; rebuild the image, or pass --allow-spec-drift"
    )


def verify_image(
    image: Path,
    *,
    spec: Path | None = None,
    phases: Sequence[str] = PHASES,
    accelerator: Accelerator = Accelerator.AUTO,
    progress: Progress = to_stderr,
    token: str | None = None,
    allow_spec_drift: bool = False,
    leave_out: Sequence[str] = (),
    mesh_inputs: MeshInputs | None = None,
    cpus: int | None = None,
    rounds: Sequence[Round] = (),
    stop: threading.Event | None = None,
) -> VerifyReport:
    """Boot ``image`` once per phase and run the checks; never raises for a failed check.

    Phase firstboot boots the image into a local mesh (:class:`VerifyMesh`) made of
    ``mesh_inputs``, the image's own Consul zip and Envoy, whose server mints the
    tokens the first boot delivers. ``token`` is the token phase baked searches for
    (a fresh random one by default). ``leave_out`` names checks not to run (the
    broken-image tests leave out the reboot, which the good images prove). ``cpus``:
    the VM's vCPUs, by default :func:`vm_cpus` for one VM at a time. ``rounds`` (phase
    firstboot only): after the first boot, each :class:`Round` in turn, with the
    checks run once per round, not once for the boot (one result per round); once
    ``stop`` is set (e.g. by another thread at a Ctrl-C), no further round starts.
    """
    if rounds and tuple(phases) != ("firstboot",):
        raise UserError("rounds are made after a first boot: give phases=('firstboot',)")
    if not image.is_file():
        raise UserError(f"{image}: no such image")
    for phase in phases:
        if phase not in PHASES:
            raise UserError(f"unknown phase {phase!r}; choose from {', '.join(PHASES)}")
    loaded = load_spec(spec or spec_for(image))
    check_spec_drift(image, loaded, allow=allow_spec_drift)
    arch = image_arch(image)
    check_tools(arch)  # one line naming the package, before any mesh is made
    boundary.own_folder(report_folder(image), "folder of verify's logs")
    results = [
        result
        for phase in phases
        for result in _phase(
            image,
            loaded,
            phase,
            accelerator,
            progress,
            token,
            leave_out,
            mesh_inputs,
            cpus or vm_cpus(),
            arch,
            rounds,
            stop,
        )
    ]
    return VerifyReport(loaded.spec.name, tuple(results))


def verify_host(uri: str, *, spec: Path, phase: str, token: str, sudo: bool = True) -> PhaseResult:
    """Run one phase's checks against any reachable host, e.g. an EC2 instance.

    ``uri`` is a Testinfra host such as ``ssh://admin@203.0.113.7``; ``token`` is the
    token that host was given (phase firstboot) or must not contain (phase baked).
    """
    loaded = load_spec(spec)
    with tempfile.TemporaryDirectory(prefix="meshbake-verify-") as tmp:
        expect = expectations(loaded, phase, token)
        checks = run_suite(uri, expect, Path(tmp), sudo=sudo)
    return PhaseResult(phase, tuple(checks))
