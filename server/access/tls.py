"""TLS for the gRPC port: server certificate and key, and optionally a client CA (mTLS).

The files are re-read without a restart when they change: cert-manager renews certificates
into a Kubernetes Secret well before they expire, and a server that only read them at start
would serve an expired certificate after a long uptime. gRPC asks `_CertificateFiles.fetch`
for a new configuration at each new connection's handshake; it answers "unchanged" (None)
unless a file's (mtime, inode, size) moved, so the cost per handshake is three stat calls.
Connections already open keep the certificate they were made with.
"""

from __future__ import annotations

import logging
import threading

import grpc

from loraserve.access.file_signature import FileSignature, file_signature
from loraserve.access.pem import read_pem
from loraserve.errors import ConfigError

log = logging.getLogger(__name__)


class _CertificateFiles:
    """The TLS files of the server and the signatures they had when last loaded."""

    def __init__(self, cert: str, key: str, client_ca: str) -> None:
        self.paths = [(cert, "TLS certificate"), (key, "TLS key")] + ([(client_ca, "TLS client CA")] if client_ca
                                                                      else [])
        self._lock = threading.Lock()  # handshakes of several connections may fetch at once
        self._signatures = self._stat()
        self.initial = self._configuration()

    def _stat(self) -> list[FileSignature]:
        return [file_signature(path) for path, _ in self.paths]

    def _configuration(self) -> grpc.ServerCertificateConfiguration:
        """The files as a configuration; ConfigError when one is unreadable."""
        data = [read_pem(path, what) for path, what in self.paths]
        return grpc.ssl_server_certificate_configuration([(data[1], data[0])],
                                                         root_certificates=data[2] if len(data) > 2 else None)

    def fetch(self) -> grpc.ServerCertificateConfiguration | None:
        """gRPC's fetcher: a new configuration when the files changed, else None (keep the
        current one). Never raises: a failure here would fail the handshake of the client."""
        with self._lock:
            before = self._stat()
            if before == self._signatures:
                return None
            # Remember what was seen whatever happens next: a broken rotation is logged once,
            # and re-read only at its next change (the fix), not at every handshake.
            self._signatures = before
            try:
                config = self._configuration()
            except ConfigError as exc:
                log.error("TLS files changed but cannot be read; the previous certificate stays in use: %s",
                          exc.message)
                return None
            if self._stat() != before:
                # Written while being read (a writer that is not atomic): keep the old pair and
                # retry at the next handshake rather than pair a new certificate with an old key.
                self._signatures = []
                return None
            # Not checked here: that the PEM parses and the key matches the certificate (that
            # would need a crypto library at run time). gRPC checks both when it builds the new
            # handshaker, and on failure logs "Handshaker factory creation failed" and keeps the
            # current certificate (tested: a garbage certificate, a new certificate with the old
            # key). A non-atomic writer's second file is a new change, so it is read again.
            log.warning("TLS files changed; new connections get them (unless gRPC rejects them, see its log)")
            return config


def server_credentials(cert: str, key: str, client_ca: str = "") -> grpc.ServerCredentials:
    """Credentials for `add_secure_port` that follow changes of the files; with `client_ca`,
    clients must present a certificate that CA signed. ConfigError when a file is unreadable."""
    files = _CertificateFiles(cert, key, client_ca)
    return grpc.dynamic_ssl_server_credentials(files.initial, files.fetch,
                                               require_client_authentication=bool(client_ca))
