"""Runs that survive: options and output paths checked before any model loads; a per-sample journal that
kill -9 and Ctrl-C cannot lose; --resume continues the journal whose configuration matches."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from egpt_speed import journal, results
from egpt_speed.cli import app
from egpt_speed.errors import EgptError
from helpers import write_eventgpt_checkpoint

ROOT = Path(__file__).resolve().parents[1]


def invoke(*args: str):
    return CliRunner().invoke(app, list(args))


@pytest.fixture
def no_load(monkeypatch):
    def load(*args, **kwargs):
        pytest.fail("a refused run must not load a model")

    monkeypatch.setattr("egpt_speed.baselines.runner.load_model", load)


def refused(result, needle: str) -> None:
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and needle in lines[0], result.stderr


# ------------------------------------------------------------------------------------------ checks before work


def test_read_only_out_dir_is_refused_before_loading(tmp_path, no_load):
    out = tmp_path / "ro"
    out.mkdir()
    out.chmod(0o555)
    try:
        refused(invoke("run", "baseline", "--device", "cpu", "--out", str(out)), "read-only")
    finally:
        out.chmod(0o755)
    assert not list(out.iterdir())


def test_out_that_is_a_file_is_refused_before_loading(tmp_path, no_load):
    target = tmp_path / "file"
    target.write_text("")
    refused(invoke("run", "baseline", "--device", "cpu", "--out", str(target)), "is a file")


def test_duplicate_candidates_are_refused(tmp_path, no_load):
    refused(invoke("compare", "baseline", "pld", "baseline", "--device", "cpu", "--out", str(tmp_path)), "listed twice")


def test_preparers_that_override_each_other_are_refused(tmp_path, no_load):
    refused(invoke("run", "eager+sdpa+baseline", "--device", "cpu", "--out", str(tmp_path)), "eager and sdpa")


@pytest.mark.parametrize("strategy", ["baseline", "speculative", "eagle-tree", "pld", "batch", "hf-assisted"])
@pytest.mark.parametrize("flag, value", [("--temperature", "-1"), ("--temperature", "0"), ("--top-p", "1.5"),
                                         ("--top-p", "0")])
def test_bad_sampling_parameters_are_refused_for_every_sampler(strategy, flag, value, tmp_path, no_load):
    result = invoke("run", strategy, "--sample", flag, value, "--device", "cpu", "--out", str(tmp_path))
    refused(result, flag)


def test_long_candidate_lists_get_a_short_file_name():
    names = ["baseline"] + [f"candidate-number-{i}" for i in range(22)]
    long = "compare_" + "_vs_".join(names)
    short = results.result_name(long, names, name_max=255)
    assert len(long) > 255 and len(short) < 100 and short.startswith("compare_baseline_vs_22-strategies_")
    assert results.result_name(long, names[::-1], 255) != short  # another list, another name
    assert results.result_name("compare_baseline_vs_pld", ["baseline", "pld"]) == "compare_baseline_vs_pld"


# ------------------------------------------------------------------------------------------ journal


def test_a_torn_last_line_is_ignored_and_cut_on_reopen(tmp_path):
    path = tmp_path / f"x{journal.SUFFIX}"
    with journal.Journal.create(path, {"config_hash": "h"}) as records:
        records.append({"index": 0})
    with path.open("ab") as handle:
        handle.write(b'{"index": 1, "tok')  # the process died inside this write
    contents = journal.read_journal(path)
    assert [e["index"] for e in contents.entries] == [0]
    with journal.Journal.reopen(path, contents) as records:
        records.append({"index": 1})
    assert [e["index"] for e in journal.read_journal(path).entries] == [0, 1]
    assert journal.find_journal(tmp_path, "h") == path and journal.find_journal(tmp_path, "other") is None


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return write_eventgpt_checkpoint(tmp_path_factory.mktemp("ck") / "EventGPT-tiny", tower_in_checkpoint=False)


def _command(checkpoint: Path, data: Path, out: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "egpt_speed.cli", "compare", "baseline", "pld", "--model", str(checkpoint),
            "--data", str(data), "-n", "6", "--warmup", "1", "--max-new-tokens", "12", "--device", "cpu",
            "--out", str(out), *extra]


def _env() -> dict:
    return {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}


def _journaled(path: Path) -> int:
    """Samples in a journal another process is writing; 0 while it is created but its header not yet written."""
    from egpt_speed.errors import EgptError

    try:
        return len(journal.read_journal(path).entries)
    except EgptError:
        return 0


def _start_and_stop_after_one_sample(command: list[str], out: Path, sig: int) -> subprocess.Popen:
    """Start `command`, wait until its journal holds one sample, send `sig`; returns the ended process."""
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env())
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and process.poll() is None:
        found = list(out.glob(f"*{journal.SUFFIX}"))
        if found and _journaled(found[0]) >= 1:
            break
        time.sleep(0.05)
    assert process.poll() is None, "the run ended before it could be interrupted: " + process.stderr.read()[-2000:]
    process.send_signal(sig)
    process.wait(timeout=120)
    return process


def _tokens(out: Path) -> dict[str, list]:
    [path] = out.glob("*.json")
    document = json.loads(path.read_text())
    return {name: [s["token_ids"] for s in run["samples"]] for name, run in document["runs"].items()}


def test_kill_9_then_resume_loses_at_most_one_sample_and_equals_an_uninterrupted_run(tmp_path, tiny_dataset, checkpoint):
    out = tmp_path / "killed"
    killed = _start_and_stop_after_one_sample(_command(checkpoint, tiny_dataset, out), out, signal.SIGKILL)
    assert killed.returncode == -signal.SIGKILL
    [path] = out.glob(f"*{journal.SUFFIX}")
    kept = len(journal.read_journal(path).entries)
    assert kept >= 1 and not list(out.glob("*.json"))
    resumed = subprocess.run(_command(checkpoint, tiny_dataset, out, "--resume"), capture_output=True, text=True,
                             env=_env(), timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert f"reused {kept} journaled samples" in resumed.stdout
    assert len(journal.read_journal(path).entries) == 6  # the same journal, continued
    straight = tmp_path / "straight"
    done = subprocess.run(_command(checkpoint, tiny_dataset, straight), capture_output=True, text=True, env=_env(),
                          timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    assert _tokens(out) == _tokens(straight)


def test_sigint_keeps_the_journal_and_says_how_to_resume(tmp_path, tiny_dataset, checkpoint):
    out = tmp_path / "interrupted"
    stopped = _start_and_stop_after_one_sample(_command(checkpoint, tiny_dataset, out), out, signal.SIGINT)
    stderr = stopped.stderr.read()
    assert stopped.returncode == 130, stderr
    assert "--resume" in stderr and len(stderr.strip().splitlines()) == 1, stderr
    [path] = out.glob(f"*{journal.SUFFIX}")
    assert len(journal.read_journal(path).entries) >= 1 and not list(out.glob("*.json"))


@pytest.mark.parametrize("debug", [False, True])
def test_a_failing_strategy_is_named_in_one_line_and_the_finished_samples_stay(tmp_path, tiny_loader, tiny_dataset,
                                                                            monkeypatch, debug):
    """An exception inside one strategy (on the H200: an 800-line inductor error that named no strategy) stops the
    run with one line naming the strategy and the sample, and where the finished samples are; --debug re-raises
    with the original error chained."""
    from egpt_speed.errors import StrategyFailed

    _failing_decode(monkeypatch, "pld", 2)
    result = invoke("compare", "baseline", "pld", "--data", str(tiny_dataset), "-n", "3", "--warmup", "0",
                    "--max-new-tokens", "4", "--device", "cpu", "--out", str(tmp_path), *(["--debug"] if debug else []))
    [path] = tmp_path.glob(f"*{journal.SUFFIX}")
    assert len(journal.read_journal(path).entries) == 1 and not list(tmp_path.glob("*.json"))
    if debug:
        assert isinstance(result.exception, StrategyFailed) and isinstance(result.exception.__cause__, RuntimeError)
        return
    assert result.exit_code == 1
    assert result.stderr.strip().splitlines() == [
        f"error: pld failed on counted sample 2: RuntimeError: LoweringException: something inductor could not lower; "
        f"1 finished samples are kept in {path}; run the others without it, or add --debug for the traceback."]


def _failing_decode(monkeypatch, name: str, failing_call: int, kind: type[BaseException] = RuntimeError) -> None:
    """Make strategy `name` raise a long inductor-like error (or `kind`) on its `failing_call`-th decode (1-based)."""
    from egpt_speed.strategies import registry

    cls = registry.available()[name]
    original, calls = cls.decode, []

    def decode(self, model, request, clock):
        calls.append(request.id)
        if len(calls) == failing_call:
            raise kind("LoweringException: something inductor could not lower\n" + "  IR line\n" * 500)
        return original(self, model, request, clock)
    monkeypatch.setattr(cls, "decode", decode)


def test_a_candidate_failing_in_warm_up_is_left_out_and_the_rest_is_measured(tmp_path, tiny_loader, tiny_dataset,
                                                                            monkeypatch):
    """On the H200 one candidate's compile failure in warm-up cost a four-strategy compare all its results."""
    _failing_decode(monkeypatch, "pld", 1)
    result = invoke("compare", "baseline", "pld", "eager", "--data", str(tiny_dataset), "-n", "2", "--warmup", "1",
                    "--max-new-tokens", "4", "--device", "cpu", "--out", str(tmp_path))
    assert result.exit_code == 0, result.output
    note = "pld failed in warm-up and is left out of this result: RuntimeError: LoweringException: something inductor could not lower"
    assert f"WARNING: {note}" in result.stdout.replace("\n", " ")
    [path] = tmp_path.glob("*.json")
    document = json.loads(path.read_text())
    assert list(document["runs"]) == ["baseline", "eager"] and [c["candidate"] for c in document["comparisons"]] == ["eager"]
    assert document["left_out"] == {"pld": note.split(": ", 1)[1]}
    assert all(len(run["samples"]) == 2 for run in document["runs"].values())
    assert f"## Left out\n\n- {note}" in path.with_suffix(".md").read_text()


