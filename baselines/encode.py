"""Stages 1–3 of one sample under the runner's clocks, and the input-side options they read.

`--preprocess` (where Stage 2's image work runs) and `--source` are checked against the model family
before any model loads; a processor `--preprocess device` cannot reproduce is refused right after
loading. On the first counted sample, outside every timed region, the device path's pixels are
compared with the CPU processor's (`preprocess_max_pixel_diff`).
"""

from __future__ import annotations

from typing import Any, Iterator

import torch

from egpt_speed.datasets import SampleSpec
from egpt_speed.errors import EgptError
from egpt_speed.events import png_decoder_name
from egpt_speed.models import model_family
from egpt_speed.preprocess import PREPROCESS_MODES, Preprocess, check_preprocess, clip_spec
from egpt_speed.stages import (EncodedSample, PreprocessedSample, default_preprocess, preprocess_pixel_diff,
                               stage1_load, stage2_preprocess, stage3_vision, stage3_vision_batch)
from egpt_speed.timing import TimedRegion
from egpt_speed.vision_graph import check_vision_mode, use_vision_mode, vision_facts

STAGE1_NOTE = "Stage 1 is a disk read, no caching across samples"
PREPROCESS_CHOICES = ("auto", *PREPROCESS_MODES)


def check_input_options(config) -> None:
    """--preprocess and --source against the model family of --model (no weights read)."""
    if config.preprocess not in PREPROCESS_CHOICES:
        raise EgptError(f"--preprocess {config.preprocess!r} is not one of {', '.join(PREPROCESS_CHOICES)}; pick one.")
    check_vision_mode(config.vision_mode)
    family = model_family(config.model)
    if family == "eventgpt":
        return
    if config.preprocess == "device":
        raise EgptError(f"--preprocess device renders event frames for EventGPT; {family} uses its own processor, "
                        "so pass --preprocess cpu or auto.")
    if config.source == "png":
        raise EgptError(f"--source png reads pre-rendered event frames; {family} reads the clip's video frames, "
                        "so drop --source png.")


def resolve_preprocess(choice: str, device: torch.device, family: str = "eventgpt") -> Preprocess:
    """auto → the device on CUDA, else the CPU; the LLaVA families always use their own (CPU) processor."""
    if family != "eventgpt":
        return "cpu"
    return default_preprocess(device) if choice == "auto" else check_preprocess(choice)


def check_loaded(model, config) -> None:
    """Right after loading: a processor the device path does not reproduce fails before any sample runs;
    the model gets its Stage-3 frame encoder for --vision-mode."""
    use_vision_mode(model, config.vision_mode)
    if resolve_preprocess(config.preprocess, model.device, model.family) == "device":
        clip_spec(model.image_processor)


def encode(spec: SampleSpec, config, base, measure_diff: bool = False) -> tuple[EncodedSample, dict[str, Any]]:
    """Stages 1–3 of one sample, each timed → (encoded sample, the record fields they fill).

    `measure_diff` (the first counted sample): also, untimed, the largest device-vs-CPU pixel
    difference when Stage 2 runs on the device.
    """
    pre, common = encode_front(spec, config, base, measure_diff)
    with TimedRegion(base.device) as r3:
        encoded = stage3_vision(pre, base)
    return encoded, {**common, **_stage3_fields(encoded, r3.ms, r3.peak_bytes)}


def encode_batch(specs: list[SampleSpec], config, base,
                 measure_diff: bool = False) -> list[tuple[EncodedSample, dict[str, Any]]]:
    """Stages 1–2 per sample, then Stage 3 once for all their frames (`stage3_vision_batch`), for a
    batched strategy. Each sample's `stage3_ms` is the batch's Stage 3 time divided by the samples
    (`stage3_batch_size` says by how many); `measure_diff` applies to the first sample."""
    fronts = [encode_front(spec, config, base, measure_diff and i == 0) for i, spec in enumerate(specs)]
    with TimedRegion(base.device) as r3:
        encoded = stage3_vision_batch([pre for pre, _ in fronts], base)
    share = r3.ms / len(specs)
    return [(e, {**common, **_stage3_fields(e, share, r3.peak_bytes), "stage3_batch_size": len(specs)})
            for e, (_, common) in zip(encoded, fronts)]


def encode_plan(plan: list[tuple[SampleSpec, bool]], config, base, group: int = 1,
                skip: int = 0) -> Iterator[tuple[int, int | None, EncodedSample, dict[str, Any]]]:
    """Stages 1–3 of the run's samples in order → (plan index, counted index or None, encoded, fields).

    `group` > 1 (every strategy batched): Stage 3 runs once per `group` samples (`encode_batch`);
    warm-up and counted samples never share a group. The first `skip` counted samples are not run;
    the first counted sample measures the pixel difference.
    """
    warmups = sum(1 for _, counted in plan if not counted)
    todo = [(i, i - warmups if counted else None, spec) for i, (spec, counted) in enumerate(plan)
            if not counted or i - warmups >= skip]
    while todo:
        warm = todo[0][1] is None
        chunk = [todo.pop(0)]
        while todo and len(chunk) < group and (todo[0][1] is None) == warm:
            chunk.append(todo.pop(0))
        specs = [spec for _, _, spec in chunk]
        first = chunk[0][1] == 0
        results = encode_batch(specs, config, base, first) if group > 1 else [encode(specs[0], config, base, first)]
        for (index, counted_index, _), (encoded, common) in zip(chunk, results):
            yield index, counted_index, encoded, common


def encode_front(spec: SampleSpec, config, base, measure_diff: bool = False) -> tuple[PreprocessedSample, dict[str, Any]]:
    """Stages 1 and 2 of one sample, timed → (preprocessed sample, their record fields)."""
    device, family = base.device, base.family
    preprocess = resolve_preprocess(config.preprocess, device, family)
    with TimedRegion(device) as r1:
        loaded = stage1_load(spec, config.source, config.frames, family)
    with TimedRegion(device) as r2:
        pre = stage2_preprocess(loaded, base, config.frames, preprocess)
    common = {"id": spec.id, "query": spec.query, "stage1_ms": r1.ms, "stage2_ms": r2.ms,
              "input_warnings": list(loaded.warnings)}
    if measure_diff and preprocess == "device":
        common["preprocess_max_pixel_diff"] = preprocess_pixel_diff(loaded, base, config.frames)
    return pre, common


def _stage3_fields(encoded: EncodedSample, ms: float, peak_bytes: int | None) -> dict[str, Any]:
    events = int(encoded.event_features.shape[0])
    return {"stage3_ms": ms, "stage3_peak_bytes": peak_bytes, "event_tokens": events,
            "prompt_tokens": int(encoded.prompt_ids.numel()) - 1 + events}


def input_facts(records: list[dict], config, base) -> dict[str, Any]:
    """The run-level input facts for the result's config: the resolved preprocess mode, the first
    sample's pixel difference, every sample's input warnings (union) and what Stage 1 measures."""
    first = records[0] if records else {}
    warnings = sorted({warning for record in records for warning in record.get("input_warnings", ())})
    frames = getattr(base, "frames", config.frames)  # a LLaVA family's own frame count (1 or 8)
    return {"model_family": base.family, "frames_used": frames,
            "preprocess": resolve_preprocess(config.preprocess, base.device, base.family),
            "preprocess_requested": config.preprocess,
            "preprocess_max_pixel_diff": first.get("preprocess_max_pixel_diff"),
            "input_warnings": warnings, "stage1_note": STAGE1_NOTE, **vision_facts(base),
            "png_decoder": png_decoder_name() if config.source == "png" else None}
