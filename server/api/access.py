"""Who is calling, and may they: authentication, roles, tenant namespaces and per-tenant
limits for every RPC. The servicers ask here first; nothing below the API layer knows about
keys or tenants beyond the '<tenant>/<name>' adapter ids.

- Authentication: `authorization: Bearer <key>` metadata, checked against the keys file
  (salted hashes; `loraserve.access.keys`). Without a keys file the server runs open: every
  caller is an admin of tenant `default`, and management RPCs are refused from non-loopback
  peers unless `allow_open_management`.
- Tenants: a request names an adapter as `name` (the caller's own tenant) or `tenant/name`.
  Another tenant's adapter is NOT_FOUND with the very message a missing one gets, unless an
  admin shared it: its existence is never revealed.
- Errors: UNAUTHENTICATED for a missing or unknown key (one message for both), PERMISSION_DENIED
  for a known key whose role does not allow the call.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from loraserve.access.principal import DEFAULT_TENANT, OPEN_PRINCIPAL, Principal, TenantLimits
from loraserve.api.tenant_gate import MAX_HELD, TenantGate, TenantOverLimit
from loraserve.errors import AdapterNotFound, PermissionDenied, ResourceExhausted
from loraserve.store.layout import adapter_id as make_adapter_id
from loraserve.store.layout import check_adapter_name

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class AdapterRef:
    """An adapter as a request named it, resolved against the caller."""

    requested: str
    """What the client sent: 'name' or 'tenant/name' (echoed back in errors and summaries)."""
    tenant: str
    name: str

    @property
    def adapter_id(self) -> str:
        """The adapter's id in the store and the engine: '<tenant>/<name>'."""
        return f"{self.tenant}/{self.name}"


def parse_ref(requested: str, caller: Principal) -> AdapterRef:
    """'name' -> the caller's tenant; 'tenant/name' as given. InvalidArgument when malformed."""
    if "/" in requested:
        tenant, _, name = requested.partition("/")
        make_adapter_id(tenant, name)  # checks both parts
        return AdapterRef(requested, tenant, name)
    check_adapter_name(requested)
    return AdapterRef(requested, caller.tenant, requested)


def _not_found(ref: AdapterRef) -> AdapterNotFound:
    return AdapterNotFound(f"adapter {ref.requested!r} is not registered")


def _is_loopback(peer: str) -> bool:
    """grpc peer strings: 'ipv4:127.0.0.1:5000', 'ipv6:[::1]:5000', 'unix:/path'."""
    return peer.startswith(("ipv4:127.", "ipv6:[::1]", "unix:"))


class AccessControl:
    """The server's access policy; one per process, shared by the servicers."""

    def __init__(self, keys=None, allow_open_management: bool = False,
                 is_shared: Callable[[str], bool] = lambda key: False, refusal_hold: float = 0.0,
                 max_held: int = MAX_HELD) -> None:
        """`keys`: a reloadable keys file (`loraserve.access.keys.KeyFile`), or None to run open.
        `is_shared(key)`: whether an admin shared that adapter with every tenant.
        `refusal_hold`: most seconds a tenant's over-limit refusal is held (`loraserve.api.tenant_gate`);
        `max_held`: most refusals held at once over all tenants."""
        self._keys = keys
        self._allow_open_management = allow_open_management
        self._is_shared = is_shared
        self._refusal_hold = refusal_hold
        self._gate = TenantGate(max_held_total=min(MAX_HELD, max_held))

    @property
    def open(self) -> bool:
        return self._keys is None

    def tenants(self) -> frozenset[str]:
        """Every tenant the keys file names (the bounded values of the `tenant` label)."""
        return frozenset({DEFAULT_TENANT}) if self._keys is None else self._keys.ring.tenants

    # ---- who -------------------------------------------------------------------------------
    def caller(self, metadata, peer: str, role: str, management: bool = False) -> Principal:
        """The authenticated caller, allowed `role`. `metadata`: the call's invocation metadata."""
        if self._keys is None:
            if management and not self._allow_open_management and not _is_loopback(peer):
                raise PermissionDenied("this server runs without API keys, so adapter management is accepted only "
                                       "from loopback; configure --api-keys-file (or --allow-open-management)")
            return OPEN_PRINCIPAL
        principal = self._keys.ring.authenticate(_bearer(metadata))
        if not principal.allows(role):
            raise PermissionDenied(f"key {principal.key_name!r} has role {principal.role!r}; this call needs {role!r}")
        return principal

    def limits(self, tenant: str) -> TenantLimits:
        return TenantLimits() if self._keys is None else self._keys.ring.limits_for(tenant)

    # ---- which adapter ---------------------------------------------------------------------
    def for_use(self, requested: str, caller: Principal) -> AdapterRef:
        """An adapter the caller may generate with or look at: its own tenant's, any for an
        admin, or one shared with everyone. Anything else is NOT_FOUND, as a missing one."""
        ref = parse_ref(requested, caller)
        if ref.tenant == caller.tenant or caller.is_admin or self._is_shared(ref.adapter_id):
            return ref
        raise _not_found(ref)

    def for_change(self, requested: str, caller: Principal, creating: bool) -> AdapterRef:
        """An adapter the caller may register, replace or remove: its own tenant's (an admin:
        any). Registering into another tenant is PERMISSION_DENIED (the answer is the same
        whether the name exists there); changing another tenant's adapter is NOT_FOUND, or
        PERMISSION_DENIED when it is shared (the caller already sees it)."""
        ref = parse_ref(requested, caller)
        if ref.tenant == caller.tenant or caller.is_admin:
            return ref
        if creating:
            raise PermissionDenied(f"key {caller.key_name!r} may only register adapters of tenant {caller.tenant!r}")
        if self._is_shared(ref.adapter_id):
            raise PermissionDenied(f"adapter {ref.requested!r} is shared by tenant {ref.tenant!r}; only that tenant "
                                   "or an admin may change it")
        raise _not_found(ref)

    def visible(self, key: str, caller: Principal) -> bool:
        """Whether a listing shows this adapter to the caller."""
        tenant = key.partition("/")[0]
        return tenant == caller.tenant or caller.is_admin or self._is_shared(key)

    # ---- how much ----------------------------------------------------------------------------
    @contextmanager
    def admit(self, caller: Principal) -> Iterator[None]:
        """Hold one of the tenant's concurrent-request places for a generation call, after
        taking one token of its rate; RESOURCE_EXHAUSTED for that tenant only when over."""
        with self._gate.admit(caller.tenant, self.limits(caller.tenant)):
            yield

    async def refuse(self, refusal: ResourceExhausted, time_remaining: float | None) -> ResourceExhausted:
        """The refusal to send for a call `admit` refused: a tenant's limit is held until a retry
        could be admitted (see `loraserve.api.tenant_gate`); any other goes out as it is."""
        if isinstance(refusal, TenantOverLimit):
            return await self._gate.hold(refusal, self._refusal_hold, time_remaining)
        return refusal

    def held_refusals(self) -> dict[str, int]:
        """Refusals being held now, per tenant (for the metrics scrape, on its own thread)."""
        return self._gate.held_by_tenant()


def _bearer(metadata) -> str | None:
    for key, value in metadata or ():
        if key == "authorization":
            scheme, _, token = str(value).partition(" ")
            return token.strip() if scheme.lower() == "bearer" else None
    return None
