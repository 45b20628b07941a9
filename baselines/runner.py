"""The decoupled four-stage runner behind `run` and `compare`.

Per sample: Stages 1–3 run once (timed, features cached); then every strategy decodes from the
same cache, in an order that alternates between samples so drift (clocks, thermals, caches) hits
all strategies alike. Warm-up samples run the same path and are dropped from every statistic.
Each counted sample is journaled (all its strategies' records) before the next one starts, and
the result files are written from the journal, so `--resume` can continue an interrupted run.
"""

from __future__ import annotations

import gc
from contextlib import contextmanager
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any, Callable

import torch

from egpt_speed import datasets, divergence, journal, metrics, results, shards
from egpt_speed.baselines.checks import (check_compile_modes, check_coordinate_descent, check_draft_and_counts, check_flex, check_sampling,
                                         check_speculation_flags, check_strategy_names)
from egpt_speed.baselines.encode import check_input_options, check_loaded, encode, encode_plan, input_facts
from egpt_speed.baselines.journaling import (Outcome, check_resumable, finished_outcome, journaled_left_out, open_journal, resumed_batches,
                                             sigterm_as_interrupt)
from egpt_speed.baselines.decode import (PendingSample, SampleSink, StrategyState, add_teacher_forced_top1,
                                         decode_one, decode_pending_batch, queue_for_batch)
from egpt_speed.datasets import SampleSpec
from egpt_speed.decoding import GenerationSettings
from egpt_speed.errors import EgptError, RunInterrupted, StrategyFailed
from egpt_speed.fused_step import resolve_fused_step
from egpt_speed.models import (EventGPT, cache_root, check_model_spec, load_model, model_family, resolve_device,
                               resolve_dtype)
from egpt_speed.options import MeasureOptions, RunOptions, default_strategy_options
from egpt_speed.results import batch_summary  # noqa: F401 - re-exported for benchmarks/batch_sweep.py
from egpt_speed.stages import EncodedSample, make_request
from egpt_speed.strategies import registry
from egpt_speed.strategies.registry import RunContext, Strategy
from egpt_speed.timing import collect_between_samples, collector_paused, measure_copy_bandwidth

__all__ = ["RunConfig", "StrategyState", "decode_one", "execute", "run", "Outcome"]


@dataclass
class RunConfig(MeasureOptions):
    """Everything a run measures with; the defaults are the CLI's (egpt_speed.options)."""

    strategies: list[str] = field(default_factory=list)
    options: dict[str, Any] = field(default_factory=default_strategy_options)  # strategy-specific (RunContext)

    @classmethod
    def from_options(cls, strategies: list[str], options: RunOptions) -> "RunConfig":
        return cls(strategies=list(strategies), **options.measure(), options=options.strategy_options())

    def record(self) -> dict[str, Any]:
        """The configuration as the result file's `config` holds it (and the journal's hash covers)."""
        return {f.name: (str(v) if isinstance(v := getattr(self, f.name), Path) else v) for f in fields(self)}


def validate(config: RunConfig) -> None:
    """Check every user input that can be checked before loading weights."""
    if config.frames not in (1, 5):
        raise EgptError(f"--frames {config.frames} is not supported; use 5 (official pooled path) or 1.")
    if config.source not in ("npy", "png"):
        raise EgptError(f"--source {config.source!r} is not supported; use npy or png.")
    for flag, value, least in (("--samples", config.samples, 1), ("--warmup", config.warmup, 0),
                               ("--max-new-tokens", config.max_new_tokens, 1), ("--gamma", config.gamma, 1),
                               ("--batch-size", config.batch_size, 1)):
        if value < least:
            raise EgptError(f"{flag} must be at least {least}.")
    resolve_dtype(config.dtype)
    resolve_device(config.device)
    check_model_spec(config.model, config.vision_tower)
    check_input_options(config)
    check_strategy_names(config.strategies)
    shards.check_shard(shards.parse_shard(config.shard), config.samples)
    check_sampling(config.do_sample, config.temperature, config.top_p)
    if config.fp32_check and config.do_sample:
        raise EgptError("--fp32-check compares greedy outputs; drop --sample or --fp32-check.")
    check_compile_modes(config.options)
    check_speculation_flags(config.options, config.strategies, config.do_sample)
    check_coordinate_descent(config.options, config.strategies, shards.local_device(resolve_device(config.device)))
    check_flex(config.strategies, config.batch_size)
    check_draft_and_counts(config.options, config.draft, config.model)
    if config.memory_budget_gb is not None and config.memory_budget_gb <= 0:
        raise EgptError("--memory-budget must be a positive number of GB.")


