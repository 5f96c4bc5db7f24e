"""The shipped image suites (``builder.verify.imagetests``) collect the right module per
phase, and what they report reaches verify's summary and JUnit file.

The suites run against a booted image; here they are only collected, from a copy of
exactly the files the wheel ships (``*.py``), so that an accidental import from
``tests.*``, or a shared helper that the copy cannot import relatively, shows up as a
collection error. Their pure parts (Envoy's stats, nft listings) and the runner's
reports are checked here too; tests/e2e runs them against real images.
"""

from __future__ import annotations

import importlib
import json
import re
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from importlib import resources
from pathlib import Path
from typing import Any

import pytest

from builder.spec.model import load_spec
from builder.verify import runner

EXPECT = {
    "image": "web",
    "service": "web",
    "port": 8080,
    "proxy_id": "web-sidecar-proxy",
    "consul_version": "1.22.1",
    "envoy_version": "1.38.3",
    "app_user": "web",
    "app_unit": "web.service",
    "wait_for_mesh": True,
    "units": [
        "consul.service",
        "envoy-sidecar.service",
        "meshbake-firstboot.service",
        "web.service",
    ],
    "acl": True,
    "tokens": "shared",
    "inbound_exclusions": [22],
    "outbound_ports": [],
    "outbound_cidrs": [],
    "exclude_uids": [],
    "dns_forward": True,
    "token": "4d3c2b1a-0000-4000-8000-000000000000",
    "dns_token": None,
    "mesh": None,
    "redirect_backend": "nftables",
    "dns_token_key": "dns",
    "fail_closed": False,
    "imds_restricted": True,
    "imds_allow_users": [],
    "traffic": {
        "inbound": {"address": "127.0.0.1", "port": 9},
        "outbound": {"address": "10.0.2.2", "port": 9, "banner": "b", "log": "/nonexistent"},
    },
}

#: Nothing listens here; collection must not connect.
URI = "paramiko://meshbake-verify@127.0.0.1:9?ssh_identity_file=/nonexistent/key"


@pytest.fixture
def suite(tmp_path: Path) -> Path:
    """A copy of the shipped suite, as the wheel's package data has it."""
    shipped = resources.files("builder.verify.imagetests")
    out = tmp_path / "imagetests"
    out.mkdir()
    for entry in shipped.iterdir():
        if entry.name.endswith(".py"):
            (out / entry.name).write_bytes(entry.read_bytes())
    return out


def collect(suite: Path, *options: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "pytest", str(suite), "-p", "no:cacheprovider", "--collect-only"]
        + ["-q", f"--hosts={URI}", *options],
        cwd=suite.parent,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def collected(output: str) -> list[str]:
    """``module.py::test`` ids (no folder, no host parameter) from ``--collect-only -q``."""
    ids = []
    for line in output.splitlines():
        if "::" in line:
            path, _, name = line.split("[", 1)[0].partition("::")
            ids.append(f"{Path(path).name}::{name}")
    return ids


@pytest.mark.parametrize(
    ("phase", "module", "other"),
    [
        ("baked", "test_baked.py", "test_firstboot.py"),
        ("firstboot", "test_firstboot.py", "test_baked.py"),
    ],
)
def test_phase_selects_its_module(suite: Path, phase: str, module: str, other: str) -> None:
    expect = suite.parent / "expect.json"
    expect.write_text(json.dumps({**EXPECT, "phase": phase}))
    result = collect(suite, f"--expect={expect}")
    assert result.returncode == 0, result.stdout + result.stderr
    ids = collected(result.stdout)
    assert ids, result.stdout
    assert {i.split("::")[0] for i in ids} == {module}, ids
    assert "deselected" in result.stdout, "the other module must be deselected, not skipped"
    assert all(f"{other}::" not in i for i in ids)
    if phase == "firstboot":
        # The traffic checks are all there.
        for check in (
            "inbound_crosses_the_sidecar",
            "outbound_crosses_the_sidecar",
            "consul_user_bypasses_the_sidecar",
            "ssh_bypasses_the_sidecar",
            "dns_answers_under_the_dns_token",
            "plain_inbound_per_mtls_mode",
            "mesh_client_refused",
            "upstream_by_virtual_name",
            "catalog_has_the_node_and_passing_instances",
            "imds_only_for_root_and_allowed_users",
            "envoy_admin_only_for_root_and_envoy",
            "sidecar_restarts_after_a_clean_exit",
        ):
            assert f"test_firstboot.py::test_{check}" in ids, ids
        # These change the host; the reboot must be last.
        assert ids[-2:] == [
            "test_firstboot.py::test_sidecar_down",
            "test_firstboot.py::test_reboot_keeps_the_mesh",
        ], ids
    # Each check (each parameter of one) runs once, against the one host.
    lines = [line for line in result.stdout.splitlines() if "::" in line]
    assert len(lines) == len(set(lines))
    assert all(re.search(r"\[(\w+-)?paramiko://127\.0\.0\.1(-\w+)?\]", line) for line in lines), (
        lines
    )


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"phase": "later"}, "phase must be one of"),
        ({"phase": "baked", "token": None, "acl": None}, None),
    ],
)
def test_bad_expect_is_a_usage_error(
    suite: Path, change: dict[str, object], message: str | None
) -> None:
    expect = suite.parent / "expect.json"
    data = {**EXPECT, **change}
    for key in [k for k, v in change.items() if v is None]:
        del data[key]
    expect.write_text(json.dumps(data))
    result = collect(suite, f"--expect={expect}")
    assert result.returncode == pytest.ExitCode.USAGE_ERROR, result.stdout + result.stderr
    assert (message or "missing keys: acl, token") in result.stderr


