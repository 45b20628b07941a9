"""Issue 11: which EAGLE-2 tree shape pays most on the compiled static target, and where a step's time goes.

    python benchmarks/spec_tree_sweep.py --out DIR [--dtype float32] [--samples 4] [--shapes 4x8x32,5x8x48]
    # the same shape with the drafter's bodies compiled by inductor (--draft-compile default) beside it:
    python benchmarks/spec_tree_sweep.py --out DIR --dtype bfloat16 --shapes 4x8x32,4x8x32c
    # fused (one graph a step, --fused-step) beside unfused, trees ('f') and chains ('4f'):
    python benchmarks/spec_tree_sweep.py --out DIR --dtype bfloat16 --shapes 4x8x32,4x8x32f --chains 4,4f

On `tiny` (real SmolLM2 weights, shipped `tiny-eagle` head, real prompts with event features),
one StaticEngine (compile mode default on CUDA) serves the autoregressive `compile` decode and
every tree shape γ×topk×nodes; per sample the order rotates (interleaved). Per shape: ms/token,
τ (tokens per verify step), draft/verify ms per step from the loop's CUDA events, and the isolated
costs of one captured tree verify and one captured tree draft next to one compiled decode step.
A torch.profiler table of compiled decode steps and of one tree verify says which kernels cost.
Writes spec_tree_sweep_<stamp>.json and .md under --out.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from egpt_speed.baselines.encode import encode  # noqa: E402
from egpt_speed.baselines.runner import RunConfig, resolve_samples  # noqa: E402
from egpt_speed.decoding import GenerationSettings, eos_ids  # noqa: E402
from egpt_speed.drafts import load_draft  # noqa: E402
from egpt_speed.models import load_model  # noqa: E402
from egpt_speed.results import capture_env  # noqa: E402
from egpt_speed.speculation import speculative_decode  # noqa: E402
from egpt_speed.stages import make_request  # noqa: E402
from egpt_speed.static_decode import StaticEngine, StaticTarget  # noqa: E402
from egpt_speed.static_draft import StaticEagleDrafter  # noqa: E402
from egpt_speed.fused_step import WARM_UP_RUNS, fused_chain_decode  # noqa: E402
from egpt_speed.timing import Clock, collect_between_samples, collector_paused, median_ms  # noqa: E402
from egpt_speed.tree import TreeShape  # noqa: E402

NEW_TOKENS = 64


def parse_shapes(text: str) -> list[tuple[int, int, int, bool, bool]]:
    """'4x8x32,5x8x48c,4x8x32f' → [(depth γ, topk, nodes, drafter compiled by inductor, one fused graph a step), ...]."""
    shapes = []
    for item in filter(None, text.split(",")):
        numbers = item.rstrip("cf")
        shapes.append((*(int(v) for v in numbers.split("x")), "c" in item[len(numbers):], "f" in item[len(numbers):]))
    return shapes


def shape_name(shape: tuple[int, int, int, bool, bool]) -> str:
    depth, topk, nodes, compiled, fused = shape
    return f"{depth}x{topk}x{nodes}" + ("c" if compiled else "") + ("f" if fused else "")


def prompts(dtype: str, samples: int, device: torch.device):
    """(model, [prefix embeds [1, L, H]]) of the first `samples` synthetic clips, as `compare` encodes them."""
    config = RunConfig(strategies=["compile"], model="tiny", dtype=dtype, samples=samples, warmup=0)
    model = load_model("tiny", getattr(torch, dtype), device)
    settings = GenerationSettings(max_new_tokens=NEW_TOKENS)
    embeds = []
    for spec in resolve_samples(config)[:samples]:
        request = make_request(encode(spec, config, model)[0], settings)
        embeds.append(model.splice(request.prompt_ids, request.event_features))
    return model, embeds


class Sweep:
    """One engine, one tree target (room for the deepest shape), one captured drafter per shape."""

    def __init__(self, model, head, shapes: list[tuple[int, int, int, bool]], compile_mode: str | None, max_prefix: int,
                 chains: list[tuple[int, bool]] = ()):
        self.model, self.shapes, self.stop = model, shapes, eos_ids(model)
        self.engine = StaticEngine(model.llm, compile_mode=compile_mode)
        # room for the fused steps' warm-up runs past the end (fused_chain_decode's own sizing): one cache, and its
        # graphs, for every run; a re-allocation mid-sweep would put compilation inside a timed sample
        widths = [g + 1 for g, _ in chains] + [s[0] + 1 + s[2] for s in shapes] + [9]
        self.engine.setup(1, max_prefix + NEW_TOKENS + (WARM_UP_RUNS + 1) * max(widths))  # + target.setup's own margin
        self.target = StaticTarget(self.engine, gamma=max(s[0] for s in shapes))
        self.target.setup(max_prefix + NEW_TOKENS, tree_nodes=max(s[2] for s in shapes))
        self.drafters = {shape: StaticEagleDrafter(head, model.llm, shape[0], shape[1], shape[2],
                                                   compile_mode="default" if shape[3] else None) for shape in shapes}
        self.settings = GenerationSettings(max_new_tokens=NEW_TOKENS)
        # a fused step verifies on a target of its own depth (its captured body is built for that width)
        self.fused_targets = {shape[0]: StaticTarget(self.engine, shape[0]) for shape in shapes if shape[4]}
        for shape in shapes:
            if shape[4]:
                self.fused_targets[shape[0]].setup(max_prefix + NEW_TOKENS, tree_nodes=shape[2])
        self.chains = list(chains)
        self.chain_targets = {gamma: StaticTarget(self.engine, gamma) for gamma, _ in self.chains}
        for target in self.chain_targets.values():
            target.setup(max_prefix + NEW_TOKENS)
        self.chain_drafters = {chain: StaticEagleDrafter(head, model.llm, chain[0]) for chain in self.chains}
        aux = head.aux_layers_for(len(model.llm.model.layers))
        if aux:  # an EAGLE-3 head (the shipped tiny-eagle) drafts from three target layers' inputs
            for target in [self.target, *self.fused_targets.values(), *self.chain_targets.values()]:
                target.capture_layers(aux)

    def chain(self, embeds: torch.Tensor, chain: tuple[int, bool]) -> dict:
        """γ-token chains: the unfused loop (three captured graphs a step) or one fused graph a step."""
        gamma, fused = chain
        target, drafter = self.chain_targets[gamma], self.chain_drafters[chain].begin(embeds, NEW_TOKENS)
        clock = Clock(self.engine.device)
        clock.begin()
        if fused:
            result = fused_chain_decode(target, drafter, embeds, self.settings, gamma, self.stop, clock)
        else:
            result = speculative_decode(target, embeds, drafter, self.settings, gamma, self.stop, clock)
        _, decode_ms = clock.end()
        steps = result.metrics["target_forwards"] - 1
        return {"tokens": result.token_ids, "ms_per_token": decode_ms / max(len(result.token_ids) - 1, 1),
                "tau": (len(result.token_ids) - 1) / max(steps, 1), "decode_ms_per_step": decode_ms / max(steps, 1)}

    def autoregressive(self, embeds: torch.Tensor) -> dict:
        clock = Clock(self.engine.device)
        clock.begin()
        result = self.engine.generate(embeds, NEW_TOKENS, self.stop, clock)
        _, decode_ms = clock.end()
        return {"tokens": result.token_ids, "ms_per_token": decode_ms / max(len(result.token_ids) - 1, 1)}

    def speculative(self, embeds: torch.Tensor, shape: tuple[int, int, int]) -> dict:
        depth, topk, nodes, _, fused = shape
        self.target.tree_width = nodes + 1  # pad to this shape's budget (the target keeps one graph per width)
        drafter = self.drafters[shape].begin(embeds, NEW_TOKENS)
        clock = Clock(self.engine.device)
        clock.begin()
        if fused:
            result = fused_chain_decode(self.fused_targets[depth], drafter, embeds, self.settings, depth, self.stop, clock,
                                        tree=True)
        else:
            result = speculative_decode(self.target, embeds, drafter, self.settings, depth, self.stop, clock,
                                        tree=TreeShape(topk=topk, max_nodes=nodes))
        _, decode_ms = clock.end()
        steps = result.metrics["target_forwards"] - 1
        phases = clock.phases_ms
        return {"tokens": result.token_ids, "ms_per_token": decode_ms / max(len(result.token_ids) - 1, 1),
                "tau": (len(result.token_ids) - 1) / max(steps, 1), "draft_ms_per_step": phases.get("draft", 0.0) / max(steps, 1),
                "verify_ms_per_step": phases.get("verify", 0.0) / max(steps, 1), "decode_ms_per_step": decode_ms / max(steps, 1)}


def run_interleaved(sweep: Sweep, embeds: list[torch.Tensor], warmup: int) -> dict:
    """Per sample, AR and every shape in rotating order; the first `warmup` samples (compile, capture) are dropped."""
    jobs = [("compile", sweep.autoregressive)]
    jobs += [(shape_name(shape), lambda prefix, shape=shape: sweep.speculative(prefix, shape)) for shape in sweep.shapes]
    jobs += [(f"chain{gamma}" + (" fused" if fused else ""), lambda prefix, chain=(gamma, fused): sweep.chain(prefix, chain))
             for gamma, fused in sweep.chains]
    runs: dict[str, list[dict]] = {name: [] for name, _ in jobs}
    plan = [embeds[i % len(embeds)] for i in range(warmup)] + embeds
    with collector_paused():  # as the CLI's measured loop: no cyclic collection inside a timed sample
        for index, prefix in enumerate(plan):
            for position in [(index + r) % len(jobs) for r in range(len(jobs))]:
                name, job = jobs[position]
                record = job(prefix)
                if index >= warmup:
                    runs[name].append(record)
            collect_between_samples()
            print(f"sample {index} done", flush=True)
    return runs


def summarise(runs: dict) -> list[dict]:
    reference = runs["compile"]
    rows = []
    for name, records in runs.items():
        row = {"name": name, "ms_per_token": statistics.median(r["ms_per_token"] for r in records),
               "speedup_vs_compile": statistics.median(a["ms_per_token"] / r["ms_per_token"] for a, r in zip(reference, records)),
               "exact": sum(a["tokens"] == r["tokens"] for a, r in zip(reference, records)) / len(records)}
        for key in ("tau", "draft_ms_per_step", "verify_ms_per_step", "decode_ms_per_step"):
            if key in records[0]:
                row[key] = statistics.mean(r[key] for r in records)
        rows.append(row)
    return rows


def isolated_costs(sweep: Sweep, prefix: torch.Tensor, repeats: int) -> dict:
    """Graph replays alone: one compiled decode step, each shape's tree draft and tree verify (+ keep_path)."""
    engine, target, device = sweep.engine, sweep.target, sweep.engine.device
    costs = {"decode_step_ms": median_ms(lambda: engine._steps["decode"](), device, repeats)}
    for shape, drafter in sweep.drafters.items():
        depth, topk, nodes, _, fused = shape
        if fused:
            continue  # one graph for draft and verify: the loop's step time is its cost
        drafter.begin(prefix, NEW_TOKENS)
        target.tree_width = nodes + 1
        target.prefill(prefix)
        drafter.observe(target.last_hidden)
        committed = [int(target.last_hidden.shape[1] % 100) + 5]
        tree = drafter.propose_tree(committed, depth, topk, nodes)
        name = shape_name(shape)
        costs[f"draft_{name}_ms"] = median_ms(lambda: drafter.graphs.steps[f"tree{depth}"](), device, repeats)
        base = target.length

        def verify():
            target.verify_tree(tree)
            target.crop(base)
        costs[f"verify_{name}_ms"] = median_ms(verify, device, repeats)
        costs[f"verify_replay_{name}_ms"] = median_ms(lambda: engine._steps[target._step_name(f"tree{nodes + 1}")](), device, repeats)
    return costs


