"""A random model of deepseek-llm-7b's shape (30 Llama layers, hidden 4096, MLP 11008, 32 heads),
built on the GPU in bf16, for `run.sh` when no real weights can be reached. Its tokenizer is
the synthetic deepseek-llm one, and the vocabulary is what that tokenizer reaches (not 102,400),
so every id the model emits decodes: the layers, where the time goes, are 7B's.

    python benchmarks/gpu/make_7b_shape.py OUT_DIR
"""

import sys
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, GenerationConfig, LlamaConfig

from loraserve.devtools.synthetic_tokenizer import BOS_TOKEN_ID, EOS_TOKEN_ID, PAD_TOKEN_ID, build_tokenizer


def main(out: Path) -> None:
    tokenizer = build_tokenizer("deepseek-llm", 4096)
    tokenizer.model_max_length = 4096
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=4096, intermediate_size=11008, num_hidden_layers=30,
                         num_attention_heads=32, num_key_value_heads=32, max_position_embeddings=4096,
                         rms_norm_eps=1e-6, rope_theta=10000.0, bos_token_id=BOS_TOKEN_ID, eos_token_id=EOS_TOKEN_ID,
                         pad_token_id=PAD_TOKEN_ID, tie_word_embeddings=False)
    torch.manual_seed(0)
    with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    model.generation_config = GenerationConfig(bos_token_id=BOS_TOKEN_ID, eos_token_id=EOS_TOKEN_ID,
                                               pad_token_id=PAD_TOKEN_ID)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    print(f"wrote a deepseek-llm-7b-shaped model ({sum(p.numel() for p in model.parameters()) / 1e9:.2f}B) to {out}")


if __name__ == "__main__":
    main(Path(sys.argv[1]))
