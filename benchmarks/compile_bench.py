"""Stage-4 decode speed on the 7B shapes: baseline vs hf-static vs compile (static cache + CUDA graph).

Run on the GPU machine (about 4–5 minutes on an H100; most of it is the one-time compilations:
hf-static ~35 s, compile ~115 s with max-autotune, compile_mode=default ~40 s):
    python benchmarks/compile_bench.py --profile --out benchmarks/results   # + kernel breakdown of one step
Writes compile_bench_<stamp>.json/.md: per method the median ms/token (decode_ms / (n − 1), as the
runner defines it), TTFT, MBU against the measured copy bandwidth, the first call's cost
(compilation / capture) apart, and token agreement with baseline (random weights in bf16 have
nearly flat logits, so agreement is low by nature: judge equality in float32, see the tests).

Methods run interleaved (rotating order per round) after warm-up rounds that are not counted.
If the `synthetic-7b` preset cannot be built (it borrows the SmolLM2 tokenizer, see GPU.md), the
script falls back to the bare 7B Llama with a random ~600-token prompt of the same length and says so.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from egpt_speed.metrics import bytes_per_decoded_token, weight_bytes  # noqa: E402
from egpt_speed import metrics  # noqa: E402
from egpt_speed.decoding import DecodeRequest, GenerationSettings  # noqa: E402
from egpt_speed.errors import EgptError  # noqa: E402
from egpt_speed.models import (EventGPT, load_model, resolve_device, resolve_dtype,  # noqa: E402
                               synthetic_7b_configs)
from egpt_speed.prompt import EVENT_TOKEN_INDEX, PromptTemplate, tokenize_with_event_placeholder  # noqa: E402
from egpt_speed.results import capture_env, timestamped_name, write_json_atomic, write_text_atomic  # noqa: E402
from egpt_speed.static_decode import StaticEngine  # noqa: E402
from egpt_speed.timing import Clock, measure_copy_bandwidth, synchronize  # noqa: E402
from egpt_speed.strategies import registry  # noqa: E402
from egpt_speed.strategies.registry import RunContext  # noqa: E402

EVENT_TOKENS = 582  # 5 frames pooled: 5 temporal + 577 spatial tokens
QUESTION = "What are the key elements in this scene?"


def bare_7b(dtype: torch.dtype, device: torch.device, layers: int | None = None) -> EventGPT:
    """The 7B Llama alone, wrapped so strategies can splice; no tokenizer or vision stack needed.

    `layers` shrinks it (a CPU smoke run of this script); the default keeps the 32 layers.
    """
    from transformers import LlamaForCausalLM

    llm_config, _ = synthetic_7b_configs()
    llm_config.dtype = dtype
    if layers:
        llm_config.num_hidden_layers = layers
    torch.manual_seed(0)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            llm = LlamaForCausalLM(llm_config)
    finally:
        torch.set_default_dtype(previous)
    llm.generation_config.pad_token_id = 0
    return EventGPT(llm, nn.Identity(), nn.Sequential(nn.Identity()), None, None, None, PromptTemplate("eventgpt_v1"),
                    name="synthetic-7b (bare LLM)", random_weights=True).eval()


def build_request(model: EventGPT, max_new_tokens: int, bare: bool) -> DecodeRequest:
    device, dtype = model.device, model.llm.dtype
    if bare:  # a prompt of the preset's length: BOS + system/question text ids + the event placeholder
        text = torch.randint(3, 32000, (40,), generator=torch.Generator().manual_seed(0)).tolist()
        ids = [1] + text[:30] + [EVENT_TOKEN_INDEX] + text[30:]
    else:
        prompt = model.template.render(QUESTION, model.tokenizer)
        ids = tokenize_with_event_placeholder(prompt, model.tokenizer, model.fold_to_vocab)
    features = torch.randn(EVENT_TOKENS, model.hidden_size, device=device, dtype=dtype,
                           generator=torch.Generator(device).manual_seed(0)) * 0.02
    return DecodeRequest("bench", torch.tensor(ids, device=device), features, GenerationSettings(max_new_tokens=max_new_tokens))


def decode_once(strategy, model, request, device) -> dict:
    clock = Clock(device)
    start = time.perf_counter()
    clock.begin()
    result = strategy.decode(model, request, clock)
    prefill_ms, decode_ms = clock.end()
    return {"wall_ms": (time.perf_counter() - start) * 1e3, "prefill_ms": prefill_ms, "decode_ms": decode_ms,
            "num_tokens": len(result.token_ids), "per_token_ms": metrics.per_token_ms(decode_ms, len(result.token_ids)),
            "token_ids": result.token_ids, "metrics": result.metrics}


def median(values):
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def profile_decode_step(engine: StaticEngine, request, model, steps: int, out_dir: Path, stem: str) -> dict:
    """Kernel-time breakdown of `steps` captured decode steps (torch.profiler, CUDA activities)."""
    from torch.profiler import ProfilerActivity, profile

    embeds = model.splice(request.prompt_ids, request.event_features)
    clock = Clock(model.device)
    clock.begin()
    engine.generate(embeds, 2, set(), clock)  # prefill so the step decodes from a realistic position
    first = torch.zeros(1, 1, dtype=torch.long, device=model.device)
    position = embeds.shape[1]
    with torch.inference_mode():
        engine.decode_n(first, position, 4, set(), eos_every=4)  # warm
        synchronize(model.device)
        with profile(activities=[ProfilerActivity.CUDA, ProfilerActivity.CPU]) as prof:
            engine.decode_n(first, position, steps, set(), eos_every=steps)
            synchronize(model.device)
    # inductor names its fused kernels after every op inside: a Triton kernel holding an `mm` is a GEMV
    # with its neighbours fused in, so matmul is checked first
    groups = {"matmul (weights)": ("gemv", "gemm", "nvjet", "sm90_", "cutlass", "cublas", "ampere_", "splitk", "_mm_", "_mm"),
              "attention": ("fmha", "flash", "attention", "efficient", "sdpa", "cudnn"),
              "index_copy (cache write)": ("index_copy", "indexcopy", "index_put"),
              "argmax/reduce": ("argmax", "reduce_kernel", "max_")}
    by_group: dict[str, float] = {name: 0.0 for name in groups}
    by_group["elementwise/other"] = 0.0
    kernels = 0
    rows = []
    for event in prof.key_averages():
        device_us = event.self_device_time_total  # kernels only: an aten op's device time is its kernels'
        if not device_us or event.key.startswith(("cuda", "aten::", "Activity")):
            continue
        name = event.key.lower()
        group = next((g for g, keys in groups.items() if any(k in name for k in keys)), "elementwise/other")
        by_group[group] += device_us / 1e3 / steps
        kernels += event.count
        rows.append((event.key[:90], event.count / steps, device_us / 1e3 / steps))
    rows.sort(key=lambda r: -r[2])
    table = prof.key_averages().table(sort_by="self_device_time_total", row_limit=40)
    (out_dir / f"{stem}_profile.txt").write_text(table)
    return {"steps": steps, "kernels_per_step": kernels / steps, "kernel_ms_per_step": sum(by_group.values()),
            "ms_per_step_by_group": by_group, "top_kernels": [{"kernel": k, "per_step": c, "ms_per_step": ms} for k, c, ms in rows[:15]]}


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="synthetic-7b")
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=5, help="counted rounds (each runs every method once)")
    parser.add_argument("--warmup", type=int, default=1, help="uncounted rounds after each method's first call")
    parser.add_argument("--methods", default="baseline,hf-static,compile,compile:compile_mode=default,compile:compile_mode=none",
                        help="comma-separated strategy[:option=value] list; the first is the reference")
    parser.add_argument("--profile", action="store_true", help="also profile the captured decode step (kernel breakdown)")
    parser.add_argument("--bare", action="store_true", help="skip the preset: the bare 7B LLM and a random prompt of its length")
    parser.add_argument("--bare-layers", type=int, default=None, help="layers of the bare LLM (smoke runs only)")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    return parser.parse_args()


def load_bench_model(args: argparse.Namespace, dtype: torch.dtype, device: torch.device) -> tuple[EventGPT, bool]:
    """The preset, or the bare 7B LLM when asked or when `synthetic-7b` cannot be built; (model, bare)."""
    if not args.bare:
        try:
            return load_model(args.model, dtype, device), False
        except EgptError as error:
            if args.model != "synthetic-7b":
                raise
            print(f"note: {error} → using the bare 7B LLM with a random prompt of the same length")
    return bare_7b(dtype, device, args.bare_layers), True


def build_methods(spec_list: str, model: EventGPT, model_spec: str, device: torch.device, dtype: torch.dtype) -> list[dict]:
    """One prepared strategy per `strategy[:option=value...]` entry, in order (the first is the reference)."""
    methods = []
    for spec in [m.strip() for m in spec_list.split(",") if m.strip()]:
        name, *pairs = spec.split(":")
        options = dict(pair.split("=", 1) for pair in pairs)
        strategy = registry.build(name, RunContext(device=device, dtype=dtype, model_spec=model_spec, options=options))
        strategy.prepare(model)
        methods.append({"label": spec, "strategy": strategy, "first": None, "runs": [], "error": None})
    return methods


def run_methods(methods: list[dict], model: EventGPT, request: DecodeRequest, device: torch.device,
                warmup: int, rounds: int) -> None:
    """First call apart (compilation, capture), then warm-up rounds, then counted rounds, rotating the order."""
    for method in methods:
        try:
            method["first"] = decode_once(method["strategy"], model, request, device)
        except Exception as error:  # noqa: BLE001 - one failing method (e.g. a compile mode) must not hide the others
            method["error"] = f"{type(error).__name__}: {str(error)[:300]}"
            print(f"{method['label']}: failed: {method['error']}")
    live = [m for m in methods if m["error"] is None]
    for round_index in range(warmup + rounds):
        shift = round_index % max(len(live), 1)
        for method in live[shift:] + live[:shift]:
            run = decode_once(method["strategy"], model, request, device)
            if round_index >= warmup:
                method["runs"].append(run)


def method_rows(methods: list[dict], bytes_per_token: float, bandwidth: float) -> list[dict]:
    """One result row per method: medians over the counted runs, MBU, first-call cost, agreement with the first."""
    reference = methods[0]["runs"][0]["token_ids"] if methods[0]["runs"] else None
    rows = []
    for method in methods:
        runs = method["runs"]
        per_token = median([r["per_token_ms"] for r in runs])
        first = method["first"] or {}
        row = {"method": method["label"], "settings": method["strategy"].settings(), "error": method["error"],
               "per_token_ms": per_token, "tokens_per_s": 1e3 / per_token if per_token else None,
               "prefill_ms": median([r["prefill_ms"] for r in runs]), "num_tokens": median([r["num_tokens"] for r in runs]),
               "mbu": metrics.mbu(bytes_per_token, per_token, bandwidth),
               "first_call_ms": first.get("wall_ms"), "compile_ms": (first.get("metrics") or {}).get("compile_ms"),
               "captured": (first.get("metrics") or {}).get("captured"),
               "per_token_ms_all": [r["per_token_ms"] for r in runs]}
        if reference is not None and runs:
            agreement = metrics.agreement(reference, runs[0]["token_ids"])
            row["agreement_with_reference"] = agreement.token_match_rate
            row["first_divergence"] = agreement.first_divergence
        rows.append(row)
    return rows


def profile_first_engine(methods: list[dict], model: EventGPT, request: DecodeRequest, model_spec: str, out: Path) -> dict:
    """Kernel breakdown of the first compile method's engine (its step is compiled already)."""
    live = [m for m in methods if m["error"] is None]
    engine = next((m["strategy"].engine for m in live if hasattr(m["strategy"], "engine")), None) or StaticEngine(model.llm)
    profile = profile_decode_step(engine, request, model, 16, out, timestamped_name(f"compile_bench_{model_spec}"))
    profile["engine"] = {"compile_mode": engine.compile_mode, "captured": engine.captured}
    return profile


