"""Reading PEM files (certificates, keys, CA bundles) for the server's TLS and the client's."""

from __future__ import annotations

from pathlib import Path

from loraserve.errors import ConfigError


def read_pem(path: str, what: str) -> bytes:
    """The file's bytes; ConfigError (a ValueError) naming `what` and the path when unreadable.
    The contents are checked by whoever uses them (gRPC's TLS layer)."""
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        raise ConfigError(f"cannot read the {what} {path}: {exc.strerror}") from None
