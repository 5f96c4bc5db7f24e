"""The checks can fail: break copies of a good image offline, verify them, and each
fails exactly the checks that see its break, with a message that says what it saw.

Phase baked, one copy with three breaks, the way a bad bake or a careless hand would:

- a secrets file holding the token is baked in (``zz-meshbake-secrets.json``);
- the ``envoy`` user is gone (passwd, shadow, group, gshadow);
- ``envoy-sidecar.service`` is disabled (its ``multi-user.target.wants`` link removed).

The baked secrets file also lets consul start without first boot (its ExecCondition
only looks for that file), so the "consul is down until first boot" check must fail
too: that is the check doing its job, not a side effect to hide.

Phase firstboot, one copy per break, each proved by traffic (Envoy's counters). On both
examples (web: nftables; api: iptables, failing closed):

- ``redirect_bypass``: inbound to the app's port is not redirected (a rule of the
  break's own returns first), so a plain client from outside gets the app's answer;
- ``outbound_bypass``: outbound TCP is not redirected (a rule of the break's own returns
  first), so the app's connections leave without its sidecar and an upstream's virtual
  IP leads nowhere;
- ``fenced_sidecar``: the sidecar's unit may not use the network (``IPAddressDeny=any``),
  so its redirect cannot ask the agent and it never comes up; verify stops waiting for it
  once consul has been active a while, and the checks that need it fail at once;
- ``dns_broken``: resolved no longer sends ``*.consul`` to the agent (its drop-in is
  gone);
- ``dns_token_missing``: the agent starts without the DNS token first boot delivered (a
  drop-in of consul.service takes it out of the secrets file), so it answers DNS as the
  anonymous token, which default deny lets see nothing;
- ``relay``: the sidecar runs Envoy with a hand-written plain-TCP relay instead of
  what Consul gives it, as the double did before verify joined a mesh: a plain client
  from outside reaches the app, a mesh client's TLS is not terminated, intentions are
  not enforced, and no upstream is reachable by its virtual name.

On web only: ``app_not_listening``, the app runs but listens nowhere.

On api only (their scripts' iptables branch):

- ``no_uid_exclusion``: the redirect loses its proxy-uid exclusion (Envoy's own
  connections are sent back into Envoy: a loop);
- ``inbound_port_wrong``: inbound traffic is redirected to a port where Envoy does not
  listen.

The breaks that edit the rules (the bypasses, ``no_uid_exclusion``,
``inbound_port_wrong``) also fail the check of Consul's rules: it names what Consul's
redirect never installs. Every copy costs a boot (about 3 minutes two at a time on 2
cores, one vCPU each). A sidecar that never comes up is proved on
both by the fenced sidecar (a missing ``/usr/bin/envoy``, a copy of its own before,
failed a subset of its checks: all but the app's start order).

The scripted breaks are applied by a drop-in of the sidecar unit that edits Consul's own
rules right after the redirect (``ExecStartPre`` lines of a drop-in run after the
unit's), so they come back at every start and every boot, as a bad redirect would.
Fail-closed is proved on a good image of its own: images/api.yaml sets it, and its
verify (tests/e2e/test_bake_and_verify.py) must see the connection refused while the
sidecar is down.

The good images are the session's bakes of the examples (tests/e2e/conftest.py);
``MESHBAKE_E2E_IMAGE`` replaces web's. Each is converted to raw once per session; each copy
costs a sparse copy of that raw disk, one conversion back to qcow2 and one boot. The
copies boot as many at a time as the session's pool of VMs allows (tests/e2e/conftest.py),
each test waiting for its own report.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from builder.render import paths
from builder.verify import runner as verify
from builder.verify.localmesh import MeshInputs

from .conftest import VM_CPUS, Example, mesh_for, selected_params

pytestmark = [pytest.mark.image, pytest.mark.root]

#: The token the verify run searches for; the broken image carries it.
TOKEN = uuid.UUID("5e1f0c1a-7a1e-4b0d-9c3e-b20ce4ba5e11")

#: The baked-phase checks the three breaks must fail, and only these.
MUST_FAIL = {
    "test_token_nowhere",
    "test_no_secret_files",
    # meshbake-secret-scan finds the token in Consul's config folder too.
    "test_no_foreign_secret",
    "test_envoy_user_is_system_nologin",
    "test_units_enabled",
    "test_consul_not_running_and_journal_says_why",
}

#: A few checks the breaks do not touch: they must still pass.
MUST_PASS = {
    "test_consul_binary",
    "test_envoy_binary",
    "test_consul_user_is_system_nologin",
    "test_consul_config",
    "test_no_consul_chains",
    "test_machine_id_fresh",
}


@dataclass(frozen=True)
class Good:
    """A good golden image of one example, and verify's local mesh for it."""

    image: Path
    spec: Path
    mesh: MeshInputs


