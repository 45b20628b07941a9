"""Join the shard results of one command (`--shard i/n`, or the ranks of torchrun) into one result.

The shards must share a configuration (`shards.group_hash`: everything but `shard`) and form a
complete set 0..n-1; each shard's samples go back to their dataset positions (shard i's k-th
counted sample is sample i + k·n). Summaries are recomputed over all samples; the speedups stay
per-sample ratios measured within one process.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from egpt_speed import journal, metrics, results, shards
from egpt_speed.errors import EgptError

FOOTPRINT_KEYS = ("weight_bytes", "weight_bytes_measured", "draft_bytes", "bytes_per_token")


@dataclass
class ShardResult:
    path: Path
    document: dict

    @property
    def shard(self) -> shards.Shard:
        return shards.parse_shard(self.document["config"]["shard"])


def load_shard(path: Path) -> ShardResult:
    """A shard's result from its .json, or from its journal when the journal's run finished."""
    if path.name.endswith(journal.SUFFIX):
        json_path = path.with_name(path.name[:-len(journal.SUFFIX)] + ".json")
        if not json_path.exists():
            kept = len(journal.read_journal(path).entries)
            raise EgptError(f"{path} is an unfinished shard ({kept} samples journaled); finish it by re-running "
                            "its command with --resume, then merge.")
        path = json_path
    document = results.load_result(path)
    if document["config"].get("shard") is None:
        raise EgptError(f"{path} is not a shard (it was run without --shard or a launcher); merge only shard results.")
    return ShardResult(path, document)


def check_set(parts: list[ShardResult]) -> None:
    """Refuse shards of different configurations, of different splits, repeated, or an incomplete set."""
    first = parts[0]
    for part in parts[1:]:
        if shards.group_hash(part.document["config"]) != shards.group_hash(first.document["config"]):
            keys = shards.differing_keys(first.document["config"], part.document["config"])
            raise EgptError(f"{part.path} and {first.path} were run with different configurations "
                            f"({', '.join(keys) or 'config'}); merge only the shards of one command.")
        if part.shard.count != first.shard.count:
            raise EgptError(f"{part.path} is shard {part.shard} but {first.path} is shard {first.shard}; "
                            "merge the shards of one split.")
    seen: dict[int, Path] = {}
    for part in parts:
        if part.shard.index in seen:
            raise EgptError(f"shard {part.shard} is given twice ({seen[part.shard.index]}, {part.path}); pass it once.")
        seen[part.shard.index] = part.path
    count = first.shard.count
    missing = [f"{i}/{count}" for i in range(count) if i not in seen]
    if missing:
        raise EgptError(f"incomplete set: shard{'s' if len(missing) > 1 else ''} {', '.join(missing)} "
                        f"missing; run {'them' if len(missing) > 1 else 'it'} (--shard i/{count}) and merge all {count}.")


def merged_samples(parts: list[ShardResult], name: str) -> list[dict]:
    """`name`'s records of every shard, in dataset order; batch indices renumbered to stay distinct."""
    placed, batch_offset = [], 0
    for part in parts:
        records = part.document["runs"][name]["samples"]
        for position, record in enumerate(records):
            record = dict(record)
            if record.get("batch_index") is not None:
                record["batch_index"] += batch_offset
            placed.append((part.shard.dataset_index(position), record))
        batches = [r["batch_index"] for r in records if r.get("batch_index") is not None]
        batch_offset += max(batches, default=-1) + 1
    return [record for _, record in sorted(placed, key=lambda item: item[0])]


