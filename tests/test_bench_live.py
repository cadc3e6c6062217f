"""`streamprune bench live`: a tiny synthetic stream played in real time per method through the real
CLI entry point; one row per method with the runner's counters; bad options are one line and exit 2."""

from __future__ import annotations

import dataclasses
import json
import time

import pytest

from streamprune.cli import main
from streamprune.errors import EXIT_USAGE

TINY = "synthetic:width=64,height=48,fps=10,scene_every=20"
QUICK = ["bench", "live", "--source", TINY, "--seconds", "3", "--warmup", "0", "--question-every", "0.5",
         "--device", "cpu"]
KEYS = {"method", "retain", "seconds", "fps", "fps_target", "frames_offered", "frames_processed", "frames_dropped",
        "drop_share", "answers", "answer_ms_p50", "answer_ms_p99", "answer_ms_max", "answer_stage_ms_p50",
        "answer_stage_ms_p99", "answer_tokens_mean", "tokens_mean", "tokens_max", "kv_bytes_mean", "kv_bytes_max",
        "cacher_hit_rate", "vision_flops_saved_share", "fps_ratio", "answer_p50_ratio", "stats"}


def _run(argv: list[str], capsys) -> tuple[int, str, str]:
    try:
        code = main(argv)
    except SystemExit as exit_:  # argparse's own one-line usage errors
        code = exit_.code
    out = capsys.readouterr()
    return code, out.out, out.err


def test_bench_live_writes_one_row_per_method_with_fps_answers_latency_and_a_png(tmp_path, capsys):
    from streamprune.runtime.live_runner import LiveStats

    out, plot = tmp_path / "live.json", tmp_path / "live.png"
    code, stdout, err = _run([*QUICK, "--methods", "none,stc", "--json", str(out), "--plot", str(plot)], capsys)
    assert code == 0, err
    assert "| none | 1 |" in stdout and "| stc | own |" in stdout
    data = json.loads(out.read_text())
    assert data["meta"]["source"] == TINY and data["meta"]["seconds"] == 3.0
    rows = data["rows"]
    assert [r["method"] for r in rows] == ["none", "stc"]
    for row in rows:
        assert KEYS <= set(row), KEYS - set(row)
        assert {f.name for f in dataclasses.fields(LiveStats)} <= set(row["stats"])  # read generically
        assert row["seconds"] >= 2.9 and row["fps"] > 0 and row["frames_processed"] > 0
        assert row["answers"] > 0 and row["answer_ms_p99"] >= row["answer_ms_p50"] > 0
        assert 0 < row["tokens_mean"] <= row["tokens_max"] and row["kv_bytes_max"] > 0
        assert row["frames_dropped"] >= 0 and row["fps_ratio"] > 0 and row["answer_p50_ratio"] > 0
    none, stc = rows
    assert none["fps_ratio"] == 1.0 and none["answer_p50_ratio"] == 1.0
    assert none["cacher_hit_rate"] is None and stc["cacher_hit_rate"] is not None  # only stc has an STC-Cacher
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_ratios_are_against_none_and_left_out_without_it():
    from streamprune.bench.live import add_ratios

    rows = [{"method": m, "fps": fps, "answer_ms_p50": p50} for m, fps, p50 in
            (("stc", 4.0, 5.0), ("none", 2.0, 10.0), ("visionzip", 1.0, None))]
    add_ratios(rows)
    assert [r["fps_ratio"] for r in rows] == [2.0, 1.0, 0.5]
    assert [r.get("answer_p50_ratio") for r in rows] == [0.5, 1.0, None]
    alone = [{"method": "stc", "fps": 4.0, "answer_ms_p50": 5.0, "fps_ratio": None, "answer_p50_ratio": None}]
    add_ratios(alone)
    assert alone[0]["fps_ratio"] is None and alone[0]["answer_p50_ratio"] is None


@pytest.mark.parametrize(("extra", "match"), [
    (["--seconds", "0"], "--seconds"),
    (["--seconds", "nan"], "--seconds"),
    (["--warmup", "-1"], "--warmup"),
    (["--question-every", "inf"], "--question-every"),
    (["--fps", "0"], "--fps"),
    (["--kv-budget", "0"], "--kv-budget"),
    (["--retain", "2"], "--retain"),
    (["--methods", "none,nosuch"], "unknown method 'nosuch'"),
    (["--source", "file:/no/such/clip.mp4"], "no such video file"),
    (["--source", "bogus:1"], "unknown source"),
    (["--source", "synthetic:width=2"], "synthetic options out of range"),
    (["--question", "   "], "--question is empty"),
    (["--json", "{tmp}"], "is a folder"),
    (["--device", "cuda:99"], "--device cuda:99"),
], ids=lambda v: v[0] if isinstance(v, list) else None)
def test_bad_options_are_one_line_and_exit_2_before_any_stream(extra, match, tmp_path, capsys):
    argv = [*QUICK, "--methods", "none", *[a.format(tmp=tmp_path) for a in extra]]
    start = time.monotonic()
    code, _, err = _run(argv, capsys)
    lines = err.strip().splitlines()
    assert code == EXIT_USAGE, err
    assert len(lines) == 1 and lines[0].startswith("streamprune: error: "), err
    assert match in lines[0], lines[0]
    assert time.monotonic() - start < 10, "a bad option should fail before the stream plays"