@pytest.fixture(scope="session")
def good(request: pytest.FixtureRequest) -> Callable[[str], Good]:
    """The good image of example ``name``: for web ``MESHBAKE_E2E_IMAGE`` when set, else
    the session's bake. Its manifest's Consul zip and Envoy must be in the session's
    artifact cache: verify's mesh is made of them."""
    done: dict[str, Good] = {}

    def example(name: str) -> Good:
        if name not in done:
            baked: Example = request.getfixturevalue("bake")(name)
            image = baked.built.output
            given = os.environ.get("MESHBAKE_E2E_IMAGE") if name == "web" else None
            if given:
                image = Path(given)
                if not image.is_file():
                    pytest.fail(f"MESHBAKE_E2E_IMAGE={given}: no such file")
            assert image is not None
            done[name] = Good(image, baked.spec, mesh_for(image, baked.options))
        return done[name]

    return example


def run(*argv: str | Path) -> str:
    done = subprocess.run(
        [str(a) for a in argv], check=True, capture_output=True, text=True, timeout=600
    )
    return done.stdout


def first_partition(raw: Path) -> tuple[int, int]:
    """(offset, size) in bytes of the image's first (root) partition."""
    table = json.loads(run("sfdisk", "-J", raw))["partitiontable"]
    sector = int(table.get("sectorsize", 512))
    part = table["partitions"][0]
    return int(part["start"]) * sector, int(part["size"]) * sector


def drop_user_lines(path: Path, name: str) -> None:
    lines = path.read_text().splitlines(keepends=True)
    kept = [line for line in lines if not line.startswith(f"{name}:")]
    assert len(kept) < len(lines), f"{path} has no {name} entry"
    path.write_text("".join(kept))


def break_image(root: Path) -> None:
    secrets = root / "etc/consul.d/zz-meshbake-secrets.json"
    secrets.write_text(json.dumps({"acl": {"tokens": {"agent": str(TOKEN)}}}) + "\n")
    secrets.chmod(0o600)
    for name in ("passwd", "shadow", "group"):
        drop_user_lines(root / "etc" / name, "envoy")
    gshadow = root / "etc/gshadow"
    if gshadow.is_file() and any(
        line.startswith("envoy:") for line in gshadow.read_text().splitlines()
    ):
        drop_user_lines(gshadow, "envoy")
    wants = root / "etc/systemd/system/multi-user.target.wants/envoy-sidecar.service"
    assert wants.is_symlink(), "the good image does not enable envoy-sidecar.service"
    wants.unlink()


def raw_disk(image: Path, folder: Path) -> Path:
    """``image`` (a qcow2, compressed by the bake) as a raw disk in ``folder``."""
    raw = folder / f"{image.stem}.raw"
    run("qemu-img", "convert", "-O", "raw", image, raw)
    return raw


@pytest.fixture(scope="session")
def good_raws(
    good: Callable[[str], Good], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Callable[[str], Path]]:
    """Example ``name``'s good image as a raw disk, converted once per session: every
    break copies it (a sparse copy is much cheaper than decompressing the qcow2 again)."""
    done: dict[str, Path] = {}

    def raw(name: str) -> Path:
        if name not in done:
            done[name] = raw_disk(good(name).image, tmp_path_factory.mktemp(f"good-raw-{name}"))
        return done[name]

    yield raw
    for path in done.values():
        path.unlink(missing_ok=True)  # gigabytes; pytest keeps old sessions' folders


