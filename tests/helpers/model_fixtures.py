"""Shared fixtures for the engine tests: tiny real DeepSeek bases, real PEFT adapters, running
engines and the PEFT reference they are held to.

Every base is built once per session (tens of milliseconds each) and every adapter set once per
arch; engines are cheap to load (well under a second on a tiny base) so each test starts its own
and owns all of its state.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM, PreTrainedModel

from loraserve.base.loading import load_base
from loraserve.config import BaseModelConfig, EngineConfig
from loraserve.devtools.random_adapters import make_random_adapter
from loraserve.devtools.synthetic_base import ARCHS, init_model
from loraserve.engine.native import NativeEngine
from loraserve.engine.request import FinishEvent, GenerationRequest, RequestStream, SamplingParams, TokenEvent
from loraserve.lora.peft_compat import keep_module_targets

# Prompts of different lengths and scripts (prose, Chinese, code, JSON), so batch rows differ.
PROMPTS = (
    "The patient reports chest pain after exercise",
    "患者主诉胸闷三天",
    "def fibonacci(n: int) -> int:",
    '{"r": 8, "lora_alpha": 16,',
    "The contract shall terminate",
    "今天天气很好，我们去公园散步吧。",
    "Question: what is the capital of France? Answer:",
    "Dear customer",
)


@dataclass(frozen=True)
class AdapterSpec:
    """How one test adapter was made (PEFT vocabulary)."""

    name: str
    r: int
    lora_alpha: int
    target: str
    use_rslora: bool = False


# Nine adapters covering every rank the slot buffers pad (4/8/16), several alphas, rsLoRA, and
# each target preset; more than any max_loras the tests use, so slots must rotate.
ADAPTER_SPECS: tuple[AdapterSpec, ...] = (
    AdapterSpec("att-r4", r=4, lora_alpha=8, target="attention"),
    AdapterSpec("mlp-r8", r=8, lora_alpha=16, target="mlp"),
    AdapterSpec("all-r16", r=16, lora_alpha=32, target="all-linear"),
    AdapterSpec("att-r8-rs", r=8, lora_alpha=8, target="attention", use_rslora=True),
    AdapterSpec("mlp-r4", r=4, lora_alpha=16, target="mlp"),
    AdapterSpec("all-r16-a8", r=16, lora_alpha=8, target="all-linear"),
    AdapterSpec("all-r8-a32", r=8, lora_alpha=32, target="all-linear"),
    AdapterSpec("att-r16", r=16, lora_alpha=16, target="attention"),
    AdapterSpec("mlp-r16-a4", r=16, lora_alpha=4, target="mlp"),
)


@pytest.fixture
def single_threaded_torch() -> Iterator[None]:
    """One intra-op thread for the duration of a test. The tiny models gain nothing from a
    second thread, and with OpenMP's busy-waiting barriers a test sharing the two cores with any
    other process runs 10-20x slower (55 s instead of 3 s measured). Restored afterwards."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="session")
def base_dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """arch -> directory of its tiny random checkpoint (with tokenizer and chat template)."""
    root = tmp_path_factory.mktemp("bases")
    return {arch: init_model(root / arch, arch, "tiny", seed=0) for arch in ARCHS}


class AdapterLibrary:
    """Builds each arch's adapter set on first use and keeps it for the session."""

    def __init__(self, root: Path, base_dirs: dict[str, Path]) -> None:
        self._root = root
        self._base_dirs = base_dirs
        self._sets: dict[str, dict[str, Path]] = {}

    def __call__(self, arch: str) -> dict[str, Path]:
        """name -> adapter directory, in ADAPTER_SPECS order."""
        if arch not in self._sets:
            base_dir = self._base_dirs[arch]
            fp32 = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
            self._sets[arch] = {
                spec.name: make_random_adapter(base_dir, self._root / arch / spec.name, r=spec.r,
                                               lora_alpha=spec.lora_alpha, target=spec.target, seed=seed,
                                               use_rslora=spec.use_rslora, model=fp32)
                for seed, spec in enumerate(ADAPTER_SPECS, start=1)
            }
        return self._sets[arch]


@pytest.fixture(scope="session")
def adapter_dirs(tmp_path_factory: pytest.TempPathFactory, base_dirs: dict[str, Path]) -> AdapterLibrary:
    """Call with an arch: name -> directory of each of the nine ADAPTER_SPECS adapters."""
    return AdapterLibrary(tmp_path_factory.mktemp("adapters"), base_dirs)


@contextlib.contextmanager
def running_engine(base_dir: Path, quantization: str = "nf4", adapters: dict[str, Path] | None = None,
                   **limits: int) -> Iterator[NativeEngine]:
    """A started engine on its own fresh load of `base_dir`, with `adapters` registered; stopped
    (everything still running cancelled) on exit."""
    engine = NativeEngine.load(EngineConfig(base=BaseModelConfig(model=str(base_dir), quantization=quantization), **limits))
    engine.start()
    try:
        for name, path in (adapters or {}).items():
            engine.add_adapter(name, path)
        yield engine
    finally:
        engine.stop(drain_timeout=0)


