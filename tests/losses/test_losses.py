"""The chunked / fused losses against plain dense PyTorch computations: value and gradient."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from hf_capgap.losses import (
    ACCELERATOR_CHUNK_ROWS,
    CHUNK_ELEMENTS,
    DIVERGENCES,
    DenseTeacher,
    FusedTeacher,
    LossSpec,
    SampledTeacher,
    TopKTeacher,
    distillation_loss,
    divergence,
)

BETA = {"forward_kl": 0.5, "reverse_kl": 0.5, "jsd": 0.3, "skew_kl": 0.1, "tvd": 0.5}


def plain_divergence(log_p: torch.Tensor, log_q: torch.Tensor, kind: str, beta: float) -> torch.Tensor:
    """Textbook formulas on probabilities, written independently of hf_capgap.losses."""
    p, q = log_p.exp(), log_q.exp()
    if kind == "forward_kl":
        return (p * (log_p - log_q)).sum(-1)
    if kind == "reverse_kl":
        return (q * (log_q - log_p)).sum(-1)
    if kind == "jsd":
        m = beta * p + (1 - beta) * q
        return beta * (p * (log_p - m.log())).sum(-1) + (1 - beta) * (q * (log_q - m.log())).sum(-1)
    if kind == "skew_kl":
        m = beta * p + (1 - beta) * q
        return (p * (log_p - m.log())).sum(-1)
    return 0.5 * (p - q).abs().sum(-1)


def plain_objective(student_logits, teacher_logits, labels, kind, beta, temperature, alpha):
    valid = labels != -100
    s, t = student_logits[valid].float(), teacher_logits[valid].float()
    log_q = torch.log_softmax(s / temperature, -1)
    log_p = torch.log_softmax(t / temperature, -1)
    distill = plain_divergence(log_p, log_q, kind, beta).mean() * temperature**2
    return alpha * distill + (1 - alpha) * F.cross_entropy(s, labels[valid])


def make_batch(n=40, vocab=37, hidden=12, masked_every=4, dtype=torch.float32):
    hidden_states = torch.randn(n, hidden, dtype=dtype)
    weight = (torch.randn(vocab, hidden) / math.sqrt(hidden)).to(dtype)
    teacher = torch.randn(n, vocab, dtype=dtype) * 2
    labels = torch.randint(0, vocab, (n,))
    if masked_every:
        labels[::masked_every] = -100
    return hidden_states, weight, teacher, labels


@pytest.mark.parametrize("kind", DIVERGENCES)
@pytest.mark.parametrize("temperature", [1.0, 2.0, 0.5])
def test_reference_divergence_matches_plain_formula(kind, temperature):
    _, _, teacher, labels = make_batch()
    student = torch.randn_like(teacher, requires_grad=True)
    ours = divergence(student, teacher, labels, kind, BETA[kind], temperature)
    plain = plain_objective(student, teacher, labels, kind, BETA[kind], temperature, alpha=1.0)
    torch.testing.assert_close(ours, plain, rtol=1e-5, atol=1e-6)
    (g_ours,) = torch.autograd.grad(ours, student)
    (g_plain,) = torch.autograd.grad(plain, student)
    torch.testing.assert_close(g_ours, g_plain, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("kind", DIVERGENCES)
@pytest.mark.parametrize("temperature", [1.0, 2.0])
@pytest.mark.parametrize("alpha", [0.0, 0.5, 1.0])
@pytest.mark.parametrize("fused", [False, True])
def test_chunked_loss_equals_dense_reference(kind, temperature, alpha, fused):
    hidden, weight, teacher, labels = make_batch()
    hidden.requires_grad_(True)
    weight.requires_grad_(True)
    spec = LossSpec(kind=kind, beta=BETA[kind], temperature=temperature, alpha=alpha, chunk_size=7)
    if fused:
        ours = distillation_loss(hidden, DenseTeacher(teacher), labels, spec, lm_head_weight=weight).loss
    else:
        ours = distillation_loss(hidden @ weight.t(), DenseTeacher(teacher), labels, spec).loss
    plain = plain_objective(hidden @ weight.t(), teacher, labels, kind, BETA[kind], temperature, alpha)
    torch.testing.assert_close(ours, plain, rtol=1e-5, atol=1e-6)
    grads_ours = torch.autograd.grad(ours, (hidden, weight))
    grads_plain = torch.autograd.grad(plain, (hidden, weight))
    for ours_grad, plain_grad in zip(grads_ours, grads_plain, strict=True):
        torch.testing.assert_close(ours_grad, plain_grad, rtol=1e-5, atol=1e-6)


def test_fused_teacher_equals_dense_teacher_and_bias_grad():
    hidden, weight, _, labels = make_batch()
    bias = torch.randn(weight.shape[0], requires_grad=True)
    weight.requires_grad_(True)
    teacher_hidden, teacher_weight = torch.randn(hidden.shape[0], 9), torch.randn(weight.shape[0], 9)
    spec = LossSpec(kind="jsd", beta=0.4, temperature=1.5, alpha=0.5, chunk_size=5)
    fused = distillation_loss(
        hidden, FusedTeacher(teacher_hidden, teacher_weight), labels, spec, lm_head_weight=weight, lm_head_bias=bias
    ).loss
    plain = plain_objective(
        F.linear(hidden, weight, bias), teacher_hidden @ teacher_weight.t(), labels, "jsd", 0.4, 1.5, 0.5
    )
    torch.testing.assert_close(fused, plain, rtol=1e-5, atol=1e-6)
    for a, b in zip(
        torch.autograd.grad(fused, (weight, bias)), torch.autograd.grad(plain, (weight, bias)), strict=True
    ):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("fused", [False, True])
def test_bf16_inputs_match_reference_on_the_same_bf16_values(fused):
    hidden, weight, teacher, labels = make_batch(dtype=torch.bfloat16)
    hidden.requires_grad_(True)
    spec = LossSpec(kind="forward_kl", temperature=2.0, alpha=0.5, chunk_size=8)
    if fused:
        ours = distillation_loss(hidden, DenseTeacher(teacher), labels, spec, lm_head_weight=weight).loss
    else:
        ours = distillation_loss(hidden @ weight.t(), DenseTeacher(teacher), labels, spec).loss
    plain = plain_objective(hidden @ weight.t(), teacher, labels, "forward_kl", 0.5, 2.0, 0.5)
    assert ours.dtype == torch.float32
    torch.testing.assert_close(ours, plain, rtol=1e-5, atol=1e-5)
    (g_ours,) = torch.autograd.grad(ours, hidden)
    (g_plain,) = torch.autograd.grad(plain, hidden)
    assert g_ours.dtype == torch.bfloat16
    torch.testing.assert_close(g_ours.float(), g_plain.float(), rtol=2e-2, atol=2e-3)


def test_padded_vocab_is_ignored():
    """Rows past the real vocabulary (embedding padding) take no part in the loss and get zero grad."""
    _, _, teacher, labels = make_batch(vocab=30)
    student = torch.randn(teacher.shape[0], 30, requires_grad=True)
    padded_student = F.pad(student, (0, 6), value=5.0)
    padded_teacher = F.pad(teacher, (0, 2), value=-3.0)
    spec = LossSpec(kind="reverse_kl", temperature=1.0, alpha=0.5, chunk_size=16, vocab_size=30)
    ours = distillation_loss(padded_student, DenseTeacher(padded_teacher), labels, spec).loss
    plain = plain_objective(student, teacher, labels, "reverse_kl", 0.5, 1.0, 0.5)
    torch.testing.assert_close(ours, plain, rtol=1e-5, atol=1e-6)
    (grad,) = torch.autograd.grad(ours, student)
    torch.testing.assert_close(grad, torch.autograd.grad(plain, student)[0], rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("num_items", [None, 17])
@pytest.mark.parametrize("fused", [False, True])
def test_all_masked_micro_batch_gives_zero_loss_and_exact_zero_gradients(fused, num_items):
    """Under DDP every rank must step: an empty micro-batch still sends (zero) gradients everywhere."""
    hidden, weight, teacher, _ = make_batch()
    labels = torch.full((hidden.shape[0],), -100)
    bias = torch.randn(weight.shape[0], requires_grad=True)
    weight.requires_grad_(True)
    student = hidden if fused else torch.randn_like(teacher)
    student.requires_grad_(True)
    head = {"lm_head_weight": weight, "lm_head_bias": bias} if fused else {}
    spec = LossSpec(kind="forward_kl", alpha=0.5, chunk_size=8)
    output = distillation_loss(student, DenseTeacher(teacher), labels, spec, num_items_in_batch=num_items, **head)
    assert output.num_tokens == 0
    assert float(output.loss.detach()) == 0.0 and float(output.distill_sum) == 0.0 and float(output.ce_sum) == 0.0
    inputs = (student, weight, bias) if fused else (student,)
    for grad, tensor in zip(torch.autograd.grad(output.loss, inputs), inputs, strict=True):
        assert torch.equal(grad, torch.zeros_like(tensor))
    with pytest.raises(ValueError, match="-100"):
        divergence(torch.randn_like(teacher), teacher, labels)


def test_inplace_logits_gradient_with_masked_rows_and_padded_vocab():
    """The logits buffer may hold its own gradient: masked rows and padding columns end exactly zero."""
    _, _, teacher, labels = make_batch(vocab=30)
    student = torch.randn(teacher.shape[0], 30, requires_grad=True)
    padded = F.pad(student, (0, 6), value=5.0)
    spec = LossSpec(kind="forward_kl", alpha=0.5, chunk_size=7, vocab_size=30)
    ours = distillation_loss(padded, DenseTeacher(teacher), labels, spec, inplace_grad=True).loss
    plain = plain_objective(student, teacher, labels, "forward_kl", 0.5, 1.0, 0.5)
    torch.testing.assert_close(ours, plain, rtol=1e-5, atol=1e-6)
    (grad,) = torch.autograd.grad(ours, student)
    torch.testing.assert_close(grad, torch.autograd.grad(plain, student)[0], rtol=1e-5, atol=1e-7)
    assert torch.equal(padded[:, 30:], torch.zeros(teacher.shape[0], 6))
    assert torch.equal(padded[labels == -100], torch.zeros(int((labels == -100).sum()), 36))


def all_signals(teacher_logits: torch.Tensor) -> dict[str, object]:
    teacher_hidden, teacher_weight = torch.randn(teacher_logits.shape[0], 9), torch.randn(teacher_logits.shape[1], 9)
    return {
        "dense": DenseTeacher(teacher_logits),
        "fused": FusedTeacher(teacher_hidden, teacher_weight),
        "topk": topk_signal(teacher_logits, 6, 1.0),
        "sampled": sampled_signal(teacher_logits, 8, 1.0),
    }


@pytest.mark.parametrize("signal_name", ["dense", "fused", "topk", "sampled"])
@pytest.mark.parametrize("fused", [False, True])
def test_compacted_teacher_signal_equals_aligned_signal(signal_name, fused):
    """A cache stores teacher rows for labelled positions only: those signals are not filtered again."""
    hidden, weight, teacher, labels = make_batch(vocab=40)
    signal = all_signals(teacher)[signal_name]
    compacted = signal.take(labels != -100)
    assert signal.num_rows == labels.shape[0] and compacted.num_rows == int((labels != -100).sum())
    weight.requires_grad_(True)
    spec = LossSpec(kind="forward_kl", alpha=0.5, chunk_size=7)
    results = []
    for teacher_signal in (signal, compacted):
        student = (hidden if fused else hidden @ weight.detach().t()).clone().requires_grad_(True)
        head = {"lm_head_weight": weight} if fused else {}
        loss = distillation_loss(student, teacher_signal, labels, spec, **head).loss
        results.append((loss, *torch.autograd.grad(loss, (student, weight) if fused else (student,))))
    for aligned, compact in zip(*results, strict=True):
        torch.testing.assert_close(compact, aligned, rtol=1e-6, atol=1e-7)


def test_teacher_signal_with_other_row_count_is_refused():
    _, _, teacher, labels = make_batch()
    with pytest.raises(ValueError, match="rows"):
        distillation_loss(torch.randn_like(teacher), DenseTeacher(teacher[:5]), labels, LossSpec())


class RecordedOps(TorchDispatchMode):
    """Every aten op run inside, with the shapes and dtypes of the tensors it allocated (views excluded)."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: list[tuple[str, list[tuple[tuple[int, ...], torch.dtype]]]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        flat = out if isinstance(out, (tuple, list)) else [out]
        made = [] if func.is_view else [(tuple(t.shape), t.dtype) for t in flat if isinstance(t, torch.Tensor)]
        self.ops.append((str(func), made))
        return out

    def matmuls(self) -> int:
        return sum(1 for name, _ in self.ops if name.split(".")[1] in ("mm", "addmm", "addmm_"))

    def made(self, shape: tuple[int, ...]) -> bool:
        return any(output_shape == shape for _, outputs in self.ops for output_shape, _ in outputs)


