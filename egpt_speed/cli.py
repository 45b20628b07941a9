"""`egpt-speed`: run, compare, report, strategies, train-draft.

Options and their defaults live in `egpt_speed.options` (dataclasses); this module turns their
fields into typer options, so each default is written once.
"""

from __future__ import annotations

import inspect
import sys
import typing
from dataclasses import MISSING, fields
from pathlib import Path
from typing import Any, Callable, Optional

import typer

from egpt_speed.errors import EgptError, RunInterrupted, StrategyFailed
from egpt_speed.options import CommonOptions, ExportDraftOptions, MergeOptions, ReportOptions, RunOptions, TrainDraftOptions

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Measure EventGPT inference in four decoupled stages and compare Stage-4 strategies.")
_state = {"debug": False}
DEBUG_HELP = "Show full tracebacks on errors (also accepted before the command)."
KEYWORD = inspect.Parameter.KEYWORD_ONLY


@app.callback()
def main(debug: bool = typer.Option(False, "--debug", help=DEBUG_HELP, metavar="")) -> None:
    _state["debug"] = debug


def _configure(debug: bool) -> None:
    """Library advice (deprecations, config-type notices) is not the user's error line, unless --debug."""
    _state["debug"] = _state["debug"] or debug
    if not _state["debug"]:
        import warnings

        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        warnings.filterwarnings("ignore", category=FutureWarning)
        warnings.filterwarnings("ignore", category=DeprecationWarning)


def _typer_option(name: str, annotation: Any, default: Any, metadata: dict) -> inspect.Parameter:
    extra = {k: v for k, v in metadata.items() if k not in ("names", "help", "required")}
    if annotation in (bool, Optional[bool]):
        extra.setdefault("metavar", "")  # a flag takes no value: no "<bool>" in --help
    value = ... if metadata.get("required") else default
    return inspect.Parameter(name, KEYWORD, annotation=annotation,
                             default=typer.Option(value, *metadata["names"], help=metadata["help"], **extra))


def option_parameters(cls: type) -> list[inspect.Parameter]:
    """The dataclass's fields as typer options (flag names and help from the field metadata)."""
    hints = typing.get_type_hints(cls)
    return [_typer_option(f.name, hints[f.name], f.default if f.default is not MISSING else None, dict(f.metadata))
            for f in fields(cls)]


def command(name: str, options: type | None = None, arguments: tuple[inspect.Parameter, ...] = ()) -> Callable:
    """Register `body(*arguments, options)` as a typer command taking the dataclass's fields and --debug."""
    debug = inspect.Parameter("debug", KEYWORD, annotation=bool,
                              default=typer.Option(False, "--debug", help=DEBUG_HELP, metavar=""))

    def register(body: Callable) -> Callable:
        def handler(**values: Any) -> None:
            _configure(values.pop("debug"))
            positional = [values.pop(a.name) for a in arguments]
            built = [options(**values)] if options else []
            _guarded(lambda: body(*positional, *built))

        handler.__signature__ = inspect.Signature(  # type: ignore[attr-defined]
            [*arguments, *(option_parameters(options) if options else []), debug])
        handler.__doc__ = body.__doc__
        app.command(name=name)(handler)
        return body

    return register


def argument(name: str, annotation: Any, help: str) -> inspect.Parameter:
    return inspect.Parameter(name, KEYWORD, annotation=annotation, default=typer.Argument(..., help=help))


def _guarded(body: Callable[[], None]) -> None:
    try:
        body()
    except EgptError as error:
        if _state["debug"]:
            raise
        typer.echo(f"error: {error}", err=True)
        raise typer.Exit(2)
    except RunInterrupted as interrupted:
        typer.echo(str(interrupted), err=True)
        raise typer.Exit(130)
    except KeyboardInterrupt:
        typer.echo("interrupted: no result file was written.", err=True)
        raise typer.Exit(130)
    except StrategyFailed as failed:
        if _state["debug"]:
            raise
        typer.echo(f"error: {failed}", err=True)
        raise typer.Exit(1)
    except Exception as error:  # noqa: BLE001 - last line of defence: one line unless --debug
        if _state["debug"]:
            raise
        typer.echo(f"error: {type(error).__name__}: {error} (rerun with --debug for the traceback)", err=True)
        raise typer.Exit(1)


def _progress():
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    console = Console(stderr=True)
    return Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                    console=console, transient=False, disable=not console.is_terminal)


def _run_or_resume(strategies: list[str], name: str, options: RunOptions) -> None:
    from transformers.utils import logging as hf_logging

    from egpt_speed.baselines import distributed, runner
    from egpt_speed.shards import samples_of
    from egpt_speed.summary_table import print_summary

    hf_logging.disable_progress_bar()  # our bar shows progress; transformers' loading bars would add stderr lines
    config = runner.RunConfig.from_options(strategies, options)
    with _progress() as progress:
        def factory(total: int) -> Callable[[int], None]:
            task = progress.add_task(f"{name} (incl. {config.warmup} warm-up)", total=total)
            return lambda step: progress.advance(task, step)

        try:
            outcome = distributed.run(config, options.out, factory, name=name, resume=options.resume)
        except BaseException:
            progress.live.transient = True  # a failed run leaves its one error line, not a stale bar
            raise
    if distributed.is_quiet_rank() and not _state["debug"]:
        return  # rank 0 of the launch reports the merged result
    print_summary(outcome.document)
    if not outcome.rerun:
        typer.echo(f"--resume: {outcome.json_path} already holds this configuration; nothing re-run.")
        return
    if outcome.reused:
        typer.echo(f"--resume: reused {outcome.reused} journaled samples from {outcome.paths[-1]}, "
                   f"ran {samples_of(config.shard, config.samples) - outcome.reused}.")
    typer.echo("wrote " + ", ".join(str(path) for path in outcome.paths))


