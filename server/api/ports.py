"""Is a port free to listen on? Asked before the gRPC and metrics servers bind, so that a port
already taken stops the server at once with one line that names it, instead of gRPC's own
bind error (or, with SO_REUSEPORT, a second server silently sharing the port of the first)."""

from __future__ import annotations

import errno
import socket

from loraserve.errors import ConfigError


class PortInUse(ConfigError):
    """A port the server must listen on is taken."""


def check_port_free(host: str, port: int, what: str) -> None:
    """PortInUse when `what` ("gRPC port", say) cannot listen on host:port; 0 (any port) passes."""
    if port == 0:
        return
    bare = host.strip("[]") or "::"
    try:
        infos = socket.getaddrinfo(bare, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror:
        return  # an unresolvable host: the bind itself reports it
    for family, kind, proto, _, address in infos:
        with socket.socket(family, kind, proto) as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as servers bind: TIME_WAIT is no conflict
            if family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)  # '::' takes IPv4 too
            try:
                sock.bind(address)
            except OSError as exc:
                if exc.errno == errno.EADDRINUSE:
                    raise PortInUse(f"{what} {port} is already in use on {host}: another process listens there "
                                    "(stop it or choose another port)") from None
                if exc.errno == errno.EACCES:
                    raise PortInUse(f"{what} {port} on {host} needs privileges this process lacks") from None
                raise PortInUse(f"{what} {port} on {host} cannot be used: {exc.strerror}") from None
