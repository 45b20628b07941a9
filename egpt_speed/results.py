"""Result documents: schema egpt-speed/1, JSON written atomically, markdown and PNG rendered from it."""

from __future__ import annotations

import hashlib
import json
import os
import platform
import subprocess
import sys
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import torch

from egpt_speed import divergence, metrics

SCHEMA = "egpt-speed/1"
STAGE_KEYS = ("stage1_ms", "stage2_ms", "stage3_ms", "stage4_ms")
TIMED_KEYS = STAGE_KEYS + ("prefill_ms", "decode_ms", "total_ms", "per_token_ms", "tokens_per_s", "num_tokens")


def _package_version(name: str) -> str | None:
    try:
        from importlib.metadata import version
        return version(name)
    except Exception:  # noqa: BLE001 - not installed (PackageNotFoundError) or broken metadata
        return None


def _git_commit() -> str | None:
    """HEAD (+ "-dirty"); EGPT_SPEED_GIT_COMMIT where the tree was copied without .git (a GPU box)."""
    if os.environ.get("EGPT_SPEED_GIT_COMMIT"):
        return os.environ["EGPT_SPEED_GIT_COMMIT"]
    try:
        here = Path(__file__).resolve().parent
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True, timeout=5)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=here, capture_output=True, text=True, timeout=5)
        return (out.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")) if out.returncode == 0 else None
    except (OSError, subprocess.SubprocessError):
        return None


def capture_env(device: torch.device, bandwidth: float | None) -> dict[str, Any]:
    env: dict[str, Any] = {
        "device": str(device), "python": platform.python_version(), "platform": platform.platform(),
        "torch": torch.__version__, "cuda": torch.version.cuda,
        "transformers": _package_version("transformers"), "accelerate": _package_version("accelerate"),
        "bitsandbytes": _package_version("bitsandbytes"), "torchao": _package_version("torchao"),
        "flash_attn": _package_version("flash-attn"), "numpy": _package_version("numpy"),
        "git_commit": _git_commit(), "command": " ".join([Path(sys.argv[0]).name] + sys.argv[1:]),
        "copy_bandwidth_bytes_per_s": bandwidth, "cpu_threads": torch.get_num_threads(),
    }
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        env["device_name"] = props.name
        env["device_memory_bytes"] = props.total_memory
        try:
            env["driver"] = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                           capture_output=True, text=True, timeout=10).stdout.strip() or None
        except (OSError, subprocess.SubprocessError):
            env["driver"] = None
    else:
        env["device_name"] = platform.processor() or platform.machine()
        env["driver"] = None
    return env


def summarize(samples: list[dict]) -> dict[str, Any]:
    """Means (the headline), with median and p90 beside each, and the full distributions."""
    summary: dict[str, Any] = {"samples": len(samples), "distributions": {}}
    for key in TIMED_KEYS:
        values = [s[key] for s in samples if s.get(key) is not None]
        stats = metrics.quantiles(values)
        if not stats:
            summary[key] = None
            continue
        summary["distributions"][key] = stats
        summary[key] = stats["mean"]
        summary[f"{key}_median"] = stats["median"]
        summary[f"{key}_p90"] = stats["p90"]
    # ms/token and tokens/s over the whole run are token-weighted (Σ decode / Σ (n − 1))
    aggregate = metrics.aggregate_per_token_ms([s["decode_ms"] for s in samples], [s["num_tokens"] for s in samples])
    summary["per_token_ms"] = aggregate
    summary["tokens_per_s"] = 1e3 / aggregate if aggregate else None
    total = summary.get("total_ms") or 0.0
    for key in STAGE_KEYS:
        summary[key.replace("_ms", "_pct")] = 100.0 * summary[key] / total if total and summary.get(key) is not None else None
    summary["samples_per_s"] = 1e3 / total if total else None
    tokens = [s["num_tokens"] for s in samples]
    summary["num_tokens_min"] = min(tokens) if tokens else None
    summary["num_tokens_max"] = max(tokens) if tokens else None
    summary["num_tokens_std"] = summary["distributions"].get("num_tokens", {}).get("std")
    peaks = [s.get("stage4_peak_bytes") for s in samples if s.get("stage4_peak_bytes")]
    summary["stage4_peak_bytes"] = max(peaks) if peaks else None
    if any("drafted" in s or "target_forwards" in s for s in samples):
        summary["speculation"] = metrics.speculation_summary(samples)
    for key in ("draft_ms", "verify_ms"):
        values = [s[key] for s in samples if s.get(key) is not None]
        if values:
            summary[key] = metrics.quantiles(values)["mean"]
    return summary


