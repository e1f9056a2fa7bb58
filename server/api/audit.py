"""The audit log: one JSON line per adapter-management call, on the `loraserve.audit` logger
(route it to its own sink with standard logging config). Never a key, a path or a trace."""

from __future__ import annotations

import json
import logging

from loraserve.access.principal import Principal
from loraserve.rfc3339 import now_utc

log = logging.getLogger("loraserve.audit")
log.setLevel(logging.INFO)  # recorded whatever --log-level says: an audit trail is not optional


def audit(caller: Principal | None, action: str, adapter: str, sha256: str, result: str, peer: str) -> None:
    """Record who (`caller`: None when authentication itself failed) did what to which adapter,
    the content's sha256 when known, and the outcome (a gRPC status code name)."""
    log.info(json.dumps({
        "time": now_utc(fraction=True), "key": caller.key_name if caller else None,
        "tenant": caller.tenant if caller else None, "role": caller.role if caller else None, "action": action,
        "adapter": adapter, "sha256": sha256 or None, "result": result, "peer": peer}, ensure_ascii=False))
