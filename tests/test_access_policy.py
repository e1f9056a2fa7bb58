"""The access policy's decisions without a server: how names resolve per caller, what each
tenant sees and may change, and the per-tenant gate (concurrency, token-bucket rate)."""

from __future__ import annotations

import pytest

from server.access.principal import OPEN_PRINCIPAL, Principal, TenantLimits
from server.api.access import AccessControl, TenantGate, parse_ref
from server.errors import AdapterNotFound, InvalidArgument, PermissionDenied, ResourceExhausted

A_GEN = Principal("a-gen", "a", "generate")
A_MAN = Principal("a-man", "a", "manage")
ADMIN = Principal("root", "ops", "admin")
SHARED = {"b/common"}


@pytest.fixture
def policy():
    return AccessControl(keys=None, is_shared=lambda key: key in SHARED)


def test_names_resolve_against_the_callers_tenant():
    assert parse_ref("med", A_GEN).key == "a/med" and parse_ref("b/med", A_GEN).key == "b/med"
    assert parse_ref("med", OPEN_PRINCIPAL).key == "default/med"
    for bad in ("", "a/b/c", "/med", "a/", "../x", "a/..", "a/-x"):
        with pytest.raises(InvalidArgument):
            parse_ref(bad, A_GEN)


def test_use_own_shared_and_admin_but_nothing_else(policy):
    assert policy.for_use("med", A_GEN).key == "a/med"
    assert policy.for_use("b/common", A_GEN).key == "b/common"
    assert policy.for_use("b/secret", ADMIN).key == "b/secret"
    with pytest.raises(AdapterNotFound) as hidden:
        policy.for_use("b/secret", A_GEN)
    with pytest.raises(AdapterNotFound) as missing:
        policy.for_use("b/never-existed", A_GEN)
    assert str(hidden.value).replace("secret", "X") == str(missing.value).replace("never-existed", "X")
    assert policy.visible("a/x", A_GEN) and policy.visible("b/common", A_GEN) and not policy.visible("b/x", A_GEN)


def test_change_only_within_the_own_tenant(policy):
    assert policy.for_change("med", A_MAN, creating=True).key == "a/med"
    assert policy.for_change("b/x", ADMIN, creating=True).key == "b/x"
    with pytest.raises(PermissionDenied, match="only register adapters of tenant 'a'"):
        policy.for_change("b/x", A_MAN, creating=True)
    with pytest.raises(AdapterNotFound):
        policy.for_change("b/x", A_MAN, creating=False)
    with pytest.raises(PermissionDenied, match="shared by tenant 'b'"):
        policy.for_change("b/common", A_MAN, creating=False)


def test_open_server_management_is_loopback_only_unless_allowed():
    closed, allowed = AccessControl(), AccessControl(allow_open_management=True)
    assert closed.caller((), "ipv4:127.0.0.1:5000", "manage", management=True) == OPEN_PRINCIPAL
    assert closed.caller((), "ipv6:[::1]:5000", "admin", management=True) == OPEN_PRINCIPAL
    assert closed.caller((), "ipv4:10.0.0.7:5000", "generate") == OPEN_PRINCIPAL
    with pytest.raises(PermissionDenied, match="loopback"):
        closed.caller((), "ipv4:10.0.0.7:5000", "manage", management=True)
    assert allowed.caller((), "ipv4:10.0.0.7:5000", "manage", management=True) == OPEN_PRINCIPAL


def test_gate_bounds_concurrency_per_tenant():
    gate = TenantGate(clock=lambda: 0.0)
    limits = TenantLimits(max_concurrent_requests=2)
    with gate.admit("b", limits), gate.admit("b", limits):
        with pytest.raises(ResourceExhausted, match="tenant 'b' already has 2 requests in flight"):
            with gate.admit("b", limits):
                pass
        with gate.admit("a", limits):  # another tenant is not affected
            pass
    with gate.admit("b", limits):  # places are given back, also after an error
        pass


def test_gate_rate_is_a_token_bucket():
    now = [0.0]
    gate = TenantGate(clock=lambda: now[0])
    limits = TenantLimits(requests_per_second=4)
    for _ in range(4):  # a burst of one second's worth
        with gate.admit("b", limits):
            pass
    with pytest.raises(ResourceExhausted, match="4 requests per second"):
        with gate.admit("b", limits):
            pass
    now[0] += 0.25  # one token back
    with gate.admit("b", limits):
        pass
    with pytest.raises(ResourceExhausted):
        with gate.admit("b", limits):
            pass
    with gate.admit("a", limits):
        pass