def compare(reference: str, candidate: str, ref_samples: list[dict], cand_samples: list[dict]) -> dict[str, Any]:
    """Per-sample ratios (median + IQR) and output agreement of a candidate against the reference."""
    pairs = list(zip(ref_samples, cand_samples))
    assert all(r["id"] == c["id"] for r, c in pairs), "compare pairs samples by id"
    stage4 = [metrics.ratio(r["stage4_ms"], c["stage4_ms"]) for r, c in pairs]
    total = [metrics.ratio(r["total_ms"], c["total_ms"]) for r, c in pairs]
    per_token = [metrics.ratio(r["per_token_ms"], c["per_token_ms"]) for r, c in pairs]
    agreements = [metrics.agreement(r["token_ids"], c["token_ids"]) for r, c in pairs]
    divergences = [a.first_divergence for a in agreements if a.first_divergence is not None]
    s4, tot, ptk = metrics.quantiles(stage4), metrics.quantiles(total), metrics.quantiles(per_token)
    return {
        "reference": reference, "candidate": candidate, "samples": len(pairs),
        "speedup_stage4_median": s4.get("median"), "speedup_stage4_q1": s4.get("q1"), "speedup_stage4_q3": s4.get("q3"),
        "speedup_total_median": tot.get("median"), "speedup_total_q1": tot.get("q1"), "speedup_total_q3": tot.get("q3"),
        "speedup_per_token_median": ptk.get("median"),
        "exact_match_rate": sum(a.exact_match for a in agreements) / len(agreements) if agreements else None,
        "token_match_rate": metrics.quantiles([a.token_match_rate for a in agreements]).get("mean"),
        "first_divergence_mean": sum(divergences) / len(divergences) if divergences else None,
        "common_prefix_len_mean": metrics.quantiles([a.common_prefix_len for a in agreements]).get("mean"),
        "teacher_forced_top1": metrics.quantiles([c.get("teacher_forced_top1") for _, c in pairs]).get("mean"),
        **divergence.comparison_keys(ref_samples, cand_samples),
        "per_sample": [{"id": r["id"], "speedup_stage4": x, "speedup_total": y, "exact_match": a.exact_match,
                        "token_match_rate": a.token_match_rate, "first_divergence": a.first_divergence,
                        "common_prefix_len": a.common_prefix_len,
                        "divergence_kind": (c.get(divergence.RECORD_KEY) or {}).get("kind")}
                       for (r, c), x, y, a in zip(pairs, stage4, total, agreements)],
    }


# ------------------------------------------------------------------------------------------ records


@dataclass
class SampleRecord:
    """Stage 4 of one sample, decoded alone or in a batch (then the times are the whole batch's)."""

    token_ids: list[int]
    text: str
    ended_with_eos: bool
    prefill_ms: float
    decode_ms: float
    peak_bytes: int | None = None
    working_bytes: int | None = None
    phases_ms: dict[str, float] = field(default_factory=dict)  # draft / verify splits a strategy timed
    metrics: dict[str, Any] = field(default_factory=dict)  # a strategy's counters (drafted, accepted, ...)
    batch: dict[str, Any] | None = None  # batch_size, batch_tokens, batch_tokens_per_s

    def to_dict(self) -> dict[str, Any]:
        tokens = len(self.token_ids)
        record = {"stage4_ms": self.prefill_ms + self.decode_ms, "prefill_ms": self.prefill_ms,
                  "decode_ms": self.decode_ms, "num_tokens": tokens,
                  "per_token_ms": metrics.per_token_ms(self.decode_ms, tokens),
                  "tokens_per_s": metrics.tokens_per_s(self.decode_ms, tokens),
                  "stage4_peak_bytes": self.peak_bytes, "stage4_working_bytes": self.working_bytes,
                  "token_ids": self.token_ids, "text": self.text, "ended_with_eos": self.ended_with_eos,
                  **(self.batch or {})}
        record.update({f"{name}_ms": ms for name, ms in self.phases_ms.items()})
        record.update(self.metrics)
        return record


