"""The caller of an RPC as the server sees it once its key is checked, and the limits of its
tenant. Torch-free and grpc-free: the API layer asks these questions, the keys file answers."""

from __future__ import annotations

from dataclasses import dataclass

ROLES = ("generate", "manage", "admin")
"""Each role includes the ones before it: `generate` may run inference (and list what it may
use), `manage` also registers and removes its own tenant's adapters, `admin` may do
everything, for every tenant (pin adapters in GPU slots, mark adapters shared)."""

DEFAULT_TENANT = "default"
"""The tenant of every caller when the server runs open (no keys file)."""


@dataclass(frozen=True)
class TenantLimits:
    """Per-tenant bounds; None = unbounded. Beyond one, that tenant gets RESOURCE_EXHAUSTED."""

    max_adapters: int | None = None
    """Adapters in the store."""
    max_store_bytes: int | None = None
    """Bytes of adapter files in the store."""
    max_concurrent_requests: int | None = None
    """Generate/GenerateStream calls running or queued at once."""
    requests_per_second: float | None = None
    """Sustained Generate/GenerateStream rate (token bucket, burst = one second's worth)."""


@dataclass(frozen=True)
class Principal:
    """An authenticated caller."""

    key_name: str
    """The key's name in the keys file (for the audit log; never the secret)."""
    tenant: str
    role: str

    def allows(self, role: str) -> bool:
        """Whether this caller's role includes `role`."""
        return ROLES.index(self.role) >= ROLES.index(role)

    @property
    def is_admin(self) -> bool:
        return self.role == "admin"


OPEN_PRINCIPAL = Principal(key_name="(open)", tenant=DEFAULT_TENANT, role="admin")
"""Every caller of a server without a keys file (management still loopback-only by default)."""