def with_resolved_options(config: RunConfig) -> RunConfig:
    """Options whose default depends on the device, resolved: the journal's hash and the result's config then say
    what runs (a CPU run without --fused-step resumes a journal written when the flag defaulted to off)."""
    device = shards.local_device(resolve_device(config.device))
    choice = resolve_fused_step(config.options.get("fused_step"), device, config.do_sample, config.options)
    return replace(config, options={**config.options, "fused_step": choice})


def context_for(config: RunConfig) -> RunContext:
    device = shards.local_device(resolve_device(config.device))
    return RunContext(device=device, dtype=resolve_dtype(config.dtype, device), model_spec=config.model,
                      draft_spec=config.draft, gamma=config.gamma, batch_size=config.batch_size,
                      options=with_resolved_options(config).options)  # a no-op after run()'s own call


def build_strategies(config: RunConfig, ctx: RunContext) -> list[Strategy]:
    built = [registry.build(name, ctx) for name in config.strategies]
    for strategy in built:
        reason = strategy.unavailable_reason()
        if reason:
            raise EgptError(f"strategy {strategy.name!r} cannot run here: {reason}")
    return built


def resolve_samples(config: RunConfig) -> list[SampleSpec]:
    return datasets.resolve_samples(config.data, config.samples, config.warmup, config.seed, config.synthetic_events,
                                    cache_root() / "synthetic", allow_outside=config.allow_paths_outside_data,
                                    video=needs_video_frames(config))


def needs_video_frames(config: RunConfig) -> bool:
    """Synthetic clips carry video frames when the target or a cross-modal draft is a LLaVA family."""
    return any(model_family(spec) != "eventgpt" for spec in (config.model, config.draft) if spec)


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
                settings: GenerationSettings, progress: Callable[[int], None] | None = None,
                sink: SampleSink | None = None, skip: int = 0, leave_out: bool = True) -> dict[str, str]:
    """The measured loop: records each counted sample into every state's `records` and into `sink`.

    The first `skip` counted samples are already journaled and are not run. A batched strategy
    queues encoded samples and decodes `--batch-size` of them in one call. With `leave_out`, a
    candidate that raises during warm-up is left out (removed from `states` and the sink's names) and
    the run goes on; returned: name → reason. A failure in a counted sample, of the reference, or
    any failure without `leave_out` stops the run (StrategyFailed).
    """
    sink = sink or SampleSink(None, [s.strategy.name for s in states], skip)
    # every strategy batched: Stage 3 runs once per batch of samples (each sample's stage3_ms is its share)
    group = config.batch_size if states and all(s.strategy.batched for s in states) else 1
    with collector_paused():
        return _measured_loop(config, base, states, plan, settings, progress, sink, skip, group, leave_out)


def _measured_loop(config: RunConfig, base: EventGPT, states: list[StrategyState], plan: list[tuple[SampleSpec, bool]],
                   settings: GenerationSettings, progress: Callable[[int], None] | None, sink: SampleSink,
                   skip: int, group: int, leave_out: bool) -> dict[str, str]:
    """run_samples' loop, run with the collector paused (collected between samples, untimed)."""
    pending: dict[int, list[PendingSample]] = {}  # id(state) → encoded samples waiting for its batch (batch_sweep
    # runs several `batch` states, so not by name)
    left_out: dict[str, str] = {}
    for index, counted_index, encoded, common in encode_plan(plan, config, base, group, skip):
        counted, failed_states = counted_index is not None, []
        for rank, position in enumerate(interleaved_order(len(states), index)):
            state, common_here = states[position], {**common, "order": rank}
            try:
                with failures_named(state, counted_index + 1 if counted else index + 1, counted):
                    record = _decode_or_queue(state, encoded, common_here, counted_index, settings, base.device,
                                              sink, pending)
            except StrategyFailed as failed:
                if failed.counted or position == 0 or not leave_out:
                    raise
                left_out[state.strategy.name] = failed.reason
                failed_states.append(state)
                continue
            if counted and record is not None:
                record.update(common_here)
                record["total_ms"] = record["stage1_ms"] + record["stage2_ms"] + record["stage3_ms"] + record["stage4_ms"]
                state.records.append(record)
                sink.add(counted_index, state.strategy.name, record)
        if failed_states:
            _leave_out(failed_states, left_out, states, sink, pending)
        if counted:
            add_teacher_forced_top1(states, encoded, settings)
            add_divergences(states, encoded, settings)
        sink.flush()
        collect_between_samples()
        if progress:
            progress(1)
    for state in states:  # the last, possibly partial, batch of each batched strategy
        queue = pending.get(id(state))
        if queue:
            last = queue[-1].index  # counted index, None for warm-up
            with failures_named(state, (last if last is not None else 0) + 1, last is not None):
                decode_pending_batch(state, queue, settings, base.device, sink)
    sink.flush()
    return left_out


