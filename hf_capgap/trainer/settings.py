"""DistillationSettings: the distillation settings every entry point shares, declared and checked once.

``DistillationConfig`` (the trainer's arguments), ``SweepConfig`` and ``MinimaConfig`` inherit these
fields, so a setting means the same, defaults the same and is refused with the same message everywhere.
The module imports nothing heavy: the checks load the loss, cache and model modules only when they run,
so ``import hf_capgap.sweep`` and ``import hf_capgap.minima`` stay free of torch.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from hf_capgap.errors import ConfigError
from hf_capgap.utils.recipe_args import field_help


@dataclass(kw_only=True)
class DistillationSettings:
    """What the student learns from the teacher: the divergence, its weight and temperature, and the
    teacher's dtype. Call :meth:`check_distillation_settings` from the subclass's checks."""

    loss: str = field(
        default="forward_kl",
        metadata=field_help(
            "Divergence between teacher and student next-token distributions: forward_kl "
            "(KL(teacher||student), MiniMA's), reverse_kl, jsd (generalized JSD with `beta`), skew_kl "
            "(DistiLLM's skewed forward KL with skew `beta`) or tvd (total variation). `beta` is 0.5 where the "
            "config has no beta setting."
        ),
    )
    alpha: float = field(
        default=0.5,
        metadata=field_help("Weight of the distillation term; (1 - alpha) weights the ordinary LM cross-entropy."),
    )
    temperature: float = field(
        default=1.0,
        metadata=field_help("Both logits are divided by T before the softmax; the divergence is scaled by T^2."),
    )
    teacher_dtype: str = field(
        default="auto",
        metadata=field_help(
            "dtype the frozen teacher runs in: auto, bfloat16, float16 or float32. 'auto': a teacher given as a "
            "path loads in bf16 on a GPU and float32 on a CPU; a teacher given as a model keeps its dtype."
        ),
    )

    def check_distillation_settings(self) -> None:
        """Refuse an unknown divergence or teacher dtype, and what :class:`~hf_capgap.losses.LossSpec` refuses."""
        from hf_capgap.losses import DIVERGENCES, LossSpec
        from hf_capgap.models import TEACHER_DTYPE_CHOICES

        if self.loss not in DIVERGENCES:
            raise ConfigError(f"loss={self.loss!r} must be one of {', '.join(DIVERGENCES)}.")
        LossSpec(kind=self.loss, alpha=self.alpha, temperature=self.temperature)
        if self.teacher_dtype not in TEACHER_DTYPE_CHOICES:
            choices = ", ".join(TEACHER_DTYPE_CHOICES)
            raise ConfigError(f"teacher_dtype={self.teacher_dtype!r} must be one of {choices}.")


@dataclass(kw_only=True)
class TeacherCacheSettings(DistillationSettings):
    """The distillation settings plus what a TeacherCache keeps per position (SweepConfig, MinimaConfig).

    Each entry point declares its own ``cache_mode``: the sets of signals they offer differ.
    """

    cache_k: int = field(
        default=64, metadata=field_help("Logits (topk) or draws (sampled) kept per position by the cache.")
    )
    cache_sampler: str = field(
        default="systematic",
        metadata=field_help("How a sampled cache draws: systematic (one uniform per position) or multinomial."),
    )

    def check_teacher_signal(self, cache_mode: str, modes: tuple[str, ...]) -> None:
        """Refuse a ``cache_mode`` outside ``modes``, a sampled cache with a loss other than forward_kl (its
        draws estimate forward KL only), an unknown sampler and a ``cache_k`` below 1."""
        from hf_capgap.cache.format import SAMPLERS

        if cache_mode not in modes:
            raise ConfigError(f"cache_mode={cache_mode!r} must be one of {', '.join(modes)}.")
        if cache_mode == "sampled" and self.loss != "forward_kl":
            raise ConfigError(f"cache_mode='sampled' estimates forward_kl only; got loss={self.loss!r}.")
        if self.cache_sampler not in SAMPLERS:
            raise ConfigError(f"cache_sampler={self.cache_sampler!r} must be one of {', '.join(SAMPLERS)}.")
        if self.cache_k < 1:
            raise ConfigError(f"cache_k={self.cache_k} must be >= 1.")
