"""The batch job's results file: JSON lines, one object per input, each with at least `input`.

Lines are appended as inputs finish, each as one `write` of the whole line followed by fsync
(`streamprune.outputs.append_line`), so a crash or a full disk leaves at most a partial last line
and every line before it. Reading skips such a line (and anything else that is not
a JSON object with an `input`); when an input has several lines, the last one wins
(`latest_records`). Compaction rewrites the file atomically (`streamprune.outputs.output_file`:
sibling file, fsync, rename), so the file is never seen half-rewritten. Only the driver process writes it; what to keep on resume is
decided by `batch_job`.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from streamprune.outputs import append_line, check_output, open_append, output_file

log = logging.getLogger(__name__)


class ResultsFile:
    """The JSON-lines output, appended one fsynced line at a time."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.unreadable_lines = 0  # found by the last `read`
        self._fd: int | None = None

    def check_writable(self) -> None:
        """A usage error now, before any work, rather than after the first input is answered."""
        check_output(self.path, "--output")

    def read(self) -> list[dict[str, Any]]:
        """Records in file order; other lines (a partial last line, blank lines, anything that is not
        a JSON object with an `input`) are skipped and counted in `unreadable_lines`."""
        self.unreadable_lines = 0
        if not self.path.is_file():
            return []
        records = []
        with open(self.path, encoding="utf-8", errors="replace") as fh:
            for number, line in enumerate(fh, 1):
                try:
                    record = json.loads(line)
                except json.JSONDecodeError:
                    record = None
                if isinstance(record, dict) and isinstance(record.get("input"), str) and line.endswith("\n"):
                    records.append(record)
                else:
                    self.unreadable_lines += 1
                    log.warning("%s:%d: ignoring an unreadable line (partial write from an interrupted run?)",
                                self.path, number)
        return records

    def rewrite(self, records: Sequence[dict[str, Any]]) -> None:
        """Replace the file's content atomically (write a sibling, fsync, rename)."""
        self.close()
        with output_file(self.path, "--output") as tmp, open(tmp, "w", encoding="utf-8") as fh:
            fh.writelines(json.dumps(r) + "\n" for r in records)

    def append(self, record: dict[str, Any]) -> None:
        """Add one line, on disk when this returns."""
        if self._fd is None:
            self._fd = open_append(self.path, "--output")
        append_line(self._fd, json.dumps(record) + "\n", self.path, "--output")

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


def latest_records(records: Sequence[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """The last record of each input, in order of first appearance."""
    latest: dict[str, dict[str, Any]] = {}
    for record in records:
        latest[record["input"]] = record
    return latest
