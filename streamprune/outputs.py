"""The one way streamprune writes a file, so a bad output path is one line instead of a traceback
and a failed write never leaves a half-written file where a good one (or nothing) was.

- `output_file(path)`: checks the target, yields a temporary sibling with the same suffix for
  the writer (PyAV, matplotlib, json all pick their format from it) and renames it over the
  target only once it is complete and fsynced; on any failure the sibling is removed.
- `write_text(path, text)`: that, for a string.
- `output_folder(path)`: a folder that files are written into (`robot --video-out`).
- `open_append` / `append_line`: the one append-only output, a batch's results lines. The same
  target checks, then O_APPEND with an fsync per line, so lines already written are never
  rewritten and an error leaves them as they were.

The checks, made before any work so a long run cannot fail at its end: the target is a regular
file or absent (never a folder, and never a FIFO or device, where a write blocks or goes
nowhere); its folder exists or is created; a file can be created in that folder. Every OSError
(no space, no permission, a read-only or virtual file system) becomes an `OutputError` naming
the path. This module sits at the bottom with types and errors: everything may import it.
"""

from __future__ import annotations

import os
import secrets
import stat
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from streamprune.errors import OutputError


def _reason(err: OSError) -> str:
    return err.strerror or str(err) or type(err).__name__


def _make_folder(folder: Path, what: str, target: Path) -> None:
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError):
        raise OutputError(f"{what} {target}: {folder} is not a folder (a file is in the way)") from None
    except OSError as err:
        raise OutputError(f"{what} {target}: cannot create the folder {folder}: {_reason(err)}") from None


def _sibling(target: Path) -> Path:
    """A fresh name next to `target` ending in its suffix (`.NAME.RANDOM.tmp.SUFFIX`)."""
    return target.with_name(f".{target.stem}.{secrets.token_hex(4)}.tmp{target.suffix}")


def _create(path: Path) -> None:
    """Create `path` empty and new (mode 0666 less the umask, as an ordinary open would)."""
    os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))


def check_output(path: str | Path, what: str = "output") -> Path:
    """The target as a Path, once it is known to be writable: a regular file or absent, in a
    folder that exists (created if needed) and in which a file can be created."""
    target = Path(path).expanduser()
    if target.name in ("", ".", ".."):
        raise OutputError(f"{what} {str(path)!r} is not a file name")
    try:
        mode = os.stat(target).st_mode
    except FileNotFoundError:
        mode = None
    except NotADirectoryError:
        raise OutputError(f"{what} {target}: a file is in the way of its folder {target.parent}") from None
    except OSError as err:
        raise OutputError(f"{what} {target}: {_reason(err)}") from None
    if mode is not None and stat.S_ISDIR(mode):
        raise OutputError(f"{what} {target} is a folder; give a file path")
    if mode is not None and not stat.S_ISREG(mode):
        raise OutputError(f"{what} {target} is not a regular file (a device, FIFO or socket)")
    _make_folder(target.parent, what, target)
    _probe(_sibling(target), what, target)
    return target


def _fsync(path: Path, flags: int = os.O_RDONLY) -> None:
    fd = os.open(path, flags)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextmanager
def output_file(path: str | Path, what: str = "output") -> Iterator[Path]:
    """Yield a temporary path to write; on success it replaces `path` atomically, on failure it
    is removed and an OSError becomes one OutputError line."""
    target = check_output(path, what)
    tmp = _sibling(target)
    try:
        _create(tmp)
        yield tmp
        _fsync(tmp)
        os.replace(tmp, target)
        _fsync(target.parent)
    except OSError as err:
        raise OutputError(f"cannot write {what} {target}: {_reason(err)}") from None
    finally:
        tmp.unlink(missing_ok=True)


def write_text(path: str | Path, text: str, what: str = "output") -> Path:
    """Write `text` (UTF-8) to `path` through `output_file`; returns the path."""
    with output_file(path, what) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return Path(path).expanduser()


def output_folder(path: str | Path, what: str = "output folder") -> Path:
    """A folder to write files into: created if absent, refused if a file is in the way or
    nothing can be created in it."""
    folder = Path(path).expanduser()
    if folder.exists() and not folder.is_dir():
        raise OutputError(f"{what} {folder} is a file, not a folder")
    _make_folder(folder, what, folder)
    _probe(folder / f".streamprune.{secrets.token_hex(4)}.probe", what, folder)
    return folder


def _probe(probe: Path, what: str, target: Path) -> None:
    """Create and remove `probe` beside `target`: an OutputError now rather than after the work."""
    try:
        _create(probe)
        probe.unlink()
    except OSError as err:
        raise OutputError(f"{what} {target} cannot be written: {_reason(err)}") from None


def open_append(path: str | Path, what: str = "output") -> int:
    """A file descriptor appending to `path` (created if absent) after `check_output`."""
    target = check_output(path, what)
    try:
        return os.open(target, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o666)
    except OSError as err:
        raise OutputError(f"{what} {target} cannot be written: {_reason(err)}") from None


def append_line(fd: int, line: str, path: str | Path, what: str = "output") -> None:
    """Append one line (one write, then fsync): on disk when this returns. A failure (a full
    disk) leaves the lines before it intact; at most this one is partial."""
    data = line.encode("utf-8")
    try:
        written = os.write(fd, data)
        while written < len(data):  # regular files take a whole write; loop in case one is short
            written += os.write(fd, data[written:])
        os.fsync(fd)
    except OSError as err:
        raise OutputError(f"cannot write {what} {path}: {_reason(err)}; the lines before this one are kept") from None
