"""Speculative-decoding cost on the compiled static-cache path (issue 11, item 4): what the tree and the head cost
relative to one compiled autoregressive step, at the EventGPT prefix length.

Run on the GPU machine:
    python benchmarks/spec_cost_static.py --model synthetic-7b --dtype bfloat16 --out benchmarks/results

Measures, all on `static_decode.StaticEngine` / `StaticTarget` / `static_draft.StaticEagleDrafter`:
- the compiled, graph-captured decode step (ms/token over a chunk of --new-tokens, one sync) and its
  MBU against the measured copy bandwidth; the eager-captured step beside it;
- a graph-captured tree verify with --tree-nodes nodes (random EAGLE-2-shaped trees, device inputs,
  + keep_path of a 4-token path) on the eager-captured engine, and on the compiled engine for
  --compiled-tree-nodes (each costs one more compilation);
- a target-width EAGLE head (random weights: cost only), captured: catch-up, γ-chain, tree draft
  of --tree-depth levels of top-k, over the full vocabulary and an 8192-id draft vocabulary;
- --quant kinds (torchao int8wo/int4wo/int4wo-gemlite) on a copy of the LLM, compiled and captured the same way;
- the predicted speedup over the compiled step at --tau tokens per verify step:
  τ · t_step / (t_catchup + t_tree_draft + t_tree_verify).
Results are written after every section (json + md), so a run cut short keeps what finished.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from egpt_speed import metrics  # noqa: E402
from egpt_speed.eagle import EagleHead, head_config_from_target  # noqa: E402
from egpt_speed.errors import EgptError  # noqa: E402
from egpt_speed.models import load_model, resolve_device, resolve_dtype  # noqa: E402
from egpt_speed.prompt import tokenize_with_event_placeholder  # noqa: E402
from egpt_speed.attention import set_llm_attention  # noqa: E402
from egpt_speed.flex import register_flex  # noqa: E402
from egpt_speed.inductor_tuning import decode_inductor_config  # noqa: E402
from egpt_speed.quantize import inductor_config_for, quantize_llm_torchao  # noqa: E402
from egpt_speed.results import capture_env, timestamped_name, write_json_atomic, write_text_atomic  # noqa: E402
from egpt_speed.static_decode import StaticEngine, StaticTarget  # noqa: E402
from egpt_speed.static_draft import DeviceTree, StaticEagleDrafter  # noqa: E402
from egpt_speed.timing import measure_copy_bandwidth, median_ms  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from spec_cost import random_tree  # noqa: E402

DECODE_POSITION_OFFSET = 23  # a realistic decode position: prefix + ~half the seed's 45.5 answer tokens
DRAFT_VOCAB = 8192  # train-draft's --draft-vocab default (FR-Spec)
CHAINED_CALLS = 8  # verifies queued back to back before one sync



def decode_ms_per_token(engine: StaticEngine, embeds: torch.Tensor, new_tokens: int, repeats: int) -> float:
    """Median ms/token of a chunk of new_tokens captured steps with one host sync (no EOS checks)."""
    prefix_len = embeds.shape[1]
    engine.setup(1, prefix_len + new_tokens + 128)
    engine.reset()
    first = engine.prefill(embeds)[0][:, -1].argmax(dim=-1, keepdim=True)

    def run():
        engine.decode_n(first, prefix_len, new_tokens, set(), eos_every=new_tokens)
    return median_ms(run, engine.device, repeats, warmup=1) / new_tokens


def device_tree(nodes: int, topk: int, device: torch.device) -> DeviceTree:
    tree = random_tree(nodes, topk)
    inputs = (torch.tensor(tree.tokens, device=device), torch.tensor(tree.depths(), device=device),
              tree.ancestry().to(device))
    return DeviceTree(tree.tokens, tree.parents, None, inputs)


def cuda_kernel_table(run, device: torch.device, calls: int = 8, rows: int = 14) -> str:
    """torch.profiler's CUDA kernels of `calls` runs, by GPU time ('' off CUDA): where a step's time goes."""
    if device.type != "cuda":
        return ""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(calls):
            run()
        torch.cuda.synchronize()
    return prof.key_averages().table(sort_by="self_cuda_time_total", row_limit=rows, max_name_column_width=90)


def tree_verify_ms(engine: StaticEngine, embeds: torch.Tensor, nodes: int, topk: int, repeats: int,
                   profile: bool = False) -> dict:
    """One captured tree verify (N+1 nodes) at the decode position: a synced call alone and followed by keep_path, the
    graph replay alone (no host-side load), and chained calls (the host ahead of the GPU); with `profile`, its kernel
    table."""
    target = StaticTarget(engine, gamma=4)
    target.setup(embeds.shape[1] + 256, tree_nodes=nodes)
    target.prefill(embeds)
    base = embeds.shape[1] + DECODE_POSITION_OFFSET
    target.length = base
    tree = device_tree(nodes, topk, engine.device)
    path = [0] + [i for i, depth in enumerate(tree.depths()) if depth][:1]  # root + the first child
    path += [i for i in range(path[-1] + 1, len(tree.tokens)) if tree.parents[i] == path[-1]][:1]

    def verify():
        target.verify_tree(tree)
        target.crop(base)

    def verify_keep():
        target.verify_tree(tree)
        target.keep_path(path)
        target.crop(base)
    def chained():  # back to back, one sync: the host's load and launch overlap the GPU, as in decode_ms_per_token
        for _ in range(CHAINED_CALLS):
            verify()
    result = {"verify_ms": median_ms(verify, engine.device, repeats),
              "verify_keep_ms": median_ms(verify_keep, engine.device, repeats), "kept_path": path,
              "replay_ms": median_ms(engine._steps[target._step_name(f"tree{target.tree_width}")], engine.device, repeats),
              "chained_ms": median_ms(chained, engine.device, repeats) / CHAINED_CALLS}
    if profile:
        result["kernels"] = cuda_kernel_table(verify, engine.device)
    return result


def chain_verify_ms(engine: StaticEngine, embeds: torch.Tensor, gamma: int, repeats: int) -> float:
    target = StaticTarget(engine, gamma)
    target.setup(embeds.shape[1] + 256)
    target.prefill(embeds)
    base = target.length = embeds.shape[1] + DECODE_POSITION_OFFSET
    tokens = torch.randint(3, 1000, (1, gamma + 1), device=engine.device)

    def run():
        target.verify(tokens)
        target.crop(base)
    return median_ms(run, engine.device, repeats)


def head_costs(llm, embeds: torch.Tensor, gamma: int, depth: int, topk: int, nodes: int, vocab: int | None,
               repeats: int) -> dict:
    """A target-width EAGLE head (random weights), captured: graph replays alone and full propose calls."""
    device, dtype = embeds.device, embeds.dtype
    head = EagleHead(head_config_from_target(llm.config)).to(device=device, dtype=dtype).eval()
    if vocab is not None:
        head.draft_vocab = torch.arange(vocab, device=device)
    drafter = StaticEagleDrafter(head, llm, gamma, topk, nodes)
    hidden = llm.config.hidden_size
    drafter.begin(embeds, 4096)
    drafter.observe(torch.randn(1, embeds.shape[1], hidden, device=device, dtype=dtype))
    committed = [5]
    drafter.propose(committed, gamma, None, None)  # the prompt's uncaptured catch-up

    def step(tree: bool):
        def run():  # as the loop does per verify step: 3 accepted features, then a draft
            drafter.observe(torch.randn(1, 3, hidden, device=device, dtype=dtype))
            committed.extend([7, 8, 9])
            if tree:
                drafter.propose_tree(committed, depth, topk, nodes)
            else:
                drafter.propose(committed, gamma, None, None)
        return run
    chain_call = median_ms(step(False), device, repeats)
    tree_call = median_ms(step(True), device, repeats)
    steps = drafter.graphs.steps
    replay = {name: median_ms(steps[name], device, repeats) for name in ("catchup", "chain", f"tree{depth}")}
    return {"draft_vocab": vocab or llm.config.vocab_size, "gamma": gamma, "tree_depth": depth, "topk": topk,
            "max_nodes": nodes, "catchup_replay_ms": replay["catchup"], "chain_replay_ms": replay["chain"],
            "tree_replay_ms": replay[f"tree{depth}"], "chain_step_ms": replay["chain"] / gamma,
            "propose_chain_call_ms": chain_call, "propose_tree_call_ms": tree_call,
            "parameters": sum(p.numel() for p in head.parameters())}


def quantized_decode(model, kind: str, embeds: torch.Tensor, compile_mode: str | None, new_tokens: int,
                     repeats: int, context_len: int, bandwidth: float | None) -> dict:
    """kind (int8wo/int4wo/int4wo-gemlite) on a copy of the LLM, then the same compiled captured decode; the error if it fails."""
    device = embeds.device
    before = torch.cuda.memory_allocated(device) if device.type == "cuda" else None
    llm = copy.deepcopy(model.llm)
    try:
        converted = quantize_llm_torchao(llm, kind)
        llm_bytes = metrics.minus(metrics.allocated_bytes(device), before)
        settings = inductor_config_for(llm)  # what compile (the strategy) uses: torchao's inductor settings
        torch._dynamo.reset()  # dynamo caches compiled code per code object and does not guard inductor settings
        engine = StaticEngine(llm, compile_mode=compile_mode, inductor_config=settings)
        ms = decode_ms_per_token(engine, embeds, new_tokens, repeats)
        moved = metrics.bytes_per_decoded_token(model, context_len, llm_bytes) if llm_bytes else None
        result = {"ms_per_token": ms, "compile_ms": engine.setup_ms, "quantized_linears": converted,
                  "llm_bytes": llm_bytes, "mbu": metrics.mbu(moved, ms, bandwidth) if moved else None,
                  "inductor_config": settings}
        engine.release()
        if compile_mode is not None and settings:  # the same step compiled without them (before 2026-12-03)
            torch._dynamo.reset()  # else the plain engine would replay the code compiled under the settings
            plain = StaticEngine(llm, compile_mode=compile_mode)
            result["ms_per_token_plain_inductor"] = decode_ms_per_token(plain, embeds, new_tokens, repeats)
            plain.release()
        return result
    except (EgptError, RuntimeError, NotImplementedError, AssertionError, ImportError, TypeError, ValueError) as error:
        return {"error": f"{type(error).__name__}: {str(error)[:600]}"}
    finally:
        del llm
        if device.type == "cuda":
            torch.cuda.empty_cache()


def predictions(document: dict, tau: float) -> list[dict]:
    """τ · t_step / (t_catchup + t_tree_draft + t_verify) for every measured tree verify."""
    step = document["decode"].get("compiled_ms_per_token")
    head = document["eagle_head"].get("draft_vocab_subset") or document["eagle_head"].get("full_vocab")
    if not step or not head:
        return []
    rows = []
    for engine_name in ("compiled", "eager_captured"):
        for nodes, cost in document["tree_verify"].get(engine_name, {}).items():
            draft = head["catchup_replay_ms"] + head["tree_replay_ms"]
            verify = cost["verify_keep_ms"]
            rows.append({"engine": engine_name, "nodes": int(nodes), "tau": tau, "draft_ms": draft, "verify_ms": verify,
                         "speedup_vs_compiled_step": tau * step / (draft + verify)})
    return rows


def host_overlap_rows(document: dict) -> list[str]:
    """The compiled verifies like for like with the step: a synced graph replay against the step's synced replay, and
    chained calls (host work overlapped) against the chained step; the synced call's excess is host-side work."""
    decode, rows = document["decode"], document["tree_verify"].get("compiled", {})
    step, step_replay = decode.get("compiled_ms_per_token"), decode.get("compiled_replay_ms")
    measured = {n: cost for n, cost in rows.items() if "replay_ms" in cost}
    if not measured or not step_replay:
        return []
    lines = ["", f"Like for like (compiled): the step's graph replayed alone and synced takes {step_replay:.3f} ms, chained "
             f"{step:.3f} ms:", "", "| tree verify | nodes + root | synced call | graph replay alone | × step replay | "
             "chained calls | × chained step |", "|---|---:|---:|---:|---:|---:|---:|"]
    for nodes, cost in measured.items():
        lines.append(f"| compiled | {int(nodes) + 1} | {cost['verify_ms']:.3f} | {cost['replay_ms']:.3f} | "
                     f"{cost['replay_ms'] / step_replay:.2f} | {cost['chained_ms']:.3f} | {cost['chained_ms'] / step:.2f} |")
    return lines


