"""On-policy distillation (GKD, Agarwal et al., ICLR 2024): micro-batches whose completions are sampled
from the student (probability ``lmbda``) or, with ``seq_kd``, from the teacher, before the loss runs.

:class:`OnPolicyBatches` replaces the completions of the micro-batches of each optimizer step as the
Trainer fetches them (``get_batch_samples``), so the token count the loss is normalised by
(``num_items_in_batch``) counts the generated tokens. A new micro-batch keeps the row's prompt, its
completion is the sampled one up to and including the first EOS, and only the completion is labelled.
The loss is then the off-policy path's (chunked / fused, every divergence), except that a micro-batch the
student sampled is scored by the divergence alone (GKD has no cross-entropy term: on its own samples it
would reinforce them); dataset and teacher-sampled micro-batches keep alpha * divergence + (1 - alpha) * CE.

Sampling reads only our settings (``OnPolicySettings``): generate fills what a given config leaves unset
from ``model.generation_config``, so while sampling that is replaced by ours, and a model's shipped
defaults (repetition_penalty, suppress_tokens, num_return_sequences ...) never reach the samples.

Reproducible by construction: whether a micro-batch is on-policy is drawn from (seed, step, micro-step),
the same on every rank and in a resumed run; the sampling itself runs under a generator forked from
(seed, step, micro-step, rank), so each rank samples its own rows, and a resumed run samples as the
uninterrupted one did.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn
from torch.nn.utils.rnn import pad_sequence
from transformers import GenerationConfig, LogitsProcessor, LogitsProcessorList, TrainerCallback

from hf_capgap.data import IGNORE_INDEX
from hf_capgap.data.sft import PROMPT_IDS_KEY, PROMPT_LENGTHS_KEY, STUDENT_SAMPLED_KEY
from hf_capgap.errors import ConfigError

_DRAW, _SAMPLE = 0, 1  # the two random streams derived from (seed, step, micro-step)


def draw_on_policy(seed: int, step: int, micro_step: int, lmbda: float) -> bool:
    """Whether micro-batch ``micro_step`` of optimizer step ``step`` is sampled from the student: a uniform
    draw < ``lmbda`` from a generator seeded by (seed, step, micro-step) alone, never the global RNG."""
    if lmbda <= 0.0:
        return False
    if lmbda >= 1.0:
        return True
    return float(np.random.default_rng([seed, step, micro_step, _DRAW]).random()) < lmbda


def _sampling_seed(seed: int, step: int, micro_step: int, rank: int) -> int:
    return int(np.random.default_rng([seed, step, micro_step, rank, _SAMPLE]).integers(2**62))


class RealVocabulary(LogitsProcessor):
    """Never sample a padded embedding row (ids past the tokenizer's vocabulary): they name no token, and
    the loss compares only the real vocabulary."""

    def __init__(self, size: int) -> None:
        self.size = size

    def __call__(self, input_ids: Tensor, scores: Tensor) -> Tensor:
        if scores.shape[-1] > self.size:
            scores[:, self.size :] = -float("inf")
        return scores


def eos_ids(tokenizer: Any, model: nn.Module) -> list[int]:
    """The tokens that end a completion: the tokenizer's EOS and any the sampling model's generation config
    names (a Llama 3 style end of turn; an instruct teacher's under seq_kd)."""
    ids = {tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set()
    configured = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids.update(configured if isinstance(configured, list) else [] if configured is None else [configured])
    return sorted(ids)


def left_padded(prompts: list[Tensor], pad_id: int) -> tuple[Tensor, Tensor]:
    """Prompts of unequal length as one left-padded batch and its attention mask (generate appends on the right)."""
    ids = pad_sequence(prompts, batch_first=True, padding_value=pad_id, padding_side="left")
    mask = pad_sequence([torch.ones_like(p) for p in prompts], batch_first=True, padding_value=0, padding_side="left")
    return ids, mask


def cut_after_eos(completion: Tensor, eos: Tensor) -> Tensor:
    """The completion up to and including its first EOS (what generate pads it with after is dropped)."""
    hits = torch.isin(completion, eos).nonzero()
    return completion if hits.numel() == 0 else completion[: int(hits[0]) + 1]


def completion_batch(prompts: list[Tensor], completions: list[Tensor], pad_id: int, like: dict) -> dict[str, Tensor]:
    """Right-padded rows of prompt + completion, labelled on the completion only (as the off-policy rows
    TRL prepares, so positions need no left-padding offsets); ``position_ids`` when ``like`` had them."""
    rows = [torch.cat([p, c]) for p, c in zip(prompts, completions, strict=True)]
    labels = [torch.cat([torch.full_like(p, IGNORE_INDEX), c]) for p, c in zip(prompts, completions, strict=True)]
    batch = {
        "input_ids": pad_sequence(rows, batch_first=True, padding_value=pad_id),
        "attention_mask": pad_sequence([torch.ones_like(r) for r in rows], batch_first=True, padding_value=0),
        "labels": pad_sequence(labels, batch_first=True, padding_value=IGNORE_INDEX),
    }
    if "position_ids" in like:
        positions = [torch.arange(len(r), device=r.device) for r in rows]
        batch["position_ids"] = pad_sequence(positions, batch_first=True, padding_value=0)
    return batch


def sampling_config(args: Any, pad_id: int, eos: list[int], max_new_tokens: int) -> GenerationConfig:
    """Plain multinomial sampling with our settings alone: one sequence per prompt, no beams, KV cache on."""
    return GenerationConfig(
        max_new_tokens=max_new_tokens,
        do_sample=True,
        temperature=args.sampling_temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        num_beams=1,
        num_return_sequences=1,
        pad_token_id=pad_id,
        eos_token_id=eos,
        use_cache=True,
    )


@contextlib.contextmanager
def _only_config(model: nn.Module, config: GenerationConfig) -> Iterator[None]:
    """``config`` as the ``generation_config`` of every module of ``model`` that has one (a PEFT wrapper's base
    model included), their own back after: transformers' generate fills every field a passed config leaves
    unset from ``model.generation_config``."""
    owners = [m for m in model.modules() if isinstance(vars(m).get("generation_config"), GenerationConfig)]
    own = [m.generation_config for m in owners]
    for module in owners:
        module.generation_config = config
    try:
        yield
    finally:
        for module, saved in zip(owners, own, strict=True):
            module.generation_config = saved


def completion_budget(args: Any, prompts: list[Tensor]) -> int:
    """Tokens to generate for a micro-batch: ``max_completion_length``, capped so that its longest prompt plus
    the completion fit ``max_length`` (TRL has cut prompts to it already)."""
    if args.max_length is None:
        return args.max_completion_length
    room = args.max_length - max(len(p) for p in prompts)
    if room < 1:
        raise ConfigError(
            f"a prompt of {max(len(p) for p in prompts)} tokens leaves no room to generate within "
            f"max_length={args.max_length}: raise max_length or shorten prompts."
        )
    return min(args.max_completion_length, room)


@contextlib.contextmanager
def _checkpointing_restored(model: nn.Module, kwargs: dict[str, Any] | None) -> Iterator[None]:
    """Gradient checkpointing as it was, also after an exception inside generate (TRL's unwrap turns it off
    and back on without a ``finally``: a caller that catches an OOM would train on without it)."""
    was_on = bool(getattr(model, "is_gradient_checkpointing", False))
    try:
        yield
    finally:
        if was_on and not getattr(model, "is_gradient_checkpointing", False):
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


@contextlib.contextmanager
def _eval_mode(model: nn.Module) -> Iterator[None]:
    """Dropout off while sampling (as inference runs), the previous mode back after."""
    training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(training)


@contextlib.contextmanager
def _seeded(seed: int, device: torch.device) -> Iterator[None]:
    """The global RNG of the CPU and ``device`` seeded with ``seed`` inside, and as it was outside."""
    devices = [] if device.type == "cpu" else [device.index if device.index is not None else 0]
    with torch.random.fork_rng(devices=devices, device_type=device.type):
        torch.manual_seed(seed)
        yield


class OnPolicyBatches(TrainerCallback):
    """Samples completions for the micro-batches of each optimizer step, and counts what the logs show:
    ``on_policy_share`` (micro-batches sampled from the student), ``completion_length`` (mean generated
    tokens per completion, student's or teacher's) and ``generation_time_share`` (the share of the steps'
    wall time spent generating). A callback, to close each step's wall time at ``on_step_end``."""

    def __init__(self, args: Any, tokenizer: Any, student: nn.Module, vocab_size: int, metric_sums: Any) -> None:
        self.args = args
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        self.tokenizer = tokenizer
        self.processors = LogitsProcessorList([RealVocabulary(vocab_size)])
        self.metric_sums = metric_sums
        self._step_started: float | None = None

    def replace(self, batches: list[dict[str, Any]], trainer: Any) -> list[dict[str, Any]]:
        """The step's micro-batches, each drawn on- or off-policy (a student-sampled one marked with
        ``STUDENT_SAMPLED_KEY``); the prompts dropped from every one."""
        self._step_started = time.perf_counter()
        step, seconds, on_policy, tokens, completions = trainer.state.global_step, 0.0, 0, 0, 0
        replaced = []
        for micro_step, batch in enumerate(batches):
            prompt_lengths, prompt_ids = batch.pop(PROMPT_LENGTHS_KEY).tolist(), batch.pop(PROMPT_IDS_KEY)
            from_student = draw_on_policy(self.args.seed, step, micro_step, self.args.lmbda)
            model = trainer.model_wrapped if from_student else trainer.teacher if self.args.seq_kd else None
            if model is None:
                replaced.append(batch)
                continue
            prompts = [row[:length] for row, length in zip(prompt_ids, prompt_lengths, strict=True)]
            started = time.perf_counter()
            seed = _sampling_seed(self.args.seed, step, micro_step, trainer.accelerator.process_index)
            sampled = self.sample(model, prompts, trainer.accelerator, seed)
            seconds += time.perf_counter() - started
            on_policy += from_student
            tokens += sum(len(c) for c in sampled)
            completions += len(sampled)
            replaced.append(completion_batch(prompts, sampled, self.pad_id, batch))
            if from_student:
                replaced[-1][STUDENT_SAMPLED_KEY] = torch.tensor(True, device=batch["input_ids"].device)
        self.metric_sums.add(
            "train",
            on_policy_micro_batches=on_policy,
            drawn_micro_batches=len(batches),
            completion_tokens=tokens,
            completions=completions,
            generation_seconds=seconds,
        )
        return replaced

    def sample(self, model: nn.Module, prompts: list[Tensor], accelerator: Any, seed: int) -> list[Tensor]:
        """One completion per prompt from ``model`` (the student as trained, or the teacher): unwrapped from
        DDP / DeepSpeed with gradient checkpointing off (TRL's ``unwrap_model_for_generation``), FSDP1
        parameters summoned, in eval mode, without gradients, KV cache on, prompts left-padded, with
        :func:`sampling_config` alone; each cut after its first EOS and at most :func:`completion_budget` long."""
        from trl.distributed import DistributedBackend
        from trl.models import unwrap_model_for_generation

        ids, mask = left_padded(prompts, self.pad_id)
        sampler = accelerator.unwrap_model(model)
        eos_list = eos_ids(self.tokenizer, sampler)  # read before its generation config is swapped out
        config = sampling_config(self.args, self.pad_id, eos_list, completion_budget(self.args, prompts))
        device = accelerator.device
        with (
            _checkpointing_restored(sampler, self.args.gradient_checkpointing_kwargs),
            unwrap_model_for_generation(
                model, accelerator, gradient_checkpointing_kwargs=self.args.gradient_checkpointing_kwargs
            ) as unwrapped,
            DistributedBackend(accelerator).summon_full_params(model, recurse=False),
            _eval_mode(unwrapped),
            _only_config(unwrapped, config),
            torch.no_grad(),
            _seeded(seed, device),
        ):
            sequences = unwrapped.generate(
                input_ids=ids.to(device),
                attention_mask=mask.to(device),
                generation_config=config,
                logits_processor=self.processors,
            )
        eos = torch.tensor(eos_list, device=sequences.device)
        return [cut_after_eos(row, eos) for row in sequences[:, ids.shape[1] :]]

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self._step_started is not None:
            self.metric_sums.add("train", step_seconds=time.perf_counter() - self._step_started)
            self._step_started = None