def edited_copy(good_raw: Path, folder: Path, edit: Callable[[Path], None]) -> Path:
    """A qcow2 copy of the raw disk ``good_raw`` whose root file system went through
    ``edit(root)``; ``good_raw`` itself is not touched."""
    raw = folder / "broken.raw"
    run("cp", "--sparse=always", good_raw, raw)
    offset, size = first_partition(raw)
    assert offset == 1048576, f"the root partition starts at byte {offset}, not 1 MiB"
    loop = run(
        "losetup", "--find", "--show", "--offset", str(offset), "--sizelimit", str(size), raw
    ).strip()
    root = folder / "root"
    root.mkdir()
    mounted = False
    try:
        run("mount", loop, root)
        mounted = True
        edit(root)
    finally:
        if mounted:
            subprocess.run(["umount", str(root)], check=False)
        subprocess.run(["losetup", "-d", loop], check=False)
    out = folder / "broken.qcow2"
    run("qemu-img", "convert", "-O", "qcow2", raw, out)
    raw.unlink()
    return out


def check_name(name: str) -> str:
    """``test_x[paramiko://127.0.0.1]`` -> ``test_x``."""
    return name.split("[", 1)[0]


#: The name the baked-phase copy (three breaks in one) has among the reports.
BAKED = "baked"


def test_broken_image_fails_exactly_the_broken_checks(
    break_reports: dict[str, Future[verify.VerifyReport]],
) -> None:
    report = break_reports[BAKED].result()
    (phase,) = report.phases
    assert phase.error is None, phase.error
    outcomes = {check_name(c.name): c.outcome for c in phase.checks}
    failed = {name for name, outcome in outcomes.items() if outcome in ("failed", "error")}
    assert failed == MUST_FAIL, report.summary()
    assert all(outcomes.get(name) == "passed" for name in MUST_PASS), report.summary()
    assert not report.ok


# --- phase firstboot: traffic --------------------------------------------------------

#: Runs as root from the sidecar's drop-in, after meshbake-redirect; mesh.env is loaded.
SIDECAR_DROPIN = "/etc/systemd/system/envoy-sidecar.service.d/zz-meshbake-broken.conf"
BREAK_SCRIPT = "/usr/local/sbin/meshbake-broken-redirect"

DROP_UID_EXCLUSION = r"""#!/bin/sh
# Deliberately broken by tests/e2e/test_broken_image.py: drop the proxy-uid exclusion.
set -eu
uid=$(id -u envoy)
if [ "$MESHBAKE_REDIRECT_BACKEND" = nftables ]; then
    handle=$(nft -a list chain inet consul_tproxy CONSUL_PROXY_OUTPUT |
        sed -n "s/.*meta skuid $uid return # handle \([0-9]*\)$/\1/p")
    nft delete rule inet consul_tproxy CONSUL_PROXY_OUTPUT handle "$handle"
else
    iptables -w -t nat -D CONSUL_PROXY_OUTPUT -m owner --uid-owner "$uid" -j RETURN
fi
"""

WRONG_INBOUND_PORT = r"""#!/bin/sh
# Deliberately broken by tests/e2e/test_broken_image.py: inbound goes to a dead port.
set -eu
if [ "$MESHBAKE_REDIRECT_BACKEND" = nftables ]; then
    nft insert rule inet consul_tproxy CONSUL_PROXY_IN_REDIRECT meta l4proto tcp redirect to :21099
else
    iptables -w -t nat -I CONSUL_PROXY_IN_REDIRECT -p tcp -j REDIRECT --to-port 21099
fi
"""


BYPASS_INBOUND = r"""#!/bin/sh
# Deliberately broken by tests/e2e/test_broken_image.py: inbound to the app's port is
# not redirected, so it reaches the app directly and still gets answers.
set -eu
port=$MESHBAKE_SERVICE_PORT
if [ "$MESHBAKE_REDIRECT_BACKEND" = nftables ]; then
    nft insert rule inet consul_tproxy CONSUL_PROXY_INBOUND tcp dport "$port" return
else
    iptables -w -t nat -I CONSUL_PROXY_INBOUND -p tcp --dport "$port" -j RETURN
fi
"""