def kernel_profile(sweep: Sweep, prefix: torch.Tensor) -> str:
    """torch.profiler over 20 compiled decode steps and 20 replays of the widest tree verify (GPU kernel order)."""
    from torch.profiler import ProfilerActivity, profile

    engine = sweep.engine
    width = sweep.target.tree_width
    tables = []
    for label, step in (("decode step x20", engine._steps["decode"]), (f"tree verify (width {width}) x20",
                                                                     engine._steps[sweep.target._step_name(f"tree{width}")])):
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            for _ in range(20):
                step()
            torch.cuda.synchronize()
        table = prof.key_averages().table(sort_by="self_cuda_time_total", row_limit=22, max_name_column_width=70)
        tables += [f"### {label}", "```", table, "```", ""]
    return "\n".join(tables)


def variant_costs(model, head, prefix: torch.Tensor, shape: tuple[int, int, int, bool, bool], repeats: int) -> dict:
    """Isolated step / draft / verify costs of other engine variants: captured without inductor, eager attention."""
    costs = {}
    for label, attention, mode in (("sdpa, captured eager (no inductor)", "sdpa", None),
                                   ("eager attention, compile default", "eager", "default")):
        model.llm.config._attn_implementation = attention
        try:
            sweep = Sweep(model, head, [shape], mode, prefix.shape[1])
            costs[label] = isolated_costs(sweep, prefix, repeats)
        except Exception as error:  # a variant that fails is reported, not fatal
            costs[label] = {"error": repr(error)[:300]}
        print(label, costs[label], flush=True)
    model.llm.config._attn_implementation = "sdpa"
    return costs


