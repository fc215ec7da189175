"""DistillationTrainer: TRL's SFTTrainer with off-policy KL-on-logits distillation as its loss.

The teacher signal comes either from a frozen teacher model run alongside the student (online) or
from a :class:`hf_capgap.cache.TeacherCache` built once (no teacher in memory at all). The loss is
:func:`hf_capgap.losses.distillation_loss`: chunked, and fused with the lm_head where the model
allows, so neither side's [tokens, vocab] logits need to exist in full.
"""

from __future__ import annotations

import contextlib
import copy
import itertools
from collections.abc import Iterator
from dataclasses import replace
from typing import Any

import torch
import torch.nn.functional as F
from accelerate.utils import is_peft_model
from torch import Tensor, nn
from transformers import PreTrainedModel
from transformers.utils import logging
from trl import SFTTrainer

import hf_capgap.trainer.on_policy_data as prompt_data
from hf_capgap.data import TEACHER_KEY_PREFIX, check_dataset, forward_inputs, has_labelled_position, next_token_labels
from hf_capgap.data.sft import STUDENT_SAMPLED_KEY
from hf_capgap.errors import ConfigError
from hf_capgap.losses import TAID, DenseTeacher, FusedTeacher, LossSpec, TeacherSignal, distillation_loss
from hf_capgap.losses.lm_head import HeadChoice, choose_lm_head, head_sharding, lm_head_bypassed
from hf_capgap.models import check_same_vocabulary, load_frozen_teacher, teacher_in_dtype
from hf_capgap.trainer.config import DistillationConfig, check_sft_loss_fields
from hf_capgap.trainer.metrics import ExampleTokensCollator, MetricSums, repeated_positions
from hf_capgap.trainer.on_policy import OnPolicyBatches
from hf_capgap.trainer.settings import check_cache_serves_loss
from hf_capgap.trainer.setup import load_student, real_vocabulary, tokenizer_for
from hf_capgap.trainer.taid import TaidSchedule

logger = logging.get_logger(__name__)


