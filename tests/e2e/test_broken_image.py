"""The checks can fail: break a good image (copies broken offline, or breaks made in a
booted VM one round at a time), verify it, and each break fails exactly the checks that
see it, with a message that says what it saw.

Phase baked, one copy with three breaks, the way a bad bake or a careless hand would:

- a secrets file holding the token is baked in (``zz-meshbake-secrets.json``);
- the ``envoy`` user is gone (passwd, shadow, group, gshadow);
- ``envoy-sidecar.service`` is disabled (its ``multi-user.target.wants`` link removed).

The baked secrets file also lets consul start without first boot (its ExecCondition
only looks for that file), so the "consul is down until first boot" check must fail
too: that is the check doing its job, not a side effect to hide.

Phase firstboot, each break proved by traffic (Envoy's counters), on both examples
(web: nftables; api: iptables, failing closed):

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
redirect never installs.

**One boot per example for the breaks, not one per break.** The fenced sidecar is a
broken copy of the image, booted on its own: it proves a first boot whose sidecar never
comes up (the app's start order fails too, since no redirect ever ran). Every other
break is a round of ``verify_image(rounds=...)`` in one VM per example: the good image
boots into its local mesh, then each break is made as root (files written or moved
aside, ``systemctl daemon-reload``), the units it touches are started again with the
sidecar and the app in one ``systemctl restart`` (boot order), the agent's checks get
one interval to see it, the whole firstboot suite runs, and the break is undone the
same way; the next round starts only once the server sees the node passing again. A
copy per break cost a boot each (about 3 minutes two at a time on 2 cores); a round
costs its checks. The scripted breaks are drop-ins of the sidecar unit whose
``ExecStartPre`` edits Consul's own rules right after the redirect (a drop-in's lines
run after the unit's own), so they come back at every start of the sidecar, as a bad
redirect would, and the checks that restart it see them again.

Fail-closed is proved on a good image of its own: images/api.yaml sets it, and its
verify (tests/e2e/test_bake_and_verify.py) must see the connection refused while the
sidecar is down.

The good images are the session's bakes of the examples (tests/e2e/conftest.py);
``MESHBAKE_E2E_IMAGE`` replaces web's. Each copy's example is converted to raw once
per session; each copy costs a sparse copy of that raw disk, one conversion back to
qcow2 and one boot. The VMs run as many at a time as the session's pool allows
(tests/e2e/conftest.py), the rounds first, each test waiting for its own report.
"""

from __future__ import annotations

import base64
import json
import os
import shlex
import subprocess
import uuid
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from builder.spec.model import LoadedSpec, load_spec
from builder.verify import runner as verify
from builder.verify.localmesh import MeshInputs

from .conftest import STOP, VM_CPUS, Example, mesh_for, selected_params

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


def fence_sidecar(root: Path) -> None:
    """The sidecar may not use the network at all, loopback included (a drop-in with
    ``IPAddressDeny=any``): its redirect cannot ask the agent and Envoy cannot reach it,
    so it fails and restarts for ever. bench/broken_verify.py times verify of this."""
    write_into(root, SIDECAR_DROPIN, "[Service]\nIPAddressDeny=any\n")


#: Where a round keeps what its change moved or saved, to put it back.
STASH = "/run/meshbake-broken"


