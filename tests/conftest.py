"""Shared test set-up: offline, deterministic, small."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
os.environ.setdefault("WANDB_DISABLED", "true")

import pytest  # noqa: E402
import torch  # noqa: E402


@pytest.fixture(autouse=True)
def _seed_everything():
    torch.manual_seed(0)
    yield


def tiny_llama(vocab_size: int = 96, hidden: int = 32, layers: int = 1, heads: int = 4, kv_heads: int = 2):
    """A LLaMA-architecture causal LM small enough to train in a test."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        max_position_embeddings=128,
        tie_word_embeddings=False,
    )
    return LlamaForCausalLM(config)


TINY_TEXT = (
    "the cat sat on the mat . the dog sat on the log . a cat and a dog sat on a mat and a log . "
    "the bird sang on the tree . a bird and a cat sang . the dog ran to the tree and the cat ran to the mat . "
) * 4


@pytest.fixture(scope="session")
def tiny_tokenizer():
    """A word-level tokenizer over TINY_TEXT, as a PreTrainedTokenizerFast."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.WordLevel(unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    backend.train_from_iterator([TINY_TEXT], trainers.WordLevelTrainer(special_tokens=["<pad>", "<unk>", "<eos>"]))
    return PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", unk_token="<unk>", eos_token="<eos>")


@pytest.fixture()
def tiny_text_dataset(tiny_tokenizer):
    """Variable-length rows of TINY_TEXT token ids."""
    from datasets import Dataset

    ids = tiny_tokenizer(TINY_TEXT)["input_ids"]
    lengths = [9, 16, 12, 7, 16, 11, 14, 10] * 3
    rows, start = [], 0
    for length in lengths:
        rows.append(ids[start : start + length])
        start = (start + length) % (len(ids) - 20)
    return Dataset.from_dict({"input_ids": rows})


CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'assistant' %}"
    "{{ '<|im_start|>assistant\\n' }}{% generation %}{{ message['content'] + '<|im_end|>' }}{% endgeneration %}"
    "{{ '\\n' }}"
    "{% else %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
"""ChatML with {% generation %} markers around each assistant turn (as assistant-only loss needs)."""

CHAT_VOCAB_SIZE = 1000
CHAT_WORDS = sorted(set(TINY_TEXT.split()) | {"user", "assistant", "system", "hello", "what", "sits", "?"})


def chat_tokenizer(
    eos_token: str = "<|im_end|>", chat_template: str | None = CHAT_TEMPLATE, swap: tuple[int, int] | None = None
):
    """A real-model-like tokenizer of exactly CHAT_VOCAB_SIZE tokens: words, filler tokens, ChatML specials.

    ``eos_token`` / ``chat_template`` vary the special-token roles as a base / instruct pair does;
    ``swap`` exchanges the ids of two tokens (a truly different vocabulary).
    """
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "<unk>", "<s>", "</s>", "<|im_start|>", "<|im_end|>"]
    words = CHAT_WORDS + [f"w{i}" for i in range(CHAT_VOCAB_SIZE - len(specials) - len(CHAT_WORDS))]
    tokens = specials + words
    if swap is not None:
        first, second = swap
        tokens[first], tokens[second] = tokens[second], tokens[first]
    backend = Tokenizer(models.WordLevel({token: i for i, token in enumerate(tokens)}, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        pad_token="<pad>",
        unk_token="<unk>",
        bos_token="<s>",
        eos_token=eos_token,
        additional_special_tokens=["<|im_start|>", "<|im_end|>"],
    )
    tokenizer.chat_template = chat_template
    assert len(tokenizer) == CHAT_VOCAB_SIZE
    return tokenizer


def tiny_qwen2(embedding_rows: int, hidden: int = 32, layers: int = 1, seed: int = 0):
    """A Qwen2 causal LM with a real model's traits: GQA (4 heads, 2 KV heads), tied embeddings, and
    ``embedding_rows`` >= the tokenizer's vocabulary (padded embedding rows)."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(seed)
    config = Qwen2Config(
        vocab_size=embedding_rows,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        tie_word_embeddings=True,
    )
    return Qwen2ForCausalLM(config)


CHAT_ROWS = [
    [
        {"role": "user", "content": "what sits on the mat ?"},
        {"role": "assistant", "content": "the cat sat on the mat ."},
    ],
    [
        {"role": "system", "content": "a bird"},
        {"role": "user", "content": "hello"},
        {"role": "assistant", "content": "the dog ran to the tree and the cat ran to the mat ."},
    ],
    [
        {"role": "user", "content": "the bird sang on the tree ?"},
        {"role": "assistant", "content": "a bird and a cat sang ."},
        {"role": "user", "content": "what ?"},
        {"role": "assistant", "content": "the dog sat on the log ."},
    ],
] * 4
