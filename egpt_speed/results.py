"""Result documents: schema egpt-speed/1, JSON written atomically, markdown and PNG rendered from it."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
from datetime import datetime
from pathlib import Path
from typing import Any

import torch

from egpt_speed import metrics

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
        "per_sample": [{"id": r["id"], "speedup_stage4": x, "speedup_total": y, "exact_match": a.exact_match,
                        "token_match_rate": a.token_match_rate, "first_divergence": a.first_divergence,
                        "common_prefix_len": a.common_prefix_len} for (r, _), x, y, a in zip(pairs, stage4, total, agreements)],
    }


def timestamped_name(name: str, now: datetime | None = None) -> str:
    safe = "".join(ch if ch.isalnum() or ch in "-_" else "-" for ch in name)
    return f"{safe}_{(now or datetime.now()).strftime('%Y%m%d_%H%M%S')}"


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
        document = json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise EgptError(f"{path} is not valid JSON ({error.msg} at line {error.lineno}).") from None
    if not isinstance(document, dict) or document.get("schema") != SCHEMA:
        raise EgptError(f"{path} is not an egpt-speed result (schema {SCHEMA!r} expected).")
    return document