def test_expect_is_required(suite: Path) -> None:
    result = collect(suite)
    assert result.returncode == pytest.ExitCode.USAGE_ERROR
    assert "--expect" in result.stderr


def test_suite_ships_nothing_but_python() -> None:
    # pyproject.toml ships "*.py" only; a data file next to the suites would be lost.
    shipped = resources.files("builder.verify.imagetests")
    others = [e.name for e in shipped.iterdir() if e.is_file() and not e.name.endswith(".py")]
    assert not others, others


# --- the shared helpers and the reports built from the suites' results ---------------

#: ``nft -nn list table inet consul_tproxy`` after sdk/nftables' transaction with
#: -proxy-uid=998 -exclude-uid=0 -exclude-inbound-port=22 and 8301 (real nft 1.0.6).
NFT_LISTING = """\
table inet consul_tproxy {
	chain CONSUL_PROXY_INBOUND {
		tcp dport 8301 return
		tcp dport 22 return
		meta l4proto 6 jump CONSUL_PROXY_IN_REDIRECT
	}

	chain CONSUL_PROXY_IN_REDIRECT {
		meta l4proto 6 redirect to :21000
	}

	chain CONSUL_PROXY_OUTPUT {
		meta skuid 0 return
		meta skuid 998 return
		ip daddr 127.0.0.1 return
		ip6 daddr ::1 return
		jump CONSUL_PROXY_REDIRECT
	}

	chain CONSUL_PROXY_REDIRECT {
		meta l4proto 6 redirect to :15001
	}

	chain CONSUL_DNS_REDIRECT {
	}

	chain CONSUL_NAT_OUTPUT {
		type nat hook output priority -100; policy accept;
		meta nfproto 10 return
		meta l4proto 6 jump CONSUL_PROXY_OUTPUT
	}

	chain CONSUL_NAT_PREROUTING {
		type nat hook prerouting priority -100; policy accept;
		meta nfproto 10 return
		meta l4proto 6 jump CONSUL_PROXY_INBOUND
	}
}
"""


def _suite_module(name: str) -> Any:
    return importlib.import_module(f"builder.verify.imagetests.{name}")


def test_nft_layout_problems_see_a_missing_uid_exclusion() -> None:
    firstboot = _suite_module("test_firstboot")
    expect = {**EXPECT, "inbound_exclusions": [22, 8301]}
    uids = {"envoy": 998, "consul": 0}
    assert firstboot.nft_layout_problems(NFT_LISTING, expect, uids) == []
    broken = NFT_LISTING.replace("\t\tmeta skuid 998 return\n", "")
    assert firstboot.nft_layout_problems(broken, expect, uids) == [
        "uid exclusion envoy (998): 0 times"
    ]
    twice = NFT_LISTING + NFT_LISTING.replace("table inet consul_tproxy {", "")
    assert "chain CONSUL_PROXY_OUTPUT: 2 times" in firstboot.nft_layout_problems(
        twice, expect, uids
    )
    assert firstboot.nft_layout_problems(None, expect, uids) == [
        "table inet consul_tproxy: missing"
    ]


