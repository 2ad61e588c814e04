"""Build a tiny randomly initialised causal LM and its tokenizer locally (no downloads).

``build_tiny_model(out_dir, corpus)`` trains a byte-level BPE tokenizer on ``corpus`` with the
``tokenizers`` library (digits always split one per token; ``<think>``, ``</think>``,
``<answer>``, ``</answer>`` added as single *normal* tokens so that vLLM's detokenizer, which
skips special tokens by default, keeps them in the response text; ``<|endoftext|>`` is EOS and
``<|pad|>`` the pad token, both special), wraps it as a ``PreTrainedTokenizerFast`` with a
small chat template, builds a randomly initialised ``Qwen2ForCausalLM`` and saves everything
as an HF directory (safetensors + generation_config.json).

The directory loads with ``AutoTokenizer`` / ``AutoModelForCausalLM`` and in vLLM, GPU or CPU.
vLLM's CPU attention backend supports only some head sizes (``head_dim = hidden_size //
num_heads``): 32, 64, 80, 96, 112, 128, 160, 192, 224, 256, 512 (vLLM 0.32
``CPUAttentionBackend.get_supported_head_sizes``);
the default hidden 128 / 4 heads (head_dim 32) loads there. Run this file as a script to check a
model directory in vLLM on the CPU.
"""

from __future__ import annotations

import json
import os
from typing import Iterable

THINK_TOKENS = ["<think>", "</think>", "<answer>", "</answer>"]
EOS_TOKEN = "<|endoftext|>"
PAD_TOKEN = "<|pad|>"
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}{{ message['content'] }}\n"
    "{% elif message['role'] == 'user' %}User: {{ message['content'] }}\n"
    "{% else %}Assistant: {{ message['content'] }}" + EOS_TOKEN + "\n{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}Assistant: {% endif %}"
)
VLLM_CPU_HEAD_SIZES = (32, 64, 80, 96, 112, 128, 160, 192, 224, 256, 512)


def train_tokenizer(corpus: Iterable[str], vocab_size: int = 512):
    """A byte-level BPE ``PreTrainedTokenizerFast`` trained on ``corpus``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=[EOS_TOKEN, PAD_TOKEN],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(list(corpus), trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token=EOS_TOKEN,
        pad_token=PAD_TOKEN,
        clean_up_tokenization_spaces=False,
    )
    fast.add_tokens(THINK_TOKENS)  # normal tokens: survive skip_special_tokens=True
    fast.chat_template = CHAT_TEMPLATE
    fast.padding_side = "left"
    return fast


def _qwen2_config(tok, *, hidden_size: int, num_layers: int, num_heads: int, num_kv_heads: int,
                  intermediate_size: int, max_position_embeddings: int, tie_word_embeddings: bool):
    """The ``Qwen2Config`` of a tiny model for tokenizer ``tok`` (vocabulary padded to a multiple of 64)."""
    from transformers import Qwen2Config

    return Qwen2Config(
        vocab_size=(len(tok) + 63) // 64 * 64,
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_kv_heads,
        max_position_embeddings=max_position_embeddings,
        rope_theta=10000.0,
        tie_word_embeddings=tie_word_embeddings,
        bos_token_id=tok.eos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        torch_dtype="float32",
        use_sliding_window=False,
    )


def _generation_config(tok):
    """Sampling defaults saved with the model: temperature 1, no top-p/top-k; BOS and EOS are the tokenizer's EOS."""
    from transformers import GenerationConfig

    return GenerationConfig(bos_token_id=tok.eos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
                            do_sample=True, temperature=1.0, top_p=1.0, top_k=0)