def batch_tokens_per_s(new_tokens: int, stage4_ms: float) -> float | None:
    """Batch throughput: all new tokens of a batch over its Stage-4 time (prefill included)."""
    return new_tokens / (stage4_ms / 1e3) if stage4_ms > 0 else None


def batch_summary(records: list[dict]) -> dict:
    """Run-level batch figures: throughput over all counted batches (Σ tokens / Σ batch time) and per batch."""
    batches: dict[int, dict] = {}
    for record in records:
        batches.setdefault(record["batch_index"], record)
    tokens = sum(r["batch_tokens"] for r in batches.values())
    seconds_ms = sum(r["stage4_ms"] for r in batches.values())
    per_batch = metrics.quantiles([r["batch_tokens_per_s"] for r in batches.values()])
    return {"batches": len(batches), "batch_tokens_per_s": batch_tokens_per_s(tokens, seconds_ms),
            "batch_tokens_per_s_median": per_batch.get("median"),
            "batch_size_mean": metrics.quantiles([r["batch_size"] for r in batches.values()]).get("mean")}


# ------------------------------------------------------------------------------------------ document


@dataclass
class RunFacts:
    """What the runner knows about one strategy's run beyond its sample records."""

    name: str
    description: str
    lossless: bool
    settings: dict[str, Any]
    batched: bool
    model: Any  # the EventGPT it decoded with (weight and byte accounting)
    llm_bytes: int | None = None  # device bytes of its LLM, measured on CUDA
    extra_bytes: int | None = None  # device bytes its prepare added beside the model (draft model/head)


def footprint(summary: dict, facts: RunFacts, records: list[dict], bandwidth: float | None) -> None:
    """Weights, working memory, bytes per decoded token and MBU, added to `summary`."""
    summary["weight_bytes"] = facts.llm_bytes if facts.llm_bytes is not None else metrics.weight_bytes(facts.model)
    summary["weight_bytes_measured"] = facts.llm_bytes is not None
    summary["draft_bytes"] = facts.extra_bytes
    working = [r["stage4_working_bytes"] for r in records if r.get("stage4_working_bytes") is not None]
    summary["stage4_working_bytes"] = max(working) if working else None
    summary["stage4_footprint_bytes"] = (summary["weight_bytes"] + (facts.extra_bytes or 0) + max(working)) if working else None
    context = (summary.get("distributions", {}).get("num_tokens", {}).get("mean", 0) / 2
               + (records[0]["prompt_tokens"] if records else 0))
    summary["bytes_per_token"] = metrics.bytes_per_decoded_token(facts.model, context, facts.llm_bytes)
    summary["mbu"] = metrics.mbu(summary["bytes_per_token"], summary.get("per_token_ms"), bandwidth)


def run_entry(facts: RunFacts, records: list[dict], bandwidth: float | None) -> dict[str, Any]:
    summary = summarize(records)
    footprint(summary, facts, records, bandwidth)
    if facts.batched and records:
        summary.update(batch_summary(records))
    return {"description": facts.description, "lossless": facts.lossless, "settings": facts.settings,
            "summary": summary, "samples": records}


def build_document(config: dict[str, Any], env: dict[str, Any], runs: dict[str, dict]) -> dict[str, Any]:
    """The result document; the first run is the reference every other one is compared with."""
    names = list(runs)
    reference = names[0]
    comparisons = [compare(reference, name, runs[reference]["samples"], runs[name]["samples"]) for name in names[1:]]
    return {"schema": SCHEMA, "created": datetime.now().isoformat(timespec="seconds"), "env": env,
            "config": {**config, "reference": reference}, "runs": runs, "comparisons": comparisons}


# ------------------------------------------------------------------------------------------ files

# the longest suffix a result stem gets: "_NN" against a same-second clash, then ".journal.jsonl"
_LONGEST_SUFFIX = len("_99") + len(".journal.jsonl")


def safe_name(name: str) -> str:
    return "".join(ch if ch.isalnum() or ch in "-_" else "-" for ch in name)