BYPASS_OUTBOUND = r"""#!/bin/sh
# Deliberately broken by tests/e2e/test_broken_image.py: outbound TCP is not redirected,
# so the app's connections leave without its sidecar (and a virtual IP leads nowhere).
set -eu
if [ "$MESHBAKE_REDIRECT_BACKEND" = nftables ]; then
    nft insert rule inet consul_tproxy CONSUL_PROXY_OUTPUT meta l4proto tcp return
else
    iptables -w -t nat -I CONSUL_PROXY_OUTPUT -p tcp -j RETURN
fi
"""

#: Runs as root before every start of consul.service, after first boot wrote the tokens.
CONSUL_DROPIN = "/etc/systemd/system/consul.service.d/zz-meshbake-broken.conf"
DNS_TOKEN_SCRIPT = "/usr/local/sbin/meshbake-broken-dns-token"

DROP_DNS_TOKEN = r"""#!/bin/sh
# Deliberately broken by tests/e2e/test_broken_image.py: the agent starts without the
# DNS token first boot delivered, so it answers DNS as the anonymous token.
set -eu
secrets=/etc/consul.d/zz-meshbake-secrets.json
if [ -f "$secrets" ]; then
    sed -i 's/,"dns":"[^"]*"//' "$secrets"
fi
"""


def write_into(root: Path, path: str, text: str, mode: int = 0o644) -> None:
    """Write ``text`` to the image's absolute ``path`` (below the mounted ``root``)."""
    target = root / path.lstrip("/")
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(text)
    target.chmod(mode)


def before_start(dropin: str, path: str, script: str) -> Callable[[Path], None]:
    """An edit that installs ``script`` at ``path`` and runs it as root from the unit
    drop-in ``dropin`` (an ``ExecStartPre`` line), at every start of that unit."""

    def edit(root: Path) -> None:
        write_into(root, path, script, 0o755)
        write_into(root, dropin, f"[Service]\nExecStartPre=+{path}\n")

    return edit


def after_redirect(script: str) -> Callable[[Path], None]:
    """An edit that runs ``script`` in the VM right after every redirect (a drop-in's
    ``ExecStartPre`` lines run after the unit's own)."""
    return before_start(SIDECAR_DROPIN, BREAK_SCRIPT, script)


def fence_sidecar(root: Path) -> None:
    """The sidecar may not use the network at all, loopback included (a drop-in with
    ``IPAddressDeny=any``): its redirect cannot ask the agent and Envoy cannot reach it,
    so it fails and restarts for ever. bench/broken_verify.py times verify of this."""
    write_into(root, SIDECAR_DROPIN, "[Service]\nIPAddressDeny=any\n")


#: consul.service starts without its DNS token (a drop-in's ``ExecStartPre`` takes it
#: out of the secrets file first boot wrote), at every start and every boot.
drop_dns_token = before_start(CONSUL_DROPIN, DNS_TOKEN_SCRIPT, DROP_DNS_TOKEN)


def break_dns(root: Path) -> None:
    """resolved no longer sends ``*.consul`` to the agent: its drop-in is gone."""
    dropin = root / "etc/systemd/resolved.conf.d/consul.conf"
    assert dropin.is_file(), "the good image has no resolved drop-in for Consul"
    dropin.unlink()


def app_listens_nowhere(root: Path) -> None:
    unit = root / "etc/systemd/system/web.service"
    assert unit.is_file(), "the good image has no web.service"
    write_into(
        root,
        "/etc/systemd/system/web.service.d/zz-meshbake-broken.conf",
        "[Service]\nExecStart=\nExecStart=/bin/sleep infinity\n",
    )


