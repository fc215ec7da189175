"""Teacher/student compatibility by token -> id map."""

from __future__ import annotations

import pytest

from hf_capgap.models import (
    VocabularyMismatchError,
    check_same_vocabulary,
    real_vocab_size,
    vocabulary_differences,
    vocabulary_fingerprint,
)
from tests.conftest import CHAT_VOCAB_SIZE, chat_tokenizer


def test_special_token_roles_and_templates_do_not_change_the_vocabulary():
    base = chat_tokenizer(eos_token="</s>", chat_template=None)
    instruct = chat_tokenizer()
    instruct.padding_side, instruct.model_max_length = "left", 32768
    check_same_vocabulary(base, instruct)
    assert vocabulary_fingerprint(base) == vocabulary_fingerprint(instruct)
    assert real_vocab_size(base) == CHAT_VOCAB_SIZE


def test_a_moved_or_extra_token_is_named_by_id():
    base = chat_tokenizer()
    swapped = chat_tokenizer(swap=(10, 11))
    assert [index for index, *_ in vocabulary_differences(base, swapped)] == [10, 11]
    assert vocabulary_fingerprint(base) != vocabulary_fingerprint(swapped)
    with pytest.raises(VocabularyMismatchError, match=r"2 id\(s\) differently: id 10: student '.+' vs teacher '.+'"):
        check_same_vocabulary(base, swapped)
    extended = chat_tokenizer()
    extended.add_tokens(["zebra"])
    with pytest.raises(VocabularyMismatchError, match=rf"id {CHAT_VOCAB_SIZE}: student None vs teacher 'zebra'"):
        check_same_vocabulary(base, extended)
