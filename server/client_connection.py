"""How a loraserve client reaches its server: plaintext or TLS (optionally with a client
certificate, mTLS), and the API key sent with every call. Shared by LoraserveClient and
AsyncLoraserveClient; validated once, when a client is made, so a wrong path fails at once
instead of at the first RPC."""

from __future__ import annotations

import os
from typing import Any

import grpc

from loraserve.access.pem import read_pem

API_KEY_ENV = "LORASERVE_API_KEY"


class Connection:
    """Channel security and call metadata for one target.

    api_key: None reads LORASERVE_API_KEY (no key when it is unset or empty); "" sends none.
    Any TLS argument turns TLS on: `tls_ca` replaces the system roots, `tls_cert` + `tls_key`
    (both or neither) present a client certificate, `tls_server_name` is the name the server's
    certificate must carry when it is not the target's host (e.g. connecting by IP)."""

    def __init__(self, target: str, api_key: str | None = None, tls: bool = False, tls_ca: str | None = None,
                 tls_cert: str | None = None, tls_key: str | None = None,
                 tls_server_name: str | None = None) -> None:
        self.target = target
        if api_key is None:
            # Stripped: a key from a file or a Secret often carries a trailing newline.
            api_key = os.environ.get(API_KEY_ENV, "").strip()
        if api_key and (not api_key.isascii() or not api_key.isprintable() or " " in api_key):
            # Never echo the value: it is a secret, and it may be a slightly wrong real one.
            raise ValueError("the API key must be printable ASCII without spaces")
        # The key travels as per-call metadata, not as call credentials: gRPC refuses call
        # credentials on a plaintext channel, and a server behind a TLS-terminating proxy (or a
        # local test server) is reached in plaintext.
        self.metadata: tuple[tuple[str, str], ...] = (("authorization", f"Bearer {api_key}"),) if api_key else ()
        if bool(tls_cert) != bool(tls_key):
            raise ValueError("tls_cert and tls_key go together: give both for a client certificate (mTLS), or neither")
        self.tls = bool(tls or tls_ca or tls_cert or tls_server_name)
        self._credentials: grpc.ChannelCredentials | None = None
        self._options: list[tuple[str, Any]] = []
        if self.tls:
            self._credentials = grpc.ssl_channel_credentials(
                root_certificates=read_pem(tls_ca, "TLS CA bundle") if tls_ca else None,
                private_key=read_pem(tls_key, "TLS client key") if tls_key else None,
                certificate_chain=read_pem(tls_cert, "TLS client certificate") if tls_cert else None)
            if tls_server_name:
                self._options.append(("grpc.ssl_target_name_override", tls_server_name))

    def channel(self) -> grpc.Channel:
        """A new blocking channel to the target."""
        if self._credentials is None:
            return grpc.insecure_channel(self.target, options=self._options)
        return grpc.secure_channel(self.target, self._credentials, options=self._options)

    def aio_channel(self) -> grpc.aio.Channel:
        """A new asyncio channel to the target (make it inside the running event loop)."""
        if self._credentials is None:
            return grpc.aio.insecure_channel(self.target, options=self._options)
        return grpc.aio.secure_channel(self.target, self._credentials, options=self._options)

    def __repr__(self) -> str:  # never the key itself
        return (f"Connection(target={self.target!r}, tls={self.tls}, "
                f"api_key={'set' if self.metadata else 'none'})")
