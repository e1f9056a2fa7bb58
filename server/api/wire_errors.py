"""Why some bytes are not a valid protobuf message, told in the message's own field names.

protobuf's parser says only "Error parsing message with type ...". A client that sent a prompt
cut in the middle of a character deserves to hear which field: this walks the wire format
against the message's descriptor and names the first string field that is not UTF-8 or the
first length-delimited field that runs past the end (`input.messages[2].content`).
"""

from __future__ import annotations

from google.protobuf.descriptor import Descriptor, FieldDescriptor

MAX_DEPTH = 32


class _Stop(Exception):
    """The walk found the first problem; its message says what."""


def describe_undecodable(descriptor: Descriptor, data: bytes) -> str:
    """A person's explanation of why `data` does not parse as a `descriptor` message."""
    try:
        _walk(descriptor, memoryview(data), "", 0)
    except _Stop as stop:
        return f"the request is not a valid {descriptor.full_name}: {stop}"
    return f"the request is not a valid {descriptor.full_name} message (corrupt or truncated bytes)"


def _walk(descriptor: Descriptor, data: memoryview, path: str, depth: int) -> None:
    if depth > MAX_DEPTH:
        raise _Stop(f"it nests more than {MAX_DEPTH} messages deep")
    seen: dict[int, int] = {}
    pos = 0
    while pos < len(data):
        key, pos = _varint(data, pos, path or "the message")
        number, wire_type = key >> 3, key & 7
        field = descriptor.fields_by_number.get(number)
        name = _name(path, field, number, seen)
        if number == 0:
            raise _Stop(f"{name} has field number 0, which protobuf never uses")
        if wire_type == 0:
            _, pos = _varint(data, pos, name)
        elif wire_type in (1, 5):
            pos += 8 if wire_type == 1 else 4
            if pos > len(data):
                raise _Stop(f"field {name} is cut off at the end of the request")
        elif wire_type == 2:
            length, pos = _varint(data, pos, name)
            if pos + length > len(data):
                raise _Stop(f"field {name} says it is {length:,} bytes but the request ends "
                            f"{len(data) - pos:,} bytes later")
            chunk = data[pos:pos + length]
            pos += length
            if field is not None and field.type == FieldDescriptor.TYPE_STRING:
                try:
                    bytes(chunk).decode("utf-8")
                except UnicodeDecodeError as exc:
                    raise _Stop(f"field {name} is not valid UTF-8 (byte {exc.start:,} of the text)") from None
            elif field is not None and field.type == FieldDescriptor.TYPE_MESSAGE:
                _walk(field.message_type, chunk, name, depth + 1)
        elif wire_type in (3, 4):
            raise _Stop(f"field {name} uses protobuf groups, which these messages never contain")
        else:
            raise _Stop(f"field {name} has an invalid wire type {wire_type}")


def _name(path: str, field: FieldDescriptor | None, number: int, seen: dict[int, int]) -> str:
    base = field.name if field is not None else f"#{number}"
    if field is not None and field.is_repeated:
        index = seen.get(number, 0)
        seen[number] = index + 1
        base = f"{base}[{index}]"
    return f"{path}.{base}" if path else base


def _varint(data: memoryview, pos: int, where: str) -> tuple[int, int]:
    value = shift = 0
    while True:
        if pos >= len(data):
            raise _Stop(f"{where} is cut off at the end of the request")
        byte = data[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return value, pos
        shift += 7
        if shift >= 70:
            raise _Stop(f"{where} has a malformed number")