def result_name(name: str, strategies: list[str], name_max: int = 255) -> str:
    """`name`, or a short one naming the reference and the count when the file name would not fit.

    The full strategy list is inside the file either way (`config.strategies`).
    """
    stamp = len("_YYYYMMDD_HHMMSS")
    if len(safe_name(name).encode()) + stamp + _LONGEST_SUFFIX <= name_max:
        return name
    digest = hashlib.sha256("\n".join(strategies).encode()).hexdigest()[:8]
    short = f"compare_{safe_name(strategies[0])[:40]}_vs_{len(strategies) - 1}-strategies_{digest}"
    return short if len(short) + stamp + _LONGEST_SUFFIX <= name_max else f"run_{digest}"


def timestamped_name(name: str, now: datetime | None = None) -> str:
    return f"{safe_name(name)}_{(now or datetime.now()).strftime('%Y%m%d_%H%M%S')}"


def free_stem(out: Path, name: str) -> str:
    """A timestamped stem no result or journal in `out` uses yet (two runs in one second never clash)."""
    stem = base = timestamped_name(name)
    suffix = 2
    while (out / f"{stem}.json").exists() or (out / f"{stem}.journal.jsonl").exists():
        stem = f"{base}_{suffix}"
        suffix += 1
    return stem


def write_outputs(document: dict, json_path: Path) -> list[Path]:
    """The .json, .md and (with matplotlib) .png of a result, each written atomically; returns them."""
    from egpt_speed import report

    write_json_atomic(document, json_path)
    write_text_atomic(report.render_markdown(document), json_path.with_suffix(".md"))
    plot = report.write_plots(document, json_path.with_suffix(".png"))
    return [json_path, json_path.with_suffix(".md")] + ([plot] if plot else [])


def write_json_atomic(document: dict, path: Path) -> None:
    """Write to a temp file in the same dir and rename: a crash never leaves half a result."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text(json.dumps(document, indent=1, default=str))
    os.replace(tmp, path)


def write_text_atomic(text: str, path: Path) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


def load_result(path: Path) -> dict:
    from egpt_speed.errors import EgptError

    if not path.exists():
        raise EgptError(f"result file {path} does not exist.")
    try:
        document = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise EgptError(f"{path} is not valid JSON ({error.msg} at line {error.lineno}).") from None
    except (UnicodeDecodeError, RecursionError) as error:
        raise EgptError(f"{path} is not readable JSON ({type(error).__name__}).") from None
    if not isinstance(document, dict) or document.get("schema") != SCHEMA:
        raise EgptError(f"{path} is not an egpt-speed result (schema {SCHEMA!r} expected).")
    if not isinstance(document.get("env"), dict) or not isinstance(document.get("runs"), dict):
        raise EgptError(f"{path} carries the result schema but lacks its env or runs; it was edited or truncated.")
    return document


def check_writable_dir(path: Path, flag: str = "--out") -> None:
    """Refuse, before any work, a directory that cannot be created or written (a file, read-only, ...).

    A directory without write permission bits is refused even for root, who could write there: the
    user marked it read-only.
    """
    from egpt_speed.errors import EgptError

    try:
        is_file = path.exists() and not path.is_dir()
    except OSError as error:  # a name too long, say
        raise EgptError(f"{flag} {path} cannot be used ({error.strerror}); pass another directory.") from None
    if is_file:
        raise EgptError(f"{flag} {path} is a file, not a directory; pass a directory.")
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise EgptError(f"{flag} {path} cannot be created ({error.strerror}); pass a writable directory.") from None
    if not path.stat().st_mode & 0o222:
        raise EgptError(f"{flag} {path} is read-only; make it writable or pass another directory.")
    probe = path / f".egpt-speed-probe-{os.getpid()}"
    try:
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as error:
        raise EgptError(f"{flag} {path} is not writable ({error.strerror}); pass a writable directory.") from None


def name_max(directory: Path) -> int:
    """The file-system limit on one file name in `directory` (255 where it cannot be asked)."""
    try:
        return os.pathconf(directory, "PC_NAME_MAX")
    except (OSError, ValueError, AttributeError):
        return 255