def _decode_or_queue(state: StrategyState, encoded: EncodedSample, common: dict, counted_index: int | None,
                     settings: GenerationSettings, device: torch.device, sink: SampleSink,
                     pending: dict[int, list[PendingSample]]) -> dict | None:
    """One strategy on one sample: its record, or None when a batched strategy queued it."""
    if state.strategy.batched:
        queue = pending.setdefault(id(state), [])
        if queue and queue[-1].index is None and counted_index is not None:  # the warm-up batch goes off first:
            with failures_named(state, len(queue), False):  # its failure is a warm-up one
                decode_pending_batch(state, queue, settings, device, sink)
        queue_for_batch(state, queue, PendingSample(encoded, common, counted_index), settings, device, sink)
        return None
    return decode_one(state, encoded, settings, device)


def _leave_out(failed: list[StrategyState], left_out: dict[str, str], states: list[StrategyState], sink: SampleSink,
               pending: dict[int, list[PendingSample]]) -> None:
    """Remove the candidates that failed in warm-up from the loop, the journal's sample set and the batch queues,
    and give back their memory (a quantised model copy, a compiled engine's cache and graphs)."""
    for state in failed:
        pending.pop(id(state), None)
        sink.names.remove(state.strategy.name)
    states[:] = [state for state in states if all(state is not gone for gone in failed)]
    sink.left_out.update(left_out)
    failed.clear()
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


@contextmanager
def failures_named(state: StrategyState, sample: int, counted: bool):
    """A strategy's exception as StrategyFailed, naming it and the sample (1-based; warm-up ones counted apart)."""
    name = state.strategy.name
    try:
        yield
    except (KeyboardInterrupt, StrategyFailed):
        raise
    except EgptError as error:  # the user's to fix (e.g. a tree that does not fit the cache): stops the run, named
        if str(error).startswith(f"{name}: "):
            raise
        raise EgptError(f"{name}: {error}") from error
    except Exception as error:  # noqa: BLE001 - re-raised with the strategy's name, the cause chained
        raise StrategyFailed(name, sample, counted, error) from error


def add_divergences(states: list[StrategyState], encoded: EncodedSample, settings: GenerationSettings) -> None:
    """Diagnose each candidate's first divergence on the reference's model (untimed; greedy, unbatched only)."""
    reference = states[0]
    if settings.do_sample or reference.strategy.batched or not reference.records:
        return
    request = make_request(encoded, settings)
    for state in states[1:]:
        if not state.strategy.batched and state.records:
            state.records[-1][divergence.RECORD_KEY] = divergence.diagnose_record(
                reference.model, request, reference.records[-1]["token_ids"], state.records[-1]["token_ids"])


def fp32_floor(config: RunConfig, ctx: RunContext, base: EventGPT, plan: list[tuple[SampleSpec, bool]],
               settings: GenerationSettings, reference_tokens: list[list[int]]) -> dict:
    """--fp32-check: the counted samples re-encoded and decoded by transformers generate on a float32 copy."""
    if ctx.dtype == torch.float32:
        return {"note": "the run is float32 already: no floor to measure."}
    fp32 = load_model(config.model, torch.float32, ctx.device, config.vision_tower)
    requests = [make_request(encode(spec, config, base)[0], settings) for spec, counted in plan if counted]
    return divergence.numerical_floor(fp32, requests, reference_tokens, ctx.dtype)


def load_for(config: RunConfig, ctx: RunContext) -> Callable[[], EventGPT]:
    def load() -> EventGPT:
        model = load_model(config.model, ctx.dtype, ctx.device, config.vision_tower,
                           allow_tokenizer_mismatch=config.allow_tokenizer_mismatch)
        check_loaded(model, config)
        return model
    return load


