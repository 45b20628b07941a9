"""Stage 4 under the runner's clocks: one sample or a batch → sample records, and the journal sink.

Every record comes from `results.SampleRecord`, whether its sample was decoded alone or in a batch.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from egpt_speed.decoding import GenerationSettings, eos_ids, teacher_forced_top1
from egpt_speed.journal import Journal
from egpt_speed.eventgpt import EventGPT
from egpt_speed.results import SampleRecord, batch_tokens_per_s
from egpt_speed.cross_modal import SampleRequest
from egpt_speed.stages import EncodedSample, make_request
from egpt_speed.strategies.registry import Strategy
from egpt_speed.timing import Clock, TimedRegion


@dataclass
class StrategyState:
    strategy: Strategy
    model: EventGPT
    records: list[dict] = field(default_factory=list)  # counted samples decoded in this process
    batches: int = 0  # counted batches decoded so far (batched strategies only; resumed ones included)
    llm_bytes: int | None = None  # device bytes of this strategy's LLM (measured on CUDA)
    extra_bytes: int | None = None  # device bytes its prepare added beside the model (draft model/head)


class SampleSink:
    """Collects each counted sample's records from every strategy; journals a sample once all are in.

    Samples are journaled in order, so a batched strategy (whose records arrive per batch) holds
    back the samples of its unfinished batch; everything before them is already durable.
    """

    def __init__(self, journal: Journal | None, names: list[str], next_index: int = 0,
                 left_out: dict[str, str] | None = None):
        self.journal, self.names, self.next_index = journal, names, next_index
        self.left_out = left_out or {}  # candidates left out after a warm-up failure: journaled with every sample
        self.pending: dict[int, dict[str, Any]] = {}  # counted index → {"id", "records": {strategy: record}}

    def add(self, index: int, name: str, record: dict) -> None:
        entry = self.pending.setdefault(index, {"index": index, "id": record["id"], "records": {}})
        entry["records"][name] = record

    def flush(self) -> int:
        """Journal every complete sample in order; returns how many were written."""
        written = 0
        while len(self.pending.get(self.next_index, {}).get("records", {})) == len(self.names):
            entry = self.pending.pop(self.next_index)
            if self.left_out:
                entry["left_out"] = dict(self.left_out)
            if self.journal is not None:
                self.journal.append(entry)
            self.next_index += 1
            written += 1
        return written


def decode_one(state: StrategyState, encoded: EncodedSample, settings: GenerationSettings, device: torch.device) -> dict:
    clock = Clock(device)
    with TimedRegion(device) as region:
        clock.begin()
        result = state.strategy.decode(state.model, sample_request(encoded, settings), clock)
        prefill_ms, decode_ms = clock.end()
    return _record(state.model, result, prefill_ms, decode_ms, region, clock).to_dict()


def sample_request(encoded: EncodedSample, settings: GenerationSettings) -> SampleRequest:
    """Stage 4's request, naming the sample's files too (a cross-modal draft reads its own view of them)."""
    request = make_request(encoded, settings)
    return SampleRequest(request.id, request.prompt_ids, request.event_features, request.settings, spec=encoded.spec)


def _record(model: EventGPT, result, prefill_ms: float, decode_ms: float, region, clock: Clock,
            batch: dict | None = None) -> SampleRecord:
    tokens = result.token_ids
    return SampleRecord(tokens, model.tokenizer.decode(tokens, skip_special_tokens=True),
                        bool(tokens) and tokens[-1] in eos_ids(model), prefill_ms, decode_ms, region.peak_bytes,
                        region.working_bytes, dict(clock.phases_ms), dict(result.metrics), batch)


def add_teacher_forced_top1(states: list[StrategyState], encoded: EncodedSample, settings: GenerationSettings) -> None:
    """For lossy candidates (quantisation), score the reference's tokens under the candidate's model (untimed)."""
    reference = states[0]
    if reference.strategy.batched or not reference.records:
        return
    for state in states[1:]:
        if not state.strategy.lossless and not state.strategy.batched and state.records:
            request = make_request(encoded, settings)
            state.records[-1]["teacher_forced_top1"] = teacher_forced_top1(state.model, request, reference.records[-1]["token_ids"])


# ---- batched strategies -------------------------------------------------------------------------

@dataclass
class PendingSample:
    """An encoded sample waiting for its batch, with what its record needs from the sample loop."""

    encoded: EncodedSample
    common: dict  # id, query, stage 1-3 times, token counts, order
    index: int | None  # counted index, None for a warm-up sample


def queue_for_batch(state: StrategyState, queue: list[PendingSample], item: PendingSample, settings: GenerationSettings,
                    device: torch.device, sink: SampleSink) -> None:
    """Add a sample to a batched strategy's queue; decode the queue once it holds a full batch.

    Warm-up and counted samples never share a batch: a counted sample arriving after warm-up ones
    first sends the warm-up batch off.
    """
    if queue and (queue[-1].index is None) != (item.index is None):
        decode_pending_batch(state, queue, settings, device, sink)
    queue.append(item)
    if len(queue) >= state.strategy.ctx.batch_size:
        decode_pending_batch(state, queue, settings, device, sink)


def decode_pending_batch(state: StrategyState, queue: list[PendingSample], settings: GenerationSettings,
                         device: torch.device, sink: SampleSink) -> None:
    """Decode the queued samples as one batch and record each counted one; empties the queue.

    A warm-up batch shorter than --batch-size is filled by repeating its samples, so the first timed
    batch finds the kernels for its shape already warm; its results are dropped.
    """
    items = list(queue)
    queue.clear()
    requests = [make_request(item.encoded, settings) for item in items]
    counted = items[0].index is not None
    if not counted:
        size = state.strategy.ctx.batch_size
        requests += [requests[k % len(requests)] for k in range(size - len(requests))]
    records = decode_batch_records(state, requests, device)
    if not counted:
        return
    for item, record in zip(items, records):
        record.update(item.common)
        record["batch_index"] = state.batches
        record["total_ms"] = record["stage1_ms"] + record["stage2_ms"] + record["stage3_ms"] + record["stage4_ms"]
        state.records.append(record)
        sink.add(item.index, state.strategy.name, record)
    state.batches += 1


def decode_batch_records(state: StrategyState, requests: list, device: torch.device) -> list[dict]:
    """One `decode_batch` call, timed like `decode_one`; one record per request, each with the batch's times."""
    clock = Clock(device)
    with TimedRegion(device) as region:
        clock.begin()
        results = state.strategy.decode_batch(state.model, requests, clock)
        prefill_ms, decode_ms = clock.end()
    new_tokens = sum(len(result.token_ids) for result in results)
    batch = {"batch_size": len(requests), "batch_tokens": new_tokens,
             "batch_tokens_per_s": batch_tokens_per_s(new_tokens, prefill_ms + decode_ms)}
    return [_record(state.model, result, prefill_ms, decode_ms, region, clock, batch).to_dict() for result in results]
