"""Whether a teacher and a student can be distilled on logits: one token -> id map, nothing more.

A base / instruct pair of one family often differs in its EOS token, chat template, padding side or
``model_max_length``; none of that changes which id a token gets, so none of it blocks logit
distillation. Models may also pad their embedding matrix past the tokenizer (Qwen2: 151,936 rows for
151,665 tokens): only the first ``len(tokenizer)`` logits are real, and both the online teacher and
the teacher cache normalise over exactly those.
"""

from __future__ import annotations

import hashlib
from typing import Any

from hf_capgap.errors import ConfigError, HfCapgapError

SHOWN_DIFFERENCES = 5


class VocabularyMismatchError(HfCapgapError, ValueError):
    """Teacher and student tokenizers map some token to different ids."""


def real_vocab_size(tokenizer: Any) -> int:
    """Tokens the tokenizer can produce (added tokens included): the logits past it are padding."""
    return len(tokenizer)


def output_rows(model: Any) -> int:
    """Rows of a model's output embedding (logits per position), also when DeepSpeed ZeRO-3 has
    partitioned it and the local shape is empty."""
    weight = model.get_output_embeddings().weight
    return getattr(weight, "ds_shape", weight.shape)[0]


def check_logits_cover(model: Any, tokenizer: Any, who: str) -> int:
    """The real vocabulary, after checking that ``model`` has a logit for every token (padding rows
    past it are fine); raise naming ``who`` when the model is too small for the tokenizer."""
    real, rows = real_vocab_size(tokenizer), output_rows(model)
    if rows < real:
        raise ConfigError(
            f"{who} has {rows} output logits but the tokenizer has {real} tokens "
            f"({getattr(tokenizer, 'name_or_path', '')!r}): they do not belong together. Resize the model's "
            "embeddings or use the matching tokenizer."
        )
    return real


def _tokens_by_id(tokenizer: Any) -> dict[int, str]:
    return {index: token for token, index in tokenizer.get_vocab().items()}


def vocabulary_fingerprint(tokenizer: Any) -> str:
    """Hash of the token -> id map alone: equal for tokenizers that differ only in special-token roles,
    chat template, padding side or ``model_max_length``."""
    digest = hashlib.sha256()
    for index, token in sorted(_tokens_by_id(tokenizer).items()):
        digest.update(f"{index}\t{token}\n".encode())
    return digest.hexdigest()[:16]


def vocabulary_differences(student_tokenizer: Any, teacher_tokenizer: Any) -> list[tuple[int, str | None, str | None]]:
    """(id, student token, teacher token) for every id the two tokenizers map differently, by id."""
    student_vocab, teacher_vocab = student_tokenizer.get_vocab(), teacher_tokenizer.get_vocab()
    if student_vocab == teacher_vocab:
        return []
    student, teacher = _tokens_by_id(student_tokenizer), _tokens_by_id(teacher_tokenizer)
    return [
        (index, student.get(index), teacher.get(index))
        for index in sorted(student.keys() | teacher.keys())
        if student.get(index) != teacher.get(index)
    ]


def check_same_vocabulary(student_tokenizer: Any, teacher_tokenizer: Any) -> None:
    """Raise :class:`VocabularyMismatchError` naming the first differing ids unless both tokenizers
    give every token the same id."""
    differences = vocabulary_differences(student_tokenizer, teacher_tokenizer)
    if not differences:
        return
    shown = ", ".join(
        f"id {index}: student {student!r} vs teacher {teacher!r}"
        for index, student, teacher in differences[:SHOWN_DIFFERENCES]
    )
    more = f" (and {len(differences) - SHOWN_DIFFERENCES} more)" if len(differences) > SHOWN_DIFFERENCES else ""
    raise VocabularyMismatchError(
        f"teacher {getattr(teacher_tokenizer, 'name_or_path', '')!r} and student "
        f"{getattr(student_tokenizer, 'name_or_path', '')!r} tokenizers map {len(differences)} id(s) differently: "
        f"{shown}{more}. Logit distillation needs one token -> id map: give the student the teacher's tokenizer "
        "(pruned students inherit it)."
    )