@pytest.mark.parametrize("kind", ["forward_kl", "jsd"])
@pytest.mark.parametrize("fused", [False, True])
def test_evaluation_computes_values_only(kind, fused):
    """Under no_grad (Trainer.evaluate / predict): same values, no gradient buffer, no gradient matmul."""
    hidden, weight, teacher, labels = make_batch(n=48, vocab=41, hidden=13)
    weight.requires_grad_(True)
    hidden.requires_grad_(True)
    spec = LossSpec(kind=kind, beta=0.3, alpha=0.5, chunk_size=8)

    def run():
        student = hidden if fused else hidden @ weight.t()
        head = {"lm_head_weight": weight} if fused else {}
        return distillation_loss(student, DenseTeacher(teacher), labels, spec, **head)

    trained = run()
    with torch.no_grad(), RecordedOps() as recorded:
        evaluated = run()
    for name in ("loss", "distill_sum", "ce_sum"):
        torch.testing.assert_close(getattr(evaluated, name), getattr(trained, name).detach(), rtol=0, atol=0)
    assert not evaluated.loss.requires_grad
    assert not recorded.made(tuple(weight.shape)), "a [V, H] gradient buffer was allocated"
    assert not recorded.made(tuple(hidden.shape)) or not fused, "an [N, H] gradient buffer was allocated"
    chunks = math.ceil(int((labels != -100).sum()) / 8)
    assert recorded.matmuls() == (chunks if fused else 1)  # the logits of each chunk (or the whole), nothing else


