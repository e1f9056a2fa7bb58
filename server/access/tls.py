"""TLS for the gRPC port: server certificate and key, and optionally a client CA (mTLS)."""

from __future__ import annotations

from pathlib import Path

import grpc

from server.errors import ConfigError


def _read(path: str, what: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        raise ConfigError(f"cannot read the {what} {path}: {exc.strerror}") from None


def server_credentials(cert: str, key: str, client_ca: str = "") -> grpc.ServerCredentials:
    """Credentials for `add_secure_port`; with `client_ca`, clients must present a certificate
    that CA signed."""
    pair = (_read(key, "TLS key"), _read(cert, "TLS certificate"))
    if not client_ca:
        return grpc.ssl_server_credentials([pair])
    return grpc.ssl_server_credentials([pair], root_certificates=_read(client_ca, "TLS client CA"),
                                       require_client_auth=True)
