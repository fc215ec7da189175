"""DistillationTrainer: transformers.Trainer with off-policy KL-on-logits distillation.

The teacher signal comes either from a frozen teacher model run alongside the student (online) or
from a :class:`hf_capgap.cache.TeacherCache` built once (no teacher in memory at all). The loss is
:func:`hf_capgap.losses.distillation_loss`: chunked, and fused with the lm_head where the model
allows, so neither side's [tokens, vocab] logits need to exist in full.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import torch
from torch import Tensor, nn
from transformers import AutoModelForCausalLM, PreTrainedModel, Trainer

from hf_capgap.collate import CausalLMCollator
from hf_capgap.config import DistillationConfig
from hf_capgap.lm_head import base_model, fusable_head, lm_head_bypassed
from hf_capgap.losses import (
    DenseTeacher,
    DistillationLossOutput,
    FusedTeacher,
    LossSpec,
    SampledTeacher,
    TeacherSignal,
    TopKTeacher,
    distillation_loss,
)

class _CacheOrPlainCollator:
    """Cache rows get the cache's collate (teacher signal included); plain rows, e.g. an evaluation
    set that was never cached, get the ordinary causal-LM collator."""

    def __init__(self, cache: Any, plain: CausalLMCollator) -> None:
        self.cache, self.plain = cache, plain

    def __call__(self, features: list[dict[str, Any]] | Any) -> dict[str, Tensor]:
        from hf_capgap.cache import SIGNAL_COLUMNS, CacheColumns

        if isinstance(features, CacheColumns) or all(c in features[0] for c in SIGNAL_COLUMNS[self.cache.mode]):
            return self.cache.collate(features)
        return self.plain(features)


def _load_causal_lm(model: PreTrainedModel | str, role: str) -> PreTrainedModel:
    if isinstance(model, str):
        return AutoModelForCausalLM.from_pretrained(model)
    if model is None:
        raise ValueError(f"{role} is required.")
    return model


class DistillationTrainer(Trainer):
    """Distill ``teacher_model`` (or a teacher cache) into ``model`` with KL on logits.

    Everything a :class:`transformers.Trainer` takes keeps working (callbacks, evaluation, saving,
    ``resume_from_checkpoint``, ``push_to_hub``, ``report_to``, ``processing_class``); a ``peft_config``
    wraps the student with PEFT. ``teacher_processing_class`` is checked against ``processing_class``.
    """

    def __init__(
        self,
        model: PreTrainedModel | str | None = None,
        teacher_model: PreTrainedModel | str | None = None,
        args: DistillationConfig | None = None,
        data_collator: Any = None,
        train_dataset: Any = None,
        eval_dataset: Any = None,
        processing_class: Any = None,
        peft_config: Any = None,
        teacher_processing_class: Any = None,
        **kwargs: Any,
    ) -> None:
        if not isinstance(args, DistillationConfig):
            raise ValueError("args must be a hf_capgap.DistillationConfig (it carries loss, alpha, temperature ...).")
        model = _load_causal_lm(model, "model (the student)")
        if peft_config is not None:
            from peft import get_peft_model

            model = get_peft_model(model, peft_config)
        pad_id = getattr(processing_class, "pad_token_id", None)
        plain_collator = CausalLMCollator(pad_token_id=pad_id if pad_id is not None else 0)
        self.teacher_cache = None
        if args.teacher_cache is not None:
            if teacher_model is not None:
                raise ValueError("pass either teacher_model or DistillationConfig.teacher_cache, not both.")
            train_dataset = self._open_cache(args, train_dataset, processing_class)
            data_collator = data_collator or _CacheOrPlainCollator(self.teacher_cache, plain_collator)
            vocab_size = self._check_vocab(model, None, processing_class, self.teacher_cache.manifest["vocab_size"])
        else:
            if teacher_model is None:
                raise ValueError(
                    "teacher_model is required: pass a causal LM (or a path), or set "
                    "DistillationConfig.teacher_cache to a cache built with TeacherCache.build."
                )
            teacher_model = _load_causal_lm(teacher_model, "teacher_model")
            self._check_tokenizers(processing_class, teacher_processing_class)
            vocab_size = self._check_vocab(model, teacher_model, processing_class, None)
        super().__init__(
            model=model,
            args=args,
            data_collator=data_collator or plain_collator,
            train_dataset=train_dataset,
            eval_dataset=eval_dataset,
            processing_class=processing_class,
            **kwargs,
        )
        # Our loss is normalised by num_items_in_batch, which makes gradient accumulation exact.
        self.model_accepts_loss_kwargs = True
        self.loss_spec = LossSpec(
            kind=args.loss,
            beta=args.beta,
            temperature=args.temperature,
            alpha=args.alpha,
            chunk_size=args.chunk_size,
            vocab_size=vocab_size,
        )
        self.teacher = None if teacher_model is None else self._prepare_teacher(teacher_model)
        self._parts: dict[str, Tensor] = {}

    # ------------------------------------------------------------------ set-up checks

    def _open_cache(self, args: DistillationConfig, train_dataset: Any, processing_class: Any) -> Any:
        """Open and check the cache; its rows (input ids + teacher signal) become the training set."""
        from hf_capgap.artifacts import dataset_fingerprint, tokenizer_fingerprint
        from hf_capgap.cache import CacheRows, TeacherCache

        self.teacher_cache = TeacherCache.load(
            args.teacher_cache,
            tokenizer_fingerprint=None if processing_class is None else tokenizer_fingerprint(processing_class),
            dataset_fingerprint=None if train_dataset is None else dataset_fingerprint(train_dataset),
            temperature=args.temperature,
        )
        return CacheRows(self.teacher_cache.dataset)

    @staticmethod
    def _check_tokenizers(student_tokenizer: Any, teacher_tokenizer: Any) -> None:
        if student_tokenizer is None or teacher_tokenizer is None:
            return
        from hf_capgap.artifacts import tokenizer_fingerprint

        if tokenizer_fingerprint(student_tokenizer) != tokenizer_fingerprint(teacher_tokenizer):
            raise ValueError(
                "teacher and student tokenizers differ "
                f"({getattr(teacher_tokenizer, 'name_or_path', '?')!r} vs "
                f"{getattr(student_tokenizer, 'name_or_path', '?')!r}): logit distillation needs one shared "
                "vocabulary. Use the teacher's tokenizer for the student (pruned students inherit it)."
            )

    @staticmethod
    def _check_vocab(student: nn.Module, teacher: nn.Module | None, tokenizer: Any, cache_vocab: int | None) -> int:
        """The real vocabulary size both sides are compared on; raise on a true mismatch.

        Models often pad their embedding matrix (e.g. 151936 vs 152064 rows for one tokenizer): only
        the first ``len(tokenizer)`` rows are real, so padding is not a mismatch.
        """
        student_vocab = base_model(student).get_output_embeddings().weight.shape[0]
        teacher_vocab = cache_vocab if teacher is None else teacher.get_output_embeddings().weight.shape[0]
        source = "the teacher cache" if teacher is None else "the teacher"
        if tokenizer is not None:
            real = len(tokenizer)
            for who, size in (("student", student_vocab), (source, teacher_vocab)):
                if size < real:
                    raise ValueError(
                        f"{who} has {size} output logits but the tokenizer "
                        f"{getattr(tokenizer, 'name_or_path', '')!r} has {real} tokens: they do not belong "
                        "together. Resize the model's embeddings or use the matching tokenizer."
                    )
            return real
        if student_vocab != teacher_vocab:
            raise ValueError(
                f"student vocab ({student_vocab}) and {source} vocab ({teacher_vocab}) differ. If one is only "
                "padded, pass processing_class=<the shared tokenizer> so the real vocabulary is compared; "
                "otherwise they use different tokenizers and cannot be distilled on logits."
            )
        return student_vocab

    def _prepare_teacher(self, teacher: PreTrainedModel) -> nn.Module:
        """Frozen, eval mode, in its own dtype; sharded for inference under ZeRO-3 / FSDP, never trained."""
        teacher.requires_grad_(False)
        teacher.eval()
        if self.args.teacher_dtype != "auto":
            teacher = teacher.to(getattr(torch, self.args.teacher_dtype))
        if self.is_deepspeed_enabled:
            from trl.models import prepare_deepspeed

            return prepare_deepspeed(teacher, self.accelerator)
        if self.is_fsdp_enabled:
            from trl.models import prepare_fsdp

            return prepare_fsdp(teacher, self.accelerator)
        return teacher.to(self.accelerator.device)

    def _set_signature_columns_if_needed(self) -> None:
        super()._set_signature_columns_if_needed()
        if self.teacher_cache is not None:
            extra = [c for c in self.teacher_cache.dataset.column_names if c not in self._signature_columns]
            self._signature_columns = [*self._signature_columns, *extra]

    def _get_collator_with_removed_columns(self, data_collator: Any, description: str | None = None) -> Any:
        # Cache batches arrive as whole columns (CacheColumns), and the cache's collate already keeps
        # only the model inputs and the teacher signal; a per-row column filter has nothing to do.
        if self.teacher_cache is not None:
            return data_collator
        return super()._get_collator_with_removed_columns(data_collator, description=description)

    # ------------------------------------------------------------------ loss

    def _sharded(self) -> bool:
        return self.is_fsdp_enabled or self.is_deepspeed_enabled

    def _forward_states(self, model: nn.Module, inputs: dict[str, Tensor]) -> tuple[Tensor, nn.Linear | None]:
        """Last hidden states and the lm_head to fuse, or logits and None."""
        head = fusable_head(self.accelerator.unwrap_model(model), self.args.fused_lm_head, self._sharded())
        call = {"input_ids": inputs["input_ids"], "attention_mask": inputs.get("attention_mask"), "use_cache": False}
        if head is None:
            return model(**call).logits, None
        with lm_head_bypassed(base_model(self.accelerator.unwrap_model(model)), head):
            return model(**call).logits, head

    def _teacher_signal(self, inputs: dict[str, Tensor]) -> TeacherSignal | None:
        """The teacher's view of positions [:, :-1], flattened to rows; None for an uncached eval batch."""
        if self.teacher_cache is not None:
            if not self.model.training and not any(key.startswith("teacher_") for key in inputs):
                return None
            return self._cached_signal(inputs)
        with torch.no_grad():
            states, head = self._forward_states(self.teacher, inputs)
        rows = states[:, :-1].reshape(-1, states.shape[-1])
        if head is None:
            return DenseTeacher(rows)
        return FusedTeacher(rows, head.weight, head.bias)

    @staticmethod
    def _cached_signal(inputs: dict[str, Tensor]) -> TeacherSignal:
        def flat(name: str) -> Tensor:
            value = inputs[name]
            return value.reshape(-1, *value.shape[2:])

        if "teacher_topk_ids" in inputs:
            return TopKTeacher(flat("teacher_topk_ids"), flat("teacher_topk_logprobs"), flat("teacher_tail_logprob"))
        if "teacher_sample_ids" in inputs:
            return SampledTeacher(
                flat("teacher_sample_ids"), flat("teacher_sample_counts"), flat("teacher_sample_logprobs")
            )
        if "teacher_logprobs" in inputs:
            return DenseTeacher(flat("teacher_logprobs"), tempered_logprobs=True)
        raise ValueError(
            "the batch carries no teacher signal (teacher_topk_* / teacher_sample_* / teacher_logprobs): "
            "use the cache's collate function, or pass teacher_model for an online teacher."
        )

    def compute_loss(
        self,
        model: nn.Module,
        inputs: dict[str, Tensor],
        return_outputs: bool = False,
        num_items_in_batch: Tensor | int | None = None,
    ) -> Tensor | tuple[Tensor, dict[str, Tensor]]:
        if "labels" not in inputs:
            raise ValueError(
                "the batch has no 'labels': use hf_capgap's CausalLMCollator (labels = input_ids with padding "
                "masked) or a collator that adds them."
            )
        labels = inputs["labels"][:, 1:].reshape(-1)
        if not bool((labels != -100).any()):
            raise ValueError(
                "every label in this batch is -100 (nothing to predict): drop empty or fully masked rows "
                "from the dataset, or check how labels are masked."
            )
        teacher = self._teacher_signal(inputs)
        states, head = self._forward_states(model, inputs)
        rows = states[:, :-1].reshape(-1, states.shape[-1])
        # Evaluating on rows that were never cached: only the LM cross-entropy can be measured.
        spec = self.loss_spec if teacher is not None else replace(self.loss_spec, alpha=0.0)
        output = distillation_loss(
            rows,
            teacher,
            labels,
            spec,
            lm_head_weight=None if head is None else head.weight,
            lm_head_bias=None if head is None else head.bias,
            num_items_in_batch=num_items_in_batch,
            inplace_grad=head is None and not rows._is_view(),
        )
        self._record_parts(output, spec)
        loss = output.loss
        if self.args.average_tokens_across_devices and num_items_in_batch is not None:
            # DDP averages gradients over processes while num_items_in_batch counts all of them.
            loss = loss * self.accelerator.num_processes
        return (loss, {"loss": loss.detach()}) if return_outputs else loss

    # ------------------------------------------------------------------ logging

    def _record_parts(self, output: DistillationLossOutput, spec: LossSpec) -> None:
        """Accumulate [distill sum, its tokens, CE sum, its tokens]; a part the loss skipped counts 0 tokens."""
        mode = "train" if self.model.training else "eval"
        tokens = float(output.num_tokens)
        step = torch.stack([
            output.distill_sum, output.distill_sum.new_tensor(tokens if spec.alpha > 0 else 0.0),
            output.ce_sum, output.ce_sum.new_tensor(tokens if spec.alpha < 1 else 0.0),
        ])
        self._parts[mode] = self._parts[mode] + step if mode in self._parts else step

    def log(self, logs: dict[str, float], *args: Any, **kwargs: Any) -> None:
        """Adds the distillation and cross-entropy parts (token-weighted means since the last log)."""
        mode = "eval" if any(key.startswith("eval_") for key in logs) else "train"
        if mode in self._parts:
            parts = self.accelerator.reduce(self._parts.pop(mode).to(self.args.device), "sum").tolist()
            prefix = "eval_" if mode == "eval" else ""
            for name, total, tokens in (("distill_loss", *parts[:2]), ("ce_loss", *parts[2:])):
                if tokens > 0:
                    logs[f"{prefix}{name}"] = round(total / tokens, 6)
        super().log(logs, *args, **kwargs)