@pytest.mark.parametrize(
    "chain_rule,rule",
    [
        # An inbound bypass: the app's port returns before Consul's redirect.
        ("\t\ttcp dport 8301 return\n", "tcp dport 8080 return"),
        # An outbound bypass: all TCP returns before the redirect.
        ("\t\tmeta skuid 0 return\n", "meta l4proto tcp return"),
    ],
)
def test_nft_layout_problems_see_a_rule_consul_never_installs(chain_rule: str, rule: str) -> None:
    firstboot = _suite_module("test_firstboot")
    expect = {**EXPECT, "inbound_exclusions": [22, 8301]}
    uids = {"envoy": 998, "consul": 0}
    broken = NFT_LISTING.replace(chain_rule, f"\t\t{rule}\n{chain_rule}", 1)
    (problem,) = firstboot.nft_layout_problems(broken, expect, uids)
    assert problem.startswith("a rule Consul does not install, in CONSUL_PROXY_")
    assert problem.endswith(rule)


#: ``iptables -t nat -S`` after sdk/iptables' rules with -proxy-uid=998 -exclude-uid=999,
#: -exclude-inbound-port=22, -exclude-outbound-port=8300 and
#: -exclude-outbound-cidr=169.254.169.254, as real iptables 1.8.9 prints it (cut down
#: from a listing of the double's rules in a namespace to these flags).
IPTABLES_RULES = """\
-P PREROUTING ACCEPT
-P OUTPUT ACCEPT
-N CONSUL_DNS_REDIRECT
-N CONSUL_PROXY_INBOUND
-N CONSUL_PROXY_IN_REDIRECT
-N CONSUL_PROXY_OUTPUT
-N CONSUL_PROXY_REDIRECT
-A PREROUTING -p tcp -j CONSUL_PROXY_INBOUND
-A OUTPUT -p tcp -j CONSUL_PROXY_OUTPUT
-A CONSUL_PROXY_INBOUND -p tcp -m tcp --dport 22 -j RETURN
-A CONSUL_PROXY_INBOUND -p tcp -j CONSUL_PROXY_IN_REDIRECT
-A CONSUL_PROXY_IN_REDIRECT -p tcp -j REDIRECT --to-ports 21000
-A CONSUL_PROXY_OUTPUT -m owner --uid-owner 999 -j RETURN
-A CONSUL_PROXY_OUTPUT -d 169.254.169.254/32 -j RETURN
-A CONSUL_PROXY_OUTPUT -p tcp -m tcp --dport 8300 -j RETURN
-A CONSUL_PROXY_OUTPUT -m owner --uid-owner 998 -j RETURN
-A CONSUL_PROXY_OUTPUT -d 127.0.0.1/32 -j RETURN
-A CONSUL_PROXY_OUTPUT -j CONSUL_PROXY_REDIRECT
-A CONSUL_PROXY_REDIRECT -p tcp -j REDIRECT --to-ports 15001
""".splitlines()


def test_iptables_layout_problems_see_missing_doubled_and_foreign_rules() -> None:
    firstboot = _suite_module("test_firstboot")
    expect = {
        **EXPECT,
        "inbound_exclusions": [22],
        "outbound_ports": [8300],
        "outbound_cidrs": ["169.254.169.254/32"],
    }
    uids = {"envoy": 998, "consul": 999}
    assert firstboot.iptables_layout_problems(IPTABLES_RULES, expect, uids) == []
    missing = [r for r in IPTABLES_RULES if "--uid-owner 998" not in r]
    assert firstboot.iptables_layout_problems(missing, expect, uids) == [
        "uid exclusion envoy (998): 0 times"
    ]
    bypass = "-A CONSUL_PROXY_INBOUND -p tcp -m tcp --dport 8080 -j RETURN"
    assert firstboot.iptables_layout_problems([*IPTABLES_RULES, bypass], expect, uids) == [
        "a rule Consul does not install, in CONSUL_PROXY_INBOUND:"
        " -p tcp -m tcp --dport 8080 -j RETURN"
    ]
    again = [*IPTABLES_RULES, "-A CONSUL_PROXY_IN_REDIRECT -p tcp -j REDIRECT --to-ports 21099"]
    assert firstboot.iptables_layout_problems(again, expect, uids) == ["inbound redirect: 2 times"]


def test_parse_stats_reads_counters_only() -> None:
    helpers = _suite_module("helpers")
    text = (
        "tcp.public_listener.downstream_cx_total: 2\n"
        "cluster.local_app.upstream_cx_connect_fail: 0\n"
        "cluster.local_app.upstream_cx_length_ms: P0(nan,1) P25(nan,1)\n"
    )
    assert helpers.parse_stats(text) == {
        "tcp.public_listener.downstream_cx_total": 2,
        "cluster.local_app.upstream_cx_connect_fail": 0,
    }