#: A hand-rolled sidecar: Envoy relays plain TCP from the public port to the app, as the
#: double's Envoy did before verify had a mesh. Outbound passes through.
def relay(app_port: int) -> dict[str, Any]:
    """A plain-TCP relay: the public listener forwards to the app on ``app_port``."""
    return {
        "admin": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": 19000}}},
        "static_resources": {
            "listeners": [
                {
                    "name": "public_listener",
                    "address": {"socket_address": {"address": "0.0.0.0", "port_value": 21000}},
                    "filter_chains": [{"filters": [{
                        "name": "envoy.filters.network.tcp_proxy",
                        "typed_config": {
                            "@type": "type.googleapis.com/envoy.extensions.filters.network"
                            ".tcp_proxy.v3.TcpProxy",
                            "stat_prefix": "public_listener",
                            "cluster": "local_app",
                        },
                    }]}],
                },
                {
                    "name": "outbound_listener",
                    "address": {"socket_address": {"address": "127.0.0.1", "port_value": 15001}},
                    "listener_filters": [{
                        "name": "envoy.filters.listener.original_dst",
                        "typed_config": {
                            "@type": "type.googleapis.com/envoy.extensions.filters.listener"
                            ".original_dst.v3.OriginalDst"
                        },
                    }],
                    "filter_chains": [{"filters": [{
                        "name": "envoy.filters.network.tcp_proxy",
                        "typed_config": {
                            "@type": "type.googleapis.com/envoy.extensions.filters.network"
                            ".tcp_proxy.v3.TcpProxy",
                            "stat_prefix": "upstream.original-destination",
                            "cluster": "original-destination",
                        },
                    }]}],
                },
            ],
            "clusters": [
                {
                    "name": "local_app",
                    "type": "STATIC",
                    "connect_timeout": "5s",
                    "load_assignment": {"cluster_name": "local_app", "endpoints": [
                        {"lb_endpoints": [{"endpoint": {"address": {"socket_address": {
                            "address": "127.0.0.1", "port_value": app_port}}}}]}
                    ]},
                },
                {
                    "name": "original-destination",
                    "type": "ORIGINAL_DST",
                    "lb_policy": "CLUSTER_PROVIDED",
                    "connect_timeout": "5s",
                },
            ],
        },
    }  # fmt: skip


def relay_sidecar(root: Path) -> None:
    """The sidecar runs Envoy with the plain relay above instead of what Consul gives it
    (the redirect still runs first, from the unit's own ExecStartPre)."""
    env = (root / paths.MESH_ENV.lstrip("/")).read_text()
    port = re.search(r"^MESHBAKE_SERVICE_PORT=(\d+)$", env, re.MULTILINE)
    assert port, f"no MESHBAKE_SERVICE_PORT in the image's {paths.MESH_ENV}"
    write_into(root, "/etc/envoy/relay.json", json.dumps(relay(int(port.group(1)))))
    write_into(
        root,
        SIDECAR_DROPIN,
        "[Service]\nExecStart=\n"
        "ExecStart=/usr/bin/envoy --config-path /etc/envoy/relay.json --disable-hot-restart\n",
    )


#: The check every traffic break must also fail: after a restart the traffic checks run
#: again. The reboot (which repeats them once more) is left out here: it costs two
#: minutes a copy, and the good images prove it (tests/e2e/test_bake_and_verify.py).
AGAIN = {"test_sidecar_down"}
LEFT_OUT = ("test_reboot_keeps_the_mesh",)

