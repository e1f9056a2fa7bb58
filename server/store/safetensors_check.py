"""Validates a safetensors file's header before anything decodes it.

A safetensors file is `u64 little-endian N`, then N bytes of JSON header
`{name: {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__": {str: str}}`, then
the data section, whose offsets are relative to its start. Decoding a hostile file can ask
for huge allocations (a header claiming [2**40, 2**40]) or burn time on a huge header, so
this check reads only the first 8 + N bytes and allocates no tensor. Every rule that the
safetensors library enforces when loading is checked here too (tensors tile the data section
exactly, no gaps, no overlap, no trailing bytes), so a file that passes also loads, and one
that fails gets a message naming the rule and the numbers.

Malformed files raise AdapterIncompatible (FAILED_PRECONDITION, like every other adapter the
base cannot use); a file over the size limit raises ResourceExhausted, like the store quotas.
"""

from __future__ import annotations

import json
import math
import os
import struct
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import NamedTuple

from loraserve.errors import AdapterIncompatible, ResourceExhausted

ITEM_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1,
              "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1}
DEFAULT_DTYPES = ("F32", "F16", "BF16")
MAX_HEADER_BYTES = 100 << 20
"""Far above any real adapter's header (a DeepSeek-V3 all-linear adapter's is ~200 KB)."""
MAX_TENSORS = 10_000
"""A rank-r adapter on every supported module of DeepSeek-V3 has ~1,400 tensors."""
MAX_DIMS = 8

ExpectedShapes = Mapping[str, Sequence[int]] | Callable[[str], Sequence[int] | None]


class TensorHeader(NamedTuple):
    """One tensor's entry in the header; unpacks as (dtype, shape)."""

    dtype: str
    shape: tuple[int, ...]


class _TooManyObjects(Exception):
    pass


def check_safetensors_header(source: bytes | Path, max_bytes: int, max_tensors: int = MAX_TENSORS,
                             allowed_dtypes: Sequence[str] = DEFAULT_DTYPES,
                             expected_shapes: ExpectedShapes | None = None,
                             label: str = "adapter_model.safetensors",
                             max_header_bytes: int = MAX_HEADER_BYTES) -> dict[str, TensorHeader]:
    """name -> (dtype, shape) of every tensor in the safetensors file `source` (its bytes or
    its path), after checking the whole header against the data section. `expected_shapes`
    (a mapping, or a function returning None for "no expectation") pins shapes by name.
    `label` starts every message (e.g. "adapter 'x': adapter_model.safetensors"); messages
    never carry a server path."""
    if isinstance(source, (bytes, bytearray, memoryview)):
        file_bytes = len(source)
        head = bytes(source[:8])
    else:
        file_bytes = os.stat(source).st_size
        with open(source, "rb") as f:
            head = f.read(8)
    if file_bytes > max_bytes:
        raise ResourceExhausted(f"{label} is {file_bytes:,} bytes, over the limit of {max_bytes:,}")
    if file_bytes < 8:
        raise AdapterIncompatible(f"{label} is truncated: {file_bytes} bytes, shorter than the 8-byte header length")
    if len(head) < 8:
        raise AdapterIncompatible(f"{label} changed while it was being read")
    (header_bytes,) = struct.unpack("<Q", head)
    if header_bytes > file_bytes - 8:
        raise AdapterIncompatible(f"{label} is truncated: header length is {header_bytes:,} bytes, "
                                  f"file has {file_bytes - 8:,} after the length")
    if header_bytes > max_header_bytes:
        raise AdapterIncompatible(f"{label} header is {header_bytes:,} bytes, over the limit of {max_header_bytes:,}")
    if isinstance(source, (bytes, bytearray, memoryview)):
        raw = bytes(source[8:8 + header_bytes])
    else:
        with open(source, "rb") as f:
            f.seek(8)
            raw = f.read(header_bytes)
        if len(raw) != header_bytes:
            raise AdapterIncompatible(f"{label} changed while it was being read")
    header = _parse_header(raw, max_tensors, label)
    data_bytes = file_bytes - 8 - header_bytes
    return _check_entries(header, data_bytes, max_tensors, set(allowed_dtypes), expected_shapes, label)


