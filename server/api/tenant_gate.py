"""Per-tenant request limits: how many generation calls a tenant may have in flight and how many
it may start per second, and how a refusal beyond them is answered.

A refusal is RESOURCE_EXHAUSTED for that tenant only. It is not sent at once: it is held (up
to `refusal_hold` seconds, and never past the call's deadline) until a retry could be admitted,
that is until the rate's next token or until one of the tenant's running requests finishes. A
client that retries without backoff (the common flood: a retry loop, or many threads calling
back to back) is thereby paced to its own limit, instead of making the server answer thousands
of refusals a second with the CPU every other tenant's requests need. A held call costs a
sleeping task, no CPU; at most `MAX_HELD_PER_TENANT` are held per tenant and `MAX_HELD` in all,
so a client that does not wait for answers cannot pin unbounded memory: beyond that, refusals go
out at once, as they would without holding.

Used from the event loop only, so plain dicts need no lock.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import time
from collections import deque
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from loraserve.access.principal import TenantLimits
from loraserve.errors import ResourceExhausted

MAX_HELD_PER_TENANT = 1024
"""Refusals held at once per tenant. A flood that waits for its answers needs one per call it
keeps in flight; beyond the bound (a client firing calls without waiting) the excess is answered
at once, as without holding. A held call costs about 26 KiB of front-end memory (measured on
CPython 3.11, grpcio 1.85), so this bounds a tenant's at about 26 MiB."""
MAX_HELD = 4096
"""Refusals held at once over all tenants (about 100 MiB)."""

HOLD_JITTER = 0.5
"""A hold that would end at `refusal_hold` ends at a random point of its last half instead. Many
callers refused together would otherwise be answered together, retry together and be refused
together, a burst every `refusal_hold` seconds that delays every other tenant's calls on the
event loop (measured: a 200-thread flood's bursts raised another tenant's p99 1.53x while its p50
rose 1.11x); jitter spreads them out, as in jittered client backoff."""

DEADLINE_MARGIN_S = 0.05
"""A held refusal goes out this long before the call's deadline, so the client reads
RESOURCE_EXHAUSTED (with its reason) rather than DEADLINE_EXCEEDED."""


class TenantOverLimit(ResourceExhausted):
    """A tenant's concurrency or rate limit refused a call."""

    def __init__(self, tenant: str, why: str, retry_after_s: float | None) -> None:
        """`why`: the limit, for the message; `retry_after_s`: when a retry could be admitted
        (None: when one of the tenant's running requests finishes)."""
        advice = "retry when one finishes" if retry_after_s is None else f"retry in {retry_after_s:.2f}s"
        super().__init__(f"tenant {tenant!r} {why}; {advice}")
        self.tenant, self.why, self.retry_after_s = tenant, why, retry_after_s

    def after_hold(self, held_s: float, released: bool) -> ResourceExhausted:
        """The refusal as sent after holding it `held_s` seconds (`released`: one of the tenant's
        requests finished meanwhile), with advice that is true at that moment."""
        if released:
            advice = "one has finished: retry now"
        elif self.retry_after_s is None:
            advice = "retry when one finishes"
        elif self.retry_after_s - held_s > 0.005:
            advice = f"retry in {self.retry_after_s - held_s:.2f}s"
        else:
            advice = "retry now"
        return ResourceExhausted(f"tenant {self.tenant!r} {self.why}; answered after {held_s:.2f}s, {advice}")


