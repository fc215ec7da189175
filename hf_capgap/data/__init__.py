"""Data: the embedded public-domain corpus and its tokenizer (``corpus``), and TRL's SFT data path as
the trainer and the cache share it: ``formats`` (which format, TRL's checks), ``chat_templates``,
``sft`` (preparation, packing, masks, collation) and ``preparation_record`` (what the rows depend on).
"""

from __future__ import annotations

from hf_capgap.data.chat_templates import apply_chat_template_path, template_digest
from hf_capgap.data.corpus import (
    CORPUS_FILE,
    PASSAGE_CHARS,
    SPECIAL_TOKENS,
    TOKENIZER_FORMAT_VERSION,
    TOKENIZER_KIND,
    VALIDATION_FRACTION,
    DatasetOrDict,
    default_tokenizer,
    load_corpus,
    tokenize_and_pack,
    train_tokenizer,
)
from hf_capgap.data.formats import (
    IGNORE_INDEX,
    TOKENIZED_COLUMN,
    DatasetFormatError,
    check_dataset,
    check_sft_config,
    completion_only,
    dataset_format,
    require_chat_template,
    skips_preparation,
    uses_padding_free,
)
from hf_capgap.data.preparation_record import PREPARATION_ARGUMENTS, preparation_disagreements
from hf_capgap.data.sft import (
    TEACHER_KEY_PREFIX,
    count_labelled_positions,
    forward_inputs,
    has_labelled_position,
    make_collator,
    next_token_labels,
    prepare_and_record,
    prepare_dataset,
    prompt_completion_rows,
    rows_holding_positions,
)

__all__ = [
    "CORPUS_FILE",
    "VALIDATION_FRACTION",
    "PASSAGE_CHARS",
    "SPECIAL_TOKENS",
    "TOKENIZER_KIND",
    "TOKENIZER_FORMAT_VERSION",
    "DatasetOrDict",
    "load_corpus",
    "train_tokenizer",
    "default_tokenizer",
    "tokenize_and_pack",
    "IGNORE_INDEX",
    "TEACHER_KEY_PREFIX",
    "TOKENIZED_COLUMN",
    "DatasetFormatError",
    "dataset_format",
    "check_dataset",
    "require_chat_template",
    "completion_only",
    "prepare_dataset",
    "prompt_completion_rows",
    "prepare_and_record",
    "skips_preparation",
    "check_sft_config",
    "apply_chat_template_path",
    "template_digest",
    "PREPARATION_ARGUMENTS",
    "preparation_disagreements",
    "make_collator",
    "uses_padding_free",
    "forward_inputs",
    "next_token_labels",
    "count_labelled_positions",
    "rows_holding_positions",
    "has_labelled_position",
]