def _parse_header(raw: bytes, max_tensors: int, label: str) -> dict:
    """The header as a dict. The object hook runs once per JSON object, so counting its calls
    stops a header with too many tensors after max_tensors entries, not after parsing all of
    it; it also refuses duplicate keys, which two parsers could resolve differently."""
    count = 0

    def hook(pairs: list[tuple[str, object]]) -> dict:
        nonlocal count
        count += 1
        if count > max_tensors + 2:  # each tensor's entry, __metadata__, the header itself
            raise _TooManyObjects
        out = dict(pairs)
        if len(out) != len(pairs):
            seen: set[str] = set()
            dup = next(k for k, _ in pairs if k in seen or seen.add(k))
            raise AdapterIncompatible(f"{label} header repeats the key {dup!r}")
        return out

    try:
        header = json.loads(raw.decode("utf-8"), object_pairs_hook=hook)
    except _TooManyObjects:
        raise AdapterIncompatible(f"{label} has more than {max_tensors:,} tensors") from None
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
        reason = exc.msg if isinstance(exc, json.JSONDecodeError) else type(exc).__name__
        raise AdapterIncompatible(f"{label} header is not valid JSON ({reason})") from None
    if not isinstance(header, dict):
        raise AdapterIncompatible(f"{label} header is not a JSON object")
    return header


def _check_entries(header: dict, data_bytes: int, max_tensors: int, allowed: set[str],
                   expected_shapes: ExpectedShapes | None, label: str) -> dict[str, TensorHeader]:
    metadata = header.pop("__metadata__", None)
    if metadata is not None and not (isinstance(metadata, dict)
                                     and all(isinstance(v, str) for v in metadata.values())):
        raise AdapterIncompatible(f"{label} __metadata__ must map strings to strings")
    if len(header) > max_tensors:
        raise AdapterIncompatible(f"{label} has {len(header):,} tensors, over the limit of {max_tensors:,}")
    expect = expected_shapes.get if isinstance(expected_shapes, Mapping) else expected_shapes
    tensors: dict[str, TensorHeader] = {}
    spans: list[tuple[int, int, str]] = []
    for name, entry in header.items():
        if not isinstance(entry, dict) or set(entry) != {"dtype", "shape", "data_offsets"}:
            raise AdapterIncompatible(f"{label}: tensor {name!r} must have exactly dtype, shape and data_offsets")
        dtype, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
        if dtype not in allowed or dtype not in ITEM_BYTES:
            raise AdapterIncompatible(f"{label}: tensor {name!r} has dtype {dtype!r}; "
                                      f"allowed: {', '.join(sorted(allowed))}")
        if (not isinstance(shape, list) or len(shape) > MAX_DIMS
                or not all(_is_int(d) and d >= 0 for d in shape)):
            raise AdapterIncompatible(f"{label}: tensor {name!r} shape {shape!r} is not a list of "
                                      f"at most {MAX_DIMS} non-negative integers")
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(_is_int(o) for o in offsets)
                and 0 <= offsets[0] <= offsets[1]):
            raise AdapterIncompatible(f"{label}: tensor {name!r} data_offsets {offsets!r} are not [begin, end] "
                                      "with 0 <= begin <= end")
        # Python ints do not overflow, so [2**40, 2**40] gives an honest (huge) product.
        need = math.prod(shape) * ITEM_BYTES[dtype]
        begin, end = offsets
        if end - begin != need:
            raise AdapterIncompatible(f"{label}: tensor {name!r} is {dtype} {shape}, which needs {need:,} bytes, "
                                      f"but its data_offsets span {end - begin:,}")
        if expect is not None:
            want = expect(name)
            if want is not None and tuple(want) != tuple(shape):
                raise AdapterIncompatible(f"{label}: tensor {name!r} has shape {list(shape)}, "
                                          f"expected {list(want)}")
        tensors[name] = TensorHeader(dtype, tuple(shape))
        spans.append((begin, end, name))
    _check_tiling(spans, data_bytes, label)
    return tensors


def _check_tiling(spans: list[tuple[int, int, str]], data_bytes: int, label: str) -> None:
    """The tensors must cover the data section exactly, in some order, like the library
    requires; overlaps would let two tensors alias the same bytes."""
    spans.sort()
    position, previous = 0, None
    for begin, end, name in spans:
        if begin < position:
            raise AdapterIncompatible(f"{label}: tensors {previous!r} and {name!r} overlap "
                                      f"(bytes {begin:,}..{position:,})")
        if begin > position:
            raise AdapterIncompatible(f"{label}: bytes {position:,}..{begin:,} of the data section "
                                      "belong to no tensor")
        position, previous = end, name
    if position > data_bytes:
        raise AdapterIncompatible(f"{label} is truncated: header says {position:,} bytes of tensors, "
                                  f"file has {data_bytes:,}")
    if position < data_bytes:
        raise AdapterIncompatible(f"{label} has {data_bytes - position:,} bytes after the last tensor")


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)