def document_from_journal(config: RunConfig, ctx: RunContext, base: EventGPT, states: list[StrategyState],
                          bandwidth: float | None, path: Path) -> dict:
    entries = journal.read_journal(path).entries
    runs = {}
    for state in states:
        name = state.strategy.name
        facts = results.RunFacts(name, state.strategy.summary, state.strategy.lossless, state.strategy.settings(),
                                 state.strategy.batched, state.model, state.llm_bytes, state.extra_bytes)
        runs[name] = results.run_entry(facts, [entry["records"][name] for entry in entries], bandwidth)
    first = entries[0]["records"][states[0].strategy.name] if entries else {}
    facts = {"dtype_resolved": str(ctx.dtype).replace("torch.", ""),
             "attn_implementation": base.llm.config._attn_implementation,
             "event_tokens": first.get("event_tokens"), "prompt_tokens": first.get("prompt_tokens"),
             "random_weights": base.random_weights, "vision_dtype": str(next(base.vision_tower.parameters()).dtype),
             "image_processor": type(base.image_processor).__name__,
             **input_facts([entry["records"][states[0].strategy.name] for entry in entries], config, base)}
    mismatch = getattr(base, "tokenizer_mismatch", None)
    env = {**results.capture_env(ctx.device, bandwidth), "tokenizer_mismatch": mismatch.describe() if mismatch else None}
    return results.build_document({**config.record(), **facts}, env, runs)


def run(config: RunConfig, out: Path, progress_factory: Callable[[int], Callable[[int], None]] | None = None,
        name: str | None = None, resume: bool = False) -> Outcome:
    """Check, load, run (journaling each counted sample), write `<out>/<name>_<stamp>.json/.md/.png`."""
    validate(config)
    config = with_resolved_options(config)
    results.check_writable_dir(out)
    name = results.result_name(name or "_".join(config.strategies), config.strategies, results.name_max(out))
    digest = journal.config_hash(config.record())
    previous = journal.find_journal(out, digest) if resume else None
    if previous:
        check_resumable(previous, shards.samples_of(config.shard, config.samples))
        finished = finished_outcome(previous, shards.samples_of(config.shard, config.samples))
        if finished:
            return finished
    ctx = context_for(config)
    strategies = build_strategies(config, ctx)
    plan = warmup_then_counted(resolve_samples(config), config.samples, config.warmup)
    plan = shards.shard_plan(plan, shards.parse_shard(config.shard))  # all warm-up, every n-th counted sample
    settings = GenerationSettings(max_new_tokens=config.max_new_tokens, do_sample=config.do_sample,
                                  temperature=config.temperature, top_p=config.top_p, seed=config.seed)
    torch.manual_seed(config.seed)
    with sigterm_as_interrupt():
        base, states, bandwidth = load_and_prepare(config, ctx, strategies)
        del strategies  # the states hold them: a candidate left out is then freed
        records, done = open_journal(out, name, config.record(), digest, previous)
        with records:
            try:
                left_out = journaled_left_out(records.path, [s.strategy.name for s in states])
                states[:] = [state for state in states if state.strategy.name not in left_out]  # as the journal has them
                for state in states:  # batch indices continue after the resumed ones
                    state.batches = resumed_batches(records.path, state.strategy.name)
                progress = progress_factory(len(plan) - done) if progress_factory else None
                sink = SampleSink(records, [s.strategy.name for s in states], done, dict(left_out))
                left_out.update(run_samples(config, base, states, plan, settings, progress, sink, skip=done))
            except KeyboardInterrupt:
                kept = len(journal.read_journal(records.path).entries)
                raise RunInterrupted(records.path, kept, shards.samples_of(config.shard, config.samples)) from None
            except StrategyFailed as failed:
                failed.kept = f"{len(journal.read_journal(records.path).entries)} finished samples are kept in {records.path}"
                raise
    document = document_from_journal(config, ctx, base, states, bandwidth, records.path)
    if left_out:
        document["left_out"] = left_out
    if config.fp32_check:
        reference = document["runs"][states[0].strategy.name]["samples"]
        document["numerical_floor"] = fp32_floor(config, ctx, base, plan, settings, [r["token_ids"] for r in reference])
    json_path = records.path.with_name(records.path.name[:-len(journal.SUFFIX)] + ".json")
    return Outcome(document, results.write_outputs(document, json_path) + [records.path], reused=done)


def load_and_prepare(config: RunConfig, ctx: RunContext,
                     strategies: list[Strategy]) -> tuple[EventGPT, list[StrategyState], float | None]:
    """Models loaded and prepared, and the device's copy bandwidth (for MBU); no journal yet."""
    try:
        base, states = prepare_states(config, ctx, strategies, load_for(config, ctx))
        bandwidth = measure_copy_bandwidth(ctx.device, megabytes=1024 if ctx.device.type == "cuda" else 128)
    except KeyboardInterrupt:
        raise RunInterrupted(None, 0, config.samples) from None
    return base, states, bandwidth


def execute(config: RunConfig, out: Path, progress_factory: Callable[[int], Callable[[int], None]] | None = None,
            name: str | None = None, resume: bool = False) -> tuple[dict, Path]:
    """`run`, returning (document, json path)."""
    outcome = run(config, out, progress_factory, name, resume)
    return outcome.document, outcome.json_path
