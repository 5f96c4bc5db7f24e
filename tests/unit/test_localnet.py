"""builder/mesh/localnet.py's pure parts: the subnet it picks, the leases it hands out,
and which records the sweep acts on (no command runs here)."""

from __future__ import annotations

import ipaddress
import json
import os
from pathlib import Path

import pytest

from builder import proc
from builder.errors import UserError
from builder.mesh import localnet
from builder.mesh.localnet import LocalNetwork

Net = ipaddress.IPv4Network


def test_the_subnet_skips_every_route_but_the_default() -> None:
    routes = [Net("0.0.0.0/0"), Net("198.18.0.0/24"), Net("198.18.1.128/25"), Net("10.0.0.0/8")]
    assert localnet.choose_subnet(routes) == Net("198.18.2.0/24")


def test_a_covered_range_is_one_clear_error() -> None:
    with pytest.raises(UserError, match=r"no free /24 in 198\.18\.0\.0/15"):
        localnet.choose_subnet([Net("198.16.0.0/12")])


def test_leases_are_stable_distinct_and_local_unicast() -> None:
    net = LocalNetwork(tag="localnet", subnet=Net("198.18.7.0/24"))
    first, second = net.lease("web"), net.lease("api")
    assert net.lease("web") == first
    assert (str(first.address), str(second.address)) == ("198.18.7.10/24", "198.18.7.11/24")
    assert first.mac != second.mac
    octet = int(first.mac.split(":")[0], 16)
    assert octet & 0b10 and not octet & 0b1  # locally administered, unicast


def test_leases_run_out_with_one_clear_error() -> None:
    net = LocalNetwork(tag="localnet", subnet=Net("198.18.7.0/28"))
    for n in range(localnet.FIRST_GUEST, 15):
        net.lease(f"vm{n}")
    with pytest.raises(UserError, match="no address left for vm15"):
        net.lease("vm15")


@pytest.mark.parametrize("tag", ["", "Up", "a-b", "x" * 21, "../x"])
def test_a_bad_tag_is_refused(tag: str) -> None:
    with pytest.raises(ValueError, match="tag"):
        LocalNetwork(tag=tag)


def _dead_pid() -> int:
    pid = os.getpid()
    while Path(f"/proc/{pid}").exists():
        pid += 1
    return pid


@pytest.mark.parametrize(
    ("stem", "record"),
    [
        ("victim", {"netns": "victim", "pid": "dead", "start": "1"}),
        ("meshbake-up-0000000g", {"netns": "meshbake-up-0000000g", "pid": "dead", "start": "1"}),
        ("meshbake-up-00000000", {"netns": "meshbake-up-11111111", "pid": "dead", "start": "1"}),
        ("meshbake-up-00000000", "not json {"),
    ],
)
def test_the_sweep_touches_nothing_it_does_not_own(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, stem: str, record: object
) -> None:
    calls: list[object] = []
    monkeypatch.setattr(proc, "run", lambda argv, **_: calls.append(argv))
    if isinstance(record, dict):
        record = json.dumps(record | {"pid": _dead_pid()})
    (tmp_path / f"{stem}.json").write_text(str(record))
    assert localnet.sweep(tmp_path) == []
    assert calls == []
    assert (tmp_path / f"{stem}.json").exists()


def test_the_sweep_removes_a_dead_owners_namespace(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    name = "meshbake-up-0123abcd"
    calls: list[list[str]] = []

    def run(argv: list[str], **_: object) -> proc.Completed:
        calls.append(list(argv))
        listed = json.dumps([{"name": name}]) if argv[1:3] == ["-j", "netns"] else ""
        return proc.Completed(tuple(argv), 0, listed, "")

    monkeypatch.setattr(proc, "run", run)
    record = {"netns": name, "pid": _dead_pid(), "start": "1"}
    (tmp_path / f"{name}.json").write_text(json.dumps(record))
    assert localnet.sweep(tmp_path) == [name]
    assert ["ip", "netns", "delete", name] in calls
    assert not list(tmp_path.iterdir())


def test_a_state_dir_it_cannot_write_is_one_clear_error(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("")
    net = LocalNetwork(tag="localnet", state_dir=blocker / "state", subnet=Net("198.18.7.0/24"))
    with pytest.raises(UserError, match=r"/file/state/meshbake-localnet-\w+\.json: cannot record"):
        net.open()
    assert net.name not in localnet.namespaces()
