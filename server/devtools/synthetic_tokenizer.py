"""A real byte-level BPE tokenizer with DeepSeek's special tokens and chat templates, built offline.

Tests and benchmarks need a tokenizer that behaves like a downloaded DeepSeek one — byte-level
BPE (so any UTF-8 text round-trips), BOS prepended on encode, the fullwidth-bar special tokens,
and the arch's chat template — without a model hub. We train one on the small corpus below.
Training is deterministic: the same `vocab_size` always yields the same vocabulary and merges.
"""

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

# DeepSeek's spellings: U+FF5C FULLWIDTH VERTICAL LINE and U+2581 LOWER ONE EIGHTH BLOCK.
BOS_TOKEN = "<｜begin▁of▁sentence｜>"
EOS_TOKEN = "<｜end▁of▁sentence｜>"
PAD_TOKEN = "<｜▁pad▁｜>"
USER_TOKEN = "<｜User｜>"
ASSISTANT_TOKEN = "<｜Assistant｜>"

# The trainer assigns special tokens the first ids in this order, so they are fixed for every arch
# and vocab size (DeepSeek-V3 also has BOS=0, EOS=1, PAD=2). Configs read them from here.
BOS_TOKEN_ID = 0
EOS_TOKEN_ID = 1
PAD_TOKEN_ID = 2

# DeepSeek LLM / V2-Chat: "User: ...\n\nAssistant: ...<eos>"; a system prompt is a bare paragraph.
_PLAIN_ROLES_TEMPLATE = (
    "{{ bos_token }}"
    "{%- for message in messages -%}"
    "{%- if message['role'] == 'system' and loop.first -%}"
    "{{ message['content'] + '\\n\\n' }}"
    "{%- elif message['role'] == 'user' -%}"
    "{{ 'User: ' + message['content'] + '\\n\\n' }}"
    "{%- elif message['role'] == 'assistant' -%}"
    "{{ 'Assistant: ' + message['content'] + eos_token }}"
    "{%- else -%}"
    "{{ raise_exception('unsupported role ' + message['role'] + ' at message ' + loop.index0|string) }}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ 'Assistant:' }}{%- endif -%}"
)

# DeepSeek-V3 / R1: role markers are special tokens; the system prompt follows BOS directly.
_ROLE_TOKENS_TEMPLATE = (
    "{{ bos_token }}"
    "{%- for message in messages -%}"
    "{%- if message['role'] == 'system' and loop.first -%}"
    "{{ message['content'] }}"
    "{%- elif message['role'] == 'user' -%}"
    "{{ '" + USER_TOKEN + "' + message['content'] }}"
    "{%- elif message['role'] == 'assistant' -%}"
    "{{ '" + ASSISTANT_TOKEN + "' + message['content'] + eos_token }}"
    "{%- else -%}"
    "{{ raise_exception('unsupported role ' + message['role'] + ' at message ' + loop.index0|string) }}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '" + ASSISTANT_TOKEN + "' }}{%- endif -%}"
)

CHAT_TEMPLATES: dict[str, str] = {
    "deepseek-llm": _PLAIN_ROLES_TEMPLATE,
    "deepseek-v2": _PLAIN_ROLES_TEMPLATE,
    "deepseek-v3": _ROLE_TOKENS_TEMPLATE,
}

