"""DistillationConfig: TRL's SFTConfig plus the knobs of KL-on-logits distillation.

Subclassing ``trl.SFTConfig`` gives distillation the data knobs of supervised fine-tuning with the
same names and meanings (``max_length``, ``packing``, ``padding_free``, ``completion_only_loss``,
``assistant_only_loss``, ``dataset_text_field``, ``dataset_kwargs`` ...), and it stays a
``transformers.TrainingArguments``, so ``HfArgumentParser`` / ``TrlParser`` read it from YAML and flags.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from trl import SFTConfig

from hf_capgap.errors import ConfigError
from hf_capgap.losses import LOSSES, check_beta
from hf_capgap.losses.liger import LOSS_BACKENDS
from hf_capgap.losses.lm_head import FUSED_LM_HEAD_MODES
from hf_capgap.trainer.settings import DistillationSettings, OnPolicySettings, TaidSettings


def check_sft_loss_fields(args: SFTConfig) -> None:
    """Refuse SFTConfig's loss variants, which replace the LM loss that distillation replaces already."""
    if args.loss_type != "nll":
        raise ConfigError(
            f"DistillationConfig.loss_type={args.loss_type!r} is not supported: the loss is "
            "alpha * distillation + (1 - alpha) * cross-entropy. Leave loss_type at 'nll'."
        )
    if args.label_smoothing_factor != 0:
        raise ConfigError(
            f"DistillationConfig.label_smoothing_factor={args.label_smoothing_factor} is not supported: the "
            "teacher's distribution already softens the targets (raise alpha or temperature). Leave it at 0."
        )


def check_on_policy_fields(args: DistillationConfig) -> None:
    """Refuse what cannot score generated completions: a teacher cache, and batches without prompt boundaries."""
    if not args.generates:
        return
    what = f"lmbda={args.lmbda}" if args.lmbda > 0 else "seq_kd=True"
    if args.teacher_cache is not None:
        raise ConfigError(
            f"{what} generates completions, which a teacher_cache cannot score (it holds the teacher's view of the "
            "dataset's tokens only): pass teacher_model instead, or set lmbda=0 and seq_kd=False."
        )
    if args.packing or args.padding_free:
        field_name = "packing" if args.packing else "padding_free"
        raise ConfigError(
            f"{what} with {field_name}=True: generation needs each row's prompt on its own, which packed or "
            f"padding-free rows lose. Set {field_name}=False."
        )


@dataclass
class DistillationConfig(DistillationSettings, TaidSettings, OnPolicySettings, SFTConfig):
    """Arguments for :class:`hf_capgap.DistillationTrainer`.

    The defaults are MiniMA's: 0.5 x LM cross-entropy + 0.5 x forward KL(teacher || student) at T = 1.
    Two SFTConfig defaults differ: ``bf16`` is on only where a GPU supports it (SFTConfig turns it on
    everywhere, CPUs included), and ``gradient_checkpointing`` is off (turn it on for large students).
    ``loss``, ``alpha``, ``temperature`` and ``teacher_dtype`` are :class:`DistillationSettings`, shared with
    the sweep's and the MiniMA recipe's configs, as are TAID's schedule (:class:`TaidSettings`) and the
    on-policy settings (:class:`OnPolicySettings`: ``lmbda``, ``seq_kd``, ``max_completion_length`` and the
    sampling settings, which sample completions from the student or the teacher). ``temperature`` is the
    loss's, ``sampling_temperature`` generation's.
    """

    bf16: bool | None = field(
        default=None,
        metadata={
            "help": "bf16 mixed precision. None: on when a CUDA GPU with bf16 support is used and fp16 is not "
            "set, off on CPUs."
        },
    )
    gradient_checkpointing: bool | None = field(
        default=None,
        metadata={
            "help": "Deprecated alias of activation_checkpointing (recompute activations in the backward pass: "
            "less memory, about 20-30%% more compute). Off unless one of the two is set."
        },
    )

    beta: float = field(
        default=0.5,
        metadata={
            "help": "jsd: teacher weight of the mixture, in (0, 1). skew_kl: skew of the mixture "
            "beta*teacher + (1-beta)*student, in [0, 1). Ignored by the other losses."
        },
    )
    chunk_size: int | None = field(
        default=None,
        metadata={
            "help": "Tokens per chunk of the memory-lean loss; peak extra memory grows with chunk_size x vocab. "
            "None: automatic, by device: on a CPU the power of two that keeps one chunk near 4M logits (128 "
            "tokens at vocab 32000); on a GPU hidden_size / 4 rows, a power of two within 256-2048."
        },
    )
    fused_lm_head: str = field(
        default="auto",
        metadata={
            "help": "Compute the loss from last hidden states and the lm_head weight chunk by chunk so the full "
            "[tokens, vocab] logits are never materialised. 'auto' uses it where the model allows it "
            "(plain linear head, no logit post-processing; torch.compile and DeepSpeed ZeRO-0/1/2 keep it, FSDP "
            "and ZeRO-3 shard the head) and logs which path runs and why.",
            "choices": FUSED_LM_HEAD_MODES,
        },
    )
    loss_backend: str = field(
        default="hf_capgap",
        metadata={
            "help": "hf_capgap (ours), or liger to compare with Liger-Kernel's fused linear JSD (optional: pip "
            "install liger-kernel; CUDA GPU; online teacher with fused heads; forward_kl / reverse_kl / jsd; no "
            "lm_head bias).",
            "choices": LOSS_BACKENDS,
        },
    )
    teacher_cache: str | None = field(
        default=None,
        metadata={
            "help": "Path of a TeacherCache built by `TeacherCache.build` / `hf-capgap cache build`. When set, "
            "the teacher's signal is read from the cache and no teacher model is needed."
        },
    )

    def __post_init__(self) -> None:
        if self.bf16 is None:
            gpu_bf16 = torch.cuda.is_available() and torch.cuda.is_bf16_supported()
            self.bf16 = not self.fp16 and not self.use_cpu and gpu_bf16
        if self.chat_template_path is not None and not self.chat_template_path.endswith((".jinja", ".j2")):
            raise ConfigError(
                f"DistillationConfig.chat_template_path={self.chat_template_path!r} names a model: cloning its chat "
                "template adds tokens to the student only, so teacher and student would no longer share a "
                "vocabulary. Pass a .jinja template file, or set the template on the shared tokenizer."
            )
        self.check_distillation_settings(LOSSES)
        self.check_taid_settings()
        self.check_on_policy_settings()
        check_on_policy_fields(self)
        check_beta(self.loss, self.beta)
        if self.chunk_size is not None and self.chunk_size < 1:
            raise ConfigError(
                f"DistillationConfig.chunk_size must be a positive number of tokens, got {self.chunk_size}."
            )
        if self.fused_lm_head not in FUSED_LM_HEAD_MODES:
            raise ConfigError(
                f"DistillationConfig.fused_lm_head={self.fused_lm_head!r} must be one of {FUSED_LM_HEAD_MODES}."
            )
        if self.loss_backend not in LOSS_BACKENDS:
            raise ConfigError(f"DistillationConfig.loss_backend={self.loss_backend!r} must be one of {LOSS_BACKENDS}.")
        check_sft_loss_fields(self)
        super().__post_init__()


def default_preparation_args(**settings: Any) -> DistillationConfig:
    """The trainer's default settings (a DistillationConfig) with ``settings`` (its data fields), as
    ``hf-capgap cache build`` prepares rows with."""
    return DistillationConfig(report_to=[], **settings)