def test_host_listener_logs_and_answers_and_the_probe_sees_it(tmp_path: Path) -> None:
    helpers = _suite_module("helpers")
    log = tmp_path / "listener.log"
    with runner.HostListener(log) as listener:
        exchange = helpers.tcp_exchange("127.0.0.1", listener.port, b"marker one\n")
        assert exchange.answered
        assert exchange.reply == f"{listener.banner} marker one\n"
        assert listener.outbound()["address"] == "10.0.2.2"
        with runner.ServiceProbe(listener.port, interval=0.05) as probe:
            deadline = time.monotonic() + 10
            while len(probe.answered) < 3 and time.monotonic() < deadline:
                time.sleep(0.05)
            answered = probe.stop()
    assert "marker one" in log.read_text().splitlines()
    assert len(answered) >= 3 and answered == sorted(answered)
    # Nothing listens any more: no connection, and the probe counts no answer.
    closed = helpers.tcp_exchange("127.0.0.1", listener.port, b"x\n", timeout=2)
    assert not closed.connected and "no connection" in closed.describe()


def test_failures_reach_the_reports_as_check_expected_seen(tmp_path: Path) -> None:
    """A check that fails with ``require`` shows up in the summary and the JUnit file
    as its name, what was expected and what was seen; figures come along."""
    suite = tmp_path / "suite"
    suite.mkdir()
    (suite / "test_demo.py").write_text(
        "from builder.verify.imagetests.helpers import require\n"
        "def test_inbound(record_property):\n"
        "    record_property('inbound_connections', 0)\n"
        "    require(False, 'the app answers through Envoy', 'no connection (refused)')\n"
        "def test_fine(record_property):\n"
        "    record_property('outbound_connections', 1)\n"
    )
    junit = tmp_path / "junit.xml"
    subprocess.run(
        [sys.executable, "-m", "pytest", str(suite), "-p", "no:cacheprovider", "-q"]
        + [f"--junitxml={junit}", "-o", "junit_family=xunit1", f"--rootdir={suite}"],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    checks = runner.parse_junit(junit)
    by_name = {c.name: c for c in checks}
    assert by_name["test_inbound"].outcome == "failed"
    assert by_name["test_inbound"].figures == {"inbound_connections": 0}
    assert by_name["test_fine"].figures == {"outbound_connections": 1}
    phase = runner.PhaseResult(
        "firstboot",
        tuple(checks),
        figures={"vm_start_to_first_proxied_s": 71.5},
        timeline={"sidecar_active": 60.1, "first_proxied_connection": 60.4},
    )
    report = runner.VerifyReport("web", (phase, runner.PhaseResult("baked", (), error="boom")))
    summary = report.summary()
    assert "FAIL  test_inbound" in summary
    assert "expected: the app answers through Envoy" in summary
    assert "seen: no connection (refused)" in summary
    assert "VM start to first proxied connection 71.5s" in summary
    # One JUnit document, a suite per phase; a phase that could not run is an error.
    root = ET.fromstring(report.to_junit())
    suites = {s.get("name"): s for s in root.iter("testsuite")}
    assert set(suites) == {"firstboot", "baked"}
    assert suites["firstboot"].get("failures") == "1"
    assert suites["baked"].get("errors") == "1"
    failure = suites["firstboot"].find("testcase[@name='test_inbound']/failure")
    assert failure is not None
    assert failure.get("message") == (
        "expected: the app answers through Envoy | seen: no connection (refused)"
    )
    props = {p.get("name"): p.get("value") for p in suites["firstboot"].iter("property")}
    assert props["timeline.first_proxied_connection"] == "60.4"
    assert props["inbound_connections"] == "0"
    assert json.loads(json.dumps(report.to_json()))["phases"][0]["timeline"]["sidecar_active"]


def test_firstboot_imds_check_expects_the_consul_user_with_cloud_auto_join(
    example_path: Path,
) -> None:
    """images/web.yaml joins with provider=aws: the firstboot IMDS check must let the
    consul user through (and still refuse the app's user and nobody)."""
    expect = runner.expectations(load_spec(example_path), "firstboot", "t")
    assert expect["imds_restricted"]
    assert "consul" in expect["imds_allow_users"]
    assert expect["app_user"] not in expect["imds_allow_users"]
