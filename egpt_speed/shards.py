"""Data-parallel shards of one run: which samples a process takes, and which device.

A run split over `n` processes (`torchrun`/`accelerate launch`, or `--shard i/n` for processes a user
launches) gives shard `i` the counted samples whose dataset index is `≡ i (mod n)`; every shard runs
the same warm-up. The shards of one command share every configuration field except `shard`, so their
shared hash (`group_hash`) tells the merge which results belong together.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, fields
from datetime import timedelta
from typing import Any, Mapping, Sequence, TypeVar

import torch

from egpt_speed.errors import EgptError
from egpt_speed.journal import config_hash
from egpt_speed.options import MeasureOptions

T = TypeVar("T")
LAUNCHER_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK")  # set by torchrun and accelerate launch


@dataclass(frozen=True)
class Shard:
    index: int
    count: int

    def __str__(self) -> str:
        return f"{self.index}/{self.count}"

    def dataset_index(self, position: int) -> int:
        """The dataset index of this shard's `position`-th counted sample."""
        return self.index + position * self.count

    def size(self, samples: int) -> int:
        """How many of `samples` counted samples this shard takes."""
        return len(range(self.index, samples, self.count))


def parse_shard(text: str | None) -> Shard | None:
    """`"i/n"` → Shard(i, n); None stays None."""
    if text is None:
        return None
    index, slash, count = str(text).partition("/")
    if not (slash and index.strip().isdigit() and count.strip().isdigit()):
        raise EgptError(f"--shard {text!r} is not of the form i/n; pass e.g. --shard 0/4 for the first of four.")
    shard = Shard(int(index), int(count))
    if shard.count < 1 or shard.index >= shard.count:
        raise EgptError(f"--shard {text}: i must be in 0..n-1 and n at least 1; pass e.g. --shard 0/4.")
    return shard


def samples_of(shard_text: str | None, samples: int) -> int:
    """Counted samples a run with `--shard shard_text` (None: unsharded) takes of `samples`."""
    shard = parse_shard(shard_text)
    return samples if shard is None else shard.size(samples)


@dataclass(frozen=True)
class Launch:
    """What a launcher (torchrun, accelerate launch) told this process."""

    rank: int
    world: int
    local_rank: int

    @property
    def shard(self) -> Shard:
        return Shard(self.rank, self.world)


def launcher(env: Mapping[str, str] | None = None) -> Launch | None:
    """The launcher's RANK/WORLD_SIZE/LOCAL_RANK, or None when no launcher started more than one process."""
    env = os.environ if env is None else env
    if any(name not in env for name in LAUNCHER_VARIABLES) or int(env["WORLD_SIZE"]) < 2:
        return None
    return Launch(int(env["RANK"]), int(env["WORLD_SIZE"]), int(env["LOCAL_RANK"]))


def secondary_rank() -> bool:
    """True in a launched process other than rank 0 (it prints nothing unless --debug, rank 0 reports)."""
    launch = launcher()
    return launch is not None and launch.rank != 0


def check_shard(shard: Shard | None, samples: int) -> None:
    if shard is not None and shard.count > samples:
        raise EgptError(f"{shard.count} shards need at least {shard.count} counted samples; raise --samples "
                        f"to {shard.count} or use fewer processes.")


def shard_plan(plan: Sequence[tuple[T, bool]], shard: Shard | None) -> list[tuple[T, bool]]:
    """Every warm-up entry, then the counted entries of `shard` (strided by dataset index)."""
    if shard is None:
        return list(plan)
    warm = [entry for entry in plan if not entry[1]]
    counted = [entry for entry in plan if entry[1]]
    return warm + counted[shard.index::shard.count]


def local_device(device: torch.device, env: Mapping[str, str] | None = None) -> torch.device:
    """Under a launcher, an unnumbered CUDA device becomes cuda:LOCAL_RANK (one process per GPU)."""
    launch = launcher(env)
    if launch is None or device.type != "cuda" or device.index is not None:
        return device
    return torch.device("cuda", launch.local_rank)


def _group_keys() -> list[str]:
    return [f.name for f in fields(MeasureOptions) if f.name != "shard"] + ["strategies", "options"]


def group_hash(config: Mapping[str, Any]) -> str:
    """The hash the shards of one command share: the run configuration without `shard`."""
    return config_hash({key: config.get(key) for key in _group_keys()})


def differing_keys(first: Mapping[str, Any], other: Mapping[str, Any]) -> list[str]:
    """The configuration fields (those `group_hash` covers) on which two shards differ."""
    return [key for key in _group_keys() if config_hash({"v": first.get(key)}) != config_hash({"v": other.get(key)})]


# ranks wait for each other on the store or a barrier before a collective; this bounds a hang
COLLECTIVE_TIMEOUT = timedelta(minutes=30)


def init_process_group(device: torch.device) -> bool:
    """The launcher's process group (NCCL on CUDA, gloo on CPU), initialised unless it already is → owned."""
    import torch.distributed as dist

    if dist.is_initialized():
        return False
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo", timeout=COLLECTIVE_TIMEOUT)
    return True