def fmt(value, spec: str = ".2f") -> str:
    return "—" if value is None else format(value, spec)


def method_line(row: dict) -> str:
    if row["error"]:
        return f"| {row['method']} | failed: {row['error'][:120]} | | | | | | | |"
    return (f"| {row['method']} | {fmt(row['per_token_ms'])} | {fmt(row['tokens_per_s'], '.1f')} | "
            f"{fmt(row['mbu'] and row['mbu'] * 100, '.0f')}% | {fmt(row['prefill_ms'], '.1f')} | {fmt(row['num_tokens'], '.0f')} | "
            f"{fmt(row['first_call_ms'], '.0f')} | {fmt(row['compile_ms'], '.0f')} | {fmt(row.get('agreement_with_reference'))} |")


def profile_lines(profile: dict) -> list[str]:
    lines = ["", f"## One captured decode step (compile_mode {profile['engine']['compile_mode']}), by kernel group (heuristic, by kernel name) "
             f"({profile['kernels_per_step']:.0f} kernels/step, "
             f"{profile['kernel_ms_per_step']:.2f} ms kernel time/step)", "", "| group | ms/step |", "|---|---:|"]
    lines += [f"| {group} | {ms:.3f} |" for group, ms in profile["ms_per_step_by_group"].items()]
    lines += ["", "| kernel | per step | ms/step |", "|---|---:|---:|"]
    lines += [f"| `{k['kernel']}` | {k['per_step']:.0f} | {k['ms_per_step']:.3f} |" for k in profile["top_kernels"]]
    return lines