class DistillationTrainer(SFTTrainer):
    """Distill ``teacher_model`` (or a teacher cache) into ``model`` with KL on logits.

    A ``trl.SFTTrainer``: it takes every dataset format SFTTrainer takes (``text``, ``messages``,
    prompt-completion, pre-tokenized) with the same knobs (packing, padding-free, completion- and
    assistant-only loss), and everything a ``transformers.Trainer`` takes keeps working (callbacks,
    evaluation, saving, ``resume_from_checkpoint``, ``push_to_hub``, ``report_to``). Only the loss
    differs. ``teacher_processing_class`` is checked against ``processing_class`` by vocabulary.
    """

    _tag_names = ["trl", "hf_capgap", "distillation"]
    _name = "Distillation"

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
        formatting_func: Any = None,
        **kwargs: Any,
    ) -> None:
        self._check_arguments(args, kwargs)
        model = load_student(model, args.model_init_kwargs)
        processing_class = tokenizer_for(model, processing_class)
        # Every check that needs no teacher weights runs before the teacher loads.
        train_dataset = self._choose_teacher_source(args, processing_class, teacher_model, train_dataset)
        self._prompt_only_rows, self._user_labels = None, False
        if args.generates:
            train_dataset, self._prompt_only_rows, self._user_labels = prompt_data.prompt_rows(
                train_dataset, args, processing_class, formatting_func
            )
        self._check_datasets(args, processing_class, formatting_func, train_dataset, eval_dataset)
        if teacher_processing_class is not None:
            check_same_vocabulary(processing_class, teacher_processing_class)
        if isinstance(teacher_model, str):
            teacher_model = load_frozen_teacher(
                teacher_model, teacher_dtype=args.teacher_dtype, trust_remote_code=args.trust_remote_code
            )
        vocab_size = real_vocabulary(model, teacher_model, processing_class, self.teacher_cache)
        self._set_up_sft(
            model=model,
            args=args,
            data_collator=data_collator,
            train_dataset=train_dataset,
            eval_dataset=eval_dataset,
            processing_class=processing_class,
            peft_config=peft_config,
            formatting_func=formatting_func,
            **kwargs,
        )
        if not has_labelled_position(self.train_dataset):
            raise ConfigError(
                "no row of train_dataset has a token to predict (every label is -100 after preparation): check "
                "completion_only_loss / assistant_only_loss and the chat template's generation markers."
            )
        if args.generates:
            prompt_data.check_prompt_boundaries(self.train_dataset, args.max_length, one_span=self._user_labels)
        if self.teacher_cache is not None:
            self._use_cache_rows()
        # Our loss is normalised by num_items_in_batch, which makes gradient accumulation exact. It scores
        # next_token_labels (labels shifted by one) whatever the architecture's loss_type, so the Trainer
        # must count shifted labels for every model (it does only for loss_type ForCausalLM, not GPT-2's).
        self.model_accepts_loss_kwargs = True
        self._loss_shifts_labels = True
        self.loss_spec = LossSpec(
            kind=args.loss,
            beta=args.beta,
            temperature=args.temperature,
            alpha=args.alpha,
            chunk_size=args.chunk_size,
            vocab_size=vocab_size,
        )
        self.teacher = None if teacher_model is None else self._prepare_teacher(teacher_model)
        self._metric_sums = MetricSums()
        self._announced_paths: set[str] = set()
        self.on_policy = None
        if args.generates:
            self.on_policy = OnPolicyBatches(args, processing_class, model, vocab_size, self._metric_sums)
            self.add_callback(self.on_policy)
        if args.loss == TAID:
            self.add_callback(TaidSchedule())

    # ------------------------------------------------------------------ set-up steps

    @staticmethod
    def _check_arguments(args: Any, kwargs: dict[str, Any]) -> None:
        """Refuse settings this trainer cannot honour before anything loads."""
        if not isinstance(args, DistillationConfig):
            raise ConfigError("args must be a hf_capgap.DistillationConfig (it carries loss, alpha, temperature ...).")
        check_sft_loss_fields(args)
        if kwargs.get("compute_loss_func") is not None:
            raise ConfigError(
                "compute_loss_func is not supported: DistillationTrainer's loss is the distillation objective "
                "(DistillationConfig.loss / alpha / temperature). Subclass DistillationTrainer to change it."
            )
        if args.teacher_cache is not None:  # the cache's mode, from its manifest, before the student loads
            from hf_capgap.cache import TeacherCache

            check_cache_serves_loss(args.loss, TeacherCache.load(args.teacher_cache).mode)
        if args.loss_backend == "liger":
            if args.loss == TAID:
                raise ConfigError("loss='taid' runs with loss_backend='hf_capgap' (Liger has no TAID loss).")
            from hf_capgap.losses.liger import require_liger

            require_liger()
            logger.warning(
                "loss_backend='liger': entropy and mean_token_accuracy are not logged (Liger's fused losses return "
                "neither, and computing them would add an lm_head pass); use loss_backend='hf_capgap' for them."
            )
            if args.teacher_cache is not None:
                raise ConfigError(
                    "loss_backend='liger' needs an online teacher (Liger fuses both lm_heads); a teacher_cache runs "
                    "with loss_backend='hf_capgap'."
                )

    def _choose_teacher_source(
        self, args: DistillationConfig, tokenizer: Any, teacher_model: PreTrainedModel | str | None, train_dataset: Any
    ) -> Any:
        """Open the teacher cache if one is set (exactly one of it and ``teacher_model``); return the rows to
        train on: ``train_dataset``, or by default the cache's own rows."""
        self._cached_rows = None
        self.teacher_cache = self._open_cache(args, tokenizer) if args.teacher_cache is not None else None
        if self.teacher_cache is not None:
            check_cache_serves_loss(args.loss, self.teacher_cache.mode)
            if teacher_model is not None:
                raise ConfigError("pass either teacher_model or DistillationConfig.teacher_cache, not both.")
            self._cached_rows = self.teacher_cache.dataset
            train_dataset = self._cached_rows if train_dataset is None else train_dataset
        elif teacher_model is None:
            raise ConfigError(
                "teacher_model is required: pass a causal LM (or a path), or set "
                "DistillationConfig.teacher_cache to a cache built with TeacherCache.build."
            )
        if train_dataset is None:
            raise ConfigError(
                "train_dataset is required (or DistillationConfig.teacher_cache, whose rows are trained on)."
            )
        return train_dataset

    def _check_datasets(
        self, args: DistillationConfig, tokenizer: Any, formatting_func: Any, train_dataset: Any, eval_dataset: Any
    ) -> None:
        """Check every dataset SFTTrainer will prepare (the cache's own rows were prepared before caching)."""
        evaluated = eval_dataset.values() if isinstance(eval_dataset, dict) else [eval_dataset]
        for dataset in evaluated:
            prompt_data.check_eval_rows(dataset)
        for dataset in (train_dataset, *evaluated):
            if dataset is not None and dataset is not self._cached_rows:
                check_dataset(dataset, tokenizer, args, formatting_func=formatting_func)

    def _set_up_sft(self, model: nn.Module, args: DistillationConfig, **sft_kwargs: Any) -> None:
        """SFTTrainer's set-up (datasets prepared, collator, model wrapped), less its patch of the student's
        forward."""
        patched = model.get_base_model() if is_peft_model(model) else model  # the module SFTTrainer patches
        own_forward = vars(patched).get("forward")  # an instance forward it had before (accelerate hooks), if any
        with self._masks_already_in(args, sft_kwargs["train_dataset"], sft_kwargs["eval_dataset"]):
            super().__init__(model=model, args=args, **sft_kwargs)
        self._restore_forward(patched, own_forward)

    @staticmethod
    def _restore_forward(module: nn.Module, own_forward: Any) -> None:
        """Undo SFTTrainer's fused-head patch of ``module.forward``, which this trainer never calls.

        The patch is a closure over the student itself, so a ``copy.deepcopy`` of the student (an EMA
        copy, a self-distillation snapshot) would keep running the original's weights.
        """
        if own_forward is None:
            vars(module).pop("forward", None)
        else:
            module.forward = own_forward

    @contextlib.contextmanager
    def _masks_already_in(self, args: DistillationConfig, train_dataset: Any, eval_dataset: Any) -> Iterator[None]:
        """Training on the cache's own rows, whose labels already carry the assistant mask: SFTTrainer
        would refuse them as "not conversational" under ``assistant_only_loss``, so the flag is off
        while it sets up (and back on after)."""
        if train_dataset is not self._cached_rows or not args.assistant_only_loss:
            yield
            return
        if eval_dataset is not None:
            raise ConfigError(
                "with assistant_only_loss, a teacher_cache and an eval_dataset, also pass train_dataset=<the chat "
                "dataset the cache was built from>: the eval rows are prepared with the same chat settings."
            )
        args.assistant_only_loss = False
        try:
            yield
        finally:
            args.assistant_only_loss = True

    @staticmethod
    def _open_cache(args: DistillationConfig, tokenizer: Any) -> Any:
        """The cache, refused unless built at this temperature and data settings, eos and chat template
        resolved against ``tokenizer`` (its vocabulary is checked below)."""
        from hf_capgap.cache import TeacherCache

        return TeacherCache.load(args.teacher_cache, temperature=args.temperature, args=args, tokenizer=tokenizer)

    def _use_cache_rows(self) -> None:
        """Train on the cache's rows (inputs + teacher signal), after checking they are the prepared
        training set: a cache built from other rows would pair each input with another row's teacher."""
        from hf_capgap.utils.artifacts import ArtifactError, dataset_fingerprint

        if self.train_dataset is not self._cached_rows:
            have, want = self.teacher_cache.manifest["dataset_fingerprint"], dataset_fingerprint(self.train_dataset)
            if have != want:
                raise ArtifactError(
                    f"{self.teacher_cache.path}: the cache was built from other rows than this train_dataset prepared "
                    f"with these settings (dataset fingerprint {have} vs {want}). Rebuild the cache with "
                    "TeacherCache.build(teacher, train_dataset, path, tokenizer=..., args=<this config>)."
                )
        self.train_dataset = self.teacher_cache.rows()
        self.data_collator = self.teacher_cache.collator(self.data_collator)

    def _prepare_teacher(self, teacher: PreTrainedModel) -> nn.Module:
        """Frozen, eval mode, in its own dtype; sharded for inference under ZeRO-3 / FSDP, never trained."""
        teacher.requires_grad_(False)
        teacher.eval()
        if self.args.teacher_dtype != "auto":
            teacher = teacher_in_dtype(teacher, getattr(torch, self.args.teacher_dtype))
        if self.is_deepspeed_enabled:
            from trl.models import prepare_deepspeed

            return prepare_deepspeed(teacher, self.accelerator)
        if self.is_fsdp_enabled:
            from trl.models import prepare_fsdp

            return prepare_fsdp(teacher, self.accelerator)
        return teacher.to(self.accelerator.device)

    def _prepare_dataset(
        self, dataset: Any, processing_class: Any, args: Any, packing: bool, formatting_func: Any, dataset_name: str
    ) -> Any:
        """TRL's preparation, except for the cache's own rows (prepared before caching), and prompt-only rows
        without assistant_only_loss: their empty completion is replaced by a generated one, labelled whole, and
        TRL refuses an empty turn that a template's generation span leaves without assistant tokens."""
        if dataset is self._cached_rows:
            return dataset
        if dataset is self._prompt_only_rows and args.assistant_only_loss:
            args = copy.copy(args)
            args.assistant_only_loss = False
        return super()._prepare_dataset(dataset, processing_class, args, packing, formatting_func, dataset_name)

    def _get_collator_with_removed_columns(self, data_collator: Any, description: str | None = None) -> Any:
        # Cache batches arrive as whole columns, and the cache's collator already keeps only the model
        # inputs and the teacher signal; a per-row column filter has nothing to do.
        if self.teacher_cache is not None:
            return data_collator
        return super()._get_collator_with_removed_columns(data_collator, description=description)

    # ------------------------------------------------------------------ on-policy batches

    def _set_signature_columns_if_needed(self) -> None:
        # Generating needs each row's prompt boundary: keep TRL's completion_mask where it is not in the labels.
        super()._set_signature_columns_if_needed()
        if self.args.generates and "completion_mask" not in self._signature_columns:
            self._signature_columns = [*self._signature_columns, "completion_mask"]

    def get_batch_samples(self, epoch_iterator: Iterator, num_batches: int, device: torch.device) -> tuple[list, Any]:
        """The Trainer's micro-batches of one optimizer step, with their completions sampled first where
        ``lmbda`` / ``seq_kd`` draw it, so ``num_items_in_batch`` counts the tokens the loss is taken on."""
        if self.on_policy is None:
            return super().get_batch_samples(epoch_iterator, num_batches, device)
        batches = self.on_policy.replace(list(itertools.islice(epoch_iterator, num_batches)), self)
        return batches, self._get_num_items_in_batch(batches, device)

    # ------------------------------------------------------------------ loss

    @property
    def taid_schedule(self) -> TaidSchedule | None:
        """The schedule of TAID's t (loss='taid'); looked up each time, since resuming with
        ``restore_callback_states_from_checkpoint`` replaces the callback by a restored copy."""
        return next((cb for cb in self.callback_handler.callbacks if isinstance(cb, TaidSchedule)), None)

    def _head_choice(self, model: nn.Module, role: str) -> HeadChoice:
        """Which lm_head to fuse for ``role`` (student / teacher); says once, in the log, which path runs and why
        (as a warning when 'auto' had to fall back to full logits, which costs [tokens, vocab] memory)."""
        choice = choose_lm_head(
            self.accelerator.unwrap_model(model), self.args.fused_lm_head, head_sharding(self.accelerator)
        )
        if role not in self._announced_paths:
            self._announced_paths.add(role)
            fell_back = choice.head is None and self.args.fused_lm_head == "auto"
            (logger.warning if fell_back else logger.info)(f"hf_capgap {role} loss path: {choice.reason}")
        return choice

    def _forward_states(
        self, model: nn.Module, inputs: dict[str, Tensor], role: str
    ) -> tuple[Tensor, nn.Linear | None, Tensor | None]:
        """Last hidden states and the lm_head to fuse, or logits and None; and the student's MoE aux loss.

        Every collator output but the labels reaches the model, so padding-free batches keep their
        ``position_ids`` (packed documents never attend to each other) on the student and the teacher alike.
        An MoE student is asked for its router logits as SFTTrainer asks (``aux_loss_enabled``), so it
        returns its load-balancing ``aux_loss``.
        """
        head = self._head_choice(model, role).head
        call = {**forward_inputs(inputs), "use_cache": False}
        if role == "student" and self.aux_loss_enabled:
            call["output_router_logits"] = True
        with (
            contextlib.nullcontext() if head is None else lm_head_bypassed(self.accelerator.unwrap_model(model), head)
        ):
            outputs = model(**call)
        return outputs.logits, head, getattr(outputs, "aux_loss", None) if role == "student" else None

    def _teacher_signal(self, inputs: dict[str, Tensor]) -> TeacherSignal | None:
        """The teacher's view of every position, flattened to rows; None for an uncached eval batch."""
        if self.teacher_cache is not None:
            if not any(key.startswith(TEACHER_KEY_PREFIX) for key in inputs):
                if self.model.training:
                    raise ConfigError(
                        "the batch carries no cached teacher signal: with DistillationConfig.teacher_cache, train on "
                        "the cache's rows with its collator (the trainer sets both up; do not pass data_collator)."
                    )
                return None  # evaluating on rows that were never cached
            return self.teacher_cache.teacher_signal(inputs)
        with torch.no_grad():
            states, head, _ = self._forward_states(self.teacher, inputs, "teacher")
        rows = states.flatten(0, 1)
        if head is None:
            return DenseTeacher(rows)
        return FusedTeacher(rows, head.weight, head.bias)

    def compute_loss(
        self,
        model: nn.Module,
        inputs: dict[str, Tensor],
        return_outputs: bool = False,
        num_items_in_batch: Tensor | int | None = None,
    ) -> Tensor | tuple[Tensor, dict[str, Tensor]]:
        """alpha * T^2 * D(teacher || student) + (1 - alpha) * CE over the labelled positions, plus an MoE
        student's ``router_aux_loss_coef`` x ``aux_loss`` as SFTTrainer adds it. A micro-batch the student
        sampled (``lmbda``) is scored by T^2 * D alone, whatever alpha: CE on its own samples would reinforce them.

        A micro-batch with no labelled position (common with assistant-only loss) gives a zero loss and
        zero gradients, so every DDP rank still steps; it is counted as ``empty_micro_batches`` in the logs.
        With ``return_outputs`` the student's logits come back too (for ``compute_metrics`` / ``predict``).
        """
        if "labels" not in inputs:
            raise ConfigError(
                "the batch has no 'labels': use the trainer's own collator (TRL's DataCollatorForLanguageModeling), "
                "or a collator that adds labels with -100 on positions outside the loss."
            )
        labels = next_token_labels(inputs["labels"])
        repeated = None if model.training else repeated_positions(inputs, self.accelerator)
        if repeated is not None:
            labels = labels.masked_fill(repeated, -100)
        spec = replace(self.loss_spec, alpha=1.0) if STUDENT_SAMPLED_KEY in inputs else self.loss_spec
        # alpha weights the distillation term: at 0 the loss is the LM cross-entropy alone, with no teacher to run.
        teacher = self._teacher_signal(inputs) if spec.alpha > 0 else None
        states, head, aux_loss = self._forward_states(model, inputs, "student")
        rows = states.flatten(0, 1)
        # alpha = 0, or evaluating on rows that were never cached: only the LM cross-entropy is computed.
        spec = spec if teacher is not None else replace(spec, alpha=0.0)
        schedule = self.taid_schedule if spec.kind == TAID else None
        if schedule is not None:  # evaluation scores against the schedule's end target, comparable across a run
            spec = replace(spec, taid_t=schedule.current_t(self.args) if model.training else self.args.taid_t_end)
        if self.args.loss_backend == "liger":
            from hf_capgap.losses.liger import liger_loss_on_head

            output = liger_loss_on_head(rows, teacher, labels, spec, head, num_items_in_batch)
        else:
            output = distillation_loss(
                rows,
                teacher,
                labels,
                spec,
                lm_head_weight=None if head is None else head.weight,
                lm_head_bias=None if head is None else head.bias,
                num_items_in_batch=num_items_in_batch,
                inplace_grad=head is None and not return_outputs,  # the model's logits, read by nothing else
            )
        self._metric_sums.record("train" if self.model.training else "eval", output, spec, inputs, aux_loss, repeated)
        if schedule is not None and self.model.training and spec.alpha > 0:
            schedule.record(output.distill_sum, output.num_tokens)
        loss = output.loss
        if self.args.average_tokens_across_devices and num_items_in_batch is not None:
            # DDP averages gradients over processes while num_items_in_batch counts all of them.
            loss = loss * self.accelerator.num_processes
        if aux_loss is not None:
            # As SFTTrainer: a per-micro-batch mean, so averaged over the accumulation steps when the
            # Trainer leaves gradient accumulation to the loss (num_items_in_batch given).
            steps = self.current_gradient_accumulation_steps if num_items_in_batch is not None else 1
            loss = loss + self.router_aux_loss_coef * aux_loss / steps
        if not return_outputs:
            return loss
        logits = states if head is None else F.linear(states, head.weight, head.bias)
        return loss, {"loss": loss.detach(), "logits": logits}

    def prediction_step(
        self,
        model: nn.Module,
        inputs: dict[str, Any],
        prediction_loss_only: bool,
        ignore_keys: list[str] | None = None,
    ) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
        """As ``Trainer.prediction_step``: the loss, and the student's logits and labels unless only the loss
        is asked."""
        inputs = self._prepare_inputs(inputs)
        with torch.no_grad(), self.compute_loss_context_manager():
            if prediction_loss_only:
                return self.compute_loss(model, inputs).detach(), None, None
            loss, outputs = self.compute_loss(model, inputs, return_outputs=True)
        return loss.detach(), outputs["logits"], inputs["labels"]

    # ------------------------------------------------------------------ logging

    def _get_dataloader(self, *args: Any, is_training: bool = False, **kwargs: Any) -> Any:
        """Trainer's dataloader; an evaluation one collates with :class:`ExampleTokensCollator`, so the rows
        repeated to even out its last batch across ranks can be told apart in padding-free batches too; an
        on-policy training one with :class:`PromptLengthsCollator`, so generation knows where prompts end."""
        if is_training and self.on_policy is None:
            return super()._get_dataloader(*args, is_training=True, **kwargs)
        collator = self.data_collator
        on_policy = prompt_data.PromptLengthsCollator(collator, self._user_labels) if is_training else None
        self.data_collator = on_policy or ExampleTokensCollator(collator)
        try:
            return super()._get_dataloader(*args, is_training=is_training, **kwargs)
        finally:
            self.data_collator = collator

    def _part_metrics(self, mode: str, prefix: str) -> dict[str, float]:
        """The token-weighted means since the last log of ``mode``, summed over ranks (a collective: every
        rank calls it), named as SFTTrainer names its metrics: distill_loss, ce_loss, empty_micro_batches,
        entropy, mean_token_accuracy, aux_loss and num_tokens (input tokens trained on so far, counted as
        SFTTrainer counts them: every training micro-batch, summed over ranks, over the tensor-parallel size)."""
        metrics, train_tokens = self._metric_sums.reduce(mode, self.accelerator, self.args.device)
        self._total_train_tokens += train_tokens // self._tp_size
        metrics["num_tokens"] = self._total_train_tokens
        return {f"{prefix}{name}": value for name, value in metrics.items()}

    def evaluation_loop(self, *args: Any, **kwargs: Any) -> Any:
        """Trainer's loop (``evaluate`` and ``predict`` both run it), with the parts of exactly this loop in
        its metrics under its ``metric_key_prefix``: none are left behind for the next one."""
        self._metric_sums.discard("eval")
        output = super().evaluation_loop(*args, **kwargs)
        prefix = kwargs.get("metric_key_prefix", args[4] if len(args) > 4 else "eval")
        output.metrics.update(self._part_metrics("eval", f"{prefix}_"))
        return output

    def log(self, logs: dict[str, float], *args: Any, **kwargs: Any) -> None:
        """Adds the training parts since the last log to a training-loss log (evaluation metrics come with
        their own loop), and with loss='taid' the t the next step uses (``taid_t``); the parts of steps
        after the last training log end with the training run."""
        if "loss" in logs:
            logs.update(self._part_metrics("train", ""))
            if self.taid_schedule is not None:
                logs["taid_t"] = round(self.taid_schedule.current_t(self.args), 6)
        elif "train_loss" in logs:
            self._part_metrics("train", "")  # counts the last steps' input tokens in num_tokens
        super().log(logs, *args, **kwargs)
