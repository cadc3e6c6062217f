"""`streamprune ask` end to end on real encoded files, and its handling of bad input."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest

from streamprune.cli import main

QUESTION = "what happens ?"


def run_cli(argv, capsys):
    try:
        code = main(argv)
    except SystemExit as exit_:
        code = exit_.code
    out = capsys.readouterr()
    return code, out.out, out.err


@pytest.mark.parametrize("fixture", ["h264_video", "vp9_video"])
def test_ask_answers_on_real_encoded_file(request, fixture, tiny_model_dirs, capsys):
    video = request.getfixturevalue(fixture)
    code, out, err = run_cli([
        "ask", str(video), "--question", QUESTION, "--model", str(tiny_model_dirs["llava_onevision"]),
        "--method", "uniform", "--retain", "0.25", "--fps", "4", "--max-frames", "5", "--json"], capsys)
    assert code == 0, err
    result = json.loads(out)
    for key in ("answer", "frames", "visual_tokens_in", "visual_tokens_kept", "method", "retain",
                "encode_ms", "prune_ms", "prefill_ms", "decode_ms", "total_ms"):
        assert key in result
    assert result["answer"]
    # 48 frames at 24 fps = 2 s; 4 fps gives 8 samples, capped evenly to 5
    assert result["frames"] == 5
    assert result["frame_timestamps"][0] == 0.0 and result["frame_timestamps"][-1] == pytest.approx(1.75)
    assert result["visual_tokens_kept"] == result["visual_tokens_in"] // 4
    assert result["method"] == "uniform" and result["retain"] == 0.25


def test_ask_qwen_family_plain_output(h264_video, tiny_model_dirs, capsys):
    code, out, err = run_cli(["ask", str(h264_video), "-q", QUESTION, "--model",
                              str(tiny_model_dirs["qwen2_5_vl"]), "--max-frames", "4"], capsys)
    assert code == 0, err
    assert out.strip() and not out.lstrip().startswith("{")


@pytest.fixture
def bad_inputs(tmp_path, h264_video, vp9_video):
    text = tmp_path / "notes.mp4"
    text.write_text("this is not a video\n" * 50)
    noise = tmp_path / "noise.webm"
    noise.write_bytes(bytes(range(256)) * 64)
    cut_mp4 = tmp_path / "cut.mp4"
    data = h264_video.read_bytes()
    cut_mp4.write_bytes(data[: len(data) // 2])
    cut_webm = tmp_path / "cut.webm"
    data = vp9_video.read_bytes()
    cut_webm.write_bytes(data[: len(data) // 2])
    return {"missing": tmp_path / "missing.mp4", "text": text, "noise": noise, "cut_mp4": cut_mp4,
            "cut_webm": cut_webm}


@pytest.mark.parametrize("case", ["missing", "text", "noise", "cut_mp4", "cut_webm"])
def test_ask_bad_video_is_one_line_exit_2(case, bad_inputs, tiny_model_dirs, capsys):
    code, out, err = run_cli(["ask", str(bad_inputs[case]), "-q", QUESTION, "--model",
                              str(tiny_model_dirs["llava_onevision"])], capsys)
    assert code == 2
    assert out == ""
    assert len(err.strip().splitlines()) == 1 and err.startswith("streamprune: error:")
    assert "Traceback" not in err


@pytest.mark.parametrize("flags", [
    ["--retain", "0"], ["--retain", "1.5"], ["--retain", "abc"], ["--method", "no_such_method"],
    ["--model", "/no/such/model"], ["--fps", "-1"], ["--max-frames", "0"],
])
def test_ask_bad_flags_are_one_line_exit_2(flags, h264_video, capsys):
    code, out, err = run_cli(["ask", str(h264_video), "-q", QUESTION, *flags], capsys)
    assert code == 2
    assert len(err.strip().splitlines()) == 1 and err.startswith("streamprune: error:")


def test_console_script_reports_bad_input_without_traceback(tmp_path):
    exe = shutil.which("streamprune") or f"{sys.executable} -m streamprune.cli"
    proc = subprocess.run([*exe.split(), "ask", str(tmp_path / "missing.mp4"), "-q", QUESTION],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip() == f"streamprune: error: video file not found: {tmp_path / 'missing.mp4'}"


def test_methods_lists_every_registered_method(capsys):
    from streamprune.pruning.registry import available

    code, out, _ = run_cli(["methods"], capsys)
    assert code == 0
    for name in available():
        assert f"  {name}: " in out
