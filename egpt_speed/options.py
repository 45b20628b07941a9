"""Every command-line option and its default, once: dataclasses the CLI turns into typer options.

A field's default is the option's default; its metadata carries the flag names and help text.
`RunConfig` (runner) and `TrainDraftConfig` (train_draft) inherit these fields, so a test building a
config directly gets exactly what a user gets from the CLI.

Sampling temperature defaults to 0.6 (the value every recorded `--sample` result used); greedy
decoding, the default, ignores it.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Optional


def option(default: Any, *names: str, help: str = "", **extra: Any) -> Any:
    """A dataclass field that is also a CLI option (`names` as typer takes them)."""
    return field(default=default, metadata={"names": names, "help": help, **extra})


@dataclass
class CommonOptions:
    """Options shared by run, compare and train-draft."""

    model: str = option("tiny", "--model", help="EventGPT, LLaVA-1.5 or Video-LLaVA checkpoint dir, or a preset: tiny, synthetic-7b, synthetic-llava-7b, synthetic-video-llava-7b, tiny-llava, tiny-video-llava.")
    data: str = option("synthetic", "--data", help="Dataset dir (with EventGPT_Instruction_Subset.json), a dir of npy files, one npy, or 'synthetic'.")
    device: str = option("auto", "--device", help="auto | cuda | cpu.")
    seed: int = option(0, "--seed", help="Seed for synthetic data and sampling.")
    frames: int = option(5, "--frames", help="5: official 5-frame pooled path (582 tokens); 1: one frame (578).")
    synthetic_events: int = option(200_000, "--synthetic-events", help="Events per synthetic 1 s clip.")
    max_new_tokens: int = option(64, "--max-new-tokens", help="Tokens to generate per sample at most.")


def memory_budget_option() -> Any:
    """--memory-budget, read by the report of run/compare and by `report` (one definition for both)."""
    return option(None, "--memory-budget", help="GB: the report also recommends the fastest strategy whose memory (weights + draft + Stage-4 working) fits.")


@dataclass
class ReportOptions:
    """`report`: re-render (or merge) result files."""

    memory_budget_gb: Optional[float] = memory_budget_option()


@dataclass
class MergeOptions:
    """`merge`: join the shard results of one command."""

    out: Optional[Path] = option(None, "--out", help="Directory for the merged result (default: the first shard's).")


@dataclass
class MeasureOptions(CommonOptions):
    """What a run or compare measures with; recorded under `config` in the result."""

    draft: Optional[str] = option(None, "--draft", help="Draft model for speculative strategies: a dir or a preset; an EventGPT / LLaVA / Video-LLaVA draft of another family than --model reads its own view of each sample (cross-modal).")
    samples: int = option(8, "-n", "--samples", help="Counted samples.")
    dtype: str = option("auto", "--dtype", help="auto (bfloat16 on CUDA, float32 on CPU) | bfloat16 | float16 | float32.")
    warmup: int = option(2, "--warmup", help="Warm-up samples run first and not counted.")
    gamma: int = option(4, "--gamma", help="Draft tokens per speculative step.")
    batch_size: int = option(1, "--batch-size", help="Prompts per generate call for the batch strategy.")
    source: str = option("npy", "--source", help="npy: render frames from events (timed); png: load the pre-rendered event_image PNGs like the seed.")
    preprocess: str = option("auto", "--preprocess", help="Where Stage 2's image work runs: auto (device on CUDA, cpu elsewhere) | device (torch, bit-exact to the CPU processor) | cpu.")
    vision_mode: str = option("auto", "--vision-mode", help="How Stage 3's fixed-shape CLIP tower + projector + adaptor forward runs: auto (graph on CUDA, eager elsewhere) | graph (one CUDA graph per input shape) | compile (torch.compile) | eager.")
    allow_paths_outside_data: bool = option(False, "--allow-paths-outside-data", help="Let the dataset JSON point at files outside the dataset dir (absolute or '..' paths); only for a JSON you trust.")
    vision_tower: Optional[Path] = option(None, "--vision-tower", help="Local CLIP ViT dir overriding the checkpoint's mm_visual_tower.")
    allow_tokenizer_mismatch: bool = option(False, "--allow-tokenizer-mismatch", help="Run a checkpoint whose tokenizer encodes the prompt unlike its tokenizer.model; the mismatch is recorded in the result.")
    do_sample: bool = option(False, "--sample/--greedy", help="Sample (seeded) instead of greedy decoding.")
    temperature: float = option(0.6, "--temperature", help="Sampling temperature (with --sample), > 0.")
    top_p: float = option(1.0, "--top-p", help="Nucleus sampling mass (with --sample), in (0, 1].")
    fp32_check: bool = option(False, "--fp32-check", help="Also re-run the reference in float32 on the same samples and report how often it differs (the numerical floor); loads a second, float32 model copy (~28 GB more at 7B).")
    memory_budget_gb: Optional[float] = memory_budget_option()
    shard: Optional[str] = option(None, "--shard", help="i/n: run only the counted samples whose index is i mod n (processes you launch yourself; `egpt-speed merge` joins the n results). Under torchrun / accelerate launch it comes from RANK/WORLD_SIZE.")


@dataclass
class StrategyOptions:
    """Options only some strategies read; they reach them as `RunContext.options`."""

    exit_layer: Optional[int] = option(None, "--exit-layer", help="Layer the early-exit draft leaves after (default: a quarter of the layers).")
    pld_ngram: int = option(3, "--pld-ngram", help="Longest n-gram prompt lookup matches.")
    adaptive_gamma: bool = option(False, "--adaptive-gamma", help="Grow/shrink gamma with acceptance (speculative).")
    compile_mode: Optional[str] = option(None, "--compile-mode", help="compile: none | default | max-autotune-no-cudagraphs (CUDA default) | reduce-overhead.")
    draft_compile: Optional[str] = option(None, "--draft-compile", help="compile+eagle / compile+eagle-tree: compile the captured drafter's bodies with inductor before capture: none (default) | default | max-autotune-no-cudagraphs.")
    fused_step: Optional[bool] = option(None, "--fused-step/--no-fused-step", help="compile+eagle / compile+eagle-tree: draft, verify, greedy acceptance (and the tree path's cache compaction) and the head's catch-up as one compiled, captured graph per step with one read-back. Default: on for greedy, fixed-γ runs on CUDA (measured faster there), off elsewhere.")
    coordinate_descent: Optional[bool] = option(None, "--coordinate-descent/--no-coordinate-descent", help="compile (and every composition with it): inductor's coordinate-descent tuning, which turns one-row matmuls into tuned, fused reductions. Default: off (at 7B bf16 on an H200 it gave 5.02 → 4.30 ms a token in one run and 5.00 in the next: the tuner's choice varies by run); a torchao-quantized LLM keeps torchao's settings, which include it (--no-coordinate-descent drops that part).")
    tree_topk: int = option(8, "--tree-topk", help="eagle-tree: children per expanded node and nodes expanded per level.")
    tree_nodes: int = option(32, "--tree-nodes", help="eagle-tree: drafted nodes verified per step (the γ levels' likeliest).")


@dataclass
class OutputOptions:
    out: Path = option(Path("results"), "--out", help="Directory for the result files and the per-sample journal.")
    resume: bool = option(False, "--resume", help="Continue the journal of an interrupted run with the same configuration (or reuse a finished one).")


@dataclass
class RunOptions(OutputOptions, StrategyOptions, MeasureOptions):
    """Everything `run` and `compare` take besides strategy names."""

    def measure(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(MeasureOptions)}

    def strategy_options(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(StrategyOptions)}


def default_strategy_options() -> dict[str, Any]:
    return asdict(StrategyOptions())


@dataclass
class TrainDraftOptions(CommonOptions):
    """`train-draft`: collect the target's answers, fit an EAGLE head, report held-out agreement."""

    out: Optional[Path] = option(None, "--out", help="Directory for the trained head (safetensors + config); required.", required=True)
    samples: int = option(120, "-n", "--samples", help="Training (clip, question) pairs.")
    clips: Optional[int] = option(None, "--clips", help="Distinct clips the pairs reuse: the first N of --data, or N synthetic clips from a seed run/compare never use (default: min(samples, 200)).")
    epochs: int = option(6, "--epochs", help="Passes over the training answers.")
    lr: float = option(1e-3, "--lr", help="AdamW learning rate (cosine schedule).")
    holdout: float = option(0.2, "--holdout", help="Fraction of clips and of questions held out.")
    unroll: int = option(0, "--unroll", help="Training steps fed the head its own predictions (1 = teacher forcing only; 0 = auto: 3 for an eagle3 head, its training-time test, 1 for an eagle head).")
    batch_size: int = option(16, "--batch-size", help="Prompts per target generate call while collecting answers.")
    train_batch: int = option(0, "--train-batch", help="Sequences per optimizer step (0 = auto: 1 for a few hundred sequences, up to 16 for thousands).")
    draft_vocab: int = option(8192, "--draft-vocab", help="Token ids the head may draft: the K most frequent in the target's training answers (0 = all).")
    store_dtype: str = option("auto", "--store-dtype", help="Collected features in memory and collected.pt: auto (bfloat16 on CUDA, float32 on CPU) | float32 | bfloat16.")
    resume: bool = option(False, "--resume", help="Reuse the answers journaled in --out by an earlier run with the same data settings, and continue its interrupted training from the last finished epoch.")
    store_features: bool = option(False, "--store-features", help="Keep every answer's target features in memory and collected.pt and train from them (the old path); default: train online, recomputing the features per batch with one teacher-forced target forward, nothing written but the answers.")
    prompt_window: int = option(8, "--prompt-window", help="Prompt positions before the answer that online training also learns from (drafting starts from the prompt's last rows).")
    target_dtype: str = option("float32", "--target-dtype", help="dtype the target is loaded in while collecting and computing features: float32 (exact features) | bfloat16 | float16 | auto (bfloat16 on CUDA). bfloat16 halves the target's memory (a 7B target then fits a 24 GB card); the head still trains in float32.")
    head_style: str = option("auto", "--head-style", help="auto: eagle3, or eagle with --store-features / --eagle1-layout or a target of fewer than 3 layers | eagle: EAGLE-1/2's head on the target's last layer (regresses its features) | eagle3: EAGLE-3's, fusing the inputs of target layers 2, L/2, L-3, with its own norm and LM head over --draft-vocab, trained on tokens only and saved in the vLLM / SGLang EAGLE-3 layout.")
    target_quant: str = option("none", "--target-quant", help="none | nf4: load the target's decoder layers in bitsandbytes NF4 (CUDA + bitsandbytes) while collecting and computing features, so a 7B target takes ~4 GB; the head still trains in float32.")
    eagle1_layout: bool = option(False, "--eagle1-layout", help="Train the head without its layer's input norm, as EAGLE-1 and vLLM / SGLang's EAGLE loaders expect, so `export-draft --format eagle` is exact.")


@dataclass
class ExportDraftOptions:
    """`export-draft`: write a draft head in a serving engine's EAGLE layout."""

    format: str = option("auto", "--format", help="auto (the head's own layout) | eagle (EAGLE-1: vLLM llama_eagle.py, SGLang llama_eagle.py) | eagle3 (llama_eagle3.py).")
    out: Optional[Path] = option(None, "--out", help="Directory for config.json + model.safetensors; required.", required=True)
