"""distillation_loss: alpha * T^2 * D(teacher, student) + (1 - alpha) * CE, what the trainer runs.

The same values and gradients as :func:`hf_capgap.losses.divergence`, computed chunk by chunk inside one
autograd Function, with closed-form gradients written in place, so that no [tokens, vocab] intermediate
outlives its chunk and a chunk holds a few [rows, vocab] buffers whatever the divergence. Given last hidden states and
the lm_head weight it never materialises the student logits at all. The teacher side is any
:data:`hf_capgap.losses.TeacherSignal` (online, or sparse from a teacher cache).
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from hf_capgap.errors import ConfigError
from hf_capgap.losses.divergence import IGNORE_INDEX, TAID, check_taid_t
from hf_capgap.losses.signals import DenseTeacher, FusedTeacher, SampledTeacher, TeacherSignal, block_rows
from hf_capgap.losses.spec import LossSpec

# A bf16 / fp16 lm_head gradient summed over at most this many chunks stays in its dtype: measured on CPU
# (bench/bench_losses.py), 8 bf16 additions give 2.1x the error of one bf16 rounding, 32 give 4.1x, 64 5.7x.
LOW_PRECISION_MAX_CHUNKS = 8


@dataclass(frozen=True)
class DistillationLossOutput:
    """``loss`` is differentiable; the parts are detached sums for logging."""

    loss: Tensor
    distill_sum: Tensor  # sum over positions of T^2 * D
    ce_sum: Tensor  # sum over positions of the LM cross-entropy
    num_tokens: int
    # sums over positions of the student's entropy (at T = 1) and of argmax == label: SFTTrainer's
    # `entropy` and `mean_token_accuracy`; None where the loss does not compute them
    entropy_sum: Tensor | None = None
    num_correct: Tensor | None = None


def _token_stats(logits: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
    """(sum of the entropy of softmax(logits), count of argmax == label) over a chunk's rows.

    Read before the loss overwrites the chunk, a block of rows at a time (:func:`block_rows`), so the
    probabilities add one small block to the chunk's memory. H = logsumexp(z) - sum softmax(z) z.
    """
    block = block_rows(logits)
    entropy = logits.new_zeros(())
    for start in range(0, logits.shape[0], block):
        z = logits[start : start + block]
        lse = torch.logsumexp(z, dim=-1, keepdim=True)
        entropy += (lse.squeeze(-1) - (z - lse).exp_().mul_(z).sum(dim=-1)).sum()
    return entropy, (logits.argmax(dim=-1) == labels).sum().float()


def _log_softmax_(logits: Tensor) -> Tensor:
    """log_softmax over the last dim, written into contiguous ``logits`` on CPU (no [rows, vocab] temporary:
    the CPU kernel reads each row before writing it); a new buffer elsewhere, where that is not checked."""
    if logits.device.type == "cpu" and logits.is_contiguous():
        return torch._log_softmax(logits, -1, False, out=logits)
    return F.log_softmax(logits, dim=-1)


def _closed_form_chunk(
    logits: Tensor, teacher: TeacherSignal | None, labels: Tensor, spec: LossSpec, owned: bool
) -> tuple[Tensor, Tensor, Tensor]:
    """(sum of T^2 * D, sum of CE, d(alpha * T^2 * D + (1 - alpha) * CE)/d logits) for one chunk, every
    divergence and teacher signal in closed form, in place.

    With u = z / T and q = softmax(u), each signal overwrites the student log-probs with
    scale * dD/du + (1 - scale) * q: q - r for forward KL (r = p for a full teacher, TAID's target for
    TAID; see each signal's ``forward_kl_into_gradient_``), G - q * sum(G) with G = dD/d(log q) for the
    others (:mod:`hf_capgap.losses.closed_form`). d(T^2 D)/dz = T dD/du and d CE/dz = softmax(z) - onehot
    complete it, so a chunk needs one to three [chunk, vocab] buffers (plus block-sized teacher buffers on
    CPU) instead of an autograd graph's dozen. ``owned`` logits (a buffer nothing else reads) are
    overwritten at T = 1.
    """
    temperature, alpha = spec.temperature, spec.alpha
    zero = logits.new_zeros(())
    if temperature == 1.0 and owned:
        log_q = _log_softmax_(logits)
    else:
        log_q = F.log_softmax(logits / temperature if temperature != 1.0 else logits, dim=-1)
    rows = torch.arange(labels.shape[0], device=labels.device)
    ce = zero
    if alpha < 1:
        ce = -log_q[rows, labels].sum() if temperature == 1.0 else F.cross_entropy(logits, labels, reduction="sum")
    distill = zero
    # At T = 1, softmax(z) == q, so alpha dD/du + (1 - alpha) (q - onehot) = [alpha dD/du + (1 - alpha) q] - (1 -
    # alpha) onehot. Otherwise the distillation part alpha T dD/du is formed first and softmax(z) added after.
    scale = alpha if temperature == 1.0 else 1.0
    if teacher is not None and alpha > 0:
        if spec.kind == TAID:
            distill = teacher.forward_kl_into_gradient_(log_q, temperature, scale, taid_t=spec.taid_t)
        elif spec.kind == "forward_kl":
            distill = teacher.forward_kl_into_gradient_(log_q, temperature, scale)
        else:
            distill = teacher.divergence_into_gradient_(log_q, temperature, scale, spec)
        distill = distill * temperature**2
        grad = log_q
    else:
        grad = log_q.exp_()
    if temperature != 1.0:
        grad.mul_(alpha * temperature)
        if alpha < 1:
            grad.add_(F.softmax(logits, dim=-1), alpha=1.0 - alpha)
    if alpha < 1:
        grad[rows, labels] -= 1.0 - alpha
    return distill, ce, grad


@dataclass(frozen=True)
class _Rows:
    """The labelled student rows, and where each chunk finds its teacher rows.

    The loss runs over labelled rows only, gathered chunk by chunk (no [N, V] compacted copy). A
    teacher signal either has one row per student row or, as a teacher cache stores it, one row per
    labelled row (``compacted``).
    """

    valid: Tensor  # [N] bool
    valid_index: Tensor | None  # positions of labelled rows; None when every row is labelled
    num_valid: int
    compacted: bool

    @classmethod
    def of(cls, labels: Tensor, teacher_rows: int | None) -> _Rows:
        valid = labels != IGNORE_INDEX
        num_valid = int(valid.sum())
        if teacher_rows not in (None, labels.shape[0], num_valid):
            raise ConfigError(
                f"the teacher signal has {teacher_rows} rows; expected one per student row ({labels.shape[0]}) "
                f"or one per labelled row ({num_valid})."
            )
        all_valid = num_valid == labels.shape[0]
        index = None if all_valid else valid.nonzero().squeeze(-1)
        return cls(valid, index, num_valid, compacted=not all_valid and teacher_rows == num_valid)

    def chunks(self, chunk_rows: int) -> Iterator[tuple[slice | Tensor, slice | Tensor]]:
        """(student rows, teacher rows) of each chunk: slices when every row is labelled."""
        for start in range(0, self.num_valid, chunk_rows):
            positions = slice(start, start + chunk_rows)
            if self.valid_index is None:
                yield positions, positions
            else:
                student_rows = self.valid_index[positions]
                yield student_rows, positions if self.compacted else student_rows


@dataclass
class _Gradients:
    """Buffers the chunk loop fills with d(summed loss)/d(input); None where no gradient is needed."""

    student: Tensor | None
    weight: Tensor | None
    bias: Tensor | None

    @classmethod
    def allocate(
        cls,
        student: Tensor,
        weight: Tensor | None,
        bias: Tensor | None,
        rows: _Rows,
        needs: tuple[bool, ...],
        inplace: bool,
        shape: _ChunkShape,
    ) -> _Gradients:
        """Zeroed where a chunk never writes (unlabelled rows, padded vocabulary columns)."""
        vocab = shape.vocab
        partial = rows.valid_index is not None or (weight is None and vocab < student.shape[-1])
        student_grad = None
        if needs[0]:
            student_grad = student if inplace else (torch.zeros_like if partial else torch.empty_like)(student)
        weight_grad = None
        if weight is not None and needs[1]:
            num_chunks = math.ceil(rows.num_valid / shape.rows)
            weight_grad = torch.zeros(weight.shape, dtype=_weight_grad_dtype(weight, num_chunks), device=weight.device)
        bias_grad = None
        if bias is not None and needs[2]:
            bias_grad = torch.zeros(bias.shape, dtype=torch.float32, device=bias.device)
        return cls(student_grad, weight_grad, bias_grad)

    def finish_inplace_(self, student: Tensor, rows: _Rows, vocab: int) -> None:
        """Zero what no chunk wrote when the student logits hold their own gradient."""
        if self.student is not student:
            return
        student[:, vocab:] = 0
        if rows.valid_index is not None:
            student[~rows.valid] = 0


def _compute_dtype(weight: Tensor) -> torch.dtype:
    """The dtype of the lm_head matmuls: autocast's where it is on for the weight's device, else the weight's."""
    if torch.is_autocast_enabled(weight.device.type):
        return torch.get_autocast_dtype(weight.device.type)
    return weight.dtype


def _weight_grad_dtype(weight: Tensor, num_chunks: int) -> torch.dtype:
    """fp32, except for a low-precision weight whose gradient sums few chunks: that weight's ``.grad`` is
    rounded to its dtype anyway, and a few more roundings stay near that error (measured in
    bench/bench_losses.py); accumulating in the weight's dtype halves the [V, H] traffic per chunk."""
    if weight.dtype == torch.float32 or num_chunks > LOW_PRECISION_MAX_CHUNKS:
        return torch.float32
    return weight.dtype


@dataclass(frozen=True)
class _ChunkShape:
    """The real vocabulary (columns past it are padding) and the rows of each chunk."""

    vocab: int
    rows: int

    @classmethod
    def of(cls, student: Tensor, weight: Tensor | None, spec: LossSpec) -> _ChunkShape:
        fused = weight is not None
        vocab = spec.vocab_size or (weight.shape[0] if fused else student.shape[-1])
        return cls(vocab, spec.rows_per_chunk(vocab, student.shape[-1] if fused else None, student.device))


def _chunked_sums(
    student: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    teacher: TeacherSignal | None,
    labels: Tensor,
    spec: LossSpec,
    rows: _Rows,
    grads: _Gradients | None,
    inplace: bool,
    shape: _ChunkShape,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Sums over labelled rows of T^2 * D, of CE, of the student's entropy and of correct argmaxes,
    chunk by chunk; fills ``grads`` when given.

    Fused (``weight`` given): each chunk's logits are built from hidden states in the compute dtype
    (tensor cores under bf16 / fp16) and dropped after their gradient has been multiplied back.
    """
    fused, vocab = weight is not None, shape.vocab
    if fused:
        compute = _compute_dtype(weight)
        head_weight = weight[:vocab].to(compute)
        head_bias = None if bias is None else bias[:vocab].to(compute)
    distill_sum = student.new_zeros((), dtype=torch.float32)
    ce_sum = student.new_zeros((), dtype=torch.float32)
    entropy_sum = student.new_zeros((), dtype=torch.float32)
    num_correct = student.new_zeros((), dtype=torch.float32)
    for student_rows, teacher_rows in rows.chunks(shape.rows):
        chunk = student[student_rows]
        if fused:
            chunk = chunk.to(compute)
            logits = F.linear(chunk, head_weight, head_bias)
        else:
            logits = chunk[:, :vocab]
        owned = fused or inplace or isinstance(student_rows, Tensor) or logits.dtype != torch.float32
        logits = logits.float()
        chunk_teacher = None if teacher is None else teacher.take(teacher_rows)
        chunk_labels = labels[student_rows]
        entropy, correct = _token_stats(logits, chunk_labels)
        entropy_sum += entropy
        num_correct += correct
        if grads is None:
            distill, ce, _ = _closed_form_chunk(logits, chunk_teacher, chunk_labels, spec, owned)
        else:
            distill, ce, grad = _closed_form_chunk(logits, chunk_teacher, chunk_labels, spec, owned)
            if fused:
                _add_head_gradients_(grads, grad, chunk, head_weight, student_rows, vocab)
            elif grads.student is not None:
                grads.student[student_rows, :vocab] = grad.to(grads.student.dtype)
        distill_sum += distill
        ce_sum += ce
    return distill_sum, ce_sum, entropy_sum, num_correct


def _add_head_gradients_(
    grads: _Gradients, grad_logits: Tensor, chunk: Tensor, head_weight: Tensor, rows: slice | Tensor, vocab: int
) -> None:
    """Multiply one chunk's logit gradient back through the lm_head: hidden rows, weight and bias."""
    if grads.bias is not None:
        grads.bias[:vocab].add_(grad_logits.sum(dim=0))
    grad_logits = grad_logits.to(head_weight.dtype)
    if grads.student is not None:
        grads.student[rows] = (grad_logits @ head_weight).to(grads.student.dtype)
    if grads.weight is not None:  # in place: no [V, H] temporary when the buffer has the matmul's dtype
        target = grads.weight[:vocab]
        if target.dtype == chunk.dtype:
            target.addmm_(grad_logits.t(), chunk)
        else:
            target.add_(grad_logits.t() @ chunk)


class _ChunkedDistillation(torch.autograd.Function):
    """Loss and gradient computed together, chunk by chunk, in the forward pass.

    Only the gradient w.r.t. the input (logits [N, V], or hidden [N, H] plus lm_head weight) is kept;
    every [chunk, vocab] intermediate is freed before the next chunk. ``backward`` only rescales.
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx,
        student: Tensor,
        weight: Tensor | None,
        bias: Tensor | None,
        teacher: TeacherSignal | None,
        labels: Tensor,
        spec: LossSpec,
        rows: _Rows,
        normalizer: float,
        inplace_grad: bool,
    ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
        shape = _ChunkShape.of(student, weight, spec)
        inplace = inplace_grad and weight is None
        grads = _Gradients.allocate(student, weight, bias, rows, ctx.needs_input_grad, inplace, shape)
        sums = _chunked_sums(student, weight, bias, teacher, labels, spec, rows, grads, inplace, shape)
        distill_sum, ce_sum = sums[:2]
        grads.finish_inplace_(student, rows, shape.vocab)
        loss = (spec.alpha * distill_sum + (1.0 - spec.alpha) * ce_sum) / normalizer
        # An attribute, not save_for_backward: the buffers are neither inputs nor outputs, and with no
        # other reference left, backward hands them to autograd without a defensive [V, H] copy.
        ctx.grads, ctx.normalizer = grads, normalizer
        ctx.mark_non_differentiable(*sums)
        return (loss, *sums)

    @staticmethod
    def backward(ctx, grad_loss: Tensor, *_unused: Tensor):  # type: ignore[override]
        grads, ctx.grads = ctx.grads, None
        scale = grad_loss / ctx.normalizer
        scaled = [None if g is None else g.mul_(scale.to(g.dtype)) for g in (grads.student, grads.weight, grads.bias)]
        del grads
        return scaled[0], scaled[1], scaled[2], None, None, None, None, None, None


def distillation_loss(
    student: Tensor,
    teacher: TeacherSignal | None,
    labels: Tensor,
    spec: LossSpec,
    *,
    lm_head_weight: Tensor | None = None,
    lm_head_bias: Tensor | None = None,
    num_items_in_batch: int | Tensor | None = None,
    inplace_grad: bool = False,
) -> DistillationLossOutput:
    """alpha * T^2 * D(teacher || student) + (1 - alpha) * CE, summed over labelled rows / normaliser.

    ``student`` is either logits [N, V] or, with ``lm_head_weight`` [V, H], last hidden states [N, H].
    ``labels`` [N] are aligned with the rows; rows labelled -100 are skipped. ``teacher`` has one row
    per student row, or one per labelled row (a teacher cache stores only those). The sum is divided
    by ``num_items_in_batch`` when given (the token count of the whole accumulated batch, which makes
    gradient accumulation exact) and otherwise by the number of labelled rows (at least 1). The
    output also carries the student's entropy and argmax-accuracy sums over the labelled rows (the
    metrics SFTTrainer logs), read from each chunk's logits so no full logits are formed for them.

    A micro-batch with no labelled row gives loss 0 whose backward still reaches the inputs and the
    lm_head with exact zeros, so every DDP rank sees every parameter and steps. Without grad mode (or
    with no input requiring grad), only values are computed: no gradient buffer, no gradient matmul.
    ``inplace_grad`` lets the logits buffer be reused for its own gradient; pass it only for a tensor
    nothing else reads.
    """
    if student.dim() != 2 or labels.dim() != 1 or labels.shape[0] != student.shape[0]:
        raise ConfigError(
            f"expected student [N, V or H] and labels [N], got {tuple(student.shape)} and {tuple(labels.shape)}."
        )
    if teacher is None and spec.alpha > 0:
        raise ConfigError(f"no teacher signal was given but alpha={spec.alpha}: the distillation term needs one.")
    if spec.kind == TAID and teacher is not None:
        check_taid_t(spec.taid_t)
        if not isinstance(teacher, DenseTeacher | FusedTeacher):
            raise ConfigError(
                f"loss='taid' interpolates the teacher's logits over the whole vocabulary; a {type(teacher).__name__} "
                "(a top-k or sampled teacher cache) does not hold them. Use an online teacher or a dense cache."
            )
    if isinstance(teacher, SampledTeacher) and spec.kind != "forward_kl" and spec.alpha > 0:
        raise ConfigError(
            f"a sampled teacher cache estimates forward_kl only; got loss={spec.kind!r}. "
            "Use loss='forward_kl', or build the cache with mode='topk' or 'dense'."
        )
    rows = _Rows.of(labels, None if teacher is None else teacher.num_rows)
    normalizer = max(float(num_items_in_batch) if num_items_in_batch is not None else float(rows.num_valid), 1.0)
    inputs = (student, lm_head_weight, lm_head_bias)
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in inputs):
        loss, *sums = _ChunkedDistillation.apply(
            student, lm_head_weight, lm_head_bias, teacher, labels, spec, rows, normalizer, inplace_grad
        )
    else:
        shape = _ChunkShape.of(student, lm_head_weight, spec)
        sums = _chunked_sums(
            student, lm_head_weight, lm_head_bias, teacher, labels, spec, rows, None, inplace_grad, shape
        )
        loss = (spec.alpha * sums[0] + (1.0 - spec.alpha) * sums[1]) / normalizer
    return DistillationLossOutput(loss, *sums[:2], rows.num_valid, *sums[2:])
