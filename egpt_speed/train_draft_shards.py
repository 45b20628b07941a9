"""`train-draft` under torchrun / accelerate launch: answer collection split over the ranks.

Rank r answers the pairs `i ≡ r (mod world)` into its own journal (`collect.shard<r>-of-<n>.journal.jsonl`,
continued by --resume), rank 0 gathers every answer through the process group and, in pair order,
rebuilds the training items from them (Stage 3 and teacher forcing only: no answer is generated
twice), then trains alone; the other ranks end after the gather. Training stays on one rank: the
head is 0.2 B parameters at 7B width and trains in seconds to minutes.
"""

from __future__ import annotations

import atexit
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator

from egpt_speed import shards
from egpt_speed.devices import resolve_device


def journal_name(shard: shards.Shard) -> str:
    return f"collect.shard{shard.index}-of-{shard.count}.journal.jsonl"


@contextmanager
def rank_zero_first(device_spec: str) -> Iterator[None]:
    """Launched: rank 0 runs the block (filling the caches all ranks read) before the others enter it."""
    launch = shards.launcher()
    if launch is None:
        yield
        return
    import torch.distributed as dist

    if shards.init_process_group(shards.local_device(resolve_device(device_spec))):
        atexit.register(dist.destroy_process_group)
    if launch.rank != 0:
        dist.barrier()
    yield
    if launch.rank == 0:
        dist.barrier()


def collect_sharded(collect: Callable[[list, dict, Path], tuple[list, int]], pairs: list, collection: dict,
                    out: Path, launch: shards.Launch, answers_of: Callable[[list], list[list[int]]],
                    rebuild: Callable[[list[list[int]]], list]) -> tuple[list | None, int]:
    """This rank's share of `pairs` collected (journaled) and gathered on rank 0.

    collect(pairs, collection, journal path) → (items, reused) as one process collects;
    answers_of(items) → their token ids; rebuild(answers) → rank 0's items for all pairs, in order.
    → (items for all pairs on rank 0, None elsewhere; answers reused from the journals, all ranks).
    """
    import torch.distributed as dist

    shard = launch.shard
    mine, reused = collect(pairs[shard.index::shard.count], {**collection, "shard": str(shard)},
                           out / journal_name(shard))
    gathered: list | None = [None] * launch.world if launch.rank == 0 else None
    dist.gather_object({"answers": answers_of(mine), "reused": reused}, gathered, dst=0)
    if gathered is None:
        return None, reused
    answers = [gathered[i % launch.world]["answers"][i // launch.world] for i in range(len(pairs))]
    return rebuild(answers), sum(g["reused"] for g in gathered)
