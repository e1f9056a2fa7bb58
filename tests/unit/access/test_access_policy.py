"""The access policy's decisions without a server: how names resolve per caller, what each
tenant sees and may change, and the per-tenant gate (concurrency, token-bucket rate, and how
long its refusals are held)."""

from __future__ import annotations

import asyncio
import re
import time

import pytest

from loraserve.access.principal import OPEN_PRINCIPAL, Principal, TenantLimits
from loraserve.api.access import AccessControl, parse_ref
from loraserve.api.tenant_gate import TenantGate, TenantOverLimit
from loraserve.errors import AdapterNotFound, InvalidArgument, PermissionDenied, ResourceExhausted

A_GEN = Principal("a-gen", "a", "generate")
A_MAN = Principal("a-man", "a", "manage")
ADMIN = Principal("root", "ops", "admin")
SHARED = {"b/common"}


@pytest.fixture
def policy():
    return AccessControl(keys=None, is_shared=lambda key: key in SHARED)


def test_names_resolve_against_the_callers_tenant():
    assert parse_ref("med", A_GEN).adapter_id == "a/med" and parse_ref("b/med", A_GEN).adapter_id == "b/med"
    assert parse_ref("med", OPEN_PRINCIPAL).adapter_id == "default/med"
    for bad in ("", "a/b/c", "/med", "a/", "../x", "a/..", "a/-x"):
        with pytest.raises(InvalidArgument):
            parse_ref(bad, A_GEN)


def test_use_own_shared_and_admin_but_nothing_else(policy):
    assert policy.for_use("med", A_GEN).adapter_id == "a/med"
    assert policy.for_use("b/common", A_GEN).adapter_id == "b/common"
    assert policy.for_use("b/secret", ADMIN).adapter_id == "b/secret"
    with pytest.raises(AdapterNotFound) as hidden:
        policy.for_use("b/secret", A_GEN)
    with pytest.raises(AdapterNotFound) as missing:
        policy.for_use("b/never-existed", A_GEN)
    assert str(hidden.value).replace("secret", "X") == str(missing.value).replace("never-existed", "X")
    assert policy.visible("a/x", A_GEN) and policy.visible("b/common", A_GEN) and not policy.visible("b/x", A_GEN)


def test_change_only_within_the_own_tenant(policy):
    assert policy.for_change("med", A_MAN, creating=True).adapter_id == "a/med"
    assert policy.for_change("b/x", ADMIN, creating=True).adapter_id == "b/x"
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


def _refused(gate: TenantGate, tenant: str, limits: TenantLimits) -> TenantOverLimit:
    with pytest.raises(TenantOverLimit) as info, gate.admit(tenant, limits):
        pass
    return info.value


def _timed_hold(gate: TenantGate, refusal: TenantOverLimit, limit_s: float,
                time_remaining: float | None = None) -> tuple[ResourceExhausted, float]:
    async def run():
        start = time.monotonic()
        sent = await gate.hold(refusal, limit_s, time_remaining)
        return sent, time.monotonic() - start
    return asyncio.run(run())


def test_a_rate_refusal_is_held_until_the_next_token():
    gate = TenantGate(clock=lambda: 0.0)
    limits = TenantLimits(requests_per_second=4)
    for _ in range(4):
        with gate.admit("b", limits):
            pass
    refusal = _refused(gate, "b", limits)
    assert refusal.retry_after_s == pytest.approx(0.25) and "retry in 0.25s" in refusal.message
    sent, took = _timed_hold(gate, refusal, limit_s=1.0)
    assert 0.24 <= took < 0.6
    assert isinstance(sent, ResourceExhausted) and sent.code == "RESOURCE_EXHAUSTED"
    assert "over its limit of 4 requests per second" in sent.message and sent.message.endswith("retry now")
    assert gate.held("b") == 0


def test_a_hold_stops_at_its_limit_and_before_the_deadline():
    gate = TenantGate(clock=lambda: 0.0)
    slow = TenantLimits(requests_per_second=0.5)  # the next token in 2 s
    with gate.admit("b", slow):
        pass
    refusal = _refused(gate, "b", slow)
    sent, took = _timed_hold(gate, refusal, limit_s=0.2)  # within the last half of the limit (jitter)
    assert 0.09 <= took < 0.4 and re.search(r"answered after 0\.[12]\ds, retry in 1\.[89]", sent.message)
    sent, took = _timed_hold(gate, refusal, limit_s=5.0, time_remaining=0.3)  # answered before the deadline
    assert 0.24 <= took < 0.3 and "retry in 1.7" in sent.message
    sent, took = _timed_hold(gate, refusal, limit_s=5.0, time_remaining=0.01)  # no time left: at once
    assert took < 0.05 and sent is refusal
    sent, took = _timed_hold(gate, refusal, limit_s=0.0)  # holding turned off
    assert took < 0.05 and sent is refusal