def test_a_batched_candidate_failing_in_its_warm_up_batch_is_left_out(tmp_path, tiny_loader, tiny_dataset, monkeypatch):
    """The warm-up batch is decoded when the first counted sample arrives: its failure is still a warm-up one."""
    from egpt_speed.strategies import registry

    def decode_batch(self, model, requests, clock):
        raise RuntimeError("out of memory at batch 2")
    monkeypatch.setattr(registry.available()["batch"], "decode_batch", decode_batch)
    result = invoke("compare", "baseline", "batch", "--batch-size", "2", "--data", str(tiny_dataset), "-n", "2",
                    "--warmup", "1", "--max-new-tokens", "4", "--device", "cpu", "--out", str(tmp_path))
    assert result.exit_code == 0, result.output
    [path] = tmp_path.glob("*.json")
    document = json.loads(path.read_text())
    assert list(document["runs"]) == ["baseline"] and document["comparisons"] == []
    assert document["left_out"] == {"batch": "RuntimeError: out of memory at batch 2"}


def test_a_run_that_left_a_candidate_out_resumes_without_it(tmp_path, tiny_loader, tiny_dataset, monkeypatch):
    """Interrupted after one counted sample with pld left out; --resume leaves it out too (its journaled samples have
    no pld record) even when pld would now pass, and the result says why."""
    from egpt_speed.strategies import registry
    originals = {name: registry.available()[name].decode for name in ("pld", "baseline")}
    _failing_decode(monkeypatch, "pld", 1)
    # baseline and eager (a preparer on baseline's decode) share one decode: 2 calls in warm-up, 2 in counted sample
    # 1, then Ctrl-C in counted sample 2
    _failing_decode(monkeypatch, "baseline", 5, KeyboardInterrupt)
    args = ("compare", "baseline", "pld", "eager", "--data", str(tiny_dataset), "-n", "3", "--warmup", "1",
            "--max-new-tokens", "4", "--device", "cpu", "--out", str(tmp_path))
    interrupted = invoke(*args)
    assert interrupted.exit_code == 130 and "--resume" in interrupted.stderr
    [path] = tmp_path.glob(f"*{journal.SUFFIX}")
    assert [sorted(e["records"]) for e in journal.read_journal(path).entries] == [["baseline", "eager"]]
    from egpt_speed.strategies import registry
    for name, original in originals.items():  # pld would pass now; no Ctrl-C this time
        monkeypatch.setattr(registry.available()[name], "decode", original)
    resumed = invoke(*args, "--resume")
    assert resumed.exit_code == 0, resumed.output
    document = json.loads(next(tmp_path.glob("*.json")).read_text())
    assert list(document["runs"]) == ["baseline", "eager"] and all(len(r["samples"]) == 3 for r in document["runs"].values())
    assert document["left_out"] == {"pld": "RuntimeError: LoweringException: something inductor could not lower"}
    assert len(journal.read_journal(path).entries) == 3