# Mixed text in the proportions a serving test sees: prose, Chinese clinical and legal phrases,
# Python, JSON. Its size bounds how many merges training can find (see build_tokenizer).
_CORPUS: tuple[str, ...] = (
    "The quick brown fox jumps over the lazy dog. A language model predicts the next token from the "
    "ones before it, and a server batches many such requests so the accelerator stays busy.",
    "Low-rank adaptation freezes the base weights and learns two small matrices per layer. "
    "Many adapters can share one base model: each request names its adapter, and the server "
    "applies the right low-rank update to every token in the batch.",
    "Please summarise the patient's history in plain language. The patient reports chest pain "
    "after exercise, shortness of breath, and occasional palpitations at night.",
    "The contract shall terminate on the thirtieth day after written notice. Neither party may "
    "assign its rights without the prior written consent of the other party.",
    "In 2024 the team measured throughput at 1,250 tokens per second with 32 concurrent requests, "
    "a p50 latency of 41 ms and a p99 latency of 180 ms.",
    "Question: what is the capital of France? Answer: Paris. Question: how many legs does a spider "
    "have? Answer: eight. Question: what colour is the sky on a clear day? Answer: blue.",
    "Dear customer, thank you for your order. Your package will arrive within three to five "
    "business days. If you have any questions, reply to this email and we will help.",
    "患者心电图提示窦性心律不齐，建议定期复查。窦性心动过速、窦性心动过缓与心房颤动需要鉴别诊断。",
    "主诉：反复胸闷、心悸三天。现病史：患者三天前无明显诱因出现胸闷，伴心悸，无发热、咳嗽。",
    "诊断：高血压病二级，2型糖尿病，窦性心律不齐。治疗：口服降压药物，监测血糖，低盐低脂饮食。",
    "根据《中华人民共和国民法典》第五百七十七条，当事人一方不履行合同义务或者履行合同义务不符合约定的，"
    "应当承担继续履行、采取补救措施或者赔偿损失等违约责任。",
    "本合同自双方签字盖章之日起生效。甲方应当按照约定支付价款，乙方应当按时交付标的物。",
    "被告人的行为已构成盗窃罪，依法应予惩处。原告的诉讼请求于法有据，本院予以支持。",
    "今天天气很好，我们去公园散步吧。人工智能模型可以帮助医生阅读病历，也可以帮助律师检索法条。",
    "def fibonacci(n: int) -> int:\n    \"\"\"Return the n-th Fibonacci number.\"\"\"\n"
    "    a, b = 0, 1\n    for _ in range(n):\n        a, b = b, a + b\n    return a\n",
    "import json\nfrom pathlib import Path\n\n\ndef load_config(path: Path) -> dict[str, object]:\n"
    "    with path.open(encoding=\"utf-8\") as f:\n        return json.load(f)\n",
    "class Request:\n    def __init__(self, prompt: str, max_tokens: int = 16) -> None:\n"
    "        self.prompt = prompt\n        self.max_tokens = max_tokens\n\n"
    "    def __repr__(self) -> str:\n        return f\"Request(prompt={self.prompt!r})\"\n",
    "for i, token in enumerate(tokens):\n    if token == eos_token_id:\n        break\n"
    "    output.append(token)\nprint(\"\".join(output))\n",
    "if __name__ == \"__main__\":\n    import sys\n    sys.exit(main(sys.argv[1:]))\n",
    '{"model": "deepseek-v3", "adapter": "medical-zh", "prompt": "窦性心律不齐是什么意思？", '
    '"max_tokens": 64, "temperature": 0.0, "stream": true}',
    '{"r": 8, "lora_alpha": 16, "target_modules": ["q_proj", "kv_b_proj", "o_proj"], '
    '"lora_dropout": 0.05, "bias": "none", "task_type": "CAUSAL_LM"}',
    '[{"role": "system", "content": "You are a helpful assistant."}, '
    '{"role": "user", "content": "Hello!"}, {"role": "assistant", "content": "Hi, how can I help?"}]',
    "Tabs\tand  double  spaces, trailing spaces   \nand blank lines\n\n\nare part of real text too.",
    "Emoji appear in chat: 👋 🙂 🚀 ✅ — and so do symbols like ©, €, ±, ≤, →, and « quotes ».",
)


def chat_template(arch: str) -> str:
    """Return the Jinja chat template for `arch`; raises ValueError naming the known archs."""
    if arch not in CHAT_TEMPLATES:
        raise ValueError(f"unknown arch {arch!r}; expected one of {sorted(CHAT_TEMPLATES)}")
    return CHAT_TEMPLATES[arch]


def _special_tokens(arch: str) -> list[str]:
    """Special tokens in id order: BOS, EOS, PAD, then V3's role markers."""
    tokens = [BOS_TOKEN, EOS_TOKEN, PAD_TOKEN]
    if arch == "deepseek-v3":
        tokens += [USER_TOKEN, ASSISTANT_TOKEN]
    return tokens


def build_tokenizer(arch: str, vocab_size: int) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE tokenizer for `arch` and wrap it as DeepSeek's tokenizer would be.

    `vocab_size` is the training target including special tokens. The embedded corpus runs out
    of merges well before a few thousand tokens, so the result may be smaller; it is never
    larger. Every UTF-8 string round-trips through encode/decode because the 256-byte alphabet
    is always in the vocabulary. Encoding with `add_special_tokens=True` prepends BOS.
    """
    template = chat_template(arch)
    specials = _special_tokens(arch)
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    if vocab_size < len(alphabet) + len(specials):
        raise ValueError(
            f"vocab_size {vocab_size} is smaller than the byte alphabet plus special tokens "
            f"({len(alphabet)} + {len(specials)})"
        )

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=specials,
        # Sorted so the base vocabulary's id order never depends on set iteration order.
        initial_alphabet=sorted(alphabet),
        show_progress=False,
    )
    backend.train_from_iterator(_CORPUS, trainer=trainer)
    # DeepSeek tokenizers prepend BOS to every sequence, never append EOS. This post-processor,
    # saved in tokenizer.json, is what carries that behaviour to every loader.
    backend.post_processor = processors.TemplateProcessing(
        single=f"{BOS_TOKEN} $A",
        pair=f"{BOS_TOKEN} $A {BOS_TOKEN}:1 $B:1",
        special_tokens=[(BOS_TOKEN, BOS_TOKEN_ID)],
    )

    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token=BOS_TOKEN,
        eos_token=EOS_TOKEN,
        pad_token=PAD_TOKEN,
        extra_special_tokens=specials[3:],
        # No add_bos_token/add_eos_token: transformers 5 drops them from tokenizer_config.json
        # whenever tokenizer.json exists, so the post-processor above is the only thing that
        # survives a reload. Passing them would make this object differ from the reloaded one.
        # Byte-level decoding is already exact; the legacy cleanup would eat spaces before
        # punctuation and break round-trips.
        clean_up_tokenization_spaces=False,
    )
    tokenizer.chat_template = template
    return tokenizer