def render(document: dict) -> str:
    lines = [f"# spec_tree_sweep: tiny {document['dtype']}, compile mode {document['compile_mode']}", "",
             f"- command: `{document['command']}`", f"- device: {document['env'].get('device_name')}, torch {document['env'].get('torch')}",
             f"- {document['samples']} samples + {document['warmup']} warm-up, {NEW_TOKENS} new tokens, greedy, interleaved", "",
             "| run (depth×topk×nodes) | ms/token | vs compile (median per sample) | exact vs compile | τ | draft ms/step | verify ms/step | decode ms/step |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for row in document["rows"]:
        get = lambda key: f"{row[key]:.2f}" if key in row else "–"  # noqa: E731
        lines.append(f"| {row['name']} | {row['ms_per_token']:.3f} | {row['speedup_vs_compile']:.2f}× | {row['exact']:.0%} | "
                     f"{get('tau')} | {get('draft_ms_per_step')} | {get('verify_ms_per_step')} | {get('decode_ms_per_step')} |")
    lines += ["", "Isolated graph replays (median ms):", "", "| what | ms |", "|---|---:|"]
    lines += [f"| {key} | {value:.3f} |" for key, value in document["isolated"].items()]
    for label, costs in document.get("variants", {}).items():
        lines += ["", f"Variant {label}:", "", "| what | ms |", "|---|---:|"]
        lines += [f"| {key} | {value if isinstance(value, str) else f'{value:.3f}'} |" for key, value in costs.items()]
    return "\n".join(lines + ["", document.get("profile", "")]) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--samples", type=int, default=4)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--shapes", default="4x8x32,4x8x16,4x4x16,5x8x24,5x8x32,6x8x32,5x8x48")
    parser.add_argument("--compile-mode", default="default")
    parser.add_argument("--repeats", type=int, default=50)
    parser.add_argument("--chains", default="", help="γ-token chains beside the trees: '4' unfused, '4f' fused (--fused-step)")
    parser.add_argument("--variants", action="store_true", help="also: captured without inductor, eager attention")
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    compile_mode = None if args.compile_mode == "none" or device.type != "cuda" else args.compile_mode
    model, embeds = prompts(args.dtype, args.samples, device)
    head = load_draft("tiny-eagle", model, "tiny", device, model.llm.dtype).head
    chains = [(int(item.rstrip("f")), item.endswith("f")) for item in args.chains.split(",") if item]
    sweep = Sweep(model, head, parse_shapes(args.shapes), compile_mode, max(e.shape[1] for e in embeds), chains)
    start = time.perf_counter()
    runs = run_interleaved(sweep, embeds, args.warmup)
    document = {"dtype": args.dtype, "compile_mode": compile_mode, "samples": args.samples, "warmup": args.warmup,
                "command": "python benchmarks/spec_tree_sweep.py " + " ".join(sys.argv[1:]), "env": capture_env(device, None),
                "rows": summarise(runs), "sweep_s": time.perf_counter() - start}
    document["isolated"] = isolated_costs(sweep, embeds[0], args.repeats) if device.type == "cuda" else {}
    if device.type == "cuda":
        document["profile"] = kernel_profile(sweep, embeds[0])
        if args.variants:
            document["variants"] = variant_costs(model, head, embeds[0], sweep.shapes[0], args.repeats)
    args.out.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%d_%H%M%S")
    (args.out / f"spec_tree_sweep_{args.dtype}_{stamp}.json").write_text(json.dumps(document, indent=1, default=str))
    (args.out / f"spec_tree_sweep_{args.dtype}_{stamp}.md").write_text(render(document))
    print(render(document).split("### ")[0])


if __name__ == "__main__":
    main()
