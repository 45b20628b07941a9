"""train-draft's cost at 7B (issue 16 item 2): peak device memory and time of answer collection and of one
online-training epoch, per 1,000 answers, at 64 and 512 new tokens.

    python benchmarks/train_draft_7b.py --model synthetic-7b --answers 200 --out benchmarks/results   # H100/H200, bf16
    python benchmarks/train_draft_7b.py --model tiny --answers 8 --new-tokens 8 --out /tmp/td7b        # CPU smoke
    python benchmarks/train_draft_7b.py --model synthetic-7b --dtype bfloat16 --target-quant nf4 --batch-size 8 ...
    python benchmarks/train_draft_7b.py --model synthetic-7b --head-style eagle3 --unroll 3 ...   # the EAGLE-3 head

synthetic-7b has random weights: honest for cost only. Random weights rarely say EOS, so every answer
runs to --new-tokens (the worst case). Collection is `train_draft.collect_answers` (Stage 3 once per clip,
batched greedy `generate`); the epoch is `train_draft.train_head` on an OnlineSet (each batch's features
from one teacher-forced target forward) for one epoch, timed from the start to its last optimizer step
(the top-1 passes that follow are excluded from the time, not from the peak). Nothing is written to
disk but the result. Writes train_draft_cost_<model>_<stamp>.json/.md.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from egpt_speed import train_draft as td  # noqa: E402
from egpt_speed.datasets import load_questions  # noqa: E402
from egpt_speed.decoding import GenerationSettings, eos_ids  # noqa: E402
from egpt_speed.models import resolve_device  # noqa: E402
from egpt_speed.results import capture_env, timestamped_name, write_json_atomic, write_text_atomic  # noqa: E402

DTYPES = {"bfloat16": torch.bfloat16, "float32": torch.float32}


def peak_gb(device: torch.device) -> float | None:
    return torch.cuda.max_memory_allocated(device) / 1e9 if device.type == "cuda" else None


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(model, args, new_tokens: int, device: torch.device) -> dict:
    """Collection and one online epoch for `args.answers` answers of `new_tokens` tokens."""
    specs, _ = td.training_clips("synthetic", args.clips, args.seed, args.synthetic_events)
    pairs, _ = td.pairs_for(specs, load_questions(), args.answers, 0.2, args.seed)
    settings = GenerationSettings(max_new_tokens=new_tokens)
    reset_peak(device)
    started = time.perf_counter()
    items = td.collect_answers(model, pairs, settings, 5, args.batch_size)
    sync(device)
    collect_s, collect_peak = time.perf_counter() - started, peak_gb(device)
    reset_peak(device)
    steps: list[float] = []
    aux = td.eagle3_aux_layers(len(model.llm.model.layers)) if args.head_style == "eagle3" else None
    data = td.OnlineSet(model, items, args.prompt_window, aux)
    vocab = td.eagle3_vocabulary(data, args.draft_vocab, sorted(eos_ids(model)), model.llm.config.vocab_size) if aux else None
    started = time.perf_counter()

    def tick(count: int) -> None:
        sync(device)
        steps.append(time.perf_counter() - started)

    td.train_head(model, data, td.OnlineSet(model, items[:1], args.prompt_window, aux), 1, 1e-3, args.seed, tick,
                  args.unroll, batch_size=args.train_batch, draft_vocab=vocab)
    epoch_s, train_peak = steps[-1], peak_gb(device)
    lengths = [len(item.answer) for item in items]
    scale = 1000 / len(items)
    return {"new_tokens": new_tokens, "answers": len(items), "mean_answer_tokens": sum(lengths) / len(lengths),
            "collect_s": collect_s, "collect_s_per_1000": collect_s * scale, "collect_peak_gb": collect_peak,
            "epoch_s": epoch_s, "epoch_s_per_1000": epoch_s * scale, "train_peak_gb": train_peak,
            "answers_bytes_per_1000": int(sum(lengths) * scale * 8)}  # token ids, as the JSON journal's ints (≈)


def markdown(document: dict) -> str:
    rows = ["| new tokens | answers | mean answer | collect s / 1000 | collect peak GB | epoch s / 1000 | train peak GB |",
            "|---:|---:|---:|---:|---:|---:|---:|"]
    for r in document["runs"]:
        gb = lambda value: "–" if value is None else f"{value:.1f}"  # noqa: E731
        rows.append(f"| {r['new_tokens']} | {r['answers']} | {r['mean_answer_tokens']:.0f} | {r['collect_s_per_1000']:.0f} | "
                    f"{gb(r['collect_peak_gb'])} | {r['epoch_s_per_1000']:.0f} | {gb(r['train_peak_gb'])} |")
    quant = " + NF4 decoder linears" if document["config"].get("target_quant") == "nf4" else ""
    if document["config"].get("head_style") == "eagle3":
        quant += f", EAGLE-3 head, unroll {document['config'].get('unroll')}"
    return (f"# train-draft cost: {document['config']['model']} ({document['config']['dtype']}{quant}) on {document['env'].get('device_name', document['env']['device'])}\n\n"
            f"`{document['command']}`\n\nOnline training: no feature files; per 1,000 answers scaled linearly "
            f"from {document['runs'][0]['answers']}." + (" Random weights: cost only." if document['config']['model'] == "synthetic-7b" else "") + "\n\n" + "\n".join(rows) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="synthetic-7b")
    parser.add_argument("--answers", type=int, default=200, help="answers measured (times are scaled to 1,000)")
    parser.add_argument("--new-tokens", type=int, nargs="+", default=[64, 512])
    parser.add_argument("--clips", type=int, default=20)
    parser.add_argument("--batch-size", type=int, default=32, help="prompts per generate call while collecting")
    parser.add_argument("--train-batch", type=int, default=8, help="sequences per optimizer step")
    parser.add_argument("--prompt-window", type=int, default=8)
    parser.add_argument("--head-style", default="eagle", choices=["eagle", "eagle3"])
    parser.add_argument("--unroll", type=int, default=1, help="training-time test steps (train-draft --unroll)")
    parser.add_argument("--draft-vocab", type=int, default=8192, help="eagle3: its LM head's ids")
    parser.add_argument("--dtype", default="auto", choices=["auto", *DTYPES])
    parser.add_argument("--target-quant", default="none", choices=list(td.TARGET_QUANTS),
                        help="nf4: the target's decoder linears in bitsandbytes NF4, as train-draft --target-quant nf4")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--synthetic-events", type=int, default=200_000)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    args = parser.parse_args()
    device = resolve_device(args.device)
    dtype = DTYPES.get(args.dtype) or (torch.bfloat16 if device.type == "cuda" else torch.float32)
    td.check_target_quant(args.target_quant, device)
    model = td.load_target(argparse.Namespace(model=args.model, target_dtype=str(dtype).replace("torch.", ""),
                                              target_quant=args.target_quant), device)
    weights_gb = peak_gb(device)  # the load's peak: a quantized target is built in --dtype first
    resident_gb = torch.cuda.memory_allocated(device) / 1e9 if device.type == "cuda" else None
    runs = []
    for new_tokens in args.new_tokens:
        runs.append(measure(model, args, new_tokens, device))
        print(runs[-1], flush=True)
    env = capture_env(device, None)
    document = {"command": " ".join(["python", *sys.argv]), "env": env, "runs": runs,
                "config": {**{k: str(v) for k, v in vars(args).items()}, "dtype": str(dtype).replace("torch.", "")},
                "target_loaded_peak_gb": weights_gb, "target_resident_gb": resident_gb}
    name = timestamped_name(f"train_draft_cost_{args.model}" + ("_nf4" if args.target_quant == "nf4" else "")
                            + (f"_eagle3u{args.unroll}" if args.head_style == "eagle3" else ""))
    write_json_atomic(document, args.out / f"{name}.json")
    write_text_atomic(markdown(document), args.out / f"{name}.md")
    print(f"wrote {args.out / name}.json and .md")


if __name__ == "__main__":
    main()
