"""Protobuf messages <-> engine domain objects. No torch, no engine calls: pure translation."""

from __future__ import annotations

from loraserve.engine.request import DEFAULT_MAX_NEW_TOKENS, FinishEvent, SamplingParams
from loraserve.errors import InvalidArgument
from loraserve.proto.v1 import inference_pb2 as pb

FINISH_REASONS = {
    "length": pb.FINISH_REASON_LENGTH,
    "stop": pb.FINISH_REASON_STOP,
    "eos": pb.FINISH_REASON_EOS,
    "cancelled": pb.FINISH_REASON_CANCELLED,
}


def sampling_from_proto(msg: pb.SamplingParams) -> SamplingParams:
    """Proto sampling settings with the documented defaults for unset fields (not validated)."""
    return SamplingParams(
        max_new_tokens=msg.max_new_tokens if msg.HasField("max_new_tokens") else DEFAULT_MAX_NEW_TOKENS,
        temperature=msg.temperature,
        top_p=msg.top_p if msg.HasField("top_p") else 1.0,
        top_k=msg.top_k,
        repetition_penalty=msg.repetition_penalty if msg.HasField("repetition_penalty") else 1.0,
        seed=msg.seed if msg.HasField("seed") else None,
        stop=tuple(msg.stop),
    )


def input_from_proto(msg: pb.GenerationInput) -> tuple[str | None, list[dict[str, str]] | None]:
    """(prompt, messages): exactly one is set."""
    kind = msg.WhichOneof("input")
    if kind == "prompt":
        return msg.prompt, None
    if kind == "messages":
        return None, [{"role": m.role, "content": m.content} for m in msg.messages.messages]
    raise InvalidArgument("the input is empty: give a prompt or messages")


def summary_to_proto(request_id: str, finish: FinishEvent) -> pb.GenerationSummary:
    return pb.GenerationSummary(
        request_id=request_id, text=finish.text, token_ids=finish.token_ids,
        finish_reason=FINISH_REASONS[finish.finish_reason],
        usage=pb.Usage(prompt_tokens=finish.prompt_tokens, completion_tokens=finish.completion_tokens),
        adapter=finish.adapter or "",
        timings=pb.Timings(queue_seconds=finish.timings.queue_s, first_token_seconds=finish.timings.first_token_s,
                           total_seconds=finish.timings.total_s))
