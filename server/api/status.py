"""The one place domain errors become gRPC statuses. A client's mistake keeps its own code and
message; anything else is INTERNAL with a request id, and the details go to the log only."""

from __future__ import annotations

import logging

import grpc

from server.errors import LoraserveError

log = logging.getLogger(__name__)

_CODES = {code.name: code for code in grpc.StatusCode}


def status_of(error: BaseException) -> tuple[grpc.StatusCode, str]:
    """(status code, message for the client) of an exception raised while serving."""
    if isinstance(error, LoraserveError) and error.code in _CODES and error.code != "INTERNAL":
        return _CODES[error.code], error.message
    return grpc.StatusCode.INTERNAL, "internal server error"


async def abort(context: grpc.aio.ServicerContext, error: BaseException, request_id: str = "") -> None:
    """Abort the RPC with the status `error` maps to; server faults are logged with the id."""
    code, message = status_of(error)
    if code == grpc.StatusCode.INTERNAL:
        log.error("request %s failed with a server fault", request_id or "-", exc_info=error)
        message = f"{message} (request id {request_id})" if request_id else message
    await context.abort(code, message)