def test_a_users_error_inside_a_strategy_stops_the_run_in_one_line_naming_it(tmp_path, tiny_loader, tiny_dataset,
                                                                             monkeypatch):
    """An EgptError raised while decoding (e.g. a tree verify that does not fit the static cache) is the user's to fix:
    not left out, the run stops with exit 2, and the line says which strategy."""
    from egpt_speed.errors import EgptError
    from egpt_speed.strategies import registry

    def decode(self, model, request, clock):
        raise EgptError("the tree verify (65 rows) does not fit the static cache; raise --max-new-tokens' margin.")
    monkeypatch.setattr(registry.available()["pld"], "decode", decode)
    result = invoke("compare", "baseline", "pld", "--data", str(tiny_dataset), "-n", "2", "--warmup", "1",
                    "--max-new-tokens", "4", "--device", "cpu", "--out", str(tmp_path))
    assert result.exit_code == 2
    assert result.stderr.strip().splitlines() == [
        "error: pld: the tree verify (65 rows) does not fit the static cache; raise --max-new-tokens' margin."]


def test_the_reference_failing_in_warm_up_stops_the_run(tmp_path, tiny_loader, tiny_dataset, monkeypatch):
    _failing_decode(monkeypatch, "baseline", 1)
    result = invoke("compare", "baseline", "pld", "--data", str(tiny_dataset), "-n", "2", "--warmup", "1",
                    "--max-new-tokens", "4", "--device", "cpu", "--out", str(tmp_path))
    assert result.exit_code == 1
    [line] = result.stderr.strip().splitlines()
    assert line.startswith("error: baseline failed on warm-up sample 1: RuntimeError: LoweringException: "), line
    assert not list(tmp_path.glob("*.json"))


