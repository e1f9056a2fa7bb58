"""Placement of the base: one GPU when it fits, balanced otherwise, one device per process in a
distributed training run, a device_map given by the operator used as it is."""

from __future__ import annotations

import shutil
from pathlib import Path

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
REAL_CONFIGS = Path(__file__).parents[2] / "fixtures" / "real_configs"


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


def _real(tmp_path, name):
    (tmp_path / name).mkdir()
    shutil.copy(REAL_CONFIGS / f"{name}.json", tmp_path / name / "config.json")
    return tmp_path / name


def test_weight_estimate_is_the_loading_peak_from_the_config(tmp_path):
    llm = _real(tmp_path, "deepseek-llm-7b-base")
    params = 6_910_365_696  # deepseek-llm-7b: 30 layers of 4096 wide, vocabulary 102,400
    assert estimate_weight_bytes(llm, "none", "bfloat16") == pytest.approx(2 * params, rel=0.01)
    assert estimate_weight_bytes(llm, "nf4", "bfloat16") == pytest.approx(4.81e9, rel=0.02)
    # V2-Lite in NF4 ends at ~8.7 GB, but its 14.4B routed-expert parameters load at bf16 before
    # they are quantized per expert: the peak a single GPU must hold is ~30 GB.
    lite = _real(tmp_path, "deepseek-v2-lite")
    peak = estimate_weight_bytes(lite, "nf4", "bfloat16")
    assert 2 * 14.39e9 < peak < 31e9
    assert choose_placement("auto", peak, [24 * GIB] * 4, None).device_map == "balanced"
    assert choose_placement("auto", estimate_weight_bytes(llm, "nf4", "bfloat16"), [79 * GIB] * 4,
                            None).device_map == {"": 0}
    # V3 comes in FP8: sized as stored whatever is requested.
    v3 = estimate_weight_bytes(_real(tmp_path, "deepseek-v3"), "nf4", "bfloat16")
    assert v3 == pytest.approx(673e9, rel=0.02)
    assert estimate_weight_bytes(tmp_path, "nf4", "bfloat16") is None  # no config.json


def test_an_empty_device_map_is_refused():
    with pytest.raises(ConfigError, match="device_map"):
        BaseModelConfig("m", device_map="")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_a_small_base_loads_on_one_gpu(tmp_path):
    base = init_model(tmp_path / "v3", "deepseek-v3", "tiny", seed=1)
    loaded = load_base(BaseModelConfig(str(base)))
    assert {p.device for p in loaded.model.parameters()} == {torch.device("cuda", 0)}