@command("run", RunOptions, (argument("strategy", str, "Strategy name or composition, e.g. baseline, nf4+speculative."),))
def run(strategy: str, options: RunOptions) -> None:
    """Run one strategy over the samples: four stages timed, results to --out."""
    _run_or_resume([strategy], strategy, options)


@command("compare", RunOptions, (argument("reference", str, "Reference strategy (speedups and agreement are against it)."),
                                 argument("candidates", list[str], "Candidate strategies.")))
def compare_command(reference: str, candidates: list[str], options: RunOptions) -> None:
    """Run REF and each CAND on the same samples, interleaved, and report speedups and agreement."""
    names = [reference, *candidates]
    _run_or_resume(names, "compare_" + "_vs_".join(names), options)


@command("report", ReportOptions, (argument("result", list[Path], "Result JSONs written by run or compare; several (same device and samples) merge into one ranking."),))
def report(result: list[Path], options: ReportOptions) -> None:
    """Re-render the markdown and PNG of a result file, or merge several into one ranking (merged_<stamp>.json)."""
    from egpt_speed import report as render
    from egpt_speed.results import load_result, timestamped_name, write_json_atomic, write_text_atomic
    from egpt_speed.summary_table import print_summary

    if len(result) == 1:
        target, document = result[0], load_result(result[0])
    else:
        target, document = result[0].parent / f"{timestamped_name('merged')}.json", render.merge_result_files(result)
        write_json_atomic(document, target)
    write_text_atomic(render.render_markdown(document, options.memory_budget_gb), target.with_suffix(".md"))
    plot = render.write_plots(document, target.with_suffix(".png"))
    print_summary(document)
    typer.echo(f"wrote {target.with_suffix('.md')}" + (f" and {plot}" if plot else ""))


@command("merge", MergeOptions, (argument("results", list[Path], "Result JSONs (or journals) of every shard of one command (--shard i/n or torchrun ranks)."),))
def merge(results: list[Path], options: MergeOptions) -> None:
    """Merge the shards of one run or compare into one result in dataset order (refuses mixed or missing shards)."""
    from egpt_speed.merge import merge_files
    from egpt_speed.summary_table import print_summary

    document, written = merge_files(results, options.out)
    print_summary(document)
    typer.echo("wrote " + ", ".join(str(path) for path in written))


@command("strategies", None, tuple(p for p in option_parameters(CommonOptions) if p.name == "device"))
def strategies(device: str) -> None:
    """List every strategy and whether it can run here."""
    import torch
    from rich.console import Console
    from rich.table import Table

    from egpt_speed.devices import resolve_device
    from egpt_speed.strategies import registry
    from egpt_speed.strategies.registry import RunContext

    ctx = RunContext(device=resolve_device(device), dtype=torch.bfloat16)
    table = Table(title=f"Stage-4 strategies (compose with +, e.g. nf4+speculative) — device {ctx.device}")
    for column in ("name", "kind", "can run here", "what it does"):
        table.add_column(column)
    for name, cls in registry.available().items():
        reason = cls(ctx).unavailable_reason()
        kind = ("decoder" if cls.decodes else "preparer") + ("" if cls.lossless else ", lossy")
        table.add_row(name, kind, "yes" if reason is None else f"no — {reason}", cls.summary)
    Console(width=160).print(table)


@command("train-draft", TrainDraftOptions)
def train_draft(options: TrainDraftOptions) -> None:
    """Train an EAGLE draft head for --model on its own greedy answers (float32), report held-out agreement."""
    from transformers.utils import logging as hf_logging

    from egpt_speed import train_draft as td

    hf_logging.disable_progress_bar()
    with _progress() as progress:
        def factory(description: str, total: int) -> Callable[[int], None]:
            task = progress.add_task(description, total=total)
            return lambda step: progress.advance(task, step)

        outcome = td.run(options, factory)
    if outcome.report is not None:  # None: a launched rank other than 0, which only collected answers
        typer.echo(outcome.describe())


@command("export-draft", ExportDraftOptions, (argument("head_dir", Path, "A train-draft head dir, or an EAGLE-1 / EAGLE-3 head dir."),))
def export_draft(head_dir: Path, options: ExportDraftOptions) -> None:
    """Write a draft head in the EAGLE-1 or EAGLE-3 layout vLLM and SGLang load."""
    from egpt_speed.eagle_formats import export_head

    for note in export_head(head_dir, options.format, options.out):
        typer.echo(f"note: {note}.")
    typer.echo(f"wrote {options.out / 'config.json'}, {options.out / 'model.safetensors'}")


def entrypoint() -> None:
    app()


if __name__ == "__main__":
    sys.exit(entrypoint())