# ------------------------------------------------------------------------------------------ CLI ergonomics


def test_debug_after_the_command_flags_without_bool_and_a_summary_that_fits_100_columns(tmp_path, tiny_loader,
                                                                                        tiny_dataset):
    help_text = invoke("run", "--help").stdout
    assert "--debug" in help_text
    assert not [line for line in help_text.splitlines() if ("--resume" in line or "--greedy" in line) and "<bool>" in line]
    result = invoke("compare", "baseline", "pld", "--data", str(tiny_dataset), "-n", "2", "--warmup", "0",
                    "--max-new-tokens", "4", "--device", "cpu", "--out", str(tmp_path), "--debug")
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    tables = [line for line in lines if not line.startswith(("wrote ", "note: "))]
    assert max(len(line) for line in tables) <= 100 and "…" not in result.stdout  # headers shortened, values whole
    assert any(line.startswith("note: the ratios are noisy (only 2 counted samples)") for line in lines)
    written = lines[-1]
    assert written.startswith("wrote ")
    for suffix in (".json", ".md", journal.SUFFIX) + ((".png",) if list(tmp_path.glob("*.png")) else ()):
        [path] = tmp_path.glob(f"*{suffix}")
        assert str(path) in written


def test_a_damaged_line_before_finished_samples_is_refused_and_the_journal_left_alone(tmp_path):
    path = tmp_path / f"x{journal.SUFFIX}"
    with journal.Journal.create(path, {"config_hash": "h"}) as records:
        for index in range(3):
            records.append({"index": index, "records": {}})
    lines = path.read_bytes().splitlines(keepends=True)
    for damage in (b"garbage\n", b'{"index": 0, "records": {"\xff": 1}}\n'):  # not JSON; not UTF-8
        path.write_bytes(b"".join([lines[0], lines[1], damage, lines[3]]))
        before = path.read_bytes()
        with pytest.raises(EgptError, match="damaged line 3 with 1 line"):
            journal.read_journal(path)
        assert path.read_bytes() == before  # the finished sample after it is still there


def test_a_stray_file_that_is_not_utf8_does_not_break_finding_the_journal(tmp_path):
    path = tmp_path / f"x{journal.SUFFIX}"
    journal.Journal.create(path, {"config_hash": "h"}).close()
    (tmp_path / f"zzz{journal.SUFFIX}").write_bytes(b"\xff\xfe\x00garbage\n")
    assert journal.find_journal(tmp_path, "h") == path


def test_a_journal_to_resume_is_checked_before_any_model_loads(tmp_path):
    from egpt_speed.baselines.journaling import check_resumable

    path = tmp_path / f"x{journal.SUFFIX}"
    with journal.Journal.create(path, {"config_hash": "h"}) as records:
        records.append({"index": 0, "records": {"baseline": {"id": "a"}}})
        records.append({"index": 1, "records": {"baseline": {"id": "b"}}})
    check_resumable(path, samples=4)
    with pytest.raises(EgptError, match="holds 2 samples but this run has 1"):
        check_resumable(path, samples=1)
    with path.open("ab") as handle:
        handle.write(b'{"foo": 1}\n')
    with pytest.raises(EgptError, match="line 4 is not a sample of a run"):
        check_resumable(path, samples=4)
    path.write_bytes(path.read_bytes().replace(b'{"foo": 1}\n', b"[]\n"))
    with pytest.raises(EgptError, match="line 4 is not a journal entry"):
        check_resumable(path, samples=4)
