"""Speculative-decoding cost model on the real shapes: verify cost of γ+1 tokens vs 1, draft/target ratio c.

Run on the GPU machine:
    python benchmarks/spec_cost.py --model synthetic-7b --draft synthetic-68m --out benchmarks/results
Writes spec_cost_<stamp>.json/.md: median ms of one target forward over k tokens at the EventGPT
prefix length, one draft step, c, and the speedup the Leviathan formula predicts at α = 0.6/0.7/0.8,
both as E/(γc+1) and with the measured verify cost E·t1/(γ·t_draft + t_verify(γ+1)).
With --tree-nodes it also times a draft-tree verify (N nodes under a tree mask, one forward) and an
EAGLE head of the target's width (random weights: cost only): one chain step and one tree level of
--tree-topk nodes, so a 7B user can size γ and the tree before training a head.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from transformers import DynamicCache

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from egpt_speed import decoding, metrics  # noqa: E402
from egpt_speed.decoding import crop_cache  # noqa: E402
from egpt_speed.drafts import load_draft  # noqa: E402
from egpt_speed.eagle import EagleHead, head_config_from_target  # noqa: E402
from egpt_speed.models import load_model, resolve_device, resolve_dtype  # noqa: E402
from egpt_speed.prompt import tokenize_with_event_placeholder  # noqa: E402
from egpt_speed.results import capture_env, timestamped_name, write_json_atomic, write_text_atomic  # noqa: E402
from egpt_speed.timing import measure_copy_bandwidth  # noqa: E402
from egpt_speed.timing import median_ms as timing_median_ms  # noqa: E402
from egpt_speed.tree import DraftTree, tree_attention_mask, tree_position_ids  # noqa: E402


def median_ms(fn, device, repeats: int) -> float:
    return timing_median_ms(fn, device, repeats, warmup=10)  # eager cached steps: more warm-up than the static ones



def random_tree(nodes: int, topk: int, max_depth: int = 6, seed: int = 0) -> DraftTree:
    """A tree shaped like EAGLE-2's: each node's parent is one of the last level's first `topk` nodes."""
    generator = torch.Generator().manual_seed(seed)
    parents, depths, level = [-1], [0], [0]
    while len(parents) <= nodes:
        next_level = []
        for parent in level[:topk]:
            for _ in range(topk):
                if len(parents) > nodes or depths[parent] >= max_depth:
                    break
                next_level.append(len(parents))
                parents.append(parent)
                depths.append(depths[parent] + 1)
        if not next_level:
            raise SystemExit(f"a tree of {nodes} nodes does not fit {max_depth} levels of top-{topk}")
        level = next_level
    tokens = torch.randint(3, 1000, (len(parents),), generator=generator).tolist()
    return DraftTree(tokens, parents)


def tree_step(model, cache, base_len: int, nodes: int, topk: int, device: torch.device):
    tree = random_tree(nodes, topk)
    inputs = torch.tensor(tree.tokens, device=device).unsqueeze(0)
    mask = tree_attention_mask(tree, base_len, model.llm.dtype, device)
    positions = tree_position_ids(tree, base_len, device)
    return cached_cost(model.llm, cache, base_len, input_ids=inputs, attention_mask=mask, position_ids=positions)


