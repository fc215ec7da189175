"""The one way hf_capgap loads a frozen teacher: right dtype, right device, one copy in host memory.

At 7B on 8 GPUs a plain ``from_pretrained`` is the failure: every rank materialises the teacher in fp32
on the CPU (~28 GB each) before moving it. Here the weights stream from safetensors straight onto the
local rank's device (``device_map``), in bf16 when that device is a GPU, remote code stays off unless
asked, and pickled checkpoints are refused. A local folder is checked first (:func:`check_model_folder`),
so a folder missing its weights or tokenizer is named as such instead of failing deep inside transformers.
The recipe, the ladder, the sweep, ``hf-capgap prune`` and ``hf-capgap cache build`` all load teachers
through :func:`load_frozen_teacher`.
"""

from __future__ import annotations

import copy
import json
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers.utils import logging

from hf_capgap.errors import ConfigError, ModelFolderError

logger = logging.get_logger(__name__)

TEACHER_DTYPE_CHOICES = ("auto", "bfloat16", "float16", "float32")
TOKENIZER_VOCABULARIES = ("tokenizer.json", "tokenizer.model", "spiece.model", "vocab.json", "vocab.txt", "*.tiktoken")
"""Files one of which holds a tokenizer's vocabulary (fast, sentencepiece, BPE, WordPiece, tiktoken)."""
SAFETENSORS_INDEX = "model.safetensors.index.json"
PICKLED_WEIGHTS = ("*.bin", "*.pt", "*.pth", "*.ckpt", "pytorch_model.bin.index.json")
_SAVE_HINT = "save the model and its tokenizer into it with save_pretrained(DIR), or pass a Hub id"


def teacher_device() -> torch.device:
    """The local rank's device: ``cuda:LOCAL_RANK`` when GPUs are used, else the CPU."""
    from hf_capgap.utils.processes import use_cpu

    if use_cpu():
        return torch.device("cpu")
    return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))


def resolve_teacher_dtype(teacher_dtype: str, device: torch.device) -> torch.dtype:
    """``auto`` is bf16 on a GPU (what the teacher runs in there) and float32 on a CPU."""
    if teacher_dtype not in TEACHER_DTYPE_CHOICES:
        raise ConfigError(f"teacher_dtype={teacher_dtype!r} must be one of {TEACHER_DTYPE_CHOICES}.")
    if teacher_dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return getattr(torch, teacher_dtype)


def _buffer_dtypes_as_built(model: nn.Module, dtype: torch.dtype) -> dict[str, torch.dtype]:
    """The dtype of each buffer of ``model``'s class built in ``dtype``, as ``from_pretrained(dtype=dtype)``
    builds it before loading: read from an instance on the meta device (no memory, no compute).

    A class that cannot be built there (custom code) gives nothing: its buffers keep their dtypes.
    """
    from transformers import PreTrainedModel

    if not isinstance(model, PreTrainedModel):
        return {}
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device("meta"):
            built = type(model)(copy.deepcopy(model.config))
    except Exception as error:  # a foreign constructor's failure means "unknown", not a failed load
        logger.warning(
            f"Could not build {type(model).__name__} on the meta device ({error}); its buffers keep their dtypes."
        )
        return {}
    finally:
        torch.set_default_dtype(previous)
    return {name: buffer.dtype for name, buffer in built.named_buffers()}


def _target_dtypes(model: nn.Module, dtype: torch.dtype) -> dict[str, tuple[torch.Tensor, torch.dtype]]:
    """Each floating tensor of ``model`` (of its base model, when PEFT wraps it) with the dtype
    ``from_pretrained(dtype=dtype)`` gives it.

    Loading casts every checkpoint tensor (parameters and persistent buffers) to ``dtype``, except the
    modules a model keeps in float32 (``_keep_in_fp32_modules(_strict)``, matched as transformers
    matches them). Non-persistent buffers are not in the checkpoint and stay as the model computes them
    under ``dtype`` as default: RoPE's ``inv_freq`` in float32 (rounding it to bf16 shifts the rotary
    phases of far positions), Gemma's ``embed_scale`` in ``dtype``.
    """
    from transformers import PreTrainedModel
    from transformers.core_model_loading import build_glob_alternation

    get_base_model = getattr(model, "get_base_model", None)  # a PEFT model: the tensors are its base model's
    base = get_base_model() if callable(get_base_model) else model
    plan = base._get_dtype_plan(dtype) if isinstance(base, PreTrainedModel) else {}
    keep = build_glob_alternation(list(plan))[0] if plan else None
    state = base.state_dict(keep_vars=True)
    targets = {
        name: (tensor, torch.float32 if keep is not None and keep.search(name) else dtype)
        for name, tensor in state.items()
        if tensor.is_floating_point()
    }
    built = _buffer_dtypes_as_built(base, dtype)
    for name, buffer in base.named_buffers():
        if name not in state and name in built and buffer.is_floating_point():
            targets[name] = (buffer, built[name])
    return targets


