"""Build a small teacher cache in its own process, so tests can SIGKILL it, resume it, or launch it
on several ranks with ``accelerate launch``. The tiny teacher and dataset are seeded, hence identical
in every process that calls ``make_teacher`` / ``make_dataset``."""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import torch

VOCAB_SIZE = 128
SEQ_LEN = 16


def make_teacher(vocab_size: int = VOCAB_SIZE, seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
    )
    return LlamaForCausalLM(config).eval()


def make_dataset(
    rows: int = 24, seq_len: int = SEQ_LEN, vocab_size: int = VOCAB_SIZE, seed: int = 0, labels: bool = False
):
    import datasets

    generator = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(0, vocab_size, (rows, seq_len), generator=generator)
    columns = {"input_ids": input_ids.tolist()}
    if labels:
        masked = input_ids.clone()
        masked[:, : seq_len // 4] = -100
        columns["labels"] = masked.tolist()
    return datasets.Dataset.from_dict(columns)


def fully_shard_over_ranks(model) -> None:
    """FSDP2 on the CPU ranks of the launch: each decoder layer and the rest of the model sharded."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    from hf_capgap.utils.processes import process_state

    process_state()  # initialises the process group of the launch
    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    for layer in model.model.layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", required=True)
    parser.add_argument("--mode", default="topk")
    parser.add_argument("--k", type=int, default=8)
    parser.add_argument("--shard-tokens", type=int, default=3 * SEQ_LEN)
    parser.add_argument("--delay", type=float, default=0.0, help="seconds of sleep before each teacher forward")
    parser.add_argument("--rank-dir", help="each process writes rank-<index>.txt here (proves ranks ran)")
    parser.add_argument(
        "--bytes-per-token", type=float, nargs="+",
        help="the draws' budget instead of --k; one per rank stands in for ranks that measure differently",
    )  # fmt: skip
    parser.add_argument(
        "--fully-shard", action="store_true",
        help="shard the teacher's weights over the ranks with FSDP2 (each forward becomes a collective)",
    )  # fmt: skip
    args = parser.parse_args()

    torch.set_num_threads(1)
    from hf_capgap.cache import TeacherCache

    teacher = make_teacher()
    if args.fully_shard:
        fully_shard_over_ranks(teacher)
    if args.delay:
        teacher.register_forward_pre_hook(lambda module, inputs: time.sleep(args.delay))
    budget = None
    if args.bytes_per_token:
        from hf_capgap.utils.processes import process_state

        budget = args.bytes_per_token[process_state().process_index % len(args.bytes_per_token)]
    TeacherCache.build(
        teacher,
        make_dataset(),
        args.out,
        mode=args.mode,
        k=args.k,
        bytes_per_token=budget,
        batch_size=2,
        shard_tokens=args.shard_tokens,
        progress=False,
    )
    import torch.distributed as dist

    if args.rank_dir:
        rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
        Path(args.rank_dir, f"rank-{rank}.txt").write_text(f"{world} {os.getpid()}\n")
    if dist.is_initialized():  # as in ddp_train_script.py: skip gloo's exit-time destructors
        dist.barrier()
        os._exit(0)


if __name__ == "__main__":
    main()
