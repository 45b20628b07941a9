"""The decoupled four-stage runner behind `run` and `compare`.

Per sample: Stages 1–3 run once (timed, features cached); then every strategy decodes from the
same cache, in an order that alternates between samples so drift (clocks, thermals, caches) hits
all strategies alike. Warm-up samples run the same path and are dropped from every statistic.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

from egpt_speed import metrics
from egpt_speed import datasets
from egpt_speed.datasets import SampleSpec
from egpt_speed.decoding import GenerationSettings, eos_ids, teacher_forced_top1
from egpt_speed.errors import EgptError
from egpt_speed.models import EventGPT, cache_root, check_model_spec, load_model, resolve_device, resolve_dtype
from egpt_speed.stages import (EncodedSample, make_request, stage1_load, stage2_preprocess, stage3_vision, stage4_decode)
from egpt_speed.timing import Clock, TimedRegion, measure_copy_bandwidth
from egpt_speed.strategies import registry
from egpt_speed.strategies.registry import RunContext, Strategy


@dataclass
class RunConfig:
    """Everything a run needs; the CLI fills it, tests build it directly."""

    strategies: list[str]
    model: str = "tiny"
    draft: str | None = None
    data: str = "synthetic"
    samples: int = 8
    max_new_tokens: int = 64
    dtype: str = "auto"
    device: str = "auto"
    warmup: int = 2
    frames: int = 5
    gamma: int = 4
    batch_size: int = 1
    seed: int = 0
    source: str = "npy"
    vision_tower: Path | None = None
    do_sample: bool = False
    temperature: float = 1.0
    top_p: float = 1.0
    synthetic_events: int = 200_000
    options: dict[str, Any] = field(default_factory=dict)


@dataclass
class StrategyState:
    strategy: Strategy
    model: EventGPT
    records: list[dict] = field(default_factory=list)
    batches: int = 0  # counted batches decoded so far (batched strategies only)
    llm_bytes: int | None = None  # device bytes of this strategy's LLM (measured on CUDA)
    extra_bytes: int | None = None  # device bytes its prepare added beside the model (draft model/head)


def validate(config: RunConfig) -> None:
    """Check every user input that can be checked before loading weights."""
    if config.frames not in (1, 5):
        raise EgptError(f"--frames {config.frames} is not supported; use 5 (official pooled path) or 1.")
    if config.source not in ("npy", "png"):
        raise EgptError(f"--source {config.source!r} is not supported; use npy or png.")
    if config.samples < 1:
        raise EgptError("--samples must be at least 1.")
    if config.warmup < 0:
        raise EgptError("--warmup cannot be negative.")
    if config.max_new_tokens < 1:
        raise EgptError("--max-new-tokens must be at least 1.")
    if config.gamma < 1:
        raise EgptError("--gamma must be at least 1.")
    if config.batch_size < 1:
        raise EgptError("--batch-size must be at least 1.")
    resolve_dtype(config.dtype)
    resolve_device(config.device)
    check_model_spec(config.model)
    if not config.strategies:
        raise EgptError("name at least one strategy, e.g. `egpt-speed run baseline`.")


def context_for(config: RunConfig) -> RunContext:
    device = resolve_device(config.device)
    return RunContext(device=device, dtype=resolve_dtype(config.dtype, device), model_spec=config.model,
                      draft_spec=config.draft, gamma=config.gamma, batch_size=config.batch_size, options=config.options)


def build_strategies(config: RunConfig, ctx: RunContext) -> list[Strategy]:
    built = [registry.build(name, ctx) for name in config.strategies]
    for strategy in built:
        reason = strategy.unavailable_reason()
        if reason:
            raise EgptError(f"strategy {strategy.name!r} cannot run here: {reason}")
    return built


def resolve_samples(config: RunConfig) -> list[SampleSpec]:
    return datasets.resolve_samples(config.data, config.samples, config.warmup, config.seed, config.synthetic_events,
                                    cache_root() / "synthetic")


def warmup_then_counted(specs: list[SampleSpec], samples: int, warmup: int) -> list[tuple[SampleSpec, bool]]:
    """Warm-up samples first (not counted), then `samples` counted ones; reuse clips if data is short."""
    if warmup and len(specs) > samples:
        spare = specs[samples:]  # clips no counted sample uses, cycled when there are fewer than `warmup`
        warm = [spare[i % len(spare)] for i in range(warmup)]
    else:
        warm = [specs[i % len(specs)] for i in range(warmup)]
    counted = [specs[i % len(specs)] for i in range(samples)] if len(specs) < samples else specs[:samples]
    return [(s, False) for s in warm] + [(s, True) for s in counted]


def interleaved_order(count: int, index: int) -> list[int]:
    """Strategy order for sample `index`: rotate by one each sample (A,B then B,A for two)."""
    shift = index % count
    return [(shift + k) % count for k in range(count)]


def prepare_states(config: RunConfig, ctx: RunContext, strategies: list[Strategy],
                   load: Callable[[], EventGPT]) -> tuple[EventGPT, list[StrategyState]]:
    """One base model for Stages 1–3 and unmodified strategies; a fresh copy for each that modifies it."""
    before = metrics.allocated_bytes(ctx.device)
    base = load()
    base_bytes = metrics.minus(metrics.allocated_bytes(ctx.device), before)
    states = []
    for strategy in strategies:
        before = metrics.allocated_bytes(ctx.device)
        model = load() if strategy.modifies_model else base
        strategy.prepare(model)
        grown = metrics.minus(metrics.allocated_bytes(ctx.device), before)
        state = StrategyState(strategy, model)
        # on CUDA, measured: quantised tensor subclasses misreport numel × element_size
        if grown is not None:
            loaded = grown if strategy.modifies_model else base_bytes
            state.llm_bytes = loaded - metrics.vision_bytes(model)
            state.extra_bytes = 0 if strategy.modifies_model else grown  # a draft model or head
        states.append(state)
    return base, states


def run_samples(config: RunConfig, base: EventGPT, states: list[StrategyState], plan: list[tuple[SampleSpec, bool]],
                settings: GenerationSettings, progress: Callable[[int], None] | None = None) -> None:
    """The measured loop. Appends one record per counted sample to each state's `records`.

    A batched strategy (`strategy.batched`) queues encoded samples and decodes `--batch-size` of
    them in one call; its records follow the same sample order as everyone else's.
    """
    device = base.device
    pending: dict[int, list[PendingSample]] = {}  # state position → encoded samples waiting for their batch
    for index, (spec, counted) in enumerate(plan):
        with TimedRegion(device) as r1:
            loaded = stage1_load(spec, config.source, config.frames)
        with TimedRegion(device) as r2:
            pre = stage2_preprocess(loaded, base, config.frames)
        with TimedRegion(device) as r3:
            encoded = stage3_vision(pre, base)
        del loaded, pre
        stage_common = {"id": spec.id, "query": spec.query, "stage1_ms": r1.ms, "stage2_ms": r2.ms, "stage3_ms": r3.ms,
                        "stage3_peak_bytes": r3.peak_bytes, "event_tokens": int(encoded.event_features.shape[0]),
                        "prompt_tokens": int(encoded.prompt_ids.numel()) - 1 + int(encoded.event_features.shape[0])}
        for position in interleaved_order(len(states), index):
            state = states[position]
            order = list(interleaved_order(len(states), index)).index(position)
            if state.strategy.batched:
                queue_for_batch(state, pending.setdefault(position, []), PendingSample(encoded, stage_common, counted, order),
                                settings, device)
                continue
            record = decode_one(state, encoded, settings, device)
            if counted:
                record.update(stage_common)
                record["order"] = order
                record["total_ms"] = record["stage1_ms"] + record["stage2_ms"] + record["stage3_ms"] + record["stage4_ms"]
                state.records.append(record)
        if counted:
            add_teacher_forced_top1(states, encoded, settings)
        if progress:
            progress(1)
    for position, queue in pending.items():  # the last, possibly partial, batch of each batched strategy
        if queue:
            decode_pending_batch(states[position], queue, settings, device)


def add_teacher_forced_top1(states: list[StrategyState], encoded: EncodedSample, settings: GenerationSettings) -> None:
    """For lossy candidates (quantisation), score the reference's tokens under the candidate's model (untimed)."""
    reference = states[0]
    if reference.strategy.batched or not reference.records:
        return
    for state in states[1:]:
        if not state.strategy.lossless and not state.strategy.batched and state.records:
            request = make_request(encoded, settings)
            state.records[-1]["teacher_forced_top1"] = teacher_forced_top1(state.model, request, reference.records[-1]["token_ids"])


def decode_one(state: StrategyState, encoded: EncodedSample, settings: GenerationSettings, device: torch.device) -> dict:
    clock = Clock(device)
    peak = TimedRegion(device)
    with peak as region:
        clock.begin()
        result = stage4_decode(encoded, state.model, state.strategy, settings, clock)
        prefill_ms, decode_ms = clock.end()
    tokens = result.token_ids
    record = {"stage4_ms": prefill_ms + decode_ms, "prefill_ms": prefill_ms, "decode_ms": decode_ms,
              "num_tokens": len(tokens), "per_token_ms": metrics.per_token_ms(decode_ms, len(tokens)),
              "tokens_per_s": metrics.tokens_per_s(decode_ms, len(tokens)), "stage4_peak_bytes": region.peak_bytes, "stage4_working_bytes": region.working_bytes,
              "token_ids": tokens, "text": state.model.tokenizer.decode(tokens, skip_special_tokens=True),
              "ended_with_eos": bool(tokens) and tokens[-1] in eos_ids(state.model)}
    for name, ms in clock.phases_ms.items():
        record[f"{name}_ms"] = ms
    record.update(result.metrics)
    return record


# ---- batched strategies -------------------------------------------------------------------------

@dataclass
class PendingSample:
    """An encoded sample waiting for its batch, with what its record needs from the sample loop."""

    encoded: EncodedSample
    common: dict  # id, query, stage 1-3 times, token counts
    counted: bool
    order: int


def queue_for_batch(state: StrategyState, queue: list[PendingSample], item: PendingSample, settings: GenerationSettings,
                    device: torch.device) -> None:
    """Add a sample to a batched strategy's queue; decode the queue once it holds a full batch.

    Warm-up and counted samples never share a batch: a counted sample arriving after warm-up ones
    first sends the warm-up batch off.
    """
    if queue and queue[-1].counted != item.counted:
        decode_pending_batch(state, queue, settings, device)
    queue.append(item)
    if len(queue) >= state.strategy.ctx.batch_size:
        decode_pending_batch(state, queue, settings, device)


def decode_pending_batch(state: StrategyState, queue: list[PendingSample], settings: GenerationSettings,
                         device: torch.device) -> None:
    """Decode the queued samples as one batch and record each counted one; empties the queue.

    A warm-up batch shorter than --batch-size is filled by repeating its samples, so the first timed
    batch finds the kernels for its shape already warm; its results are dropped.
    """
    items = list(queue)
    queue.clear()
    requests = [make_request(item.encoded, settings) for item in items]
    counted = items[0].counted
    if not counted:
        size = state.strategy.ctx.batch_size
        requests += [requests[k % len(requests)] for k in range(size - len(requests))]
    records = decode_batch_records(state, requests, device)
    if not counted:
        return
    for item, record in zip(items, records):
        record.update(item.common)
        record["order"] = item.order
        record["batch_index"] = state.batches
        record["total_ms"] = record["stage1_ms"] + record["stage2_ms"] + record["stage3_ms"] + record["stage4_ms"]
        state.records.append(record)
    state.batches += 1


def batch_tokens_per_s(new_tokens: int, stage4_ms: float) -> float | None:
    """Batch throughput: all new tokens of a batch over its Stage-4 time (prefill included)."""
    return new_tokens / (stage4_ms / 1e3) if stage4_ms > 0 else None


def decode_batch_records(state: StrategyState, requests: list, device: torch.device) -> list[dict]:
    """One `decode_batch` call, timed like `decode_one`; one record per request, each with the batch's times."""
    clock = Clock(device)
    with TimedRegion(device) as region:
        clock.begin()
        results = state.strategy.decode_batch(state.model, requests, clock)
        prefill_ms, decode_ms = clock.end()
    stage4_ms = prefill_ms + decode_ms
    new_tokens = sum(len(result.token_ids) for result in results)
    stop = eos_ids(state.model)
    records = []
    for result in results:
        tokens = result.token_ids
        record = {"stage4_ms": stage4_ms, "prefill_ms": prefill_ms, "decode_ms": decode_ms, "num_tokens": len(tokens),
                  "per_token_ms": metrics.per_token_ms(decode_ms, len(tokens)),
                  "tokens_per_s": metrics.tokens_per_s(decode_ms, len(tokens)), "stage4_peak_bytes": region.peak_bytes, "stage4_working_bytes": region.working_bytes,
                  "token_ids": tokens, "text": state.model.tokenizer.decode(tokens, skip_special_tokens=True),
                  "ended_with_eos": bool(tokens) and tokens[-1] in stop,
                  "batch_size": len(requests), "batch_tokens": new_tokens,
                  "batch_tokens_per_s": batch_tokens_per_s(new_tokens, stage4_ms)}
        for name, ms in clock.phases_ms.items():
            record[f"{name}_ms"] = ms
        record.update(result.metrics)
        records.append(record)
    return records


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


