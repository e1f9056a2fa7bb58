"""The one place domain errors become gRPC statuses. A client's mistake keeps its own code and
message and is logged as one WARNING line (summarised when they come in floods, never a stack
trace); anything else is INTERNAL with a request id, and its details go to the log only."""

from __future__ import annotations

import logging

import grpc

from loraserve.api.refusal_log import RefusalLog
from loraserve.errors import LoraserveError

log = logging.getLogger(__name__)
mistakes_log = logging.getLogger("loraserve.client_errors")

_CODES = {code.name: code for code in grpc.StatusCode}
CLIENT_MISTAKES = frozenset({"INVALID_ARGUMENT", "FAILED_PRECONDITION", "NOT_FOUND", "ALREADY_EXISTS",
                             "PERMISSION_DENIED", "UNAUTHENTICATED", "RESOURCE_EXHAUSTED", "OUT_OF_RANGE"})
"""Codes that mean the caller must change something (or wait): a WARNING line, no trace."""
mistakes = RefusalLog(mistakes_log, summarized=CLIENT_MISTAKES, level=logging.WARNING, key_name="call")
"""Warning lines for client mistakes: the first of each (call, code) per window in full, the
rest summed up (the server flushes it every window)."""


def status_of(error: BaseException) -> tuple[grpc.StatusCode, str]:
    """(status code, message for the client) of an exception raised while serving."""
    if isinstance(error, LoraserveError) and error.code in _CODES and error.code != "INTERNAL":
        return _CODES[error.code], error.message
    return grpc.StatusCode.INTERNAL, "internal server error"


def as_named(error: BaseException, adapter_id: str, requested: str) -> BaseException:
    """`error` with the adapter id ('<tenant>/<name>') in its message replaced by the name the
    caller used, so a caller never sees ids it did not send."""
    if isinstance(error, LoraserveError) and adapter_id != requested and repr(adapter_id) in error.message:
        error.message = error.message.replace(repr(adapter_id), repr(requested))
        error.args = (error.message,)
    return error


async def abort(context: grpc.aio.ServicerContext, error: BaseException, request_id: str = "",
                call: str = "") -> None:
    """Abort the RPC with the status `error` maps to; server faults are logged with the id and
    their traceback, a client's mistake as one line (`call`: the RPC's name, for that line)."""
    code, message = status_of(error)
    if code == grpc.StatusCode.INTERNAL:
        log.error("request %s failed with a server fault", request_id or "-", exc_info=error)
        message = f"{message} (request id {request_id})" if request_id else message
    else:
        log_refusal(call or "rpc", code.name, message, request_id)
    await context.abort(code, message)


def log_refusal(call: str, code: str, message: str, request_id: str = "") -> None:
    """One WARNING line for a client's mistake (windowed per call and code)."""
    if code in CLIENT_MISTAKES and mistakes.should_log(call, code):
        suffix = f" (request id {request_id})" if request_id else ""
        mistakes_log.warning("%s refused: %s: %s%s", call, code, message, suffix)