def eagle_head_costs(model, prefix_len: int, topk: int, device: torch.device, dtype: torch.dtype, repeats: int) -> dict:
    """ms of one EAGLE head step (1 token) and one tree level (topk tokens) after a prefix-long head cache."""
    head = EagleHead(head_config_from_target(model.llm.config)).to(device=device, dtype=dtype).eval()
    hidden = model.hidden_size
    cache = DynamicCache(config=head.config)
    head(torch.randn(1, prefix_len, hidden, device=device, dtype=dtype), torch.randn(1, prefix_len, hidden, device=device, dtype=dtype),
         torch.arange(prefix_len, device=device), cache)

    def step(width: int):
        features = torch.randn(1, width, hidden, device=device, dtype=dtype)
        positions = torch.full((width,), prefix_len, device=device)

        def run():
            out = head(features, features, positions, cache)
            model.llm.lm_head(out).float().log_softmax(-1).topk(topk, dim=-1)
            crop_cache(cache, prefix_len)
        return run
    return {"chain_step_ms": median_ms(step(1), device, repeats), "tree_level_ms": median_ms(step(topk), device, repeats),
            "parameters": sum(p.numel() for p in head.parameters())}


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="synthetic-7b")
    parser.add_argument("--draft", default=None)
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--max-gamma", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    parser.add_argument("--tree-nodes", default="", help="comma-separated draft-tree sizes to time, e.g. 16,32,64")
    parser.add_argument("--tree-topk", type=int, default=8)
    return parser.parse_args()


def cached_cost(module, cache, base_len: int, **inputs):
    """A call of `module` on `inputs` over `cache`, cropped back to `base_len` after (one timed repeat)."""

    def run():
        module(**decoding.with_cache(cache, **inputs))
        crop_cache(cache, base_len)
    return run


def target_prefix(model, device: torch.device, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor, DynamicCache, int]:
    """(prompt ids, spliced embeddings, target cache at a realistic decode position, that position)."""
    prompt = model.template.render("What are the key elements in this scene?", model.tokenizer)
    ids = torch.tensor(tokenize_with_event_placeholder(prompt, model.tokenizer, model.fold_to_vocab), device=device)
    features = torch.randn(582, model.hidden_size, device=device, dtype=dtype) * 0.02
    embeds = model.splice(ids, features)
    cache = DynamicCache(config=model.llm.config)
    model.llm(**decoding.with_cache(cache, inputs_embeds=embeds))
    # a realistic decode position: prefix + ~23 generated tokens (half of the seed's 45.5)
    warm = torch.randint(3, 1000, (1, 23), device=device)
    model.llm(**decoding.with_cache(cache, input_ids=warm))
    return ids, embeds, cache, embeds.shape[1] + 23


def draft_step_ms(draft, ids: torch.Tensor, embeds: torch.Tensor, device: torch.device, repeats: int) -> float:
    """Median ms of one draft token after the draft's own prefix (multimodal: the embeddings; else the text)."""
    draft_cache = DynamicCache(config=draft.llm.config)
    if draft.multimodal:
        draft.llm(**decoding.with_cache(draft_cache, inputs_embeds=embeds))
        draft_base = embeds.shape[1]
    else:
        text_ids = ids[ids >= 0].unsqueeze(0)
        draft.llm(**decoding.with_cache(draft_cache, input_ids=text_ids))
        draft_base = text_ids.shape[1]
    one = torch.randint(3, 1000, (1, 1), device=device)
    return median_ms(cached_cost(draft.llm, draft_cache, draft_base, input_ids=one), device, repeats)


def predictions_for(verify_ms: dict[int, float], draft_ms: float, max_gamma: int) -> list[dict]:
    """Leviathan's predicted speedup at α = 0.6/0.7/0.8 per γ, by formula and with the measured verify costs."""
    c = draft_ms / verify_ms[1]
    predictions = []
    for alpha in (0.6, 0.7, 0.8):
        for gamma in range(1, max_gamma + 1):
            e = metrics.expected_tokens_per_step(alpha, gamma)
            predictions.append({"alpha": alpha, "gamma": gamma, "expected_tokens": e,
                                "speedup_formula": metrics.predicted_speedup(alpha, gamma, c),
                                "speedup_measured_costs": e * verify_ms[1] / (gamma * draft_ms + verify_ms[gamma + 1])})
    return predictions


