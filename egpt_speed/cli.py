"""`egpt-speed`: run, compare, report, strategies. Defaults live in these signatures only."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Optional

import typer

from egpt_speed.errors import EgptError

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Measure EventGPT inference in four decoupled stages and compare Stage-4 strategies.")
_state = {"debug": False}


@app.callback()
def main(debug: bool = typer.Option(False, "--debug", help="Show full tracebacks on errors.")) -> None:
    _state["debug"] = debug
    if not debug:  # library advice (deprecations, config-type notices) is not the user's error line
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        import warnings

        warnings.filterwarnings("ignore", category=FutureWarning)
        warnings.filterwarnings("ignore", category=DeprecationWarning)


def _options(model, draft, data, samples, max_new_tokens, dtype, device, warmup, frames, gamma, batch_size, seed,
             source, vision_tower, sample, temperature, top_p, synthetic_events, exit_layer, pld_ngram, adaptive_gamma,
             compile_mode=None, tree_topk=None, tree_nodes=None):
    return dict(model=model, draft=draft, data=data, samples=samples, max_new_tokens=max_new_tokens, dtype=dtype,
                device=device, warmup=warmup, frames=frames, gamma=gamma, batch_size=batch_size, seed=seed,
                source=source, vision_tower=vision_tower, do_sample=sample, temperature=temperature, top_p=top_p,
                synthetic_events=synthetic_events,
                options={"exit_layer": exit_layer, "pld_ngram": pld_ngram, "adaptive_gamma": adaptive_gamma,
                         "compile_mode": compile_mode, "tree_topk": tree_topk, "tree_nodes": tree_nodes})


def _execute(strategies: list[str], out: Path, name: str, **kwargs) -> None:
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from transformers.utils import logging as hf_logging

    from egpt_speed.baselines.runner import RunConfig, execute

    hf_logging.disable_progress_bar()  # our bar shows progress; transformers' loading bars would add stderr lines
    console = Console(stderr=True)
    config = RunConfig(strategies=strategies, **kwargs)
    with Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  console=console, transient=False, disable=not console.is_terminal) as progress:
        holder = {}

        def factory(total: int):
            holder["task"] = progress.add_task(f"{name} (incl. {config.warmup} warm-up)", total=total)
            return lambda step: progress.advance(holder["task"], step)

        try:
            document, path = execute(config, out, factory, name=name)
        except BaseException:
            progress.live.transient = True  # a failed run leaves its one error line, not a stale bar
            raise
    _print_summary(document)
    typer.echo(f"wrote {path} and {path.with_suffix('.md').name}")


def _print_summary(document: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    from egpt_speed.report import _f

    console = Console()
    table = Table(title="egpt-speed summary (means; ms/token = decode / (tokens − 1))")
    for column in ("strategy", "S1 ms", "S2 ms", "S3 ms", "S4 ms", "S4 %", "prefill ms", "ms/token", "tok/s", "tokens"):
        table.add_column(column, justify="right" if column != "strategy" else "left")
    for name, run in document["runs"].items():
        s = run["summary"]
        table.add_row(name, _f(s.get("stage1_ms"), 2), _f(s.get("stage2_ms"), 2), _f(s.get("stage3_ms"), 2),
                      _f(s.get("stage4_ms"), 1), _f(s.get("stage4_pct"), 1), _f(s.get("prefill_ms"), 1),
                      _f(s.get("per_token_ms"), 2), _f(s.get("tokens_per_s"), 1), _f(s.get("num_tokens"), 1))
    console.print(table)
    if document["comparisons"]:
        comparison = Table(title=f"vs {document['comparisons'][0]['reference']} (median per-sample ratio [IQR])")
        for column in ("candidate", "S4 speedup", "total speedup", "exact match", "token match", "α", "mean acc. tokens"):
            comparison.add_column(column, justify="right" if column != "candidate" else "left")
        for c in document["comparisons"]:
            spec = document["runs"][c["candidate"]]["summary"].get("speculation") or {}
            comparison.add_row(c["candidate"], f"{_f(c['speedup_stage4_median'], 2)}× [{_f(c['speedup_stage4_q1'], 2)}–{_f(c['speedup_stage4_q3'], 2)}]",
                               f"{_f(c['speedup_total_median'], 2)}×", f"{_f(100 * c['exact_match_rate'], 0)} %",
                               f"{_f(100 * c['token_match_rate'], 1)} %", _f(spec.get("accept_rate"), 3),
                               _f(spec.get("mean_accepted_tokens"), 2))
        console.print(comparison)


# Shared options (typer needs them spelled out per command; the values below are the only defaults).
MODEL = typer.Option("tiny", "--model", help="EventGPT checkpoint dir, or a preset: tiny, synthetic-7b.")
DRAFT = typer.Option(None, "--draft", help="Draft model for speculative strategies: a dir or a preset.")
DATA = typer.Option("synthetic", "--data", help="Dataset dir (with EventGPT_Instruction_Subset.json), a dir of npy files, one npy, or 'synthetic'.")
SAMPLES = typer.Option(8, "-n", "--samples", help="Counted samples.")
MAX_NEW = typer.Option(64, "--max-new-tokens", help="Tokens to generate per sample at most.")
DTYPE = typer.Option("auto", "--dtype", help="auto (bfloat16 on CUDA, float32 on CPU) | bfloat16 | float16 | float32.")
DEVICE = typer.Option("auto", "--device", help="auto | cuda | cpu.")
WARMUP = typer.Option(2, "--warmup", help="Warm-up samples run first and not counted.")
FRAMES = typer.Option(5, "--frames", help="5: official 5-frame pooled path (582 tokens); 1: one frame (578).")
GAMMA = typer.Option(4, "--gamma", help="Draft tokens per speculative step.")
BATCH = typer.Option(1, "--batch-size", help="Prompts per generate call for the batch strategy.")
SEED = typer.Option(0, "--seed", help="Seed for synthetic data and sampling.")
OUT = typer.Option(Path("results"), "--out", help="Directory for the result files.")
RESUME = typer.Option(False, "--resume", help="Reuse a finished result with the same configuration instead of re-running.")
SOURCE = typer.Option("npy", "--source", help="npy: render frames from events (timed); png: load the pre-rendered event_image PNGs like the seed.")
TOWER = typer.Option(None, "--vision-tower", help="Local CLIP ViT dir overriding the checkpoint's mm_visual_tower.")
SAMPLE = typer.Option(False, "--sample/--greedy", help="Sample (seeded) instead of greedy decoding.")
TEMPERATURE = typer.Option(0.6, "--temperature", help="Sampling temperature (with --sample).")
TOP_P = typer.Option(1.0, "--top-p", help="Nucleus sampling mass (with --sample).")
EVENTS = typer.Option(200_000, "--synthetic-events", help="Events per synthetic 1 s clip.")
EXIT_LAYER = typer.Option(None, "--exit-layer", help="Layer the early-exit draft leaves after (default: a quarter of the layers).")
PLD_NGRAM = typer.Option(3, "--pld-ngram", help="Longest n-gram prompt lookup matches.")
ADAPTIVE = typer.Option(False, "--adaptive-gamma", help="Grow/shrink gamma with acceptance (speculative).")
TREE_TOPK = typer.Option(8, "--tree-topk", help="eagle-tree: children per expanded node and nodes expanded per level.")
TREE_NODES = typer.Option(32, "--tree-nodes", help="eagle-tree: drafted nodes verified per step (the γ levels' likeliest).")
COMPILE_MODE = typer.Option(None, "--compile-mode", help="compile: none | default | max-autotune-no-cudagraphs (CUDA default) | reduce-overhead.")


def _resume_path(out: Path, name: str) -> Optional[Path]:
    candidates = sorted(out.glob(f"{name}_*.json")) if out.exists() else []
    return candidates[-1] if candidates else None


def _guarded(body) -> None:
    try:
        body()
    except EgptError as error:
        if _state["debug"]:
            raise
        typer.echo(f"error: {error}", err=True)
        raise typer.Exit(2)
    except KeyboardInterrupt:
        typer.echo("interrupted: no result file was written.", err=True)
        raise typer.Exit(130)
    except Exception as error:  # noqa: BLE001 - last line of defence: one line unless --debug
        if _state["debug"]:
            raise
        typer.echo(f"error: {type(error).__name__}: {error} (rerun with --debug for the traceback)", err=True)
        raise typer.Exit(1)


@app.command()
def run(strategy: str = typer.Argument(..., help="Strategy name or composition, e.g. baseline, nf4+speculative."),
        model: str = MODEL, draft: Optional[str] = DRAFT, data: str = DATA, samples: int = SAMPLES,
        max_new_tokens: int = MAX_NEW, dtype: str = DTYPE, device: str = DEVICE, warmup: int = WARMUP,
        frames: int = FRAMES, gamma: int = GAMMA, batch_size: int = BATCH, seed: int = SEED, out: Path = OUT,
        resume: bool = RESUME, source: str = SOURCE, vision_tower: Optional[Path] = TOWER, sample: bool = SAMPLE,
        temperature: float = TEMPERATURE, top_p: float = TOP_P, synthetic_events: int = EVENTS,
        exit_layer: Optional[int] = EXIT_LAYER, pld_ngram: int = PLD_NGRAM, adaptive_gamma: bool = ADAPTIVE,
        compile_mode: Optional[str] = COMPILE_MODE, tree_topk: int = TREE_TOPK, tree_nodes: int = TREE_NODES) -> None:
    """Run one strategy over the samples: four stages timed, results to --out."""
    options = _options(model, draft, data, samples, max_new_tokens, dtype, device, warmup, frames, gamma, batch_size,
                       seed, source, vision_tower, sample, temperature, top_p, synthetic_events, exit_layer, pld_ngram,
                       adaptive_gamma, compile_mode, tree_topk, tree_nodes)
    _guarded(lambda: _run_or_resume([strategy], out, strategy, resume, options))


@app.command(name="compare")
def compare_command(reference: str = typer.Argument(..., help="Reference strategy (speedups and agreement are against it)."),
                    candidates: list[str] = typer.Argument(..., help="Candidate strategies."),
                    model: str = MODEL, draft: Optional[str] = DRAFT, data: str = DATA, samples: int = SAMPLES,
                    max_new_tokens: int = MAX_NEW, dtype: str = DTYPE, device: str = DEVICE, warmup: int = WARMUP,
                    frames: int = FRAMES, gamma: int = GAMMA, batch_size: int = BATCH, seed: int = SEED,
                    out: Path = OUT, resume: bool = RESUME, source: str = SOURCE, vision_tower: Optional[Path] = TOWER,
                    sample: bool = SAMPLE, temperature: float = TEMPERATURE, top_p: float = TOP_P,
                    synthetic_events: int = EVENTS, exit_layer: Optional[int] = EXIT_LAYER,
                    pld_ngram: int = PLD_NGRAM, adaptive_gamma: bool = ADAPTIVE,
                    compile_mode: Optional[str] = COMPILE_MODE, tree_topk: int = TREE_TOPK, tree_nodes: int = TREE_NODES) -> None:
    """Run REF and each CAND on the same samples, interleaved, and report speedups and agreement."""
    options = _options(model, draft, data, samples, max_new_tokens, dtype, device, warmup, frames, gamma, batch_size,
                       seed, source, vision_tower, sample, temperature, top_p, synthetic_events, exit_layer, pld_ngram,
                       adaptive_gamma, compile_mode, tree_topk, tree_nodes)
    names = [reference, *candidates]
    _guarded(lambda: _run_or_resume(names, out, "compare_" + "_vs_".join(names), resume, options))


def _run_or_resume(strategies: list[str], out: Path, name: str, resume: bool, options: dict) -> None:
    from egpt_speed.results import load_result, timestamped_name

    stem = timestamped_name(name).rsplit("_", 2)[0]
    if resume:
        previous = _resume_path(out, stem)
        if previous is not None:
            document = load_result(previous)
            wanted = {k: (str(v) if isinstance(v, Path) else v) for k, v in options.items()}
            if all(document["config"].get(k) == v for k, v in wanted.items()) and list(document["runs"]) == strategies:
                _print_summary(document)
                typer.echo(f"--resume: {previous} already holds this configuration; nothing re-run.")
                return
    _execute(strategies, out, stem, **options)


@app.command()
def report(result: Path = typer.Argument(..., help="A result JSON written by run or compare.")) -> None:
    """Re-render the markdown and PNG of a result file."""

    def body() -> None:
        from egpt_speed import report as render
        from egpt_speed.results import load_result, write_text_atomic

        document = load_result(result)
        write_text_atomic(render.render_markdown(document), result.with_suffix(".md"))
        plot = render.write_plots(document, result.with_suffix(".png"))
        _print_summary(document)
        typer.echo(f"wrote {result.with_suffix('.md')}" + (f" and {plot}" if plot else ""))

    _guarded(body)


@app.command()
def strategies(device: str = DEVICE) -> None:
    """List every strategy and whether it can run here."""

    def body() -> None:
        from rich.console import Console
        from rich.table import Table

        from egpt_speed.strategies import registry
        from egpt_speed.strategies.registry import RunContext
        from egpt_speed.models import resolve_device

        import torch

        ctx = RunContext(device=resolve_device(device), dtype=torch.bfloat16)
        table = Table(title=f"Stage-4 strategies (compose with +, e.g. nf4+speculative) — device {ctx.device}")
        for column in ("name", "kind", "can run here", "what it does"):
            table.add_column(column)
        for name, cls in registry.available().items():
            reason = cls(ctx).unavailable_reason()
            kind = ("decoder" if cls.decodes else "preparer") + ("" if cls.lossless else ", lossy")
            table.add_row(name, kind, "yes" if reason is None else f"no — {reason}", cls.summary)
        Console(width=160).print(table)

    _guarded(body)


@app.command(name="train-draft")
def train_draft(model: str = MODEL, data: str = DATA, out: Path = typer.Option(..., "--out", help="Directory for the trained head (safetensors + config)."),
                samples: int = typer.Option(120, "-n", "--samples", help="Training (clip, question) pairs."),
                clips: Optional[int] = typer.Option(None, "--clips", help="Distinct clips the pairs reuse: the first N of --data, or N synthetic clips from a seed run/compare never use (default: min(samples, 200))."),
                max_new_tokens: int = typer.Option(64, "--max-new-tokens", help="Length of the target's answers used as training text."),
                epochs: int = typer.Option(6, "--epochs"), lr: float = typer.Option(1e-3, "--lr"),
                holdout: float = typer.Option(0.2, "--holdout", help="Fraction of clips and of questions held out."),
                unroll: int = typer.Option(1, "--unroll", help="Training steps fed the head its own predictions (1 = teacher forcing only)."),
                batch_size: int = typer.Option(16, "--batch-size", help="Prompts per target generate call while collecting answers."),
                train_batch: int = typer.Option(0, "--train-batch", help="Sequences per optimizer step (0 = auto: 1 for a few hundred sequences, up to 16 for thousands)."),
                draft_vocab: int = typer.Option(8192, "--draft-vocab", help="Token ids the head may draft: the K most frequent in the target's training answers (0 = all)."),
                store_dtype: str = typer.Option("auto", "--store-dtype", help="Collected features in memory and collected.pt: auto (bfloat16 on CUDA, float32 on CPU) | float32 | bfloat16."),
                device: str = DEVICE, seed: int = SEED, frames: int = FRAMES, synthetic_events: int = EVENTS,
                resume: bool = typer.Option(False, "--resume", help="Reuse the target answers collected in --out by an earlier run with the same data settings, and continue its interrupted training from the last finished epoch.")) -> None:
    """Train an EAGLE draft head for --model on its own greedy answers (float32), report held-out agreement."""

    def body() -> None:
        import time

        import torch
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
        from transformers.utils import logging as hf_logging

        from egpt_speed.baselines.runner import RunConfig, load_model, validate
        from egpt_speed import train_draft as td
        from egpt_speed.datasets import load_questions
        from egpt_speed.decoding import GenerationSettings, eos_ids
        from egpt_speed.models import resolve_device

        hf_logging.disable_progress_bar()
        validate(RunConfig(strategies=["baseline"], model=model, data=data, samples=samples, device=device, frames=frames,
                           max_new_tokens=max_new_tokens, batch_size=batch_size))
        clip_count = min(samples, 200) if clips is None else clips
        if clip_count < 2:
            raise EgptError("--clips must be at least 2: some clips are held out.")
        if train_batch < 0:
            raise EgptError("--train-batch must be 0 (auto) or a positive count.")
        if draft_vocab < 0:
            raise EgptError("--draft-vocab must be 0 (all ids) or a positive count.")
        target_device = resolve_device(device)
        storage = td.store_dtype_for(store_dtype, target_device)
        specs, data_seed = td.training_clips(data, clip_count, seed, synthetic_events)
        train_pairs, heldout_pairs = td.pairs_for(specs, load_questions(), samples, holdout, seed)
        collection = dict(model=model, data=data, synthetic_seed=data_seed, synthetic_events=synthetic_events,
                          samples=samples, clips=clip_count, holdout=holdout, seed=seed, max_new_tokens=max_new_tokens,
                          frames=frames)
        target = load_model(model, torch.float32, target_device)
        settings = GenerationSettings(max_new_tokens=max_new_tokens)
        cache_file = out / "collected.pt"
        with Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn()) as progress:
            started = time.perf_counter()
            if resume and cache_file.exists():
                train_seqs, heldout_seqs = td.load_collected(cache_file, collection)
            else:
                task = progress.add_task("target answers", total=len(train_pairs) + len(heldout_pairs))
                collected = td.collect_batch(target, train_pairs + heldout_pairs, settings, frames, batch_size, storage,
                                             lambda step: progress.advance(task, step))
                train_seqs, heldout_seqs = collected[:len(train_pairs)], collected[len(train_pairs):]
                td.save_collected(cache_file, collection, train_seqs, heldout_seqs)
            collect_s = time.perf_counter() - started
            task = progress.add_task("training head", total=epochs * len(train_seqs))
            started = time.perf_counter()
            head, loss, train_top1, heldout_top1 = td.train_head(target, train_seqs, heldout_seqs, epochs, lr, seed,
                                                                 lambda step: progress.advance(task, step), unroll,
                                                                 train_batch or td.auto_train_batch(len(train_seqs)),
                                                                 out / "train_checkpoint.pt", resume)
            train_s = time.perf_counter() - started
        coverage = td.set_draft_vocabulary(head, train_seqs, heldout_seqs, draft_vocab, sorted(eos_ids(target)))
        report = td.TrainReport(len(train_seqs), len(heldout_seqs), epochs, loss, train_top1, heldout_top1, collect_s,
                                train_s, td.clip_record(data, data_seed, train_pairs, heldout_pairs),
                                draft_vocab=draft_vocab, heldout_vocab_coverage=coverage)
        td.save_head(head, out, report, model)
        (out / "train_checkpoint.pt").unlink(missing_ok=True)  # the head is saved; nothing left to resume
        typer.echo(f"trained head → {out}: held-out top-1 agreement {heldout_top1:.3f} (train {train_top1:.3f}), "
                   f"loss {loss:.4f}, draft vocabulary covers {100 * coverage:.1f} % of held-out answer tokens, "
                   f"collect {collect_s:.0f} s, train {train_s:.0f} s")

    _guarded(body)


def entrypoint() -> None:
    app()


if __name__ == "__main__":
    sys.exit(entrypoint())