@dataclass(frozen=True)
class Change:
    """A break made in the booted VM (a verify round), and how it is undone.

    ``write``: files written (path, text, mode), removed again by the undo; ``aside``:
    files moved away, and back; ``saved``: files the break edits at a unit's start,
    copied first and copied back; ``units``: what to start again besides the sidecar and
    the app. Both the change and the undo restart those, then the sidecar, then the app,
    in one ``systemctl restart`` (so in boot order: After=), as a boot would start them;
    a drop-in's ``ExecStartPre`` then runs at every start, as in a broken image.
    """

    write: tuple[tuple[str, str, int], ...] = ()
    aside: tuple[str, ...] = ()
    saved: tuple[str, ...] = ()
    units: tuple[str, ...] = ()

    def round(self, name: str, app_unit: str) -> verify.Round:
        q = shlex.quote
        stash = [f"{STASH}/{n}" for n in range(len(self.aside) + len(self.saved))]
        moved = list(zip(self.aside, stash, strict=False))
        copied = list(zip(self.saved, stash[len(self.aside) :], strict=True))
        restart = " ".join(q(u) for u in (*self.units, "envoy-sidecar.service", app_unit))
        apply = ["set -eu", f"rm -rf {STASH}", f"mkdir -m 0700 {STASH}"]
        apply += [f"mv {q(path)} {kept}" for path, kept in moved]
        apply += [f"cp -p {q(path)} {kept}" for path, kept in copied]
        for path, text, mode in self.write:
            data = base64.b64encode(text.encode()).decode()
            apply += [
                f"mkdir -p {q(str(Path(path).parent))}",
                f"echo {data} | base64 -d > {q(path)}",
                f"chmod {mode:o} {q(path)}",
            ]
        undo = ["set -eu"]
        undo += [f"rm -f {q(path)}" for path, _, _ in self.write]
        undo += [f"mv {kept} {q(path)}" for path, kept in moved]
        undo += [f"cp -p {kept} {q(path)}" for path, kept in copied]
        undo.append(f"rm -rf {STASH}")
        for script in (apply, undo):
            script += ["systemctl daemon-reload", f"systemctl restart {restart}"]
        return verify.Round(name, "\n".join(apply), "\n".join(undo))


def after_redirect(script: str) -> Change:
    """``script`` runs in the VM right after every redirect (a drop-in's
    ``ExecStartPre`` lines run after the unit's own)."""
    dropin = f"[Service]\nExecStartPre=+{BREAK_SCRIPT}\n"
    return Change(write=((BREAK_SCRIPT, script, 0o755), (SIDECAR_DROPIN, dropin, 0o644)))


#: consul.service starts without its DNS token (a drop-in's ``ExecStartPre`` takes it
#: out of the secrets file first boot wrote), at every start.
DROP_DNS_TOKEN_CHANGE = Change(
    write=(
        (DNS_TOKEN_SCRIPT, DROP_DNS_TOKEN, 0o755),
        (CONSUL_DROPIN, f"[Service]\nExecStartPre=+{DNS_TOKEN_SCRIPT}\n", 0o644),
    ),
    saved=("/etc/consul.d/zz-meshbake-secrets.json",),
    units=("consul.service",),
)

#: resolved no longer sends ``*.consul`` to the agent: its drop-in is gone.
BREAK_DNS = Change(
    aside=("/etc/systemd/resolved.conf.d/consul.conf",), units=("systemd-resolved.service",)
)