def markdown(document: dict, tree_topk: int) -> str:
    config, verify_ms = document["config"], document["target_forward_ms"]
    tree_ms, head_ms, c = document["tree_verify_ms"], document["eagle_head_ms"], document["cost_ratio"]
    lines = [f"# Speculative cost model: {config['model']} + draft {config['draft']}", "",
             f"- device {document['env'].get('device_name')}, dtype {config['dtype']}, prefix {config['prefix_len']} tokens, "
             f"decode position {config['decode_position']}",
             f"- command: `{document['env']['command']}`", "",
             "| tokens per target forward | median ms | × one-token cost |", "|---:|---:|---:|"]
    lines += [f"| {k} | {v:.2f} | {v / verify_ms[1]:.2f} |" for k, v in verify_ms.items()]
    lines += ["", f"- draft step {document['draft_step_ms']:.3f} ms → cost ratio c = {c:.4f}", "",
              "| α | γ | E tokens/step | E/(γc+1) | with measured verify cost |", "|---:|---:|---:|---:|---:|"]
    lines += [f"| {p['alpha']} | {p['gamma']} | {p['expected_tokens']:.2f} | {p['speedup_formula']:.2f}× | {p['speedup_measured_costs']:.2f}× |"
              for p in document["predictions"]]
    if tree_ms:
        lines += ["", f"Draft-tree verify (random tree, ≤ 6 levels, top-{tree_topk} children, one forward under a tree mask):", "",
                  "| tree nodes + root | median ms | × one-token cost |", "|---:|---:|---:|"]
        lines += [f"| {n + 1} | {v:.2f} | {v / verify_ms[1]:.2f} |" for n, v in tree_ms.items()]
        lines += ["", f"EAGLE head of the target's width (fc 2H→H + one decoder layer; LM-head product over the full vocabulary): "
                  f"one chain step {head_ms['chain_step_ms']:.3f} ms (c = {head_ms['chain_step_ms'] / verify_ms[1]:.4f}), "
                  f"one tree level of {tree_topk} nodes {head_ms['tree_level_ms']:.3f} ms "
                  f"({head_ms['parameters'] / 1e9:.3f} B parameters)."]
    return "\n".join(lines) + "\n"


@torch.inference_mode()
def main() -> None:
    args = parse_args()
    device = resolve_device(args.device)
    dtype = resolve_dtype(args.dtype, device)
    model = load_model(args.model, dtype, device)
    draft = load_draft(args.draft, model, args.model, device, dtype)
    ids, embeds, cache, base_len = target_prefix(model, device, dtype)
    prefix_len = embeds.shape[1]

    verify_ms = {k: median_ms(cached_cost(model.llm, cache, base_len, input_ids=torch.randint(3, 1000, (1, k), device=device)),
                              device, args.repeats)
                 for k in range(1, args.max_gamma + 2)}
    tree_sizes = [int(n) for n in args.tree_nodes.split(",") if n.strip()]
    tree_ms = {n: median_ms(tree_step(model, cache, base_len, n, args.tree_topk, device), device, args.repeats)
               for n in tree_sizes}
    head_ms = eagle_head_costs(model, prefix_len, args.tree_topk, device, dtype, args.repeats) if tree_sizes else {}
    draft_ms = draft_step_ms(draft, ids, embeds, device, args.repeats)

    bandwidth = measure_copy_bandwidth(device, 1024 if device.type == "cuda" else 128)
    document = {"schema": "egpt-speed/spec-cost/1", "env": capture_env(device, bandwidth),
                "config": {"model": args.model, "draft": draft.name, "dtype": str(dtype), "prefix_len": prefix_len,
                           "decode_position": base_len, "repeats": args.repeats},
                "target_forward_ms": verify_ms, "draft_step_ms": draft_ms, "cost_ratio": draft_ms / verify_ms[1],
                "predictions": predictions_for(verify_ms, draft_ms, args.max_gamma),
                "tree_verify_ms": tree_ms, "eagle_head_ms": head_ms}
    out = args.out / f"{timestamped_name(f'spec_cost_{args.model}')}.json"
    write_json_atomic(document, out)
    text = markdown(document, args.tree_topk)
    write_text_atomic(text, out.with_suffix(".md"))
    print(text, end="")

if __name__ == "__main__":
    main()
