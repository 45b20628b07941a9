"""Draft heads compared at equal data (issue 16 items 2-3): held-out top-1 and τ of heads trained online by
train-draft's own functions on one set of answers, for several recipes and training targets.

    # CPU, reduced budget (both styles see the same answers, epochs, unroll):
    python benchmarks/draft_heads.py --model tiny --answers 48 --new-tokens 32 --epochs 3 \
        --variants eagle:1 eagle:3 eagle3:3 --out /tmp/heads
    # GPU: the shipped recipe (4,000 + 800 answers, 64 tokens, 6 epochs, 8,192-id draft vocabulary), bf16 vs nf4 target:
    python benchmarks/draft_heads.py --model tiny --answers 4000 --new-tokens 64 --epochs 6 \
        --variants eagle:1 eagle3:3 --train-targets float32 bfloat16 bfloat16+nf4 --out OUT

A variant is STYLE:UNROLL (eagle: the last layer's feature regression + 0.1 CE, the default head; eagle3: fused
layers 2, L/2, L-3, CE only, its own LM head). A training target is DTYPE[+nf4]: the target that answers the
training prompts and gives the training features. Every head is judged against one evaluation target (--eval-dtype,
never quantized): held-out answers are its own, held-out top-1 is teacher-forced agreement with its argmax
(train_draft.top1, the figure train-draft reports), τ is tokens per verify step of greedy chain speculation
(γ = --gamma) on --tau-prompts held-out prompts, each checked token-for-token against the target's own greedy output.
Writes draft_heads_<model>_<stamp>.json/.md.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from egpt_speed import train_draft as td  # noqa: E402
from egpt_speed.datasets import load_questions  # noqa: E402
from egpt_speed.decoding import GenerationSettings, eos_ids  # noqa: E402
from egpt_speed.devices import resolve_dtype  # noqa: E402
from egpt_speed.hf_generate import generate_batch  # noqa: E402
from egpt_speed.models import load_model, resolve_device  # noqa: E402
from egpt_speed.proposers import EagleProposer  # noqa: E402
from egpt_speed.results import capture_env, timestamped_name, write_json_atomic, write_text_atomic  # noqa: E402
from egpt_speed.speculation import DynamicTarget, speculative_decode  # noqa: E402
from egpt_speed.timing import Clock  # noqa: E402


def load_target(spec: str, device: torch.device):
    """DTYPE[+nf4] → the target (nf4 through train-draft's own loader, so the script measures what the CLI does)."""
    dtype, _, quant = spec.partition("+")
    config = argparse.Namespace(model=ARGS.model, target_dtype=dtype, target_quant=quant or "none")
    td.check_target_quant(config.target_quant, device)
    return td.load_target(config, device)


def answers(model, pairs, args, label: str) -> list[td.AnswerItem]:
    """The target's answers; with --answers-cache, journaled per batch as token ids and reused by a later run
    (a GPU call cut at its time limit, or the next variant in the next call, skips the generation)."""
    path = args.answers_cache / f"{args.model}_{label}_{len(pairs)}x{args.new_tokens}_seed{args.seed}.json" \
        if args.answers_cache else None
    known = json.loads(path.read_text())["answers"] if path and path.exists() else []
    saved = list(known)

    def keep(first: int, new: list[list[int]]) -> None:
        saved[first:] = new
        write_json_atomic({"answers": saved}, path)

    return td.collect_answers(model, pairs, GenerationSettings(max_new_tokens=args.new_tokens), 5, args.batch_size,
                              known=known, on_answers=keep if path else None)


@torch.inference_mode()
def tau(head, model, items: list[td.AnswerItem], gamma: int, new_tokens: int) -> dict:
    """Greedy chain speculation with `head` on `model` → τ, acceptance and whether every output equals the target's own."""
    steps = accepted = exact = 0
    for item in items:
        embeds = model.splice(item.request.prompt_ids, item.request.event_features)
        proposer = EagleProposer(head, model.llm, embeds)
        clock = Clock(model.device, enabled=False)
        clock.begin()
        settings = GenerationSettings(max_new_tokens=new_tokens)
        result = speculative_decode(DynamicTarget(model.llm, proposer.aux_layers), embeds, proposer, settings, gamma,
                                    eos_ids(model), clock)
        reference = generate_batch(model, [item.request], Clock(model.device, enabled=False))[0].token_ids
        exact += result.token_ids == reference[:len(result.token_ids)]
        steps += result.metrics["target_forwards"] - 1  # verify steps: the prefill forward excluded
        accepted += result.metrics["accepted"]
    return {"tau": 1 + accepted / max(steps, 1), "verify_steps": steps, "accepted": accepted,
            "exact_outputs": f"{exact}/{len(items)}"}


def save_variant(head, style: str, run: dict, heldout, clips: td.ClipRecord, args) -> Path:
    """--save: the head as train-draft writes it (ours, or the public EAGLE-3 layout), with its report."""
    vocab = head.draft_vocab if head.draft_vocab is not None else torch.arange(heldout.model.llm.config.vocab_size)
    report = td.TrainReport(args.answers, len(heldout.items), args.epochs, run["final_loss"], run["train_top1"],
                            run["heldout_top1"], run["collect_s"], run["train_s"], clips, int(vocab.numel()),
                            td.vocabulary_coverage(heldout, vocab), True, args.prompt_window, style, run["unroll"])
    out = args.save / f"{run['train_target']}_{style}_u{run['unroll']}"
    td.save_head(copy.deepcopy(head).to(torch.bfloat16), out, report, args.model)  # bf16 on disk, as train-draft's
    return out


def train_variant(style: str, unroll: int, train_target, eval_target, train_items, heldout_items, args,
                  provenance: dict) -> dict:
    """provenance: the training target's spec, its collection time and the clip record (for --save)."""
    aux = td.eagle3_aux_layers(len(train_target.llm.model.layers)) if style == "eagle3" else None
    train = td.OnlineSet(train_target, train_items, args.prompt_window, aux)
    heldout = td.OnlineSet(eval_target, heldout_items, args.prompt_window, aux)
    always = sorted(eos_ids(eval_target))
    vocab = td.eagle3_vocabulary(train, args.draft_vocab, always, eval_target.llm.config.vocab_size) if aux else None
    started = time.perf_counter()
    head, loss, train_top1, _ = td.train_head(train_target, train, td.OnlineSet(eval_target, heldout_items[:1], 0, aux),
                                              args.epochs, args.lr, args.seed, None, unroll,
                                              args.train_batch or td.auto_train_batch(len(train)), draft_vocab=vocab)
    train_s = time.perf_counter() - started
    if aux is None:
        td.set_draft_vocabulary(head, train, heldout, args.draft_vocab, always)
    lm_head = copy.deepcopy(eval_target.llm.lm_head).float()
    heldout_top1 = td.top1(head, lm_head, heldout, eval_target.device, 4)
    measured = tau(head.to(eval_target.llm.dtype), eval_target, heldout_items[:args.tau_prompts], args.gamma, args.new_tokens)
    run = {"style": style, "unroll": unroll, "final_loss": loss, "train_top1": train_top1, "heldout_top1": heldout_top1,
           "train_s": train_s, "collect_s": provenance["collect_s"], "train_target": provenance["train_target"], **measured}
    if args.save:
        run["saved"] = str(save_variant(head, style, run, heldout, provenance["clips"], args))
    return run


def reference_head(spec: str, eval_target, heldout_items, args) -> dict:
    """An existing head (the shipped `tiny-eagle`, or a head dir) judged on the same held-out answers and prompts."""
    from egpt_speed.drafts import shipped_head_dir
    from egpt_speed.eagle_formats import load_any_head

    directory = shipped_head_dir(spec) if spec == "tiny-eagle" else Path(spec)
    head = load_any_head(directory, eval_target.device, torch.float32)
    aux = head.aux_layers_for(len(eval_target.llm.model.layers)) if hasattr(head, "aux_layers_for") else None
    heldout = td.OnlineSet(eval_target, heldout_items, args.prompt_window, aux)
    lm_head = copy.deepcopy(eval_target.llm.lm_head).float()
    measured = tau(head.to(eval_target.llm.dtype), eval_target, heldout_items[:args.tau_prompts], args.gamma, args.new_tokens)
    return {"train_target": "reference", "style": spec, "unroll": 0, "train_top1": None, "train_s": 0.0,
            "heldout_top1": td.top1(head, lm_head, heldout, eval_target.device, 4), **measured}


def markdown(document: dict) -> str:
    rows = ["| training target | head | unroll | held-out top-1 | τ (γ = %d) | exact outputs | train s |" % document["config"]["gamma"],
            "|---|---|---:|---:|---:|---|---:|"]
    for r in document["runs"]:
        rows.append(f"| {r['train_target']} | {r['style']} | {r['unroll']} | {r['heldout_top1']:.3f} | {r['tau']:.2f} | "
                    f"{r['exact_outputs']} | {r['train_s']:.0f} |")
    c = document["config"]
    return (f"# Draft heads at equal data: {c['model']} on {document['env'].get('device_name', document['env']['device'])}\n\n"
            f"`{document['command']}`\n\n{c['answers']} training answers (+ {document['heldout_answers']} held-out, "
            f"clips and questions unseen), {c['new_tokens']} new tokens, {c['epochs']} epochs, draft vocabulary "
            f"{c['draft_vocab']}; evaluated against the {c['eval_dtype']} target.\n\n" + "\n".join(rows) + "\n")


def progress(line: str) -> None:
    """One timestamped line per phase, so a run cut by a device time limit shows how far it got."""
    print(f"[{time.strftime('%H:%M:%S')}] {line}", flush=True)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="tiny")
    parser.add_argument("--answers", type=int, default=48, help="training answers (held-out: 20 %% more, unseen clips and questions)")
    parser.add_argument("--clips", type=int, default=None, help="default: min(answers, 400), as the shipped head")
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--variants", nargs="*", default=["eagle:1", "eagle3:1"], help="STYLE:UNROLL")
    parser.add_argument("--train-targets", nargs="+", default=["float32"], help="DTYPE[+nf4]")
    parser.add_argument("--eval-dtype", default="float32")
    parser.add_argument("--draft-vocab", type=int, default=8192)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--train-batch", type=int, default=0)
    parser.add_argument("--prompt-window", type=int, default=8)
    parser.add_argument("--gamma", type=int, default=4)
    parser.add_argument("--tau-prompts", type=int, default=8)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--synthetic-events", type=int, default=200_000)
    parser.add_argument("--reference-head", default=None,
                        help="also judge an existing head (tiny-eagle or a head dir) on the same held-out set")
    parser.add_argument("--save", type=Path, default=None,
                        help="also write every trained head under DIR/<target>_<style>_u<unroll> (train-draft's layout)")
    parser.add_argument("--answers-cache", type=Path, default=None, help="folder for the answers as token ids (reused)")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    return parser.parse_args()