def render(document: dict) -> str:
    env, config, decode = document["env"], document["config"], document["decode"]
    step = decode.get("compiled_ms_per_token")
    fmt = lambda v, spec=".3f": "–" if v is None else format(v, spec)  # noqa: E731
    lines = [f"# Speculative cost on the compiled static path: {config['model']}, {config['dtype']}", "",
             f"- device {env.get('device_name')}, copy bandwidth {fmt((env.get('copy_bandwidth_bytes_per_s') or 0) / 1e12, '.2f')} TB/s, "
             f"prefix {config['prefix_len']} tokens, decode position {config['decode_position']}, compile mode {config['compile_mode']}, inductor settings {config.get('inductor_config') or 'default'}, attention {config.get('attention', 'sdpa')}",
             f"- command: `{env.get('command')}`", "- random weights: costs only, no acceptance", "",
             "| path | ms/token | MBU | compile s |", "|---|---:|---:|---:|",
             f"| compiled + captured decode step | {fmt(step)} | {fmt(decode.get('compiled_mbu'), '.1%')} | {fmt((decode.get('compile_ms') or 0) / 1e3, '.0f')} |",
             f"| eager-captured decode step | {fmt(decode.get('eager_captured_ms_per_token'))} | {fmt(decode.get('eager_captured_mbu'), '.1%')} | – |"]
    for kind, q in document.get("quant", {}).items():
        if "error" in q:
            lines.append(f"| {kind}+compile | failed: {q['error'][:200]} | | |")
        else:
            lines.append(f"| {kind}+compile | {fmt(q['ms_per_token'])} | {fmt(q['mbu'], '.1%')} (of {q['llm_bytes'] / 1e9:.2f} GB) | {q['compile_ms'] / 1e3:.0f} |")
            if "ms_per_token_plain_inductor" in q:
                lines.append(f"| {kind}+compile without torchao's inductor settings | {fmt(q['ms_per_token_plain_inductor'])} | | |")
    lines += ["", "Each verify against one step of its own engine (× own step) and against the compiled step:", "",
              "| captured verify | nodes + root | ms | × own step | × compiled step | ms with keep_path | × compiled step |",
              "|---|---:|---:|---:|---:|---:|---:|"]
    own_step = {"compiled": step, "eager_captured": decode.get("eager_captured_ms_per_token")}
    chain = document.get("chain_verify_ms")
    if chain:
        lines.append(f"| chain γ = 4, eager-captured | 5 | {chain:.3f} | {fmt(metrics.ratio(chain, own_step['eager_captured']), '.2f')} | "
                     f"{fmt(metrics.ratio(chain, step), '.2f')} | | |")
    for engine_name, rows in document["tree_verify"].items():
        for nodes, cost in rows.items():
            lines.append(f"| tree, {engine_name.replace('_', '-')} | {int(nodes) + 1} | {cost['verify_ms']:.3f} | "
                         f"{fmt(metrics.ratio(cost['verify_ms'], own_step[engine_name]), '.2f')} | "
                         f"{fmt(metrics.ratio(cost['verify_ms'], step), '.2f')} | {cost['verify_keep_ms']:.3f} | "
                         f"{fmt(metrics.ratio(cost['verify_keep_ms'], step), '.2f')} |")
    lines += host_overlap_rows(document)
    lines += ["", "| EAGLE head (target width, captured) | draft vocab | catch-up | γ-chain (per token) | tree draft | propose() chain / tree incl. host |",
              "|---|---:|---:|---:|---:|---:|"]
    for name, head in document["eagle_head"].items():
        lines.append(f"| {name} (γ = {head['gamma']}, tree {head['tree_depth']} levels top-{head['topk']}, {head['max_nodes']} nodes) | "
                     f"{head['draft_vocab']} | {head['catchup_replay_ms']:.3f} | {head['chain_replay_ms']:.3f} "
                     f"({head['chain_step_ms']:.3f} = {fmt(metrics.ratio(head['chain_step_ms'], step), '.3f')}× step) | "
                     f"{head['tree_replay_ms']:.3f} | {head['propose_chain_call_ms']:.3f} / {head['propose_tree_call_ms']:.3f} |")
    if document.get("predictions"):
        lines += ["", f"Predicted speedup over the compiled step at τ = {config['tau']} (draft = catch-up + tree draft, 8k draft vocab; verify incl. keep_path; no loop overhead):", "",
                  "| verify engine | nodes | draft ms | verify ms | speedup |", "|---|---:|---:|---:|---:|"]
        lines += [f"| {p['engine']} | {p['nodes']} | {p['draft_ms']:.3f} | {p['verify_ms']:.3f} | {p['speedup_vs_compiled_step']:.2f}× |"
                  for p in document["predictions"]]
    tables = [("compiled decode step", decode.get("compiled_kernels"))]
    tables += [(f"compiled tree verify, {int(n) + 1} rows", cost.get("kernels"))
               for n, cost in document["tree_verify"].get("compiled", {}).items()]
    for title, table in tables:
        if table:
            lines += ["", f"### {title}: CUDA kernels of 8 replays", "", "```", table, "```"]
    return "\n".join(lines) + "\n"


