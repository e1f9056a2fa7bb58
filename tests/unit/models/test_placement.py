"""Placement of the base: one GPU when it fits, balanced otherwise, one device per process in a
distributed training run, a device_map given by the operator used as it is."""

from __future__ import annotations

import pytest
import torch

from loraserve.base.loading import load_base
from loraserve.base.placement import (
    choose_placement,
    distributed_local_rank,
    estimate_weight_bytes,
)
from loraserve.config import BaseModelConfig
from loraserve.devtools.synthetic_base import init_model
from loraserve.errors import ConfigError

GIB = 1024**3


def test_cpu_without_gpu_and_explicit_maps_as_given():
    assert choose_placement("auto", 10 * GIB, [], None).device_map == "cpu"
    assert choose_placement("sequential", 10 * GIB, [80 * GIB] * 4, None).device_map == "sequential"
    assert choose_placement("cuda:1", None, [], None).device_map == "cuda:1"


def test_a_model_that_fits_on_one_gpu_goes_on_one():
    # deepseek-llm-7b in NF4 (~5 GiB) on 4 x 80 GiB: one GPU, not a four-stage pipeline.
    placement = choose_placement("auto", 5 * GIB, [79 * GIB] * 4, None)
    assert placement.device_map == {"": 0} and "fits on one GPU" in placement.reason


def test_a_model_too_big_for_one_gpu_is_balanced():
    # V2-Lite unquantized (~32 GiB) on 4 x 39 GiB free: more than 0.8 of one GPU, so balanced.
    placement = choose_placement("auto", 32 * GIB, [39 * GIB] * 4, None)
    assert placement.device_map == "balanced" and "4 GPUs" in placement.reason
    assert choose_placement("auto", None, [80 * GIB] * 2, None).device_map == "balanced"


def test_a_single_gpu_and_a_distributed_rank_get_their_own_device():
    assert choose_placement("auto", 300 * GIB, [80 * GIB], None).device_map == {"": 0}
    assert choose_placement("auto", 5 * GIB, [80 * GIB] * 8, 3).device_map == {"": 3}


def test_local_rank_only_counts_in_a_distributed_launch():
    assert distributed_local_rank({"WORLD_SIZE": "4", "LOCAL_RANK": "2"}) == 2
    assert distributed_local_rank({"WORLD_SIZE": "1", "LOCAL_RANK": "0"}) is None
    assert distributed_local_rank({}) is None


def test_weight_estimate_follows_the_quantization(tmp_path):
    base = init_model(tmp_path / "llm", "deepseek-llm", "tiny", seed=1)
    stored = sum(f.stat().st_size for f in base.glob("*.safetensors"))
    full = estimate_weight_bytes(base, "none", 4, prequantized=False)
    nf4 = estimate_weight_bytes(base, "nf4", 4, prequantized=False)
    assert full == pytest.approx(stored, rel=0.01)
    assert nf4 < 0.25 * full
    assert estimate_weight_bytes(base, "none", 4, prequantized=True) == stored
    assert estimate_weight_bytes(tmp_path, "nf4", 4, prequantized=False) is None


def test_an_empty_device_map_is_refused():
    with pytest.raises(ConfigError, match="device_map"):
        BaseModelConfig("m", device_map="")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_a_small_base_loads_on_one_gpu(tmp_path):
    base = init_model(tmp_path / "v3", "deepseek-v3", "tiny", seed=1)
    loaded = load_base(BaseModelConfig(str(base)))
    assert {p.device for p in loaded.model.parameters()} == {torch.device("cuda", 0)}
