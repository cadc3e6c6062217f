"""Multiple-choice video QA in one shape, read from our own files or from the published
annotation layouts of VideoMME, MLVU and LongVideoBench (the user brings the videos).

Our shape, one JSON object per item (a JSON list, or JSON lines):

    {"id": "q1", "video": "clips/x.mp4", "question": "...", "options": ["red", "blue", ...],
     "answer": "B" | 1, "task_type": "counting", "duration": "short" | 12.5}

`answer` is the correct option as a letter or a 0-based index; `task_type` and `duration` are
optional and group the accuracy. The converters map each layout's fields onto this one, as
lmms-eval's task files read them (lmms_eval/tasks/{videomme,mlvu,longvideobench}/utils.py).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from streamprune.errors import InputError

LETTERS = "ABCDEFGH"
_LEADING_LETTER = re.compile(r"^\(?([A-H])[.):]\s*")  # "A. text", "(A) text", "A) text"


@dataclass(frozen=True)
class MCQItem:
    """One question: `options` are the choices' texts (no letters), `answer` the correct index."""

    id: str
    video: str
    question: str
    options: tuple[str, ...]
    answer: int
    task_type: str = "all"
    duration: str = "all"  # a group name ("short", "medium", "long") or seconds as text
    benchmark: str = "mcq"  # whose prompt and answer parsing apply: mcq, videomme, mlvu, longvideobench

    @property
    def answer_letter(self) -> str:
        return LETTERS[self.answer]


def _answer_index(value: Any, options: tuple[str, ...], where: str) -> int:
    """A letter ("B", "(B)"), a 0-based index, or the correct option's text -> its index."""
    if isinstance(value, bool):
        raise InputError(f"{where}: answer must be a letter, an index or an option's text, got {value!r}")
    if isinstance(value, int):
        index = value
    elif isinstance(value, str) and re.fullmatch(r"\(?[A-Ha-h]\)?\.?", value.strip()):
        index = LETTERS.index(value.strip().strip("().").upper())
    elif isinstance(value, str) and value.strip() in options:
        index = options.index(value.strip())
    elif isinstance(value, str) and value.strip().isdigit():
        index = int(value.strip())
    else:
        raise InputError(f"{where}: answer {value!r} is neither a letter, an index nor one of the options")
    if not 0 <= index < len(options):
        raise InputError(f"{where}: answer {value!r} is outside the {len(options)} options")
    return index


def _options(values: Any, where: str) -> tuple[str, ...]:
    if not isinstance(values, list) or not 2 <= len(values) <= len(LETTERS):
        raise InputError(f"{where}: options must be a list of 2 to {len(LETTERS)} choices")
    return tuple(_LEADING_LETTER.sub("", str(v).strip()) for v in values)


def _text(record: dict[str, Any], key: str, where: str) -> str:
    value = record.get(key)
    if not isinstance(value, str) or not value.strip():
        raise InputError(f"{where}: '{key}' must be a non-empty string")
    return value.strip()


def _duration(value: Any) -> str:
    return "all" if value is None else str(value)


def from_ours(record: dict[str, Any], where: str) -> MCQItem:
    options = _options(record.get("options"), where)
    return MCQItem(id=str(record.get("id", where)), video=_text(record, "video", where),
                   question=_text(record, "question", where), options=options,
                   answer=_answer_index(record.get("answer"), options, where),
                   task_type=str(record.get("task_type", "all")), duration=_duration(record.get("duration")))


def from_videomme(record: dict[str, Any], where: str) -> MCQItem:
    """VideoMME (lmms-eval/Video-MME): videoID, question_id, options "A. ...", answer letter,
    duration short/medium/long, task_type; the video is VIDEO_ROOT/videoID.mp4."""
    options = _options(record.get("options"), where)
    return MCQItem(id=str(record.get("question_id", where)), video=f"{_text(record, 'videoID', where)}.mp4",
                   question=_text(record, "question", where), options=options,
                   answer=_answer_index(record.get("answer"), options, where),
                   task_type=str(record.get("task_type", "all")), duration=_duration(record.get("duration")),
                   benchmark="videomme")


def from_mlvu(record: dict[str, Any], where: str) -> MCQItem:
    """MLVU: video_name, question, candidates, answer (the option's text, or a letter), task_type
    (question_type in the authors' json); duration in seconds when given."""
    options = _options(record.get("candidates"), where)
    task = record.get("task_type", record.get("question_type", "all"))
    return MCQItem(id=str(record.get("question_id", where)), video=_text(record, "video_name", where),
                   question=_text(record, "question", where), options=options,
                   answer=_answer_index(record.get("answer"), options, where), task_type=str(task),
                   duration=_duration(record.get("duration")), benchmark="mlvu")


def from_longvideobench(record: dict[str, Any], where: str) -> MCQItem:
    """LongVideoBench: video_path, question, option0..option4 ("N/A" = no such option),
    correct_choice (0-based), duration_group, question_category."""
    raw = [record.get(f"option{i}") for i in range(5)]
    options = _options([o for o in raw if o is not None and o != "N/A"], where)
    return MCQItem(id=str(record.get("id", where)), video=_text(record, "video_path", where),
                   question=_text(record, "question", where), options=options,
                   answer=_answer_index(record.get("correct_choice"), options, where),
                   task_type=str(record.get("question_category", "all")),
                   duration=_duration(record.get("duration_group")), benchmark="longvideobench")


FORMATS: dict[str, Callable[[dict[str, Any], str], MCQItem]] = {
    "mcq": from_ours, "videomme": from_videomme, "mlvu": from_mlvu, "longvideobench": from_longvideobench}


def detect_format(record: dict[str, Any]) -> str:
    """The layout a record is in, from the fields only that layout has."""
    if "videoID" in record:
        return "videomme"
    if "candidates" in record and "video_name" in record:
        return "mlvu"
    if "correct_choice" in record or "option0" in record:
        return "longvideobench"
    return "mcq"


def read_records(path: str | Path) -> list[dict[str, Any]]:
    """A JSON list (or an object with a list under "data"), or JSON lines."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"data file not found: {path}")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise InputError(f"{path} is not UTF-8 text") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError:
        data = []
        for number, line in enumerate(text.splitlines(), 1):
            if line.strip():
                try:
                    data.append(json.loads(line))
                except json.JSONDecodeError as err:
                    raise InputError(f"{path}:{number}: not JSON ({err.msg})") from None
    if isinstance(data, dict):  # {"data": [...]}, or JSON lines of one line
        data = data["data"] if isinstance(data.get("data"), list) else [data]
    if not isinstance(data, list) or not all(isinstance(r, dict) for r in data):
        raise InputError(f"{path}: expected a JSON list of objects or JSON lines")
    if not data:
        raise InputError(f"{path} holds no items")
    return data


def load_items(path: str | Path, layout: str = "auto") -> list[MCQItem]:
    """Every item of `path` in our shape; `layout` auto-detects per file from its first record."""
    records = read_records(path)
    name = detect_format(records[0]) if layout == "auto" else layout
    if name not in FORMATS:
        raise InputError(f"unknown data layout {layout!r}; expected auto or one of {sorted(FORMATS)}")
    items = [FORMATS[name](record, f"{Path(path).name} item {i}") for i, record in enumerate(records)]
    ids = [item.id for item in items]
    if len(set(ids)) != len(ids):
        seen: set[str] = set()
        twice = next(i for i in ids if i in seen or seen.add(i))
        raise InputError(f"{path}: item id {twice!r} appears twice")
    return items
