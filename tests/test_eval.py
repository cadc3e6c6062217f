"""`streamprune eval`: the converters on hand-written annotation files of each published layout,
lmms-eval's answer parsing on a table of answers, and the run on the shipped example set (equal to
`bench accuracy` on the same clips), resumed, on Ray, and with a video missing."""

from __future__ import annotations

import contextlib
import io
import json

import pytest

from streamprune.cli import main
from streamprune.data.mcq import MCQItem, load_items
from streamprune.data.mcq_scoring import letter_prompt, names_correct_text, parse_letter
from streamprune.errors import InputError

VIDEOMME = [{"video_id": "001", "duration": "short", "domain": "Knowledge", "sub_category": "Humanity & History",
             "url": "https://www.youtube.com/watch?v=fFjv93ACGo8", "videoID": "fFjv93ACGo8", "question_id": "001-1",
             "task_type": "Counting Problem", "question": "When demonstrating the Germany modern Christmas tree is "
             "initially decorated with apples, candles and berries, which kind of the decoration has the largest "
             "number?", "options": ["A. Apples.", "B. Candles.", "C. Berries.", "D. The three kinds are of the "
             "same number."], "answer": "C"}]
MLVU = [{"video_name": "needle_32.mp4", "duration": 467.0, "question": "What does the hand coming out of the "
         "computer do?", "candidates": ["Delivers a product", "Shakes the woman's hand", "Takes the woman's "
         "credit card", "Points at something on the screen"], "answer": "Delivers a product",
         "question_type": "needle"}]
LONGVIDEOBENCH = [{"video_id": "86CxyhFV9MI", "question": "In the video, which subtitles appear at the same time "
                   "as the man with black hair?", "option0": "promisc has come to an end, run", "option1": "I "
                   "thought so", "option2": "The mutation", "option3": "Some", "option4": "N/A",
                   "correct_choice": 2, "duration_group": 600, "question_category": "TOS", "id": "86CxyhFV9MI_0",
                   "video_path": "86CxyhFV9MI.mp4", "duration": 501.2}]


def write(path, records, lines=False):
    path.write_text("".join(json.dumps(r) + "\n" for r in records) if lines else json.dumps(records))
    return path


def test_videomme_layout(tmp_path):
    item, = load_items(write(tmp_path / "videomme.json", VIDEOMME))
    assert (item.id, item.video, item.benchmark) == ("001-1", "fFjv93ACGo8.mp4", "videomme")
    assert item.options[0] == "Apples." and item.answer == 2 and item.answer_letter == "C"
    assert (item.task_type, item.duration) == ("Counting Problem", "short")
    prompt = letter_prompt(item)
    assert prompt.startswith("Select the best answer") and "\nA. Apples.\n" in prompt
    assert prompt.endswith("\n\nAnswer with the option's letter from the given choices directly.")


def test_mlvu_layout_answer_given_as_option_text(tmp_path):
    item, = load_items(write(tmp_path / "mlvu.jsonl", MLVU, lines=True))
    assert (item.video, item.answer, item.task_type, item.benchmark) == ("needle_32.mp4", 0, "needle", "mlvu")
    assert letter_prompt(item).endswith("(D) Points at something on the screen\nOnly give the best option.\n"
                                        "Best option: (")


def test_longvideobench_layout_drops_na_options(tmp_path):
    item, = load_items(write(tmp_path / "lvb.json", {"data": LONGVIDEOBENCH}))
    assert len(item.options) == 4 and item.answer == 2 and item.answer_letter == "C"
    assert (item.video, item.task_type, item.duration) == ("86CxyhFV9MI.mp4", "TOS", "600")
    assert letter_prompt(item).endswith("D. Some\nAnswer with the option's letter from the given choices directly.\n")


@pytest.mark.parametrize("record, message", [
    ({"video": "a.mp4", "question": "q", "options": ["x", "y"], "answer": "E"}, "outside the 2 options"),
    ({"video": "a.mp4", "question": "q", "options": ["x"], "answer": 0}, "2 to 8 choices"),
    ({"video": "a.mp4", "question": "", "options": ["x", "y"], "answer": 0}, "'question'"),
    ({"video": "a.mp4", "question": "q", "options": ["x", "y"], "answer": "z"}, "neither a letter"),
])
def test_bad_items_are_one_line_errors(tmp_path, record, message):
    with pytest.raises(InputError, match=message):
        load_items(write(tmp_path / "bad.json", [record]))


ITEM = MCQItem("q", "v.mp4", "which?", ("red", "blue", "green", "white", "black"), 1)


