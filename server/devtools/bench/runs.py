"""What every `loraserve bench` run does around its measurement: the flags that name the base
and the output, a fresh working directory, and the JSON result. Torch-free (the CLI imports
it to build its parser)."""

from __future__ import annotations

import argparse
import json
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

T = TypeVar("T")


def add_base_flags(b: argparse.ArgumentParser, archs: tuple[str, ...], sizes: tuple[str, ...],
                   quantizations: tuple[str, ...]) -> None:
    """--json and the base every benchmark builds (--arch, --size, --quantization)."""
    b.add_argument("--json", dest="json_out", default=None, help="also write the results as JSON here")
    b.add_argument("--arch", choices=archs, default="deepseek-v3")
    b.add_argument("--size", choices=sizes, default="small")
    b.add_argument("--quantization", choices=quantizations, default="nf4")


def measure_in(workdir: str | None, name: str, measure: Callable[[Path], T]) -> T:
    """Run `measure` in a fresh directory: a temporary one (deleted after), or a new one under
    `workdir` (kept; fresh per run, because a base or adapter of an earlier run may differ)."""
    if workdir is None:
        with tempfile.TemporaryDirectory(prefix="loraserve-bench-") as tmp:
            return measure(Path(tmp))
    Path(workdir).mkdir(parents=True, exist_ok=True)
    return measure(Path(tempfile.mkdtemp(prefix=f"{name}-bench-", dir=workdir)))


def write_result(json_out: str | None, result: dict) -> None:
    """Write the result as JSON when asked (--json)."""
    if json_out:
        Path(json_out).parent.mkdir(parents=True, exist_ok=True)
        Path(json_out).write_text(json.dumps(result, indent=2) + "\n")
        print(f"\nwrote {json_out}")
