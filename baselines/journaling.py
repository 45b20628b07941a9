"""The runner's side of the journal: open or continue one, find a finished run, signals, the outcome."""

from __future__ import annotations

import signal
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from egpt_speed import journal, results
from egpt_speed.errors import EgptError


@dataclass
class Outcome:
    document: dict
    paths: list[Path]  # every file written: .json, .md, .png (with matplotlib), the journal
    reused: int = 0  # counted samples taken from the journal instead of re-run
    rerun: bool = True  # False: --resume found this configuration finished, nothing ran

    @property
    def json_path(self) -> Path:
        return self.paths[0]


@contextmanager
def sigterm_as_interrupt() -> Iterator[None]:
    """SIGTERM ends a run like Ctrl-C: the sample in flight is dropped, the journal kept."""
    def interrupt(signum, frame):
        raise KeyboardInterrupt

    try:
        previous = signal.signal(signal.SIGTERM, interrupt)
    except ValueError:  # not the main thread: leave signals to whoever owns them
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def open_journal(out: Path, name: str, config: dict, digest: str, previous: Path | None) -> tuple[journal.Journal, int]:
    """(an open journal, counted samples it already holds): a fresh one, or `previous` continued."""
    if previous is None:
        stem = results.free_stem(out, name)
        header = {"config_hash": digest, "kind": "run", "config": config}
        return journal.Journal.create(out / f"{stem}{journal.SUFFIX}", header), 0
    contents = journal.read_journal(previous)
    return journal.Journal.reopen(previous, contents), len(contents.entries)


def check_resumable(previous: Path, samples: int) -> None:
    """Before any model loads: every entry of the journal to continue is a sample's records, and there are no more of
    them than the run has samples (a journal with lines appended twice resumed as 'ran -4' with 8 samples of 4)."""
    entries = journal.read_journal(previous).entries
    for number, entry in enumerate(entries, start=2):
        if not isinstance(entry.get("records"), dict) or not all(isinstance(r, dict) for r in entry["records"].values()):
            raise EgptError(f"{previous} line {number} is not a sample of a run; move the journal out of --out to start afresh.")
    if len(entries) > samples:
        raise EgptError(f"{previous} holds {len(entries)} samples but this run has {samples}; it was edited or "
                        "duplicated: move it out of --out to start afresh.")


def finished_outcome(previous: Path, samples: int) -> Outcome | None:
    """The finished result of a journal holding every counted sample, if its .json exists."""
    json_path = previous.with_name(previous.name[:-len(journal.SUFFIX)] + ".json")
    if len(journal.read_journal(previous).entries) < samples or not json_path.exists():
        return None
    return Outcome(results.load_result(json_path), [json_path, previous], reused=samples, rerun=False)


def resumed_batches(path: Path, name: str) -> int:
    indices = [e["records"][name].get("batch_index") for e in journal.read_journal(path).entries]
    return max((i for i in indices if i is not None), default=-1) + 1


def journaled_left_out(path: Path, names: list[str]) -> dict[str, str]:
    """The candidates an interrupted run had left out after a warm-up failure (name → reason), as its journaled
    samples record them; a resumed run leaves them out too, so every sample of the result has the same strategies."""
    entries = journal.read_journal(path).entries
    if not entries:
        return {}
    left_out = {name: reason for entry in entries for name, reason in entry.get("left_out", {}).items()}
    for name in names:
        if name not in entries[0]["records"] and name not in left_out:
            left_out[name] = "absent from the journaled samples this run continues"
    return left_out