def greedy_request(prompt_ids: list[int], n: int, adapter: str | None = None, **sampling) -> GenerationRequest:
    """Exactly `n` new tokens, greedy unless `sampling` says otherwise. EOS is an ordinary token
    (ignore_eos), so outputs have a known length and compare one to one with the reference."""
    params = {"max_new_tokens": n, "ignore_eos": True}
    params.update(sampling)
    return GenerationRequest(list(prompt_ids), SamplingParams(**params), adapter=adapter)


def collect(stream: RequestStream) -> tuple[list[TokenEvent], FinishEvent]:
    """Read a stream to its end: every TokenEvent in order, then the FinishEvent."""
    pieces: list[TokenEvent] = []
    for event in stream:
        if isinstance(event, FinishEvent):
            return pieces, event
        pieces.append(event)
    raise AssertionError("the stream ended without a FinishEvent")


def first_token_at(request: GenerationRequest, finish: FinishEvent) -> float:
    """time.monotonic() at which the engine produced the request's first token."""
    return request.arrival + finish.timings.first_token_s


def finished_at(request: GenerationRequest, finish: FinishEvent) -> float:
    """time.monotonic() at which the engine ended the request."""
    return request.arrival + finish.timings.total_s


class PeftReference:
    """What PEFT and plain transformers produce for one request alone: each adapter on its own
    fresh load of the base (same quantization), so nothing is shared with an engine."""

    def __init__(self, base_dir: Path, quantization: str) -> None:
        self.base_dir = base_dir
        self.quantization = quantization
        self._models: dict[Path | None, PreTrainedModel] = {}

    def model(self, adapter_dir: Path | None) -> PreTrainedModel:
        """PeftModel of `adapter_dir` on a fresh base, or the bare base for None."""
        if adapter_dir not in self._models:
            base = load_base(BaseModelConfig(model=str(self.base_dir), quantization=self.quantization)).model
            if adapter_dir is None:
                self._models[None] = base
            else:
                with keep_module_targets():
                    peft_model = PeftModel.from_pretrained(base, str(adapter_dir))
                self._models[adapter_dir] = peft_model.eval()
        return self._models[adapter_dir]

    @torch.inference_mode()
    def greedy(self, adapter_dir: Path | None, prompt_ids: list[int], n: int) -> list[int]:
        """`n` greedy tokens. eos_token_id=None rather than min_new_tokens: min_new_tokens masks
        EOS out, while ignore_eos lets the model pick EOS as an ordinary token and go on."""
        model = self.model(adapter_dir)
        input_ids = torch.tensor([prompt_ids])  # [1, L]
        out = model.generate(input_ids=input_ids, attention_mask=torch.ones_like(input_ids), do_sample=False,
                             max_new_tokens=n, eos_token_id=None)
        new = out[0, len(prompt_ids):].tolist()
        assert len(new) == n, f"reference stopped after {len(new)} of {n} tokens"
        return new

    @torch.inference_mode()
    def next_token_logits(self, adapter_dir: Path | None, token_ids: list[int]) -> torch.Tensor:
        """Logits [V] float32 of the token after `token_ids`, from one full forward (no cache)."""
        model = self.model(adapter_dir)
        return model(input_ids=torch.tensor([token_ids])).logits[0, -1].float()


class DequantizedExpertsReference(PeftReference):
    """PEFT on the NF4 base whose routed experts are left fused and set to the values the 4-bit
    experts hold (dequantized): PEFT cannot wrap loraserve's per-expert 4-bit buffers, so this is
    the reference for LoRA on 4-bit experts."""

    def __init__(self, base_dir: Path) -> None:
        from bitsandbytes.functional import dequantize_4bit

        from loraserve.base.moe_experts import EXPERT_WEIGHTS, _expert_quant_state

        super().__init__(base_dir, "nf4")
        quantized = load_base(BaseModelConfig(str(base_dir), quantization="nf4")).model
        self._values = {
            name: {p: torch.stack([dequantize_4bit(getattr(m, f"{p}_packed")[e].view(-1, 1), _expert_quant_state(m, p, e))
                                   for e in range(m._fourbit_meta["num_experts"])]) for p in EXPERT_WEIGHTS}
            for name, m in quantized.named_modules() if hasattr(m, "_fourbit_meta")}

    def model(self, adapter_dir: Path | None) -> PreTrainedModel:
        import loraserve.base.loading as loading
        from loraserve.base.moe_experts import EXPERT_WEIGHTS, routed_experts_modules

        if adapter_dir not in self._models:
            with pytest.MonkeyPatch.context() as patch:
                patch.setattr(loading, "quantize_routed_experts", lambda *args: 0)
                base = load_base(BaseModelConfig(str(self.base_dir), quantization="nf4")).model
            with torch.no_grad():
                for name, module in routed_experts_modules(base):
                    for p in EXPERT_WEIGHTS:
                        getattr(module, p).copy_(self._values[name][p])
            self._models[adapter_dir] = (PeftModel.from_pretrained(base, str(adapter_dir)).eval()
                                         if adapter_dir else base)
        return self._models[adapter_dir]
