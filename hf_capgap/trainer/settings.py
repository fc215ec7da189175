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
            "config has no beta setting. Or taid (TAID's interpolated target with the taid_* schedule; it needs the "
            "teacher's whole distribution: an online teacher or a dense cache)."
        ),
    )
    alpha: float = field(
        default=0.5,
        metadata=field_help(
            "Weight of the distillation term; (1 - alpha) weights the ordinary LM cross-entropy. On-policy "
            "(lmbda > 0), micro-batches the student sampled are scored by the divergence alone (weight 1, no "
            "cross-entropy: on its own samples it would reinforce them, and GKD has none); dataset and "
            "teacher-sampled (seq_kd) micro-batches keep alpha."
        ),
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

    def check_distillation_settings(self, losses: tuple[str, ...] | None = None) -> None:
        """Refuse a loss outside ``losses`` (default: the divergences, which every entry point offers), an
        unknown teacher dtype, and what :class:`~hf_capgap.losses.LossSpec` refuses."""
        from hf_capgap.losses import DIVERGENCES, LossSpec
        from hf_capgap.models import TEACHER_DTYPE_CHOICES

        losses = losses or DIVERGENCES
        if self.loss not in losses:
            raise ConfigError(f"loss={self.loss!r} must be one of {', '.join(losses)}.")
        LossSpec(kind=self.loss, alpha=self.alpha, temperature=self.temperature)
        if self.teacher_dtype not in TEACHER_DTYPE_CHOICES:
            choices = ", ".join(TEACHER_DTYPE_CHOICES)
            raise ConfigError(f"teacher_dtype={self.teacher_dtype!r} must be one of {choices}.")


@dataclass(kw_only=True)
class TaidSettings:
    """The schedule of TAID's interpolation weight t (Shing et al., ICLR 2025, arXiv 2501.16937, Algorithm 1),
    named after the paper's symbols, with its defaults. Used when ``loss='taid'``; call
    :meth:`check_taid_settings` from the subclass's checks."""

    taid_t_start: float = field(
        default=0.4,
        metadata=field_help("loss='taid': t at the first step (the target starts 40% of the way to the teacher)."),
    )
    taid_t_end: float = field(
        default=1.0,
        metadata=field_help("loss='taid': the largest t, where the linear ramp from taid_t_start ends with training."),
    )
    taid_alpha: float = field(
        default=5e-4,
        metadata=field_help(
            "loss='taid': step size of the adaptive update, t += taid_alpha * sigmoid(momentum) * (1 - t) per "
            "optimizer step, never below the linear ramp from taid_t_start to taid_t_end. 0: the linear ramp alone."
        ),
    )
    taid_beta: float = field(
        default=0.99,
        metadata=field_help(
            "loss='taid': momentum of the objective's relative change, m = taid_beta * m + (1 - taid_beta) * "
            "(J_prev - J) / J_prev."
        ),
    )

    def check_taid_settings(self) -> None:
        """Refuse a schedule outside the ranges where TAID's update is defined (the paper's code asserts them)."""
        if not 0.0 <= self.taid_t_start < 1.0:
            raise ConfigError(f"taid_t_start={self.taid_t_start} must be in [0, 1).")
        if not self.taid_t_start <= self.taid_t_end <= 1.0:
            raise ConfigError(f"taid_t_end={self.taid_t_end} must be in [taid_t_start={self.taid_t_start}, 1].")
        if not 0.0 <= self.taid_alpha <= 1.0:
            raise ConfigError(f"taid_alpha={self.taid_alpha} must be in [0, 1].")
        if not 0.0 <= self.taid_beta < 1.0:
            raise ConfigError(f"taid_beta={self.taid_beta} must be in [0, 1).")


@dataclass(kw_only=True)
class OnPolicySettings:
    """GKD's on-policy knobs (Agarwal et al., ICLR 2024), with its names: how often a batch's completions are
    sampled from the student (``lmbda``) or the teacher (``seq_kd``), and how they are sampled.

    The sampling settings are generation's alone: ``DistillationSettings.temperature`` is the *loss's* softmax
    temperature, ``sampling_temperature`` the one completions are sampled at (TRL's configs use one
    ``temperature`` for both), and nothing else reaches sampling (not the model's own generation_config).
    The student's own samples are scored by the divergence alone, whatever ``alpha`` (see its help). Call
    :meth:`check_on_policy_settings` from the subclass's checks.
    """

    lmbda: float = field(
        default=0.0,
        metadata=field_help(
            "Probability that a micro-batch's completions are sampled from the student (GKD's lambda): 0 trains on "
            "the dataset's completions only (off-policy, as MiniMA), 1 on the student's own samples only. Drawn per "
            "micro-batch from (seed, step, micro-step), so every rank and a resumed run draw alike."
        ),
    )
    seq_kd: bool = field(
        default=False,
        metadata=field_help(
            "Micro-batches not sampled from the student take completions sampled from the teacher instead of the "
            "dataset's (GKD's sequence-level KD)."
        ),
    )
    max_completion_length: int = field(
        default=128,
        metadata=field_help(
            "Most tokens generated per completion (generation stops earlier at EOS), capped per micro-batch so "
            "that prompt + completion fit max_length (max_length minus the micro-batch's longest prompt)."
        ),
    )
    sampling_temperature: float = field(
        default=1.0,
        metadata=field_help(
            "Temperature completions are sampled at. Not the loss's: `temperature` divides the logits in the "
            "divergence."
        ),
    )
    top_k: int = field(
        default=0, metadata=field_help("Sample completions from the k likeliest tokens only; 0 keeps every token.")
    )
    top_p: float = field(
        default=1.0,
        metadata=field_help(
            "Sample completions from the smallest set of tokens whose mass reaches top_p; 1 keeps all."
        ),
    )

    @property
    def generates(self) -> bool:
        """Whether any completion is generated (lmbda > 0 or seq_kd)."""
        return self.lmbda > 0 or self.seq_kd

    @property
    def dataset_completion_length(self) -> int:
        """Tokens of a row's own continuation kept as its dataset completion: none when every micro-batch is
        sampled from the student (lmbda = 1: prompt-only rows), else ``max_completion_length``."""
        return 0 if self.lmbda == 1 else self.max_completion_length

    def check_on_policy_settings(self) -> None:
        """Refuse values outside the ranges where sampling is defined."""
        if not 0.0 <= self.lmbda <= 1.0:
            raise ConfigError(f"lmbda={self.lmbda} must be in [0, 1] (the probability of on-policy micro-batches).")
        if self.max_completion_length < 1:
            raise ConfigError(f"max_completion_length={self.max_completion_length} must be >= 1 generated token.")
        if not self.sampling_temperature > 0:
            raise ConfigError(
                f"sampling_temperature={self.sampling_temperature} must be > 0 (1.0 samples the model's distribution)."
            )
        if self.top_k < 0:
            raise ConfigError(f"top_k={self.top_k} must be >= 0 (0 keeps every token).")
        if not 0.0 < self.top_p <= 1.0:
            raise ConfigError(f"top_p={self.top_p} must be in (0, 1] (1 keeps every token).")


def check_cache_serves_loss(loss: str, cache_mode: str) -> None:
    """Refuse a teacher-cache mode that does not hold what ``loss`` reads, before any work.

    dense serves every loss. topk keeps k tokens and the tail's total mass: enough for any divergence
    over k + 1 buckets, but not for TAID, whose target softmax((1 - t) z_student + t z_teacher) needs
    the teacher's logit of every token. sampled keeps draws from the teacher: an estimate of forward KL only.
    """
    if loss == "taid" and cache_mode in ("topk", "sampled"):
        raise ConfigError(
            f"loss='taid' interpolates the teacher's logits over the whole vocabulary, which cache_mode="
            f"{cache_mode!r} does not keep; use cache_mode='dense' or an online teacher."
        )
    if cache_mode == "sampled" and loss != "forward_kl":
        raise ConfigError(f"cache_mode='sampled' estimates forward_kl only; got loss={loss!r}.")


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
        """Refuse a ``cache_mode`` outside ``modes``, one that cannot serve the loss
        (:func:`check_cache_serves_loss`), an unknown sampler and a ``cache_k`` below 1."""
        from hf_capgap.cache.format import SAMPLERS

        if cache_mode not in modes:
            raise ConfigError(f"cache_mode={cache_mode!r} must be one of {', '.join(modes)}.")
        check_cache_serves_loss(self.loss, cache_mode)
        if self.cache_sampler not in SAMPLERS:
            raise ConfigError(f"cache_sampler={self.cache_sampler!r} must be one of {', '.join(SAMPLERS)}.")
        if self.cache_k < 1:
            raise ConfigError(f"cache_k={self.cache_k} must be >= 1.")