class TenantGate:
    """Per-tenant concurrency and rate limits (token bucket, burst = one second's worth), and the
    holding of the refusals beyond them. Held refusals are answered in turn, never as a herd: a
    freed place wakes the oldest held concurrency refusal only, and the k-th held rate refusal
    waits for the k-th next token. Told "retry now", a client is then the only one told so."""

    def __init__(self, clock: Callable[[], float] = time.monotonic, max_held: int = MAX_HELD_PER_TENANT,
                 max_held_total: int = MAX_HELD) -> None:
        self._clock = clock
        self._max_held, self._max_held_total = max_held, max_held_total
        self._running: dict[str, int] = {}
        self._buckets: dict[str, tuple[float, float]] = {}  # tenant -> (tokens, last refill)
        self._held: dict[str, int] = {}
        self._waiting_for_token: dict[str, int] = {}  # held rate refusals, per tenant
        self._waiting_for_place: dict[str, deque[asyncio.Future]] = {}  # held concurrency refusals, oldest first

    @contextmanager
    def admit(self, tenant: str, limits: TenantLimits) -> Iterator[None]:
        """Hold one of the tenant's places for the duration, after taking a token of its rate;
        TenantOverLimit (no token taken, no place held) when over either."""
        running = self._running.get(tenant, 0)
        if limits.max_concurrent_requests is not None and running >= limits.max_concurrent_requests:
            raise TenantOverLimit(tenant, f"already has {running} requests in flight, its limit", None)
        if limits.requests_per_second is not None:
            self._take_token(tenant, limits.requests_per_second)
        self._running[tenant] = running + 1
        try:
            yield
        finally:
            self._running[tenant] -= 1
            waiting = self._waiting_for_place.get(tenant)
            while waiting:  # the place goes to the oldest held refusal still waiting
                first = waiting.popleft()
                if not first.done():
                    first.set_result(None)
                    break

    def _take_token(self, tenant: str, rate: float) -> None:
        now = self._clock()
        capacity = max(1.0, rate)
        tokens, last = self._buckets.get(tenant, (capacity, now))
        tokens = min(capacity, tokens + (now - last) * rate)
        if tokens < 1.0:
            self._buckets[tenant] = (tokens, now)
            ahead = self._waiting_for_token.get(tenant, 0)  # held refusals that get the tokens before
            raise TenantOverLimit(tenant, f"is over its limit of {rate:g} requests per second",
                                  (1.0 - tokens + ahead) / rate)
        self._buckets[tenant] = (tokens - 1.0, now)

    def held(self, tenant: str) -> int:
        """Refusals of this tenant being held now."""
        return self._held.get(tenant, 0)

    def held_by_tenant(self) -> dict[str, int]:
        """Refusals being held now, per tenant that ever had one (a copy: read from any thread)."""
        return dict(self._held)

    async def hold(self, refusal: TenantOverLimit, limit_s: float, time_remaining: float | None) -> ResourceExhausted:
        """Wait until a retry could be admitted (its turn at the rate's tokens, or one of the
        tenant's requests finishing), at most `limit_s` (less a random part of its last half,
        HOLD_JITTER) and never past the call's deadline
        (`time_remaining`, None: no deadline); return the refusal to send then."""
        tenant = refusal.tenant
        limit_s *= random.uniform(1.0 - HOLD_JITTER, 1.0)
        wait = limit_s if refusal.retry_after_s is None else min(limit_s, refusal.retry_after_s)
        if time_remaining is not None:
            wait = min(wait, time_remaining - DEADLINE_MARGIN_S)
        if wait <= 0 or self.held(tenant) >= self._max_held or sum(self._held.values()) >= self._max_held_total:
            return refusal
        self._held[tenant] = self.held(tenant) + 1
        started = time.monotonic()
        released = False
        try:
            if refusal.retry_after_s is None:
                released = await self._wait_for_place(tenant, wait)
            else:
                self._waiting_for_token[tenant] = self._waiting_for_token.get(tenant, 0) + 1
                try:
                    await asyncio.sleep(wait)
                finally:
                    self._waiting_for_token[tenant] -= 1
        finally:
            self._held[tenant] -= 1
        return refusal.after_hold(time.monotonic() - started, released)

    async def _wait_for_place(self, tenant: str, wait: float) -> bool:
        """Whether one of the tenant's places was freed for this waiter within `wait` seconds."""
        turn = asyncio.get_running_loop().create_future()
        waiting = self._waiting_for_place.setdefault(tenant, deque())
        waiting.append(turn)
        try:
            await asyncio.wait_for(turn, wait)
            return True
        except TimeoutError:
            return False
        finally:
            if not turn.done() or turn.cancelled():
                with contextlib.suppress(ValueError):
                    waiting.remove(turn)