def teacher_in_dtype(model: nn.Module, dtype: torch.dtype) -> nn.Module:
    """``model`` with its weights in ``dtype`` as ``from_pretrained(dtype=dtype)`` would load them: itself
    when they already are (a teacher loaded in ``dtype`` is not copied), else a copy.

    ``Module.to`` converts in place, which would change the dtype of a model the caller passed in and
    still uses, and would also round the non-persistent float32 buffers, which loading keeps. The copy is
    assembled from converted tensors (deepcopy's memo, tied weights stay tied), so the peak is the
    original plus the converted weights, never two originals.
    """
    targets = _target_dtypes(model, dtype)
    if all(tensor.dtype == want for tensor, want in targets.values()):
        return model
    memo: dict[int, Any] = {}
    for tensor, want in targets.values():
        if id(tensor) in memo:  # tied: one converted tensor for every name
            continue
        converted = tensor.detach().to(want)
        if isinstance(tensor, nn.Parameter):
            converted = nn.Parameter(converted, requires_grad=tensor.requires_grad)
        memo[id(tensor)] = converted
    return copy.deepcopy(model, memo)


def load_frozen_teacher(
    name_or_path: str | os.PathLike,
    *,
    teacher_dtype: str = "auto",
    device: torch.device | str | None = None,
    revision: str | None = None,
    trust_remote_code: bool = False,
) -> Any:
    """A causal LM in eval mode with gradients off, loaded once onto ``device`` (default: this rank's).

    Weights go from the safetensors files directly to the device (no full-precision host copy);
    under an initialised DeepSpeed ZeRO-3 context transformers partitions them instead, which is what
    a ZeRO-3 teacher wants and what pruning must refuse (it checks before calling this).
    """
    from transformers import AutoModelForCausalLM
    from transformers.integrations import is_deepspeed_zero3_enabled

    if Path(name_or_path).is_dir():
        check_model_folder(name_or_path, tokenizer=False)
    device = teacher_device() if device is None else torch.device(device)
    dtype = resolve_teacher_dtype(teacher_dtype, device)
    placement = {} if is_deepspeed_zero3_enabled() else {"device_map": {"": device}}
    try:
        model = AutoModelForCausalLM.from_pretrained(
            name_or_path,
            dtype=dtype,
            revision=revision,
            trust_remote_code=trust_remote_code,
            use_safetensors=True,
            low_cpu_mem_usage=True,
            **placement,
        )
    except OSError as err:
        if "safetensors" in str(err).lower():
            raise ModelFolderError(_pickles_refused(name_or_path)) from err
        raise
    model.requires_grad_(False)
    return model.eval()


def check_model_folder(folder: str | os.PathLike, *, tokenizer: bool = True) -> None:
    """Refuse a local model folder that cannot load, naming every missing file, before anything loads.

    transformers reports a folder holding only ``config.json`` as a missing sentencepiece or tiktoken
    install, which sends the user the wrong way. ``tokenizer=False`` skips the tokenizer (a teacher whose
    tokenizer is not needed, as in ``hf-capgap cache build`` on token ids).
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise ModelFolderError(f"{folder} is not a folder; {_SAVE_HINT}.")
    missing = [] if (folder / "config.json").is_file() else ["config.json"]
    if tokenizer and not _holds(folder, TOKENIZER_VOCABULARIES):
        missing.append(f"a tokenizer (one of {', '.join(TOKENIZER_VOCABULARIES)})")
    if (folder / SAFETENSORS_INDEX).is_file():
        shards = sorted(set(json.loads((folder / SAFETENSORS_INDEX).read_text())["weight_map"].values()))
        missing += [f"{shard} (listed in {SAFETENSORS_INDEX})" for shard in shards if not (folder / shard).is_file()]
    elif not _holds(folder, ("*.safetensors",)):
        if _holds(folder, PICKLED_WEIGHTS):
            raise ModelFolderError(_pickles_refused(folder))
        missing.append(f"the weights (*.safetensors or {SAFETENSORS_INDEX})")
    if missing:
        present = sorted(path.name for path in folder.iterdir()) or ["nothing"]
        raise ModelFolderError(
            f"model folder {folder} is missing {' and '.join(missing)} (it holds {', '.join(present)}); {_SAVE_HINT}."
        )


def _holds(folder: Path, patterns: tuple[str, ...]) -> bool:
    return any(path.is_file() for pattern in patterns for path in folder.glob(pattern))


def _pickles_refused(name_or_path: str | os.PathLike) -> str:
    return (
        f"teacher {str(name_or_path)!r} has no safetensors weights; hf_capgap loads no pickled checkpoints. "
        "Re-save it with save_pretrained(..., safe_serialization=True)."
    )