def merged_run(entries: list[dict], samples: list[dict], bandwidth: float | None) -> dict[str, Any]:
    """One strategy's run entry over all shards: summary recomputed, footprint from the shards."""
    first = entries[0]
    summary = results.summarize(samples)
    summary.update({key: first["summary"].get(key) for key in FOOTPRINT_KEYS})
    working = [e["summary"]["stage4_working_bytes"] for e in entries if e["summary"].get("stage4_working_bytes") is not None]
    summary["stage4_working_bytes"] = max(working) if working else None
    weights = summary.get("weight_bytes")
    summary["stage4_footprint_bytes"] = (weights + (summary.get("draft_bytes") or 0) + max(working)
                                         if working and weights is not None else None)
    summary["mbu"] = metrics.mbu(summary["bytes_per_token"], summary.get("per_token_ms"), bandwidth) \
        if summary.get("bytes_per_token") is not None else None
    if any(r.get("batch_index") is not None for r in samples):
        summary.update(results.batch_summary(samples))
    return {**{k: v for k, v in first.items() if k not in ("summary", "samples")}, "summary": summary,
            "samples": samples}


def merged_env(parts: list[ShardResult]) -> dict[str, Any]:
    """Shard 0's environment, with every rank's device listed (`ranks`, and `device` naming them all)."""
    envs = [part.document["env"] for part in parts]
    ranks = [{"shard": str(part.shard), "device": env.get("device"), "device_name": env.get("device_name"),
              "git_commit": env.get("git_commit"), "command": env.get("command"),
              "copy_bandwidth_bytes_per_s": env.get("copy_bandwidth_bytes_per_s")}
             for part, env in zip(parts, envs)]
    devices = ", ".join(dict.fromkeys(str(env.get("device")) for env in envs))
    return {**envs[0], "device": devices, "ranks": ranks}


def merged_floor(parts: list[ShardResult]) -> dict | None:
    """--fp32-check's numerical floor over all shards (counts summed, lists joined)."""
    floors = [part.document.get("numerical_floor") for part in parts]
    if any(floor is None for floor in floors) or "samples" not in floors[0]:
        return floors[0]
    count = sum(f["samples"] for f in floors)
    differing = sum(f["differs_from_fp32"] for f in floors)
    rates = [f["token_match_rate_vs_fp32"] * f["samples"] for f in floors if f["token_match_rate_vs_fp32"] is not None]
    return {**floors[0], "samples": count, "differs_from_fp32": differing,
            "exact_match_rate_vs_fp32": (count - differing) / count if count else None,
            "token_match_rate_vs_fp32": sum(rates) / count if count else None,
            "differing_ids": [i for f in floors for i in f["differing_ids"]],
            "divergences": [d for f in floors for d in f["divergences"]],
            "real_divergence_count": sum(f["real_divergence_count"] for f in floors)}


def merge_shards(parts: list[ShardResult]) -> dict:
    """The merged result document of a complete, consistent shard set (checked first)."""
    if not parts:
        raise EgptError("nothing to merge; pass the result files (or journals) of every shard.")
    check_set(parts)
    parts = sorted(parts, key=lambda part: part.shard.index)
    first = parts[0].document
    bandwidth = first["env"].get("copy_bandwidth_bytes_per_s")
    # a candidate one rank left out after a warm-up failure is left out of the merged result
    left_out = {name: reason for part in parts for name, reason in part.document.get("left_out", {}).items()}
    runs = {name: merged_run([p.document["runs"][name] for p in parts], merged_samples(parts, name), bandwidth)
            for name in first["runs"] if name not in left_out}
    config = {key: value for key, value in first["config"].items() if key != "reference"}
    config.update(shard=None, shards=parts[0].shard.count, merged_from=[str(p.path) for p in parts])
    document = results.build_document(config, merged_env(parts), runs)
    if left_out:
        document["left_out"] = left_out
    floor = merged_floor(parts)
    if floor is not None:
        document["numerical_floor"] = floor
    return document


def merge_files(paths: list[Path], out: Path | None = None) -> tuple[dict, list[Path]]:
    """`egpt-speed merge`: load, check and merge shard results; write json/md/png beside the first."""
    document = merge_shards([load_shard(path) for path in paths])
    target_dir = out or paths[0].parent
    results.check_writable_dir(target_dir)
    strategies = document["config"]["strategies"]
    name = "compare_" + "_vs_".join(strategies) if len(strategies) > 1 else strategies[0]
    stem = results.free_stem(target_dir, results.result_name(name, strategies, results.name_max(target_dir)))
    return document, results.write_outputs(document, target_dir / f"{stem}.json")