def build_tiny_model(
    out_dir: str,
    corpus: list[str],
    *,
    arch: str = "qwen2",
    hidden_size: int = 128,
    num_layers: int = 2,
    num_heads: int = 4,
    num_kv_heads: int = 2,
    intermediate_size: int = 512,
    max_position_embeddings: int = 512,
    vocab_size: int = 512,
    tie_word_embeddings: bool = True,
    seed: int = 0,
) -> str:
    """Train a tokenizer on ``corpus``, build a random ``arch`` model, save both to ``out_dir``.

    Args:
        out_dir: directory written (created if missing); returned.
        corpus: texts the tokenizer is trained on (the task's prompts and answers or worked solutions).
        arch: "qwen2" (Qwen2ForCausalLM) is the one supported.
        hidden_size, num_layers, num_heads, num_kv_heads, intermediate_size: model shape;
            ``hidden_size // num_heads`` must be a head size vLLM's CPU attention supports
            (see ``VLLM_CPU_HEAD_SIZES``) for the model to run in vLLM on the CPU.
        max_position_embeddings: longest sequence.
        vocab_size: BPE vocabulary target (the added tokens come on top).
        tie_word_embeddings: share the input embedding and the LM head.
        seed: torch seed for the random initialisation.

    Returns:
        ``out_dir``.
    """
    import torch
    from transformers import Qwen2ForCausalLM

    if arch != "qwen2":
        raise ValueError(f"unsupported arch {arch!r} (only 'qwen2')")
    if hidden_size % num_heads or num_heads % num_kv_heads:
        raise ValueError("hidden_size must divide by num_heads and num_heads by num_kv_heads")
    os.makedirs(out_dir, exist_ok=True)
    tok = train_tokenizer(corpus, vocab_size=vocab_size)
    tok.save_pretrained(out_dir)
    config = _qwen2_config(tok, hidden_size=hidden_size, num_layers=num_layers, num_heads=num_heads,
                           num_kv_heads=num_kv_heads, intermediate_size=intermediate_size,
                           max_position_embeddings=max_position_embeddings, tie_word_embeddings=tie_word_embeddings)
    torch.manual_seed(seed)
    model = Qwen2ForCausalLM(config)
    model.generation_config = _generation_config(tok)
    model.save_pretrained(out_dir, safe_serialization=True)
    with open(os.path.join(out_dir, "troupe_tiny_model.json"), "w") as f:
        json.dump({"arch": arch, "params": sum(p.numel() for p in model.parameters()), "vocab": len(tok)}, f)
    return out_dir


SMOKE_PROMPT = "Compute 37+48. Think in <think></think>, answer in <answer></answer>.\n"
"""The prompt the script samples from (a string the smoke corpus covers)."""


def _smoke_corpus() -> list[str]:
    """A small built-in corpus (sums in the R1-Zero tag format) for the script's throwaway model."""
    return [f"Compute {a}+{b}. Think in <think></think>, answer in <answer></answer>.\n"
            f"<think>{a}+{b}={a + b}</think><answer>{a + b}</answer>" for a in range(0, 100, 3) for b in range(0, 100, 7)]


def _main(argv: list[str]) -> None:
    """Check that a model directory (argv[0], else a throwaway model built here) loads and samples in vLLM on the CPU."""
    import tempfile

    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    model_dir = argv[0] if argv else build_tiny_model(tempfile.mkdtemp(prefix="tiny_model_"), _smoke_corpus())
    from vllm import LLM, SamplingParams

    llm = LLM(model=model_dir, dtype="float32", enforce_eager=True, max_model_len=256, seed=0)
    params = SamplingParams(n=4, temperature=1.0, max_tokens=16, logprobs=0, seed=0)
    outs = llm.generate([SMOKE_PROMPT], params)
    for o in outs[0].outputs:
        print(len(o.token_ids), repr(o.text), [round(next(iter(lp.values())).logprob, 3) for lp in o.logprobs][:4])
    print("vLLM CPU load ok:", model_dir)


if __name__ == "__main__":
    # Check that a built model loads in vLLM on the CPU:
    #   VLLM_CPU_KVCACHE_SPACE=1 python learner/tiny_model.py [model_dir]
    import sys

    _main(sys.argv[1:])