def load_for(config: RunConfig, ctx: RunContext) -> Callable[[], EventGPT]:
    def load() -> EventGPT:
        return load_model(config.model, ctx.dtype, ctx.device, config.vision_tower)
    return load


def execute(config: RunConfig, out: Path, progress_factory: Callable[[int], Callable[[int], None]] | None = None,
            name: str | None = None) -> tuple[dict, Path]:
    """Validate, load, run, and write `<out>/<name>_<stamp>.json` + `.md` (+ `.png`). Returns (document, json path)."""
    from datetime import datetime

    from egpt_speed import report, results

    validate(config)
    ctx = context_for(config)
    strategies = build_strategies(config, ctx)
    specs = resolve_samples(config)
    plan = warmup_then_counted(specs, config.samples, config.warmup)
    settings = GenerationSettings(max_new_tokens=config.max_new_tokens, do_sample=config.do_sample,
                                  temperature=config.temperature, top_p=config.top_p, seed=config.seed)
    torch.manual_seed(config.seed)
    base, states = prepare_states(config, ctx, strategies, load_for(config, ctx))
    bandwidth = measure_copy_bandwidth(ctx.device, megabytes=1024 if ctx.device.type == "cuda" else 128)
    progress = progress_factory(len(plan)) if progress_factory else None
    run_samples(config, base, states, plan, settings, progress)

    runs: dict[str, Any] = {}
    for state in states:
        summary = results.summarize(state.records)
        summary["weight_bytes"] = state.llm_bytes if state.llm_bytes is not None else metrics.weight_bytes(state.model)
        summary["weight_bytes_measured"] = state.llm_bytes is not None
        summary["draft_bytes"] = state.extra_bytes
        working = [r.get("stage4_working_bytes") for r in state.records if r.get("stage4_working_bytes") is not None]
        summary["stage4_working_bytes"] = max(working) if working else None
        summary["stage4_footprint_bytes"] = (summary["weight_bytes"] + (state.extra_bytes or 0) + max(working)) if working else None
        context = (summary.get("distributions", {}).get("num_tokens", {}).get("mean", 0) / 2
                   + (state.records[0]["prompt_tokens"] if state.records else 0))
        summary["bytes_per_token"] = metrics.bytes_per_decoded_token(state.model, context, state.llm_bytes)
        summary["mbu"] = metrics.mbu(summary["bytes_per_token"], summary.get("per_token_ms"), bandwidth)
        if state.strategy.batched and state.records:
            summary.update(batch_summary(state.records))
        runs[state.strategy.name] = {"description": state.strategy.summary, "lossless": state.strategy.lossless,
                                     "settings": state.strategy.settings(), "summary": summary, "samples": state.records}
    reference = states[0].strategy.name
    comparisons = [results.compare(reference, s.strategy.name, states[0].records, s.records) for s in states[1:]]
    first = states[0].records[0] if states[0].records else {}
    document = {
        "schema": results.SCHEMA, "created": datetime.now().isoformat(timespec="seconds"),
        "env": results.capture_env(ctx.device, bandwidth),
        "config": {**{k: (str(v) if isinstance(v, Path) else v) for k, v in config.__dict__.items()},
                   "reference": reference, "dtype_resolved": str(ctx.dtype).replace("torch.", ""), "attn_implementation": base.llm.config._attn_implementation,
                   "event_tokens": first.get("event_tokens"), "prompt_tokens": first.get("prompt_tokens"),
                   "random_weights": base.random_weights, "vision_dtype": str(next(base.vision_tower.parameters()).dtype),
                   "image_processor": type(base.image_processor).__name__},
        "runs": runs, "comparisons": comparisons,
    }
    stem = results.timestamped_name(name or "_".join(config.strategies))
    json_path = out / f"{stem}.json"
    suffix = 2
    while json_path.exists():  # two runs within one second never overwrite each other
        json_path = out / f"{stem}_{suffix}.json"
        suffix += 1
    results.write_json_atomic(document, json_path)
    results.write_text_atomic(report.render_markdown(document), json_path.with_suffix(".md"))
    report.write_plots(document, json_path.with_suffix(".png"))
    return document, json_path