def save(document: dict, out: Path) -> None:
    document["predictions"] = predictions(document, document["config"]["tau"])
    write_json_atomic(document, out)
    write_text_atomic(render(document), out.with_suffix(".md"))


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    parser.add_argument("--render", type=Path, default=None, help="re-write the .md beside an existing result json, and stop")
    parser.add_argument("--model", default="synthetic-7b")
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--compile-mode", default="default", help="torch.compile mode of the compiled engine ('none': capture eager)")
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--tree-nodes", default="16,32,64")
    parser.add_argument("--compiled-tree-nodes", default="32", help="tree sizes also verified on the compiled engine (one compilation each)")
    parser.add_argument("--tree-topk", type=int, default=8)
    parser.add_argument("--tree-depth", type=int, default=5)
    parser.add_argument("--gamma", type=int, default=4)
    parser.add_argument("--tau", type=float, default=4.3, help="tokens per verify step (Spec-Bench: EAGLE-2 on Vicuna-7B)")
    parser.add_argument("--quant", default="int8wo,int4wo")
    parser.add_argument("--only-quant", action="store_true", help="the compiled step, then the --quant kinds only")
    parser.add_argument("--coordinate-descent", choices=("auto", "on", "off"), default="auto",
                        help="the compiled bf16/fp32 engine's inductor tuning, as `compile` resolves --coordinate-descent (auto: off, compile's default); quantized engines keep torchao's settings")
    parser.add_argument("--attention", choices=("sdpa", "flex"), default="sdpa",
                        help="the LLM's attention (flex: FlexAttention with the static engine's block mask, egpt_speed.flex)")
    parser.add_argument("--skip-eager", action="store_true", help="leave out the eager-captured engine's step and verifies")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    return parser.parse_args()


