"""The safetensors header check in front of the store: malformed, hostile or oversized files are
refused with a reason (and without the server's paths); good files yield their dtypes and shapes.
"""

from __future__ import annotations

import json
import struct
import time

import pytest
import torch
from safetensors.torch import save_file
from store_helpers import MB, st_bytes

from loraserve.errors import AdapterIncompatible, ResourceExhausted
from loraserve.store.layout import WEIGHTS_FILE
from loraserve.store.safetensors_check import check_safetensors_header


def _entry(dtype: str, shape: list, begin: int, end: int) -> dict:
    return {"dtype": dtype, "shape": shape, "data_offsets": [begin, end]}


BAD_SAFETENSORS = {
    "shorter than the length": (b"\x01\x02", "truncated: 2 bytes"),
    "header length past the end": (struct.pack("<Q", 10**6) + b"{}", "truncated: header length is 1,000,000"),
    "non-JSON header": (st_bytes(b"{not json"), "not valid JSON"),
    "non-UTF-8 header": (st_bytes(b"\xff\xfe"), "not valid JSON"),
    "header not an object": (st_bytes([1, 2]), "not a JSON object"),
    "absurd shape": (st_bytes({"w": _entry("F32", [2**40, 2**40], 0, 16)}, bytes(16)),
                     "needs 4,835,703,278,458,516,698,824,704 bytes"),
    "negative dim": (st_bytes({"w": _entry("F32", [-4], 0, 16)}, bytes(16)), "non-negative integers"),
    "float dim": (st_bytes({"w": _entry("F32", [1.5], 0, 4)}, bytes(4)), "non-negative integers"),
    "bool dim": (st_bytes({"w": _entry("F32", [True], 0, 4)}, bytes(4)), "non-negative integers"),
    "bad dtype": (st_bytes({"w": _entry("I64", [2], 0, 16)}, bytes(16)), "dtype 'I64'"),
    "unknown dtype": (st_bytes({"w": _entry("F128", [1], 0, 16)}, bytes(16)), "dtype 'F128'"),
    "overlap": (st_bytes({"a": _entry("F32", [4], 0, 16), "b": _entry("F32", [4], 8, 24)}, bytes(24)),
                "'a' and 'b' overlap"),
    "gap": (st_bytes({"a": _entry("F32", [1], 0, 4), "b": _entry("F32", [1], 8, 12)}, bytes(12)),
            "bytes 4..8 of the data section belong to no tensor"),
    "truncated data": (st_bytes({"a": _entry("F32", [4], 0, 16)}, bytes(6)),
                       "is truncated: header says 16 bytes of tensors, file has 6"),
    "trailing bytes": (st_bytes({"a": _entry("F32", [1], 0, 4)}, bytes(9)), "5 bytes after the last tensor"),
    "reversed offsets": (st_bytes({"a": _entry("F32", [0], 4, 0)}, bytes(4)), "0 <= begin <= end"),
    "missing key": (st_bytes({"a": {"dtype": "F32", "shape": [1]}}, bytes(4)), "exactly dtype, shape"),
    "metadata not strings": (st_bytes({"__metadata__": {"x": 1}, "a": _entry("F32", [1], 0, 4)}, bytes(4)),
                             "__metadata__"),
    "duplicate key": (st_bytes(b'{"a": ' + json.dumps(_entry("F32", [1], 0, 4)).encode() + b', "a": '
                               + json.dumps(_entry("F32", [1], 0, 4)).encode() + b"}", bytes(4)), "repeats the key"),
}


@pytest.mark.parametrize("case", list(BAD_SAFETENSORS))
def test_malformed_safetensors_are_refused(case, tmp_path):
    data, words = BAD_SAFETENSORS[case]
    with pytest.raises(AdapterIncompatible, match=words) as info:
        check_safetensors_header(data, max_bytes=MB)
    assert info.value.message.startswith("adapter_model.safetensors")
    path = tmp_path / "deep" / "dir" / WEIGHTS_FILE
    path.parent.mkdir(parents=True)
    path.write_bytes(data)
    with pytest.raises(AdapterIncompatible, match=words) as info:  # same verdict reading a file
        check_safetensors_header(path, max_bytes=MB)
    assert str(tmp_path) not in info.value.message


def test_a_hundred_thousand_tensors_are_refused_quickly():
    entry = json.dumps(_entry("F32", [0], 0, 0))
    header = ("{" + ",".join(f'"t{i}": {entry}' for i in range(100_000)) + "}").encode()
    data = st_bytes(header)
    start = time.perf_counter()
    with pytest.raises(AdapterIncompatible, match="more than 10,000 tensors"):
        check_safetensors_header(data, max_bytes=64 * MB)
    assert time.perf_counter() - start < 1.0


def test_good_safetensors_pass_with_metadata_and_shapes(tmp_path):
    path = tmp_path / WEIGHTS_FILE
    save_file({"a": torch.zeros(2, 3), "b": torch.zeros(4, dtype=torch.bfloat16), "e": torch.zeros(0)}, path,
              metadata={"format": "pt"})
    expected = {"a": ("F32", (2, 3)), "b": ("BF16", (4,)), "e": ("F32", (0,))}
    assert check_safetensors_header(path, max_bytes=MB) == expected
    assert check_safetensors_header(path.read_bytes(), max_bytes=MB, expected_shapes={"a": [2, 3]}) == expected
    with pytest.raises(AdapterIncompatible, match=r"'a' has shape \[2, 3\], expected \[3, 2\]"):
        check_safetensors_header(path, max_bytes=MB, expected_shapes=lambda n: [3, 2] if n == "a" else None)
    with pytest.raises(ResourceExhausted, match="over the limit of 10"):
        check_safetensors_header(path, max_bytes=10)
    with pytest.raises(AdapterIncompatible, match="header is .* bytes, over the limit of 16"):
        check_safetensors_header(path, max_bytes=MB, max_header_bytes=16)
    with pytest.raises(AdapterIncompatible, match="more than 2 tensors"):
        check_safetensors_header(path, max_bytes=MB, max_tensors=2)