@pytest.mark.parametrize(
    "field,kwargs",
    [
        ("kind", {"kind": "kl"}),
        ("temperature", {"temperature": 0.0}),
        ("alpha", {"alpha": 1.5}),
        ("beta", {"kind": "jsd", "beta": 1.0}),
        ("beta", {"kind": "skew_kl", "beta": 1.0}),
    ],
)
def test_invalid_spec_names_the_field(field, kwargs):
    with pytest.raises(ValueError, match=field):
        LossSpec(**kwargs)


def topk_signal(teacher_logits: torch.Tensor, k: int, temperature: float) -> TopKTeacher:
    log_p = torch.log_softmax(teacher_logits / temperature, -1)
    values, ids = log_p.topk(k, dim=-1)
    tail = torch.log1p(-values.exp().sum(-1).clamp(max=1 - 1e-7))
    return TopKTeacher(ids, values, tail)


@pytest.mark.parametrize("kind", DIVERGENCES)
def test_topk_loss_equals_plain_bucketed_divergence(kind):
    _, _, teacher, labels = make_batch(vocab=40)
    student = torch.randn_like(teacher, requires_grad=True)
    k, temperature = 6, 1.5
    signal = topk_signal(teacher, k, temperature)
    spec = LossSpec(kind=kind, beta=BETA[kind], temperature=temperature, alpha=1.0, chunk_size=9)
    ours = distillation_loss(student, signal, labels, spec).loss

    valid = labels != -100
    log_q = torch.log_softmax(student[valid] / temperature, -1)
    ids = signal.ids[valid]
    q_top = log_q.gather(-1, ids).exp()
    in_top = torch.zeros_like(log_q, dtype=torch.bool).scatter(-1, ids, True)
    q_tail = (log_q.exp() * (~in_top)).sum(-1, keepdim=True)
    p_buckets = torch.cat([signal.logprobs[valid].exp(), signal.tail_logprob[valid].exp()[:, None]], -1)
    q_buckets = torch.cat([q_top, q_tail], -1)
    plain = plain_divergence(p_buckets.log(), q_buckets.log(), kind, BETA[kind]).mean() * temperature**2
    torch.testing.assert_close(ours, plain, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(
        torch.autograd.grad(ours, student)[0], torch.autograd.grad(plain, student)[0], rtol=1e-4, atol=1e-7
    )


def sampled_signal(teacher: torch.Tensor, k: int, temperature: float, seed: int = 0) -> SampledTeacher:
    """k draws per row stored as unique ids with counts (padding slots: id 0, count 0)."""
    log_p = torch.log_softmax(teacher / temperature, -1)
    draws = torch.multinomial(log_p.exp(), k, replacement=True, generator=torch.Generator().manual_seed(seed))
    counts = torch.zeros_like(log_p).scatter_add_(-1, draws, torch.ones_like(draws, dtype=log_p.dtype))
    counts, ids = counts.topk(k, dim=-1)
    ids = torch.where(counts > 0, ids, torch.zeros_like(ids))
    return SampledTeacher(ids, counts, log_p.gather(-1, ids))


@pytest.mark.parametrize("mode", ["topk", "sampled"])
@pytest.mark.parametrize(("temperature", "alpha"), [(1.0, 1.0), (1.0, 0.5), (2.0, 0.5), (0.5, 0.8)])
@pytest.mark.parametrize("fused", [False, True])
def test_cache_signals_closed_form_equals_plain_autograd(mode, temperature, alpha, fused):
    """The in-place forward-KL gradient of top-k and sampled signals equals autograd through the formula."""
    hidden, weight, teacher, labels = make_batch(vocab=40)
    signal = topk_signal(teacher, 6, temperature) if mode == "topk" else sampled_signal(teacher, 8, temperature)
    hidden.requires_grad_(True)
    weight.requires_grad_(True)
    spec = LossSpec(kind="forward_kl", temperature=temperature, alpha=alpha, chunk_size=7)
    if fused:
        ours = distillation_loss(hidden, signal, labels, spec, lm_head_weight=weight).loss
    else:
        ours = distillation_loss(hidden @ weight.t(), signal, labels, spec).loss

    valid = labels != -100
    logits = (hidden @ weight.t())[valid]
    kept = signal.take(valid)
    if mode == "topk":
        log_q = torch.log_softmax(logits / temperature, -1)
        in_top = torch.zeros_like(log_q, dtype=torch.bool).scatter(-1, kept.ids, True)
        q_buckets = torch.cat([log_q.gather(-1, kept.ids).exp(), (log_q.exp() * ~in_top).sum(-1, keepdim=True)], -1)
        p_buckets = torch.cat([kept.logprobs.exp(), kept.tail_logprob.exp()[:, None]], -1)
        distill = plain_divergence(p_buckets.log(), q_buckets.log(), "forward_kl", 0.5)
    else:
        weights = kept.counts / kept.counts.sum(-1, keepdim=True)
        log_q_drawn = torch.log_softmax(logits / temperature, -1).gather(-1, kept.ids)
        distill = (weights * (kept.logprobs - log_q_drawn)).sum(-1)
    plain = alpha * distill.mean() * temperature**2 + (1 - alpha) * F.cross_entropy(logits, labels[valid])
    torch.testing.assert_close(ours, plain, rtol=1e-5, atol=1e-6)
    ours_grads = torch.autograd.grad(ours, (hidden, weight))
    plain_grads = torch.autograd.grad(plain, (hidden, weight))
    for mine, reference in zip(ours_grads, plain_grads, strict=True):
        torch.testing.assert_close(mine, reference, rtol=1e-4, atol=1e-6)


def test_topk_with_full_vocabulary_is_exact_forward_kl():
    _, _, teacher, labels = make_batch(vocab=16)
    student = torch.randn_like(teacher)
    signal = topk_signal(teacher, 16, 1.0)
    signal = TopKTeacher(signal.ids, signal.logprobs, torch.full_like(signal.tail_logprob, -1e4))
    spec = LossSpec(kind="forward_kl", alpha=1.0)
    ours = distillation_loss(student, signal, labels, spec).loss
    torch.testing.assert_close(ours, divergence(student, teacher, labels), rtol=1e-4, atol=1e-5)


def test_sampled_estimator_is_unbiased_for_the_gradient():
    """Averaged over many sampled caches, the sampled gradient converges to the dense forward-KL one."""
    vocab, n, k, draws = 12, 6, 8, 3000
    teacher = torch.randn(n, vocab) * 2
    student = torch.randn(n, vocab, requires_grad=True)
    log_p = torch.log_softmax(teacher, -1)
    samples = torch.multinomial(log_p.exp(), k * draws, replacement=True).view(n, draws, k)
    counts = torch.zeros(n, draws, vocab).scatter_add_(-1, samples, torch.ones(n, draws, k))
    counts, ids = counts.topk(k, dim=-1)  # unique ids with counts, padded with count 0
    signal = SampledTeacher(ids.flatten(0, 1), counts.flatten(0, 1), log_p.gather(-1, ids.flatten(1)).view(-1, k))
    rows = student.repeat_interleave(draws, dim=0)  # each draw is one cached copy of each position
    labels = torch.zeros(n * draws, dtype=torch.long)
    spec = LossSpec(kind="forward_kl", alpha=1.0, chunk_size=512)
    sampled_grad = torch.autograd.grad(distillation_loss(rows, signal, labels, spec).loss, student)[0]
    dense_grad = torch.autograd.grad(divergence(student, teacher, torch.zeros(n, dtype=torch.long)), student)[0]
    torch.testing.assert_close(sampled_grad, dense_grad, rtol=0, atol=0.01)


def test_sampled_rejects_other_divergences():
    ids = torch.zeros(4, 2, dtype=torch.long)
    signal = SampledTeacher(ids, torch.ones(4, 2), torch.zeros(4, 2))
    with pytest.raises(ValueError, match="forward_kl"):
        distillation_loss(torch.randn(4, 5), signal, torch.zeros(4, dtype=torch.long), LossSpec(kind="tvd"))


def test_gradient_accumulation_invariance_with_variable_length_rows():
    """One batch of 8 rows == 4 micro-batches of 2 when normalised by num_items_in_batch."""
    vocab, hidden = 23, 10
    lengths = [3, 9, 5, 12, 2, 7, 11, 4]
    weight = torch.randn(vocab, hidden, requires_grad=True)
    rows = [torch.randn(length, hidden) for length in lengths]
    teachers = [torch.randn(length, vocab) for length in lengths]
    labels = [torch.randint(0, vocab, (length,)) for length in lengths]
    spec = LossSpec(kind="forward_kl", alpha=0.5, temperature=2.0, chunk_size=5)

    def loss_of(indices, num_items):
        h = torch.cat([rows[i] for i in indices])
        t = DenseTeacher(torch.cat([teachers[i] for i in indices]))
        y = torch.cat([labels[i] for i in indices])
        return distillation_loss(h, t, y, spec, lm_head_weight=weight, num_items_in_batch=num_items).loss

    total_tokens = sum(lengths)
    (full,) = torch.autograd.grad(loss_of(range(8), None), weight)
    accumulated = torch.zeros_like(weight)
    for start in range(0, 8, 2):
        accumulated += torch.autograd.grad(loss_of(range(start, start + 2), total_tokens), weight)[0]
    torch.testing.assert_close(accumulated, full, rtol=1e-5, atol=1e-7)


def test_cross_entropy_alone_needs_no_teacher():
    hidden, weight, _, labels = make_batch()
    weight.requires_grad_(True)
    for temperature in (1.0, 3.0):  # T only tempers the distillation term
        spec = LossSpec(alpha=0.0, temperature=temperature, chunk_size=6)
        ours = distillation_loss(hidden, None, labels, spec, lm_head_weight=weight).loss
        plain = F.cross_entropy(hidden @ weight.t(), labels)
        torch.testing.assert_close(ours, plain, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(torch.autograd.grad(ours, weight)[0], torch.autograd.grad(plain, weight)[0])
    with pytest.raises(ValueError, match="alpha"):
        distillation_loss(hidden, None, labels, LossSpec(alpha=0.5), lm_head_weight=weight)


@pytest.mark.parametrize("chunk_size", [64, 512])
def test_loss_value_does_not_drift_with_chunk_size_at_large_vocab(chunk_size):
    """Sums over [chunk, vocab] must not lose precision (a BLAS dot in fp32 did, by ~1e-4)."""
    student, teacher = torch.randn(512, 3000), torch.randn(512, 3000)
    labels = torch.randint(0, 3000, (512,))
    spec = LossSpec(kind="forward_kl", alpha=1.0, chunk_size=chunk_size)
    ours = distillation_loss(student, DenseTeacher(teacher), labels, spec).loss
    torch.testing.assert_close(ours, divergence(student, teacher, labels), rtol=1e-6, atol=0)


def test_automatic_chunk_bounds_the_buffer_size_whatever_the_vocabulary():
    spec = LossSpec()
    for vocab in (8192, 32000, 50257, 152064):
        rows = spec.rows_per_chunk(vocab)
        assert rows & (rows - 1) == 0 and rows * vocab <= CHUNK_ELEMENTS
        assert spec.rows_per_chunk(vocab, hidden=4096, device="cpu") == rows  # CPU: today's rule
    assert spec.rows_per_chunk(32000) == 128
    assert LossSpec(chunk_size=7).rows_per_chunk(32000) == 7
    assert LossSpec(chunk_size=7).rows_per_chunk(32000, hidden=4096, device="cuda") == 7


@pytest.mark.parametrize(("hidden", "rows"), [(None, 256), (896, 256), (3584, 512), (4096, 1024), (16384, 2048)])
def test_accelerator_chunk_rule(hidden, rows):
    """H / 4 rows as a power of two within ACCELERATOR_CHUNK_ROWS, whatever the vocabulary."""
    low, high = ACCELERATOR_CHUNK_ROWS
    for vocab in (32000, 151936):
        assert LossSpec().rows_per_chunk(vocab, hidden=hidden, device=torch.device("cuda")) == rows
    assert low <= rows <= high


@pytest.mark.parametrize(
    ("n", "hidden", "vocab", "device"),
    [(600, 24, 8192, "cpu"), (300, 16, 50000, "cpu"), (70, 8, 262144, "cpu"), (700, 1024, 512, "cuda")],
)
def test_automatic_chunks_equal_the_reference(n, hidden, vocab, device):
    """Several automatic chunks per batch at several (N, H, V); the accelerator rule is run on CPU rows."""
    hidden_states, weight, teacher, labels = make_batch(n=n, vocab=vocab, hidden=hidden)
    hidden_states.requires_grad_(True)
    weight.requires_grad_(True)
    rows = LossSpec().rows_per_chunk(vocab, hidden=hidden, device=device)
    assert rows < n
    spec = LossSpec(kind="forward_kl", alpha=0.5, chunk_size=None if device == "cpu" else rows)
    ours = distillation_loss(hidden_states, DenseTeacher(teacher), labels, spec, lm_head_weight=weight).loss
    plain = plain_objective(hidden_states @ weight.t(), teacher, labels, "forward_kl", 0.5, 1.0, 0.5)
    torch.testing.assert_close(ours, plain, rtol=1e-5, atol=1e-6)
    for mine, reference in zip(
        torch.autograd.grad(ours, (hidden_states, weight)),
        torch.autograd.grad(plain, (hidden_states, weight)),
        strict=True,
    ):
        torch.testing.assert_close(mine, reference, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize(("n", "chunk_size", "accumulates_in"), [(256, 32, torch.bfloat16), (512, 16, torch.float32)])
def test_low_precision_head_gradient_accumulates_in_its_dtype_only_over_few_chunks(n, chunk_size, accumulates_in):
    """A bf16 lm_head's gradient stays bf16 over <= LOW_PRECISION_MAX_CHUNKS chunks, fp32 beyond; both within
    bf16 rounding of the exact gradient of the same bf16 inputs."""
    hidden, weight, teacher, labels = make_batch(n=n, vocab=64, hidden=16, dtype=torch.bfloat16)
    weight.requires_grad_(True)
    spec = LossSpec(kind="forward_kl", alpha=0.5, chunk_size=chunk_size)
    with RecordedOps() as recorded:
        loss = distillation_loss(hidden, DenseTeacher(teacher), labels, spec, lm_head_weight=weight).loss
    seen = [
        dtype
        for name, outputs in recorded.ops
        if name.startswith("aten.zeros")
        for shape, dtype in outputs
        if shape == tuple(weight.shape)
    ]
    assert seen == [accumulates_in]
    (grad,) = torch.autograd.grad(loss, weight)
    exact_weight = weight.detach().double().requires_grad_(True)
    exact = plain_objective(hidden.double() @ exact_weight.t(), teacher.double(), labels, "forward_kl", 0.5, 1.0, 0.5)
    (reference,) = torch.autograd.grad(exact, exact_weight)
    assert grad.dtype == torch.bfloat16
    assert (grad.double() - reference).norm() / reference.norm() < 2e-2


def test_logits_path_on_the_models_own_buffer_needs_no_shifted_copy():
    """Full [B, L, V] logits as a view, next-token labels padded with -100 at each row's end: the loss
    gathers labelled rows per chunk and writes the gradient into the logits buffer (no [B*(L-1), V] copy)."""
    batch, length, vocab, hidden = 3, 9, 29, 7
    weight = torch.randn(vocab, hidden, requires_grad=True)
    states = torch.randn(batch, length, hidden)
    teacher = torch.randn(batch, length, vocab)
    labels = torch.randint(0, vocab, (batch, length))
    labels[0, :4] = -100
    spec = LossSpec(kind="forward_kl", alpha=0.5, chunk_size=5)

    logits = states @ weight.t()
    next_labels = F.pad(labels[:, 1:], (0, 1), value=-100).reshape(-1)
    rows = logits.view(-1, vocab)
    ours = distillation_loss(rows, DenseTeacher(teacher.view(-1, vocab)), next_labels, spec, inplace_grad=True).loss
    (grad,) = torch.autograd.grad(ours, weight)

    shifted = (states @ weight.t())[:, :-1].reshape(-1, vocab)
    plain = plain_objective(
        shifted, teacher[:, :-1].reshape(-1, vocab), labels[:, 1:].reshape(-1), "forward_kl", 0.5, 1.0, 0.5
    )
    torch.testing.assert_close(ours, plain, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grad, torch.autograd.grad(plain, weight)[0], rtol=1e-5, atol=1e-6)


def test_inputs_without_grad_compute_values_only_even_in_grad_mode():
    hidden, weight, teacher, labels = make_batch(n=24, vocab=19, hidden=5)
    spec = LossSpec(kind="forward_kl", alpha=0.5, chunk_size=8)
    with RecordedOps() as recorded:
        output = distillation_loss(hidden, DenseTeacher(teacher), labels, spec, lm_head_weight=weight)
    assert torch.is_grad_enabled() and not output.loss.requires_grad
    assert not recorded.made(tuple(weight.shape)) and recorded.matmuls() == math.ceil(int((labels != -100).sum()) / 8)


@pytest.mark.parametrize("kind", ["forward_kl", "jsd"])
@pytest.mark.parametrize("path", ["fused", "logits", "inplace_logits", "values_only"])
def test_entropy_and_accuracy_sums_equal_a_dense_computation(kind, path):
    """SFTTrainer's metrics from each chunk (before the loss overwrites it), over the real vocabulary."""
    hidden, weight, teacher, labels = make_batch(vocab=30)
    logits = hidden @ weight.t()
    labels[1::3] = logits[1::3].argmax(-1)  # some right, some wrong
    spec = LossSpec(kind=kind, beta=BETA[kind], temperature=2.0, chunk_size=7, vocab_size=30)
    padded = F.pad(logits, (0, 6), value=50.0)  # padding columns would win every argmax
    if path == "fused":
        output = distillation_loss(
            hidden, DenseTeacher(teacher), labels, spec, lm_head_weight=weight.requires_grad_(True)
        )
    elif path == "values_only":
        output = distillation_loss(padded, DenseTeacher(teacher), labels, spec)
    else:
        output = distillation_loss(
            padded.requires_grad_(True), DenseTeacher(teacher), labels, spec, inplace_grad=path == "inplace_logits"
        )
    valid = labels != -100
    dense = logits[valid].detach()
    entropy = -(F.softmax(dense, -1) * F.log_softmax(dense, -1)).sum()
    correct = (dense.argmax(-1) == labels[valid]).sum()
    assert 0 < correct < valid.sum()
    torch.testing.assert_close(output.entropy_sum, entropy, rtol=1e-5, atol=1e-5)
    assert float(output.num_correct) == float(correct)
