"""Which lm_head the loss fuses, and why: compiled models, DeepSpeed stages, FSDP, the modes."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from accelerate.utils import DistributedType

from hf_capgap.cache.encode import fusable_head
from hf_capgap.losses import LossSpec, distillation_loss
from hf_capgap.losses.lm_head import base_model, choose_lm_head, head_sharding, lm_head_bypassed, parameter_sharding
from tests.conftest import tiny_llama


def fake_accelerator(distributed_type: DistributedType, zero_stage: int | None = None) -> SimpleNamespace:
    plugin = None if zero_stage is None else SimpleNamespace(zero_stage=zero_stage)
    return SimpleNamespace(distributed_type=distributed_type, state=SimpleNamespace(deepspeed_plugin=plugin))


@pytest.mark.parametrize(
    ("distributed_type", "zero_stage", "sharded"),
    [
        (DistributedType.NO, None, False),
        (DistributedType.MULTI_GPU, None, False),
        (DistributedType.DEEPSPEED, 0, False),
        (DistributedType.DEEPSPEED, 1, False),
        (DistributedType.DEEPSPEED, 2, False),
        (DistributedType.DEEPSPEED, 3, True),
        (DistributedType.FSDP, None, True),
    ],
)
def test_only_zero3_and_fsdp_shard_the_head(distributed_type, zero_stage, sharded):
    reason = head_sharding(fake_accelerator(distributed_type, zero_stage))
    assert (reason is not None) == sharded
    choice = choose_lm_head(tiny_llama(), "auto", reason)
    assert (choice.head is None) == sharded
    if sharded:
        assert reason in choice.reason and choice.reason.startswith("logits path")
        with pytest.raises(ValueError, match="shards the lm_head"):
            choose_lm_head(tiny_llama(), "always", reason)


def test_a_teacher_with_weights_sharded_across_ranks_is_recognised_from_its_weights():
    """A cache build has no accelerator to ask: the weights say it. A ZeRO-3 partitioned head is gathered by
    the teacher's own forward, so the build does not multiply it itself. (FSDP2's DTensors: test_cache's
    two-rank build with a sharded teacher.)"""
    teacher = tiny_llama()
    assert parameter_sharding(teacher) is None and fusable_head(teacher) is teacher.lm_head
    teacher.lm_head.weight.ds_id = 7  # how DeepSpeed ZeRO-3 marks a partitioned weight
    assert parameter_sharding(teacher) == "DeepSpeed ZeRO-3 partitions its weights across ranks"
    assert fusable_head(teacher) is None


def test_reasons_name_the_path_and_the_cause():
    model = tiny_llama()
    fused = choose_lm_head(model, "auto")
    assert fused.head is model.lm_head and fused.reason.startswith("fused lm_head") and "96x32" in fused.reason
    never = choose_lm_head(model, "never")
    assert never.head is None and "fused_lm_head='never'" in never.reason
    model.config.model_type = "gemma2"
    softcapped = choose_lm_head(model, "auto")
    assert softcapped.head is None and "'gemma2'" in softcapped.reason
    with pytest.raises(ValueError, match="fused_lm_head"):
        choose_lm_head(model, "sometimes")


def test_compiled_student_keeps_the_fused_path():
    model = tiny_llama()
    compiled = torch.compile(model, backend="eager")
    assert base_model(compiled) is model
    for mode in ("auto", "always"):
        assert choose_lm_head(compiled, mode).head is model.lm_head


def test_fused_step_on_a_compiled_student_equals_the_plain_logits_step():
    """fused_lm_head='always' on a compiled model trains: same loss and gradients, and no recompile per step."""
    model = tiny_llama()
    compilations = []

    def counting_backend(graph_module, example_inputs):
        compilations.append(1)
        return graph_module.forward

    compiled = torch.compile(model, backend=counting_backend)
    input_ids = torch.randint(0, 96, (2, 10))
    labels = input_ids[:, 1:].reshape(-1)
    spec = LossSpec(alpha=0.0, chunk_size=5)
    head = choose_lm_head(compiled, "always").head
    for step in range(3):
        model.zero_grad()
        with lm_head_bypassed(compiled, head):
            hidden = compiled(input_ids=input_ids).logits
        rows = hidden[:, :-1].reshape(-1, hidden.shape[-1])
        distillation_loss(rows, None, labels, spec, lm_head_weight=head.weight).loss.backward()
        fused_grads = [p.grad.clone() for p in model.parameters()]
        if step == 0:
            compiled_once = len(compilations)
    assert len(compilations) == compiled_once, "the bypassed head recompiled the model at every step"

    model.zero_grad()
    logits = model(input_ids=input_ids).logits[:, :-1]
    F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels).backward()
    for fused_grad, parameter in zip(fused_grads, model.parameters(), strict=True):
        torch.testing.assert_close(fused_grad, parameter.grad, rtol=1e-4, atol=1e-6)


def test_trainer_with_always_fused_head_trains_a_compiled_student(tmp_path):
    """Trainer(torch_compile=True) wraps the student in torch.compile; 'always' would raise if it lost the head."""
    from datasets import Dataset

    from hf_capgap import DistillationConfig, DistillationTrainer
    from tests.conftest import chat_tokenizer

    tokenizer = chat_tokenizer()
    teacher, student = tiny_llama(1000, hidden=48, layers=2), tiny_llama(1000, hidden=24)
    dataset = Dataset.from_dict({"input_ids": torch.randint(6, 1000, (8, 12)).tolist()})
    args = DistillationConfig(
        output_dir=str(tmp_path),
        per_device_train_batch_size=4,
        max_steps=2,
        report_to=[],
        use_cpu=True,
        save_strategy="no",
        disable_tqdm=True,
        torch_compile=True,
        torch_compile_backend="eager",
        fused_lm_head="always",
    )
    trainer = DistillationTrainer(
        model=student, teacher_model=teacher, args=args, train_dataset=dataset, processing_class=tokenizer
    )
    before = student.lm_head.weight.detach().clone()
    trainer.train()
    assert "_orig_mod" in trainer.model_wrapped._modules
    assert not torch.equal(student.lm_head.weight, before)