def app_listens_nowhere(app_unit: str) -> Change:
    """The app runs, but listens nowhere (a drop-in replaces its ExecStart)."""
    dropin = "[Service]\nExecStart=\nExecStart=/bin/sleep infinity\n"
    return Change(
        write=((f"/etc/systemd/system/{app_unit}.d/zz-meshbake-broken.conf", dropin, 0o644),)
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


def relay_sidecar(app_port: int) -> Change:
    """The sidecar runs Envoy with the plain relay above instead of what Consul gives it
    (the redirect still runs first, from the unit's own ExecStartPre)."""
    dropin = (
        "[Service]\nExecStart=\n"
        "ExecStart=/usr/bin/envoy --config-path /etc/envoy/relay.json --disable-hot-restart\n"
    )
    return Change(
        write=(
            ("/etc/envoy/relay.json", json.dumps(relay(app_port)), 0o644),
            (SIDECAR_DROPIN, dropin, 0o644),
        )
    )


#: The check every traffic break must also fail: after a restart the traffic checks run
#: again. The reboot (which repeats them once more) is left out here: it costs two
#: minutes a copy, and the good images prove it (tests/e2e/test_bake_and_verify.py).
AGAIN = {"test_sidecar_down"}
LEFT_OUT = ("test_reboot_keeps_the_mesh",)

#: What a break is made of for one image (its spec: the app's unit, the service port).
Make = Callable[[LoadedSpec], Change]


def fixed(change: Change) -> Make:
    return lambda spec: change


def app_unit(spec: LoadedSpec) -> str:
    return f"{spec.spec.app.name}.service"


#: break -> (the change, the firstboot checks it must fail, words its failure must show).
BREAKS: dict[str, tuple[Make, set[str], dict[str, str]]] = {
    "no_uid_exclusion": (
        fixed(after_redirect(DROP_UID_EXCLUSION)),
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
        fixed(after_redirect(WRONG_INBOUND_PORT)),
        {"test_inbound_crosses_the_sidecar", "test_consul_rules_exactly_once", *AGAIN},
        {
            # Not the public listener's count: the agent's TCP check of the sidecar
            # (Consul's "Connect Sidecar Listening", every 10 s) may land in the window.
            "test_inbound_crosses_the_sidecar": "server presented nothing",
            "test_consul_rules_exactly_once": "inbound redirect: 2 times",
        },
    ),
    "relay": (
        lambda spec: relay_sidecar(spec.spec.service.port),
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
        fixed(after_redirect(BYPASS_INBOUND)),
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
        fixed(after_redirect(BYPASS_OUTBOUND)),
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
        fixed(BREAK_DNS),
        {"test_dns_answers_under_the_dns_token", "test_upstream_by_virtual_name"},
        {"test_dns_answers_under_the_dns_token": "both names resolve"},
    ),
    "dns_token_missing": (
        fixed(DROP_DNS_TOKEN_CHANGE),
        {
            "test_consul_secrets_file",
            "test_dns_answers_under_the_dns_token",
            "test_upstream_by_virtual_name",
        },
        {"test_dns_answers_under_the_dns_token": "both names resolve"},
    ),
    "app_not_listening": (
        lambda spec: app_listens_nowhere(app_unit(spec)),
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

#: A fenced sidecar, in a broken copy of its own (a boot of its own): it never comes up.
FENCED: tuple[set[str], dict[str, str]] = (
    {
        # The redirect cannot ask the agent, so Envoy never starts: everything the
        # sidecar carries or guards fails, the rest (secrets, DNS, IMDS) passes. Its
        # first redirect never happened, so the app's order fails too.
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
)

#: Each example's rounds, in the order its one VM takes them. web (nftables): every
#: break but the two whose scripts only have an iptables branch. api (iptables, failing
#: closed, Consul 2.0, one shared token): every break but the app that does not listen.
ROUNDS = {
    "web": (
        "relay",
        "redirect_bypass",
        "outbound_bypass",
        "dns_broken",
        "dns_token_missing",
        "app_not_listening",
    ),
    "api": (
        "no_uid_exclusion",
        "inbound_port_wrong",
        "redirect_bypass",
        "outbound_bypass",
        "dns_broken",
        "dns_token_missing",
        "relay",
    ),
}

#: "<image>/<break>" -> (the checks it must fail, words its failure must show).
FIRSTBOOT_BREAKS: dict[str, tuple[set[str], dict[str, str]]] = {
    **{f"{image}/{name}": BREAKS[name][1:] for image, names in ROUNDS.items() for name in names},
    **{f"{image}/fenced_sidecar": FENCED for image in ROUNDS},
}


#: Checks no firstboot break here touches: they must pass in every copy and round.
FIRSTBOOT_MUST_PASS = {
    "test_carrier_removed",
    "test_first_boot_marker",
    "test_redirect_argv",
    "test_firstboot_rerun_is_noop",
}


BAKED_TEST = "test_broken_image_fails_exactly_the_broken_checks"

#: What a break's report comes from: a copy's verify, or its example's rounds.
Source = tuple[Future[verify.VerifyReport], str]


def firstboot(
    image: Path, example: Good, rounds: Sequence[verify.Round] = ()
) -> verify.VerifyReport:
    """Verify's phase firstboot of ``image`` in ``example``'s local mesh (the reboot
    left out), with ``rounds`` after the first boot if any."""
    return verify.verify_image(
        image,
        spec=example.spec,
        phases=("firstboot",),
        progress=lambda m: None,
        leave_out=LEFT_OUT,
        mesh_inputs=example.mesh,
        cpus=VM_CPUS,
        rounds=rounds,
        stop=STOP,
    )


@pytest.fixture(scope="session")
def break_reports(
    request: pytest.FixtureRequest,
    good: Callable[[str], Good],
    good_raws: Callable[[str], Path],
    tmp_path_factory: pytest.TempPathFactory,
    vm_pool: ThreadPoolExecutor,
) -> dict[str, Source]:
    """The verify of every break this session selected, in the session's pool of VMs:
    ``BAKED`` and the fenced sidecars in copies of their own, the other firstboot
    breaks as rounds of one VM per example (its first boot in a local mesh of its own,
    then one break after another, each undone before the next). The longest first:
    the rounds. Each test waits for its own report only.

    Returns name -> (the verify's future, the name of its phase among the report's)."""
    baked = any(
        isinstance(item, pytest.Function) and item.originalname == BAKED_TEST
        for item in request.session.items
    )
    names = [BAKED] * baked + selected_params(request, "test_broken_image", "name")
    examples = {name: "web" if name == BAKED else name.split("/")[0] for name in names}
    rounds = {
        example: [n for n in ROUNDS[example] if f"{example}/{n}" in names] for example in ROUNDS
    }
    copies = [n for n in names if n == BAKED or n.endswith("/fenced_sidecar")]
    # The good images and their raw disks first, here (fixtures are not for the pool's
    # threads): the threads only copy them.
    goods = {example: good(example) for example in examples.values()}
    raws = {example: good_raws(example) for example in goods if any(
        examples[n] == example for n in copies
    )}  # fmt: skip
    folders = {name: tmp_path_factory.mktemp(name.replace("/", "-")) for name in copies}

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
        return firstboot(edited_copy(raw, folder, fence_sidecar), example)

    def verify_rounds(example: str) -> verify.VerifyReport:
        chosen = goods[example]
        spec = load_spec(chosen.spec)
        made = [BREAKS[name][0](spec).round(name, app_unit(spec)) for name in rounds[example]]
        return firstboot(chosen.image, chosen, made)

    sources: dict[str, Source] = {}
    # The VM with the most rounds first (api's seven took 936 s, web's six 732 s).
    for example, chosen in sorted(rounds.items(), key=lambda item: -len(item[1])):
        if chosen:
            future = vm_pool.submit(verify_rounds, example)
            sources |= {f"{example}/{n}": (future, f"firstboot/{n}") for n in chosen}
    for name in copies:
        phase = "baked" if name == BAKED else "firstboot"
        sources[name] = (vm_pool.submit(verify_copy, name), phase)
    return sources


def test_broken_image_fails_exactly_the_broken_checks(
    break_reports: dict[str, Source],
) -> None:
    report = break_reports[BAKED][0].result()
    (phase,) = report.phases
    assert phase.error is None, phase.error
    outcomes = {check_name(c.name): c.outcome for c in phase.checks}
    failed = {name for name, outcome in outcomes.items() if outcome in ("failed", "error")}
    assert failed == MUST_FAIL, report.summary()
    assert all(outcomes.get(name) == "passed" for name in MUST_PASS), report.summary()
    assert not report.ok


@pytest.mark.parametrize("name", sorted(FIRSTBOOT_BREAKS))
def test_firstboot_break_fails_exactly_its_checks(
    name: str, break_reports: dict[str, Source]
) -> None:
    must_fail, words = FIRSTBOOT_BREAKS[name]
    future, wanted = break_reports[name]
    report = future.result()
    (phase,) = [p for p in report.phases if p.phase == wanted]
    assert phase.error is None, phase.error
    summary = report.summary()
    outcomes = {check_name(c.name): c for c in phase.checks}
    failed = {n for n, c in outcomes.items() if c.outcome in ("failed", "error")}
    assert failed == must_fail, summary
    assert all(outcomes[n].outcome == "passed" for n in FIRSTBOOT_MUST_PASS), summary
    for check, text in words.items():
        # The readable report names the check, what it expected and what it saw.
        assert "expected: " in outcomes[check].message, outcomes[check].message
        assert text in outcomes[check].message, outcomes[check].message
        assert f"FAIL  {check}" in summary
    assert "seen: " in summary
