"""Pieces of the Consul double's server mode without sockets: where a request's token comes
from (agent/http.go), the DNS wire handling, and state checks that need no HTTP."""

from __future__ import annotations

import json
import struct

import pytest

from tests.fixtures.consul_double import acl, dns
from tests.fixtures.consul_double.server import request_token
from tests.fixtures.consul_double.state import BadRequest, Denied, ServerState


@pytest.mark.parametrize(
    ("query", "headers", "token"),
    [
        ({}, {}, ""),
        ({"token": ["q"]}, {"X-Consul-Token": "h"}, "q"),  # the query parameter first
        ({"token": [""]}, {"X-Consul-Token": "h"}, "h"),  # an empty one does not count
        ({}, {"X-Consul-Token": "h", "Authorization": "Bearer b"}, "h"),
        ({}, {"Authorization": "Bearer b"}, "b"),
        ({}, {"Authorization": "BEARER  b  c"}, "b"),  # any case; the first word after
        ({}, {"Authorization": "Basic b"}, ""),  # another scheme is no token
        ({}, {"Authorization": "Bearer"}, ""),  # one part is invalid
    ],
)
def test_request_token_follows_parse_token_internal(
    query: dict[str, list[str]], headers: dict[str, str], token: str
) -> None:
    assert request_token(query, headers) == token


def query(name: str, qtype: int = dns.TYPE_A) -> bytes:
    labels = b"".join(bytes([len(p)]) + p.encode() for p in name.split(".")) + b"\0"
    return struct.pack("!HHHHHH", 7, 0x0100, 1, 0, 0, 0) + labels + struct.pack("!HH", qtype, 1)


def rcode_and_count(packet: bytes | None) -> tuple[int, int]:
    assert packet is not None
    _, flags, _, ancount = struct.unpack("!HHHH", packet[:8])
    return flags & 0xF, ancount


def test_dns_outside_the_forms_is_nxdomain_and_garbage_is_dropped() -> None:
    state = ServerState("dc1", "server-1", "127.0.0.1")
    assert rcode_and_count(dns.answer(state, query("web.node.consul"))) == (dns.NXDOMAIN, 0)
    assert rcode_and_count(dns.answer(state, query("example.com"))) == (dns.NXDOMAIN, 0)
    assert dns.answer(state, b"\0\1") is None
    assert dns.answer(state, query("web.service.consul")[:-3]) is None


def test_dns_another_type_for_a_known_name_is_empty_noerror() -> None:
    state = ServerState("dc1", "server-1", "127.0.0.1")
    root = state.resolve(state.bootstrap()["SecretID"])
    state.register(root, {"Node": "n", "Address": "10.0.0.1", "Service": {"Service": "web"}})
    token = state.set_token(root, {"TemplatedPolicies": [{"TemplateName": "builtin/dns"}]})
    state.preset_agent_token("dns", token["SecretID"])
    assert rcode_and_count(dns.answer(state, query("web.service.consul"))) == (dns.NOERROR, 1)
    assert rcode_and_count(dns.answer(state, query("web.service.consul", 28))) == (
        dns.NOERROR,
        0,
    )


def test_a_policy_scoped_to_another_datacenter_grants_nothing_here() -> None:
    state = ServerState("dc1", "server-1", "127.0.0.1")
    root = state.resolve(state.bootstrap()["SecretID"])
    rules = json.dumps({"node_prefix": {"": {"policy": "write"}}})
    state.set_policy(root, {"Name": "far", "Rules": rules, "Datacenters": ["dc2"]})
    token = state.set_token(root, {"Policies": [{"Name": "far"}]})
    caller = state.resolve(token["SecretID"])
    with pytest.raises(Denied, match="lacks permission 'node:write' on \"n\""):
        state.register(caller, {"Node": "n", "Address": "10.0.0.1"})


def test_bad_rules_and_templates_are_refused_up_front() -> None:
    state = ServerState("dc1", "server-1", "127.0.0.1")
    root = state.resolve(state.bootstrap()["SecretID"])
    with pytest.raises(BadRequest, match="Rules"):
        state.set_policy(root, {"Name": "hcl", "Rules": 'node_prefix "" { policy = "read" }'})
    with pytest.raises(BadRequest, match="builtin/nope"):
        state.set_token(root, {"TemplatedPolicies": [{"TemplateName": "builtin/nope"}]})
    with pytest.raises(BadRequest, match="already exists"):
        state.set_policy(root, {"Name": "global-management", "Rules": "{}"})


def test_acl_rule_is_a_scalar_and_only_global_management_grants_it_by_default() -> None:
    writer = acl.Token.from_json(
        {"SecretID": "s", "Policies": [{"Name": "w", "Rules": '{"acl": "write"}'}]}
    )
    assert acl.Authorizer(writer, "dc1").acl_write()
    reader = acl.Token.from_json(
        {"SecretID": "s", "Policies": [{"Name": "r", "Rules": '{"acl": "read"}'}]}
    )
    assert acl.Authorizer(reader, "dc1").acl_read()
    assert not acl.Authorizer(reader, "dc1").acl_write()
    dns = acl.Token.from_json(
        {"SecretID": "s", "TemplatedPolicies": [{"TemplateName": "builtin/dns"}]}
    )
    assert not acl.Authorizer(dns, "dc1").acl_read()
    with pytest.raises(acl.ACLError, match="acl: must be read, write or deny"):
        acl.parse_rules('{"acl": {"": {"policy": "write"}}}')
