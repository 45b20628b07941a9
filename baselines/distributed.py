"""`run` and `compare` over several processes: torchrun / accelerate launch, or `--shard i/n`.

Each process runs its shard through the ordinary runner: its own journal and result files, named
`<name>_shard<i>-of-<n>_<stamp>`, so `--resume` finds each shard's own journal. Under a launcher,
every rank then waits until all ranks are done, rank 0 gathers the shard results through the process
group and writes one merged result in dataset order (`egpt_speed.merge`). Without a launcher and
without --shard this is `runner.run`, unchanged.

Progress: each rank adds its finished plan entries (resumed ones included) to one counter in the
launcher's store; rank 0 alone draws the bar, for all samples of all ranks.
"""

from __future__ import annotations

import time
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path
from typing import Callable, Iterator

import torch

from egpt_speed import merge, results, shards
from egpt_speed.baselines import runner
from egpt_speed.baselines.journaling import Outcome
from egpt_speed.errors import EgptError
from egpt_speed.models import resolve_device
from egpt_speed.presets import PRESETS, tiny_llm_dir

ProgressFactory = Callable[[int], Callable[[int], None]]
PROGRESS_KEY = "egpt-speed/progress"
POLL_S = 0.5


def is_quiet_rank() -> bool:
    """True in a launched process other than rank 0: it prints nothing unless --debug."""
    return shards.secondary_rank()


def shard_name(name: str, strategies: list[str], out: Path, shard: shards.Shard) -> str:
    suffix = f"_shard{shard.index}-of-{shard.count}"
    return results.result_name(name, strategies, results.name_max(out) - len(suffix)) + suffix


def run(config: runner.RunConfig, out: Path, progress_factory: ProgressFactory | None = None,
        name: str | None = None, resume: bool = False) -> Outcome:
    """`runner.run` for this process's shard; under a launcher, rank 0 returns the merged outcome."""
    launch = shards.launcher()
    if launch is None and config.shard is None:
        return runner.run(config, out, progress_factory, name, resume)
    name = name or "_".join(config.strategies)
    if launch is None:
        shard = shards.parse_shard(config.shard)
        return runner.run(config, out, progress_factory, shard_name(name, config.strategies, out, shard), resume)
    if config.shard is not None and shards.parse_shard(config.shard) != launch.shard:
        raise EgptError(f"--shard {config.shard} contradicts the launcher (rank {launch.rank} of {launch.world}); "
                        "drop --shard under torchrun / accelerate launch.")
    config = replace(config, shard=str(launch.shard))
    runner.validate(config)  # every rank refuses alike, before any process group or model
    results.check_writable_dir(out)
    device = shards.local_device(resolve_device(config.device))
    with process_group(device) as store:
        fill_shared_caches(config, launch.rank)
        counter = SharedProgress(store, launch, config, progress_factory)
        outcome = runner.run(config, out, counter.factory, shard_name(name, config.strategies, out, launch.shard),
                             resume)
        counter.finish()
        gathered = gather_outcomes(outcome, launch.rank)
    if gathered is None:
        return outcome
    return merged_outcome(gathered, out, name, config.strategies)


@contextmanager
def process_group(device: torch.device) -> Iterator[object]:
    """The launcher's process group (NCCL on CUDA, gloo on CPU), initialised here unless it already is."""
    import torch.distributed as dist

    owned = shards.init_process_group(device)
    try:
        yield dist.distributed_c10d._get_default_store()
    finally:
        if owned:
            dist.destroy_process_group()


def fill_shared_caches(config: runner.RunConfig, rank: int) -> None:
    """Rank 0 writes the caches every rank reads (synthetic clips, the converted SmolLM2) while the others
    wait: two ranks creating one cache entry at once collide on its final rename."""
    import torch.distributed as dist

    if rank == 0:
        runner.resolve_samples(config)
        if config.model in PRESETS:
            tiny_llm_dir()
    dist.barrier()


class SharedProgress:
    """One counter of finished plan entries over all ranks, in the launcher's store."""

    def __init__(self, store, launch: shards.Launch, config: runner.RunConfig, bar: ProgressFactory | None):
        self.store = store
        self.local_total = config.warmup + launch.shard.size(config.samples)
        self.total = config.warmup * launch.world + config.samples
        self.advance = bar(self.total) if bar is not None and launch.rank == 0 else None
        self.reported = self.shown = 0

    def factory(self, remaining: int) -> Callable[[int], None]:
        """The runner's progress hook; entries it will not run (resumed) count as done at once."""
        self.add(self.local_total - remaining)
        return self.add

    def add(self, steps: int) -> None:
        self.reported += steps
        self.show(self.store.add(PROGRESS_KEY, steps))

    def show(self, done: int) -> None:
        if self.advance is not None and done > self.shown:
            self.advance(done - self.shown)
            self.shown = done

    def finish(self) -> None:
        """Count this rank's entries as done (a finished resume ran none), then wait for every rank."""
        self.add(self.local_total - self.reported)
        while (done := self.store.add(PROGRESS_KEY, 0)) < self.total:
            self.show(done)
            time.sleep(POLL_S)
        self.show(done)


def gather_outcomes(outcome: Outcome, rank: int) -> list[dict] | None:
    """Every rank's result on rank 0 (in rank order); None on the other ranks."""
    import torch.distributed as dist

    mine = {"document": outcome.document, "json": str(outcome.json_path), "paths": [str(p) for p in outcome.paths],
            "reused": outcome.reused, "rerun": outcome.rerun}
    gathered: list | None = [None] * dist.get_world_size() if rank == 0 else None
    dist.gather_object(mine, gathered, dst=0)
    return gathered


def merged_outcome(gathered: list[dict], out: Path, name: str, strategies: list[str]) -> Outcome:
    """Rank 0: the shards merged into `<out>/<name>_<stamp>.json/.md/.png`."""
    parts = [merge.ShardResult(Path(g["json"]), g["document"]) for g in gathered]
    document = merge.merge_shards(parts)
    stem = results.free_stem(out, results.result_name(name, strategies, results.name_max(out)))
    written = results.write_outputs(document, out / f"{stem}.json")
    shard_files = [Path(p) for g in gathered for p in g["paths"]]
    return Outcome(document, written + shard_files, reused=sum(g["reused"] for g in gathered),
                   rerun=any(g["rerun"] for g in gathered))