#: web (nftables): break -> (edit, the firstboot checks it must fail, words its failure
#: must show).
WEB_BREAKS: dict[str, tuple[Callable[[Path], None], set[str], dict[str, str]]] = {
    "no_uid_exclusion": (
        after_redirect(DROP_UID_EXCLUSION),
        {
            "test_outbound_crosses_the_sidecar",
            "test_upstream_by_virtual_name",
            "test_consul_rules_exactly_once",
            *AGAIN,
        },
        {
            "test_outbound_crosses_the_sidecar": "did not arrive",
            "test_consul_rules_exactly_once": "uid exclusion envoy",
        },
    ),
    "inbound_port_wrong": (
        after_redirect(WRONG_INBOUND_PORT),
        {"test_inbound_crosses_the_sidecar", "test_consul_rules_exactly_once", *AGAIN},
        {
            # Not the public listener's count: the agent's TCP check of the sidecar
            # (Consul's "Connect Sidecar Listening", every 10 s) may land in the window.
            "test_inbound_crosses_the_sidecar": "server presented nothing",
            "test_consul_rules_exactly_once": "inbound redirect: 2 times",
        },
    ),
    "relay": (
        relay_sidecar,
        {
            "test_plain_inbound_per_mtls_mode",
            "test_inbound_crosses_the_sidecar",
            "test_upstream_by_virtual_name",
            *AGAIN,
        },
        {
            "test_plain_inbound_per_mtls_mode": "strict mTLS: a plain client",
            # The mesh client's handshake finds no TLS at all.
            "test_inbound_crosses_the_sidecar": "server presented nothing",
        },
    ),
    "redirect_bypass": (
        after_redirect(BYPASS_INBOUND),
        {
            "test_plain_inbound_per_mtls_mode",
            "test_inbound_crosses_the_sidecar",
            "test_consul_rules_exactly_once",
            *AGAIN,
        },
        {
            # The app answers a plain client from outside: strict mTLS is bypassed.
            "test_plain_inbound_per_mtls_mode": "answered 'HTTP/1.0 200 OK'",
            "test_inbound_crosses_the_sidecar": "server presented nothing",
            "test_consul_rules_exactly_once": "Consul does not install, in CONSUL_PROXY_INBOUND",
        },
    ),
    "outbound_bypass": (
        after_redirect(BYPASS_OUTBOUND),
        {
            "test_outbound_crosses_the_sidecar",
            "test_upstream_by_virtual_name",
            "test_consul_rules_exactly_once",
            # After a restart the bypass is back, and the rules check sees it again.
            *AGAIN,
        },
        {
            # The connection reaches the host listener, but not through Envoy.
            "test_outbound_crosses_the_sidecar": "arrived, answered",
            "test_consul_rules_exactly_once": "Consul does not install, in CONSUL_PROXY_OUTPUT",
        },
    ),
    "dns_broken": (
        break_dns,
        {"test_dns_answers_under_the_dns_token", "test_upstream_by_virtual_name"},
        {"test_dns_answers_under_the_dns_token": "both names resolve"},
    ),
    "dns_token_missing": (
        drop_dns_token,
        {
            "test_consul_secrets_file",
            "test_dns_answers_under_the_dns_token",
            "test_upstream_by_virtual_name",
        },
        {"test_dns_answers_under_the_dns_token": "both names resolve"},
    ),
    "fenced_sidecar": (
        fence_sidecar,
        {
            # The redirect cannot ask the agent, so Envoy never starts: everything the
            # sidecar carries or guards fails, the rest (secrets, DNS, IMDS) passes.
            "test_consul_and_sidecar_active",
            "test_app_started_after_the_redirect",
            "test_consul_rules_exactly_once",
            "test_inbound_crosses_the_sidecar",
            "test_plain_inbound_per_mtls_mode",
            "test_mesh_client_refused",
            "test_consul_user_bypasses_the_sidecar",
            "test_ssh_bypasses_the_sidecar",
            "test_outbound_crosses_the_sidecar",
            "test_upstream_by_virtual_name",
            "test_catalog_has_the_node_and_passing_instances",
            "test_envoy_admin_only_for_root_and_envoy",
            "test_sidecar_restarts_after_a_clean_exit",
            *AGAIN,
        },
        {
            "test_consul_and_sidecar_active": "not up: envoy-sidecar.service",
            "test_catalog_has_the_node_and_passing_instances": "critical",
            "test_sidecar_down": "not tried: the sidecar is down",
        },
    ),
    "app_not_listening": (
        app_listens_nowhere,
        {
            "test_inbound_crosses_the_sidecar",
            # The service's own check is critical: out of DNS, not passing in the catalog.
            "test_dns_answers_under_the_dns_token",
            "test_catalog_has_the_node_and_passing_instances",
            *AGAIN,
        },
        {
            "test_inbound_crosses_the_sidecar": "cluster.local_app.upstream_cx_connect_fail +1",
            "test_catalog_has_the_node_and_passing_instances": "critical",
        },
    ),
}

#: api (iptables, failing closed, Consul 2.0, one shared token): every break of web but the
#: app that does not listen, and the two whose scripts only have an iptables branch.
API_BREAKS: dict[str, tuple[Callable[[Path], None], set[str], dict[str, str]]] = {
    name: WEB_BREAKS[name]
    for name in (
        "no_uid_exclusion",
        "inbound_port_wrong",
        "redirect_bypass",
        "outbound_bypass",
        "fenced_sidecar",
        "dns_broken",
        "dns_token_missing",
        "relay",
    )
}

