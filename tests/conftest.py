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
