"""Issue 11 at 7B shape: the compiled decode step's share of copy bandwidth with and without `fused`
(q/k/v and gate/up in one GEMM each), each also under inductor's coordinate-descent tuning, and which kernel
makes `int8wo+compile` slow.

    python benchmarks/step_bandwidth_7b.py --out DIR [--model synthetic-7b] [--quant int8wo]   # GPU
Per variant (unfused, fused on a deep copy of the LLM, each a StaticEngine with --compile-mode),
interleaved rounds of a 64-token captured decode chunk → median ms/token and MBU against the
measured copy bandwidth; then, for each --quant kind, the same compiled step on a quantized copy
with a torch.profiler kernel table of 8 replays (CUDA time order). Writes
step_bandwidth_7b_<stamp>.json and .md under --out.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from egpt_speed import metrics  # noqa: E402
from egpt_speed.fuse import fuse_projections  # noqa: E402
from egpt_speed.models import load_model, resolve_device, resolve_dtype  # noqa: E402
from egpt_speed.prompt import tokenize_with_event_placeholder  # noqa: E402
from egpt_speed.quantize import inductor_config_for, quantize_llm_torchao  # noqa: E402
from egpt_speed.results import capture_env, write_json_atomic, write_text_atomic  # noqa: E402
from egpt_speed.static_decode import StaticEngine  # noqa: E402
from egpt_speed.timing import measure_copy_bandwidth  # noqa: E402
from spec_cost_static import cuda_kernel_table, decode_ms_per_token  # noqa: E402


def prompt_embeds(model) -> torch.Tensor:
    prompt = model.template.render("What are the key elements in this scene?", model.tokenizer)
    ids = torch.tensor(tokenize_with_event_placeholder(prompt, model.tokenizer, model.fold_to_vocab), device=model.device)
    features = torch.randn(582, model.hidden_size, device=model.device, dtype=model.llm.dtype) * 0.02
    return model.splice(ids, features)


def interleaved(engines: dict[str, StaticEngine], embeds: torch.Tensor, rounds: int, repeats: int) -> dict[str, list[float]]:
    times: dict[str, list[float]] = {name: [] for name in engines}
    names = list(engines)
    for round_index in range(rounds):
        shift = round_index % len(names)
        for name in names[shift:] + names[:shift]:
            times[name].append(decode_ms_per_token(engines[name], embeds, 64, repeats))
    return times


def kernel_table(engine: StaticEngine) -> str:
    return cuda_kernel_table(engine._steps["decode"], engine.device, rows=12)


def quantized(model, kind: str, embeds: torch.Tensor, compile_mode: str | None, repeats: int) -> dict:
    """kind: int8wo / int4wo compiled as `<kind>+compile` compiles it (under torchao's inductor settings,
    quantize.inductor_config_for), or `<kind>-plain`: under inductor's defaults. Without coordinate-descent tuning
    inductor does not turn a one-row int8 matmul into a reduction, and its weight-only-int8 pattern sends it to
    aten._weight_int8pack_mm (216 µs per 7B linear on the H200). Dynamo is reset first: it would otherwise replay
    the previous kind's compiled step, whose guards do not cover inductor's settings."""
    llm, engine = copy.deepcopy(model.llm), None
    try:
        plain = kind.endswith("-plain")
        kind = kind.removesuffix("-plain")
        converted = quantize_llm_torchao(llm, kind)
        torch._dynamo.reset()
        engine = StaticEngine(llm, compile_mode=compile_mode, inductor_config={} if plain else inductor_config_for(llm))
        ms = decode_ms_per_token(engine, embeds, 64, repeats)
        return {"ms_per_token": ms, "quantized_linears": converted, "kernels": kernel_table(engine)}
    except Exception as error:  # noqa: BLE001 - report why a scheme cannot run, keep the rest
        return {"error": f"{type(error).__name__}: {str(error)[:600]}"}
    finally:
        if engine is not None:
            engine.release()
        del llm, engine
        torch.cuda.empty_cache()


def render(document: dict) -> str:
    lines = [f"# step_bandwidth_7b: {document['model']} {document['dtype']}, compile mode {document['compile_mode']}", "",
             f"- command: `{document['command']}`", f"- device: {document['env'].get('device_name')}; copy bandwidth "
             f"{document['bandwidth'] / 1e12:.2f} TB/s; bytes per token {document['bytes_per_token'] / 1e9:.2f} GB", "",
             "| variant | ms/token (median of rounds) | all rounds | MBU |", "|---|---:|---|---:|"]
    for name, row in document["variants"].items():
        lines.append(f"| {name} | {row['ms_per_token']:.3f} | {', '.join(f'{t:.3f}' for t in row['rounds'])} | {row['mbu']:.0%} |")
    for name, row in document["variants"].items():
        if row.get("kernels"):
            lines += ["", f"## {name}: CUDA kernels of 8 decode steps", "", "```", row["kernels"], "```"]
    for kind, row in document["quant"].items():
        lines += ["", f"## {kind}+compile", ""]
        lines += [f"error: {row['error']}"] if "error" in row else [f"{row['ms_per_token']:.3f} ms/token", "```", row["kernels"], "```"]
    return "\n".join(lines) + "\n"


TUNED = {"coordinate_descent_tuning": True}  # gpt-fast's setting: one-row matmuls become tuned Triton reductions
# name → (fused projections?, inductor settings). The last: the tuner's wider search (torchao's own setting plus a
# larger radius), whether it lands on the good block sizes in every run (4.30 / 4.89 / 5.00 ms under TUNED, H200)
VARIANTS = {"compile": (False, {}), "fused+compile": (True, {}), "compile, coordinate descent": (False, TUNED),
            "fused+compile, coordinate descent": (True, TUNED),
            "compile, coordinate descent, all directions, radius 2": (False, {**TUNED, "coordinate_descent_check_all_directions": True,
                                                                              "coordinate_descent_search_radius": 2})}


def known_variants(text: str) -> str:
    unknown = [name.strip() for name in text.split(";") if name.strip() and name.strip() not in VARIANTS]
    if unknown:
        raise argparse.ArgumentTypeError(f"unknown variants {unknown}; known: {'; '.join(VARIANTS)}")
    return text


@torch.inference_mode()
def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="synthetic-7b")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--compile-mode", default="default")
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--quant", default="int8wo,int8wo-plain")
    parser.add_argument("--variants", default=";".join(list(VARIANTS)[:4]), type=known_variants,
                        help=f"';'-separated (the names hold commas), of: {'; '.join(VARIANTS)}")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    args = parser.parse_args()
    device = resolve_device("auto")
    compile_mode = None if args.compile_mode == "none" else args.compile_mode
    model = load_model(args.model, resolve_dtype(args.dtype, device), device)
    embeds = prompt_embeds(model)
    bandwidth = measure_copy_bandwidth(device, 1024 if device.type == "cuda" else 64)
    moved = metrics.bytes_per_decoded_token(model, embeds.shape[1] + 32)
    names = [name.strip() for name in args.variants.split(";") if name.strip()]
    fused_llm = None
    if any(VARIANTS[name][0] for name in names):
        fused_llm = copy.deepcopy(model.llm)
        fuse_projections(fused_llm)
    engines = {name: StaticEngine(fused_llm if VARIANTS[name][0] else model.llm, compile_mode=compile_mode,
                                  inductor_config=VARIANTS[name][1]) for name in names}
    for engine in engines.values():  # each compiles and captures alone: dynamo would otherwise replay another
        torch._dynamo.reset()        # variant's compiled code (its guards do not cover inductor's settings)
        decode_ms_per_token(engine, embeds, 64, 1)
    times = interleaved(engines, embeds, args.rounds, args.repeats)
    document = {"model": args.model, "dtype": args.dtype, "compile_mode": compile_mode, "env": capture_env(device, bandwidth),
                "command": "python benchmarks/step_bandwidth_7b.py " + " ".join(sys.argv[1:]), "bandwidth": bandwidth,
                "bytes_per_token": moved, "variants": {}, "quant": {}}
    for name, rounds in times.items():
        ms = statistics.median(rounds)
        document["variants"][name] = {"ms_per_token": ms, "rounds": rounds, "mbu": metrics.mbu(moved, ms, bandwidth),
                                      "kernels": kernel_table(engines[name])}  # where the missing bandwidth goes
    print(render(document), flush=True)
    for engine in engines.values():
        engine.release()
    del fused_llm
    stem = args.out / f"step_bandwidth_7b_{time.strftime('%Y%m%d_%H%M%S')}"
    save(document, stem)  # a call cut by its time limit keeps what it measured
    for kind in [k for k in args.quant.split(",") if k]:
        document["quant"][kind] = quantized(model, kind, embeds, compile_mode, args.repeats)
        save(document, stem)
    print(render(document))


def save(document: dict, stem: Path) -> None:
    write_json_atomic(document, stem.with_suffix(".json"))  # a kill mid-write keeps the previous save
    write_text_atomic(render(document), stem.with_suffix(".md"))


if __name__ == "__main__":
    main()