@pytest.mark.parametrize("answer, first_letter, ranked", [
    ("B", "B", "B"),
    ("(B)", "B", "B"),
    ("The best answer is C.", "C", "C"),
    ("Best option: (D) green", "D", "D"),
    ("b", None, None),  # lower case is not an option letter in either rule
    ("I think the answer is E because it is dark", "E", "E"),
    ("the video shows a person walking slowly through a quiet park on a sunny day", None, None),
    ("", None, None),
    ("D. A book", "D", "D"),  # not read as A (LongVideoBench's reason for its simple rule)
    ("Options A and B are wrong, so C.", "A", "C"),  # first letter vs the ranked rule's best format
])
def test_answer_parsing_as_lmms_eval(answer, first_letter, ranked):
    assert parse_letter(answer, ITEM, "first_letter") == first_letter
    assert parse_letter(answer, ITEM, "ranked") == ranked


def test_option_text_match_ignores_case_and_punctuation():
    assert names_correct_text(" Blue. ", ITEM) and not names_correct_text("blue sky", ITEM)


def run_eval(*argv) -> tuple[int, str]:
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        code = main(["eval", *argv])
    return code, out.getvalue()


def test_example_set_unpruned_accuracy_equals_bench_accuracy(tmp_path):
    """The shipped clips are lossless: eval (MCQ, scored by option text) and bench accuracy (open
    answers from the rendered frames) read the same pixels and the same questions in the same order."""
    from streamprune.bench.accuracy import run_accuracy_bench
    from streamprune.models import load_model

    n = 60
    code, _ = run_eval("--methods", "visionzip", "--retain", "0.25", "--limit", str(n), "--json", str(tmp_path / "e.json"))
    assert code == 0
    rows = {(r["method"], r["retain"]): r for r in json.loads((tmp_path / "e.json").read_text())["rows"]}
    bench = {(r.method, r.retain): r for r in run_accuracy_bench(load_model(None), ["visionzip"], [0.25], n,
                                                                  progress=False)}
    for key in (("none", 1.0), ("visionzip", 0.25)):
        assert rows[key]["n"] == n
        assert rows[key]["text_accuracy"] == pytest.approx(bench[key].accuracy, abs=1e-4)
        assert rows[key]["visual_tokens_kept"] == pytest.approx(bench[key].visual_tokens_kept)
    assert rows[("none", 1.0)]["accuracy"] >= 0.9
    assert rows[("none", 1.0)]["unparsed"] == 1.0  # the default model answers in words: no letters to parse


def test_lettered_prompt_scores_an_unparsable_answer_wrong(tmp_path):
    code, _ = run_eval("--methods", "none", "--limit", "8", "--prompt", "letters", "--json", str(tmp_path / "e.json"))
    row, = json.loads((tmp_path / "e.json").read_text())["rows"]
    assert code == 0 and row["accuracy"] == row["letter_accuracy"] == 0.0 and row["unparsed"] == 1.0


def test_an_interrupted_run_resumes_where_it_stopped(tmp_path):
    out = tmp_path / "answers.jsonl"
    args = ("--methods", "stc", "--retain", "0.5", "--limit", "12", "-o", str(out), "--json", str(tmp_path / "a.json"))
    assert run_eval(*args)[0] == 0
    lines = out.read_text().splitlines()
    assert len(lines) == 24  # 12 questions x (none, stc 0.5)
    out.write_text("\n".join(lines[:20]) + "\n" + lines[20][:15])  # killed while writing line 21
    assert run_eval(*args)[0] == 0
    records = [json.loads(x) for x in out.read_text().splitlines()]  # every line whole again
    assert sorted(r["input"] for r in records[20:]) == sorted(json.loads(x)["input"] for x in lines[20:])
    first = json.loads((tmp_path / "a.json").read_text())["rows"]
    assert run_eval(*args)[0] == 0  # nothing left to do: same rows, no new lines
    assert len(out.read_text().splitlines()) == 24
    assert json.loads((tmp_path / "a.json").read_text())["rows"] == first


def test_a_missing_video_fails_its_questions_only(tmp_path):
    from pathlib import Path

    example = Path(__file__).resolve().parent.parent / "streamprune" / "assets" / "eval_example"
    records = [json.loads(x) for x in (example / "example.jsonl").read_text().splitlines()[:20]]
    records[0]["video"] = records[1]["video"] = "clips/gone.mp4"
    data = write(tmp_path / "data.jsonl", records, lines=True)
    code, out = run_eval(str(data), "--video-root", str(example), "--methods", "none", "--json", str(tmp_path / "e.json"))
    row, = json.loads((tmp_path / "e.json").read_text())["rows"]
    assert code == 3 and row["errors"] == 2 and row["n"] == 18


def test_ray_workers_give_the_rows_of_one_process(tmp_path):
    local = run_eval("--methods", "fastvid", "--retain", "0.5", "--limit", "16", "--json", str(tmp_path / "l.json"))
    ray = run_eval("--methods", "fastvid", "--retain", "0.5", "--limit", "16", "--ray", "--num-workers", "2",
                   "--json", str(tmp_path / "r.json"))
    assert local[0] == ray[0] == 0
    rows = [json.loads((tmp_path / f).read_text())["rows"] for f in ("l.json", "r.json")]
    assert rows[0] == rows[1]
