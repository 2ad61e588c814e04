"""Chat-template prompts with an instruct tokenizer built locally in Qwen2.5-Instruct's format (ChatML special
tokens, its default system message, the generation prompt): what the GPU preset (template: chat) sends."""

from __future__ import annotations

from pathlib import Path

import pytest

from troupe.configs.schema import load_config
from troupe.rollout.prompts import build_prompts

# Qwen2.5-Instruct's chat format without the tool-calling branch, written out for this test: ChatML turns,
# "You are Qwen, created by Alibaba Cloud. You are a helpful assistant." when no system message is given.
QWEN25_TEMPLATE = (
    "{%- if messages[0]['role'] == 'system' %}"
    "{{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}"
    "{%- else %}"
    "{{- '<|im_start|>system\\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- for message in messages %}"
    "{%- if message.role == 'user' or (message.role == 'system' and not loop.first) or message.role == 'assistant' %}"
    "{{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)


@pytest.fixture(scope="module")
def qwen_like(tmp_path_factory):
    """A byte-level BPE tokenizer with Qwen2.5's special tokens and template, saved and loaded back."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    special = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    tok.train_from_iterator(["Janet has 3 apples and buys 4 more. How many apples?"] * 20,
                            trainers.BpeTrainer(vocab_size=400, special_tokens=special, show_progress=False,
                                                initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                   additional_special_tokens=["<|im_start|>"])
    fast.chat_template = QWEN25_TEMPLATE
    path = tmp_path_factory.mktemp("qwen_like")
    fast.save_pretrained(path)
    return AutoTokenizer.from_pretrained(path)


ROWS = [{"question": "Janet has 3 apples and buys 4 more. How many apples?", "answer": "7"}]


def test_gpu_preset_prompts_in_chatml(qwen_like):
    d = load_config(Path(__file__).resolve().parents[1] / "configs" / "gsm8k_qwen2.5_1.5b_gpu.yaml").data
    assert d.template == "chat"
    prompts, dropped = build_prompts(ROWS, qwen_like, template=d.template, prompt_format=d.prompt_format,
                                     system_prompt=d.system_prompt, max_prompt_tokens=d.max_prompt_tokens)
    assert dropped == 0
    assert prompts[0].text == (f"<|im_start|>system\n{d.system_prompt}<|im_end|>\n"
                               f"<|im_start|>user\n{ROWS[0]['question']}<|im_end|>\n<|im_start|>assistant\n")
    ids = prompts[0].token_ids
    start, end = qwen_like.convert_tokens_to_ids(["<|im_start|>", "<|im_end|>"])
    assert ids.count(start) == 3 and ids.count(end) == 2  # special tokens stay single ids, none split into bytes
    assert qwen_like.decode(ids) == prompts[0].text
    assert qwen_like.eos_token_id == end  # an instruct model's turn ends at <|im_end|>: the engines stop there


def test_default_system_message_when_none_is_configured(qwen_like):
    prompts, _ = build_prompts(ROWS, qwen_like, template="chat", prompt_format="Q: {question}", system_prompt=None,
                               max_prompt_tokens=512)
    assert prompts[0].text.startswith("<|im_start|>system\nYou are Qwen, created by Alibaba Cloud.")
    assert f"<|im_start|>user\nQ: {ROWS[0]['question']}<|im_end|>" in prompts[0].text