def test_a_concurrency_refusal_is_answered_when_a_place_frees():
    gate = TenantGate()
    limits = TenantLimits(max_concurrent_requests=1)

    async def run():
        place = gate.admit("b", limits)
        place.__enter__()
        refusal = _refused(gate, "b", limits)
        assert refusal.retry_after_s is None
        asyncio.get_running_loop().call_later(0.2, place.__exit__, None, None, None)
        start = time.monotonic()
        sent = await gate.hold(refusal, 5.0, None)
        return sent, time.monotonic() - start

    sent, took = asyncio.run(run())
    assert 0.19 <= took < 1.0
    assert "already has 1 requests in flight" in sent.message and sent.message.endswith("one has finished: retry now")
    with gate.admit("b", limits):  # and a retry now gets in
        pass


def test_held_refusals_are_bounded_per_tenant_and_in_all():
    gate = TenantGate(clock=lambda: 0.0, max_held=2, max_held_total=3)
    limits = TenantLimits(requests_per_second=1)
    with gate.admit("b", limits), gate.admit("a", limits):
        pass
    b, a = _refused(gate, "b", limits), _refused(gate, "a", limits)

    async def at_once(refusal):
        start = time.monotonic()
        sent = await gate.hold(refusal, 0.5, None)
        return sent is refusal and time.monotonic() - start < 0.05

    async def run():
        held = [asyncio.create_task(gate.hold(b, 0.5, None)) for _ in range(2)]
        await asyncio.sleep(0.05)
        assert gate.held("b") == 2 and await at_once(b)  # b's third: answered at once, as refused
        held.append(asyncio.create_task(gate.hold(a, 0.5, None)))  # another tenant has its own places...
        await asyncio.sleep(0.05)
        assert gate.held("a") == 1 and gate.held_by_tenant() == {"a": 1, "b": 2}
        assert await at_once(a)  # ...up to the bound over all tenants
        sent = await asyncio.gather(*held)
        assert all(s is not b and s is not a for s in sent)  # the held ones were held

    asyncio.run(run())
    assert gate.held_by_tenant() == {"a": 0, "b": 0}


def test_held_refusals_are_answered_in_turn_not_as_a_herd():
    """A freed place wakes only the oldest held concurrency refusal; the k-th held rate refusal
    waits for the k-th next token. Only one client at a time is told to retry now."""
    gate = TenantGate()
    one = TenantLimits(max_concurrent_requests=1)

    async def places():
        place = gate.admit("b", one)
        place.__enter__()
        first, second = _refused(gate, "b", one), _refused(gate, "b", one)
        held = [asyncio.create_task(gate.hold(r, 0.6, None)) for r in (first, second)]
        await asyncio.sleep(0.05)
        start = time.monotonic()
        place.__exit__(None, None, None)
        done, _ = await asyncio.wait(held, return_when=asyncio.FIRST_COMPLETED)
        woke = time.monotonic() - start
        assert done == {held[0]} and held[0].result().message.endswith("one has finished: retry now")
        later = await held[1]
        return woke, time.monotonic() - start, later.message

    woke, second_after, message = asyncio.run(places())
    # The second waits out its own hold: 0.6 s less jitter (HOLD_JITTER: down to 0.3 s), counted
    # from 0.05 s before `start`, so at least 0.25 s; woken by the freed place it would be ~0.
    assert woke < 0.1 and second_after >= 0.24 and message.endswith("retry when one finishes")

    rate = TenantLimits(requests_per_second=5)  # a token every 0.2 s
    now = [0.0]
    gate = TenantGate(clock=lambda: now[0])
    for _ in range(5):
        with gate.admit("b", rate):
            pass

    async def tokens():
        first = _refused(gate, "b", rate)
        held = [asyncio.create_task(gate.hold(first, 1.0, None))]
        await asyncio.sleep(0)  # the first is held now, so the second queues behind it
        second = _refused(gate, "b", rate)
        held.append(asyncio.create_task(gate.hold(second, 1.0, None)))
        start = time.monotonic()
        times = []
        for task in held:
            await task
            times.append(time.monotonic() - start)
        return first, second, times, [t.result().message for t in held]

    first, second, times, messages = asyncio.run(tokens())
    assert first.retry_after_s == pytest.approx(0.2) and second.retry_after_s == pytest.approx(0.4)
    assert 0.18 <= times[0] < 0.3 and 0.38 <= times[1] < 0.55
    assert all(m.endswith("retry now") for m in messages)


def test_refusals_held_together_are_answered_spread_out():
    """Callers refused together are not answered together (they would retry together, a burst
    every refusal_hold seconds): holds that reach the limit end at random in its last half."""
    gate = TenantGate()
    one = TenantLimits(max_concurrent_requests=1)

    async def run():
        place = gate.admit("b", one)
        place.__enter__()
        start = time.monotonic()

        async def held():
            await gate.hold(_refused(gate, "b", one), 0.4, None)
            return time.monotonic() - start

        times = await asyncio.gather(*(held() for _ in range(20)))
        place.__exit__(None, None, None)
        return sorted(times)

    times = asyncio.run(run())
    assert times[0] >= 0.19 and times[-1] < 0.6
    assert times[-1] - times[0] > 0.1  # 20 uniform draws over 0.2 s: all within 0.1 s has odds 20 * 0.5**19