def sizes(text: str) -> list[int]:
    return [int(n) for n in text.split(",") if n.strip()]


def measure_eager_captured(document: dict, model, embeds: torch.Tensor, args, moved: float, bandwidth: float) -> None:
    """The eager-captured engine's step, chain verify and tree verifies (the reference for the compiled ones)."""
    eager = StaticEngine(model.llm, compile_mode=None)
    eager_step = decode_ms_per_token(eager, embeds, args.new_tokens, args.repeats)
    document["decode"].update(eager_captured_ms_per_token=eager_step, eager_captured_mbu=metrics.mbu(moved, eager_step, bandwidth))
    document["chain_verify_ms"] = chain_verify_ms(eager, embeds, args.gamma, args.repeats)
    document["tree_verify"]["eager_captured"] = {n: tree_verify_ms(eager, embeds, n, args.tree_topk, args.repeats)
                                                 for n in sizes(args.tree_nodes)}
    eager.release()


@torch.inference_mode()
def main() -> None:
    args = parse_args()
    if args.render is not None:
        document = json.loads(args.render.read_text())
        write_text_atomic(render(document), args.render.with_suffix(".md"))
        return
    device = resolve_device(args.device)
    dtype = resolve_dtype(args.dtype, device)
    compile_mode = None if args.compile_mode == "none" else args.compile_mode
    model = load_model(args.model, dtype, device)
    if args.attention == "flex":
        set_llm_attention(model.llm, register_flex())
    prompt = model.template.render("What are the key elements in this scene?", model.tokenizer)
    ids = torch.tensor(tokenize_with_event_placeholder(prompt, model.tokenizer, model.fold_to_vocab), device=device)
    embeds = model.splice(ids, torch.randn(582, model.hidden_size, device=device, dtype=dtype) * 0.02)
    prefix_len = embeds.shape[1]
    context = prefix_len + args.new_tokens / 2
    bandwidth = measure_copy_bandwidth(device, 1024 if device.type == "cuda" else 128)
    moved = metrics.bytes_per_decoded_token(model, context)
    out = args.out / f"{timestamped_name(f'spec_cost_static_{args.model}')}.json"
    document = {"schema": "egpt-speed/spec-cost-static/1", "env": capture_env(device, bandwidth),
                "config": {"model": args.model, "dtype": str(dtype), "prefix_len": prefix_len, "compile_mode": compile_mode,
                           "decode_position": prefix_len + DECODE_POSITION_OFFSET, "new_tokens": args.new_tokens,
                           "repeats": args.repeats, "tau": args.tau, "bytes_per_token": moved,
                           "attention": model.llm.config._attn_implementation},
                "decode": {}, "tree_verify": {}, "eagle_head": {}, "quant": {}}
    document["env"]["copy_bandwidth_bytes_per_s"] = bandwidth

    choice = {"auto": None, "on": True, "off": False}[args.coordinate_descent]
    tuning = decode_inductor_config(model.llm, choice) if compile_mode is not None else {}
    document["config"]["inductor_config"] = tuning  # what `compile` would compile this LLM under
    compiled = StaticEngine(model.llm, compile_mode=compile_mode, inductor_config=tuning)
    step = decode_ms_per_token(compiled, embeds, args.new_tokens, args.repeats)
    document["decode"].update(compiled_ms_per_token=step, compile_ms=compiled.setup_ms, compiled_mbu=metrics.mbu(moved, step, bandwidth))
    print(f"compiled step {step:.3f} ms/token (compile {compiled.setup_ms / 1e3:.0f} s)", flush=True)
    document["decode"]["compiled_kernels"] = cuda_kernel_table(compiled._steps["decode"], device)
    # one synced replay of the step graph: the like of a tree verify's synced call (the step above is chained)
    document["decode"]["compiled_replay_ms"] = median_ms(compiled._steps["decode"], device, args.repeats)
    if args.only_quant:  # the compiled step as the same-run reference, then the quantized steps
        compiled.release()
        run_quant(document, model, embeds, compile_mode, args, context, bandwidth, out)
        return
    if not args.skip_eager:
        measure_eager_captured(document, model, embeds, args, moved, bandwidth)
        save(document, out)
    nodes = max(sizes(args.tree_nodes) or [32])
    for name, vocab in (("full_vocab", None), ("draft_vocab_subset", DRAFT_VOCAB)):
        document["eagle_head"][name] = head_costs(model.llm, embeds, args.gamma, args.tree_depth, args.tree_topk, nodes,
                                                  vocab, args.repeats)
    save(document, out)
    print(render(document), flush=True)
    document["tree_verify"]["compiled"] = {}
    for n in sizes(args.compiled_tree_nodes):  # before quantization: a run cut by a time limit keeps these first
        document["tree_verify"]["compiled"][n] = tree_verify_ms(compiled, embeds, n, args.tree_topk, args.repeats,
                                                                profile=True)
        save(document, out)
    compiled.release()
    run_quant(document, model, embeds, compile_mode, args, context, bandwidth, out)


def run_quant(document: dict, model, embeds: torch.Tensor, compile_mode: str | None, args, context: float,
              bandwidth: float | None, out: Path) -> None:
    for kind in sizes_or_names(args.quant):
        document["quant"][kind] = quantized_decode(model, kind, embeds, compile_mode, args.new_tokens, args.repeats,
                                                   context, bandwidth)
        print(kind, document["quant"][kind], flush=True)
        save(document, out)
    print(render(document), flush=True)


def sizes_or_names(text: str) -> list[str]:
    return [name.strip() for name in text.split(",") if name.strip()]


if __name__ == "__main__":
    main()