def main() -> None:
    global ARGS
    ARGS = args = parse_args()
    device = resolve_device(args.device)
    specs, data_seed = td.training_clips("synthetic", args.clips or min(args.answers, 400), args.seed, args.synthetic_events)
    train_pairs, heldout_pairs = td.pairs_for(specs, load_questions(), args.answers, 0.2, args.seed)
    clips = td.clip_record("synthetic", data_seed, train_pairs, heldout_pairs)
    eval_target = load_model(args.model, resolve_dtype(args.eval_dtype, device), device)
    started = time.perf_counter()
    heldout_items = answers(eval_target, heldout_pairs, args, f"heldout_{args.eval_dtype}")
    progress(f"held-out answers: {len(heldout_items)} in {time.perf_counter() - started:.0f} s")
    runs: list[dict] = []
    name = timestamped_name(f"draft_heads_{args.model}")
    base = {"command": " ".join(["python", *sys.argv]), "env": capture_env(device, None), "runs": runs,
            "heldout_answers": len(heldout_items),
            "config": {k: (v if isinstance(v, (int, float, list)) else str(v)) for k, v in vars(args).items()}}
    if args.reference_head:
        runs.append(reference_head(args.reference_head, eval_target, heldout_items, args))
        print(runs[-1], flush=True)
        write_json_atomic(base, args.out / f"{name}.json")
    for spec in (args.train_targets if args.variants else []):
        train_target = eval_target if spec == args.eval_dtype else load_target(spec, device)
        started = time.perf_counter()
        train_items = answers(train_target, train_pairs, args, f"train_{spec}")
        collect_s = time.perf_counter() - started
        progress(f"training answers ({spec}): {len(train_items)} in {collect_s:.0f} s")
        for variant in args.variants:
            style, _, unroll = variant.partition(":")
            provenance = {"train_target": spec, "collect_s": collect_s, "clips": clips}
            runs.append(train_variant(style, int(unroll or 1), train_target, eval_target, train_items, heldout_items, args,
                                      provenance))
            print(runs[-1], flush=True)
            write_json_atomic(base, args.out / f"{name}.json")  # after every head: a cut-off run keeps what it measured
        if train_target is not eval_target:
            del train_target
            torch.cuda.empty_cache() if device.type == "cuda" else None
    write_text_atomic(markdown(base), args.out / f"{name}.md")
    print(markdown(base))
    print(f"wrote {args.out / name}.json and .md")


ARGS: argparse.Namespace

if __name__ == "__main__":
    main()