def markdown(document: dict) -> str:
    config, env = document["config"], document["env"]
    bandwidth = env["copy_bandwidth_bytes_per_s"]
    lines = [f"# Stage-4 decode: static cache + CUDA graph vs generate ({config['model']}{', bare LLM' if config['bare_llm'] else ''})", "",
             f"- device {env.get('device_name')}, torch.{config['dtype']}, prefix {config['prefix_len']} tokens, "
             f"{config['max_new_tokens']} new tokens, {config['rounds']} counted rounds after {config['warmup']} warm-up (medians)",
             f"- bytes/token {config['bytes_per_token'] / 1e9:.2f} GB, copy bandwidth {bandwidth / 1e12:.2f} TB/s "
             f"→ roofline {config['roofline_ms_per_token']:.2f} ms/token",
             f"- command: `{env['command']}`", "",
             "| method | ms/token | tok/s | MBU | TTFT ms | tokens | first call ms | compile/capture ms | agreement vs ref |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    lines += [method_line(row) for row in document["methods"]]
    if document["profile"]:
        lines += profile_lines(document["profile"])
    return "\n".join(lines) + "\n"


@torch.inference_mode()
def main() -> None:
    args = parse_args()
    device = resolve_device(args.device)
    dtype = resolve_dtype(args.dtype, device)
    args.out.mkdir(parents=True, exist_ok=True)

    started = time.perf_counter()
    model, bare = load_bench_model(args, dtype, device)
    load_s = time.perf_counter() - started
    request = build_request(model, args.max_new_tokens, bare)
    prefix_len = int(request.prompt_ids.numel()) - 1 + EVENT_TOKENS
    bandwidth = measure_copy_bandwidth(device, megabytes=1024 if device.type == "cuda" else 128)
    bytes_per_token = bytes_per_decoded_token(model, prefix_len + args.max_new_tokens / 2)

    methods = build_methods(args.methods, model, args.model, device, dtype)
    run_methods(methods, model, request, device, args.warmup, args.rounds)
    rows = method_rows(methods, bytes_per_token, bandwidth)
    profile = None
    if args.profile and device.type == "cuda":
        profile = profile_first_engine(methods, model, request, args.model, args.out)

    document = {"schema": "egpt-speed/compile-bench/1", "env": capture_env(device, bandwidth),
                "config": {"model": args.model, "bare_llm": bare, "dtype": str(dtype).replace("torch.", ""),
                           "prefix_len": prefix_len, "max_new_tokens": args.max_new_tokens, "rounds": args.rounds,
                           "warmup": args.warmup, "load_s": load_s, "weight_bytes": weight_bytes(model),
                           "bytes_per_token": bytes_per_token, "roofline_ms_per_token": bytes_per_token / bandwidth * 1e3},
                "methods": rows, "profile": profile, "elapsed_s": time.perf_counter() - started}
    path = args.out / f"{timestamped_name(f'compile_bench_{args.model}')}.json"
    write_json_atomic(json.loads(json.dumps(document, default=str)), path)
    text = markdown(document)
    write_text_atomic(text, path.with_suffix(".md"))
    print(text, end="")
    print(f"\nwrote {path} and {path.with_suffix('.md')} in {document['elapsed_s']:.0f} s")

if __name__ == "__main__":
    main()