#: "<image>/<break>" -> (edit, must fail, words). The web image carries the breaks that
#: need no iptables branch; api all but the app that does not listen.
FIRSTBOOT_BREAKS = {
    **{
        f"web/{n}": b
        for n, b in WEB_BREAKS.items()
        if n not in ("no_uid_exclusion", "inbound_port_wrong")
    },
    **{f"api/{n}": b for n, b in API_BREAKS.items()},
}


#: Checks no firstboot break here touches: they must pass in every copy.
FIRSTBOOT_MUST_PASS = {
    "test_carrier_removed",
    "test_first_boot_marker",
    "test_redirect_argv",
    "test_firstboot_rerun_is_noop",
}


BAKED_TEST = "test_broken_image_fails_exactly_the_broken_checks"


@pytest.fixture(scope="session")
def break_reports(
    request: pytest.FixtureRequest,
    good: Callable[[str], Good],
    good_raws: Callable[[str], Path],
    tmp_path_factory: pytest.TempPathFactory,
    vm_pool: ThreadPoolExecutor,
) -> dict[str, Future[verify.VerifyReport]]:
    """The verify of every broken copy this session selected (``BAKED``, then the
    firstboot breaks by ``<image>/<break>``), in the session's pool of VMs, in the order
    the tests ask for them: each test waits for its own report only. Each firstboot copy
    boots in a local mesh of its own (its own namespace, server and upstreams)."""
    baked = any(
        isinstance(item, pytest.Function) and item.originalname == BAKED_TEST
        for item in request.session.items
    )
    names = [BAKED] * baked + selected_params(request, "test_broken_image", "name")
    examples = {name: "web" if name == BAKED else name.split("/")[0] for name in names}
    # The good images and their raw disks first, here (fixtures are not for the pool's
    # threads): the threads only copy them.
    goods = {example: good(example) for example in examples.values()}
    raws = {example: good_raws(example) for example in goods}
    folders = {name: tmp_path_factory.mktemp(name.replace("/", "-")) for name in names}

    def verify_copy(name: str) -> verify.VerifyReport:
        folder, example = folders[name], goods[examples[name]]
        raw = raws[examples[name]]
        if name == BAKED:
            # The token baked in is the one phase baked must not find anywhere.
            image = edited_copy(raw, folder, break_image)
            return verify.verify_image(
                image,
                spec=example.spec,
                phases=("baked",),
                progress=lambda m: None,
                token=str(TOKEN),
                cpus=VM_CPUS,
            )
        image = edited_copy(raw, folder, FIRSTBOOT_BREAKS[name][0])
        return verify.verify_image(
            image,
            spec=example.spec,
            phases=("firstboot",),
            progress=lambda m: None,
            leave_out=LEFT_OUT,
            mesh_inputs=example.mesh,
            cpus=VM_CPUS,
        )

    return {name: vm_pool.submit(verify_copy, name) for name in names}


@pytest.mark.parametrize("name", sorted(FIRSTBOOT_BREAKS))
def test_firstboot_break_fails_exactly_its_checks(
    name: str, break_reports: dict[str, Future[verify.VerifyReport]]
) -> None:
    _, must_fail, words = FIRSTBOOT_BREAKS[name]
    report = break_reports[name].result()
    (phase,) = report.phases
    assert phase.error is None, phase.error
    outcomes = {check_name(c.name): c for c in phase.checks}
    failed = {n for n, c in outcomes.items() if c.outcome in ("failed", "error")}
    assert failed == must_fail, report.summary()
    assert all(outcomes[n].outcome == "passed" for n in FIRSTBOOT_MUST_PASS), report.summary()
    summary = report.summary()
    for check, text in words.items():
        # The readable report names the check, what it expected and what it saw.
        assert "expected: " in outcomes[check].message, outcomes[check].message
        assert text in outcomes[check].message, outcomes[check].message
        assert f"FAIL  {check}" in summary
    assert "seen: " in summary
