"""Append-only JSON-lines journals: finished work survives kill -9, --resume continues it.

Line 1 is a header with the configuration and its hash; every later line is one finished unit of
work (a counted sample with the records of all its strategies, or a collected training answer).
Each line is flushed and fsynced before the caller starts the next unit, so a crash loses at most
the unit in flight; a torn last line (the crash hit the write) is ignored and cut on reopen.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from egpt_speed.errors import EgptError

SUFFIX = ".journal.jsonl"


def config_hash(config: dict[str, Any]) -> str:
    """A stable hash of a configuration (key order and Path vs str do not matter)."""
    text = json.dumps(config, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


@dataclass
class JournalContents:
    header: dict[str, Any]
    entries: list[dict[str, Any]] = field(default_factory=list)
    valid_bytes: int = 0  # length of the intact prefix (a torn last line is not part of it)


_DAMAGED = object()  # a line that is not whole JSON (a JSON null is a line of the wrong shape, said as such)


def read_journal(path: Path) -> JournalContents:
    """Header and entries of a journal. A torn last line (the process died inside that write) is dropped; a damaged
    line with lines after it is refused, so no finished sample after it is silently truncated away."""
    lines = path.read_bytes().splitlines(keepends=True)
    contents: JournalContents | None = None
    offset = 0
    for number, line in enumerate(lines, start=1):
        try:
            value = json.loads(line) if line.endswith(b"\n") else _DAMAGED
        except ValueError:  # JSONDecodeError, or UnicodeDecodeError for bytes that are not UTF-8
            value = _DAMAGED
        if value is _DAMAGED:
            if number < len(lines):
                raise EgptError(f"{path} has a damaged line {number} with {len(lines) - number} line(s) after it; it was "
                                "left as it is: move it out of --out to start afresh, or repair that line.")
            break
        contents = _add_line(path, contents, value, number)
        offset += len(line)
    if contents is None:
        raise EgptError(f"{path} is an empty or torn journal; delete it and run again.")
    contents.valid_bytes = offset
    return contents


def _add_line(path: Path, contents: JournalContents | None, value: Any, number: int) -> JournalContents:
    if contents is None:
        if not isinstance(value, dict) or "config_hash" not in value:
            raise EgptError(f"{path} is not an egpt-speed journal (no header); move it out of --out.")
        return JournalContents(value)
    if not isinstance(value, dict):
        raise EgptError(f"{path} line {number} is not a journal entry; move the journal out of --out to start afresh.")
    contents.entries.append(value)
    return contents


def find_journal(directory: Path, wanted_hash: str) -> Path | None:
    """The newest journal in `directory` whose header carries `wanted_hash` (others are left alone)."""
    if not directory.is_dir():
        return None
    matches = []
    for path in directory.glob(f"*{SUFFIX}"):
        try:
            with path.open("rb") as handle:
                header = json.loads(handle.readline())
        except (OSError, ValueError):  # unreadable, not JSON, not UTF-8: not ours
            continue
        if isinstance(header, dict) and header.get("config_hash") == wanted_hash:
            matches.append((path.stat().st_mtime, path))
    return max(matches)[1] if matches else None


class Journal:
    """An open journal: `append` makes one entry durable before returning."""

    def __init__(self, path: Path, handle):
        self.path = path
        self._handle = handle

    @classmethod
    def create(cls, path: Path, header: dict[str, Any]) -> "Journal":
        path.parent.mkdir(parents=True, exist_ok=True)
        journal = cls(path, path.open("xb"))
        journal.append(header)
        return journal

    @classmethod
    def reopen(cls, path: Path, contents: JournalContents) -> "Journal":
        handle = path.open("r+b")
        handle.truncate(contents.valid_bytes)  # drop a torn last line before appending after it
        handle.seek(contents.valid_bytes)
        return cls(path, handle)

    def append(self, entry: dict[str, Any]) -> None:
        self._handle.write((json.dumps(entry, default=str) + "\n").encode())
        self._handle.flush()
        os.fsync(self._handle.fileno())

    def close(self) -> None:
        self._handle.close()

    def __enter__(self) -> "Journal":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
