"""`--device/--dtype/--attn`: resolved per machine, honoured by every model load, exact in bf16,
and inner-LLM methods read the same attention row under SDPA as under eager."""

from __future__ import annotations

import logging
import subprocess
import sys

import pytest
import torch

from streamprune.cli import main
from streamprune.config import DeviceConfig
from streamprune.errors import ConfigError
from streamprune.models import load_adapter, resolve_placement
from streamprune.models.base import DynamicCache
from streamprune.models.inner import InnerStage
from streamprune.models.placement import MemoryEstimate, Placement, check_fits
from streamprune.pruning.base import Budget, PruneContext
from streamprune.pruning.registry import make_method
from streamprune.types import Selection
from tests.tiny import FAMILIES, random_clip

QUESTION = "what happens ?"
NO_CUDA = not torch.cuda.is_available()
BF16_EAGER = ["--device", "cpu", "--dtype", "bfloat16", "--attn", "eager"]


def _exit_code(argv: list[str]) -> int:
    """`streamprune ARGV` in this process: its return value, or argparse's exit code."""
    try:
        return main(argv)
    except SystemExit as stop:
        return int(stop.code)


def test_auto_resolves_to_this_machine_and_explicit_flags_are_kept():
    auto = resolve_placement(DeviceConfig(), model_attn="sdpa")
    assert auto.device.type == ("cpu" if NO_CUDA else "cuda")
    assert auto.attn == "sdpa"
    if NO_CUDA:
        assert auto.dtype is None  # the checkpoint's own dtype on CPU
    explicit = resolve_placement(DeviceConfig(device="cpu", dtype="bfloat16", attn="eager"), model_attn="sdpa")
    assert explicit == Placement(device=torch.device("cpu"), dtype=torch.bfloat16, attn="eager")


@pytest.mark.skipif(not NO_CUDA, reason="this machine has CUDA")
@pytest.mark.parametrize("flags, words", [
    (["--device", "cuda"], "no usable CUDA device"),
    (["--device", "cuda:3"], "no usable CUDA device"),
    (["--attn", "flash_attention_2"], "needs a CUDA device"),
    (["--device", "tpu"], "--device must be"),
    (["--dtype", "int8"], "--dtype must be"),
])
def test_placement_the_machine_cannot_honour_is_one_line_exit_2(h264_video, capsys, flags, words):
    code = _exit_code(["ask", str(h264_video), "-q", QUESTION, *flags])
    err = capsys.readouterr().err
    assert code == 2
    assert err.count("\n") == 1 and words in err and "Traceback" not in err


def test_a_run_that_cannot_fit_the_device_is_refused_before_loading(h264_video, capsys):
    """1e8 frames of KV cache exceed any machine; the check reads only JSON and weight headers."""
    code = _exit_code(["ask", str(h264_video), "-q", QUESTION, "--max-frames", "100000000"])
    err = capsys.readouterr().err
    assert code == 2
    assert "GiB" in err and "KV cache" in err and err.count("\n") == 1


def test_memory_check_counts_every_part():
    estimate = MemoryEstimate(weights=3 * 2 ** 30, kv_cache=2 ** 30, activations=2 ** 29)
    check_fits(estimate, torch.device("cpu"), "m", available=5 * 2 ** 30)
    with pytest.raises(ConfigError, match=r"needs ~4.5 GiB on cpu \(weights 3.0 \+ KV cache 1.0 \+ activations 0.5"):
        check_fits(estimate, torch.device("cpu"), "m", available=4 * 2 ** 30)


@pytest.mark.parametrize("family", FAMILIES)
def test_method_none_logits_in_bf16_equal_the_unmodified_model_in_bf16(tiny_model_dirs, family):
    placement = resolve_placement(DeviceConfig(device="cpu", dtype="bfloat16"), "sdpa")
    adapter = load_adapter(tiny_model_dirs[family], placement)
    assert adapter.dtype == torch.bfloat16
    clip = random_clip()
    with torch.inference_mode():
        inputs = adapter.reference_inputs(clip, QUESTION, fps=2.0)
        reference = adapter.model(**inputs).logits[0].float()
    ours = adapter.prompt_logits(adapter.encode(clip, fps=2.0), QUESTION).float()
    assert ours.shape == reference.shape
    # bf16 keeps 8 bits of mantissa: allow a few ulps at the logits' scale, and the same argmax
    scale = reference.abs().max()
    assert (ours - reference).abs().max() <= 0.02 * scale
    assert (ours.argmax(-1) == reference.argmax(-1)).float().mean() >= 0.95


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("method", ["fastv", "vla_pruner", "holitom_inner"])
def test_inner_method_under_sdpa_reads_the_eager_attention_row(tiny_model_dirs, family, method):
    """The model runs its SDPA kernel; the stage's side-computed row equals eager attention weights,
    and so the kept tokens equal those of the same stage in an eager model."""
    sdpa = load_adapter(tiny_model_dirs[family], "sdpa")
    eager = load_adapter(tiny_model_dirs[family], "eager")
    assert sdpa.language_model.config._attn_implementation == "sdpa"
    clip = random_clip()
    stages = {}
    for name, adapter in (("sdpa", sdpa), ("eager", eager)):
        video = adapter.encode(clip, fps=2.0)
        layout = adapter.layout(video, adapter.prompt_ids(QUESTION))
        embeds, positions, kept_slots = layout.keep(Selection(indices=torch.arange(len(video.tokens))))
        stage = InnerStage(adapter, make_method(method, layer=2), Budget(retain=0.5), PruneContext(), kept_slots,
                           embeds[kept_slots], video.tokens.thw, video.tokens.grid)
        adapter.forward_layers(embeds, positions, DynamicCache(), stage)
        stages[name] = stage
    with torch.inference_mode():
        out = eager.model(**eager.reference_inputs(clip, QUESTION, fps=2.0), output_attentions=True)
    weights = out.attentions[stages["sdpa"].layer - 1][0].mean(0)
    assert torch.allclose(stages["sdpa"].attention["llm_attention_last"], weights[-1, layout.visual_slots], atol=1e-5)
    assert torch.equal(stages["sdpa"].survivors, stages["eager"].survivors)


def _loaded(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.getMessage().startswith(("loaded ", "built "))]


@pytest.mark.parametrize("argv", [
    ["ask", "{video}", "-q", QUESTION, "--max-frames", "2"],
    ["viz", "{video}", "--method", "fastv", "--out", "{tmp}/v.png", "--max-frames", "2"],
    ["demo", "--n", "1"],
    ["batch", "{video}", "-q", QUESTION, "-o", "{tmp}/r.jsonl", "--no-ray", "--max-frames", "2"],
    ["live", "--source", "synthetic:width=64,height=48,frames=4", "--no-ray", "--max-frames", "4"],
    ["robot", "--episodes", "1"],
    ["bench", "accuracy", "--methods", "uniform", "--retain", "0.5", "--n", "1"],
    ["bench", "robot", "--methods", "uniform", "--retain", "0.5", "--episodes", "1"],
], ids=lambda argv: " ".join(argv[:2]))
def test_device_flags_reach_every_model_load(h264_video, tmp_path, caplog, monkeypatch, argv):
    monkeypatch.setattr(sys, "stdin", open("/dev/null"))
    argv = [a.format(video=h264_video, tmp=tmp_path) for a in argv] + BF16_EAGER
    with caplog.at_level(logging.INFO, logger="streamprune"):
        assert main(argv) == 0
    loads = _loaded(caplog)
    assert loads and all(line.endswith("on cpu bfloat16 eager") for line in loads), loads


def test_serve_policy_loads_on_the_flags_device(tmp_path):
    proc = subprocess.Popen([sys.executable, "-m", "streamprune.cli", "-v", "serve-policy", "--bind",
                             "tcp://127.0.0.1:*", *BF16_EAGER], stderr=subprocess.PIPE, text=True)
    try:
        lines = []
        for line in proc.stderr:
            lines.append(line)
            if line.startswith("serving"):
                break
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    assert any("loaded" in line and line.rstrip().endswith("on cpu bfloat16 eager") for line in lines), lines


def test_batch_asks_ray_for_one_gpu_per_model_actor_on_cuda():
    from streamprune.commands.batch import _actor_options

    assert _actor_options([], "cuda") == {"num_gpus": 1.0}
    assert _actor_options(["GPU=2"], "cuda:0") == {"num_gpus": 2.0}
    assert _actor_options([], "cpu") == {}
    assert _actor_options([], "auto") == {}


def test_bench_speed_smoke_at_real_llava_ov_shapes(tmp_path, capsys):
    """Real LLaVA-OV-0.5B shapes (SigLIP-so400m at 384 px, the 0.5B decoder cut to 6 layers), 8
    frames: the table, JSON and plot come out and the numbers are consistent. Not a timing test."""
    import json

    out = tmp_path / "speed.json"
    code = main(["bench", "speed", "--shape", "llava-ov-0.5b", "--layers", "6", "--frames", "8", "--methods",
                 "uniform", "--retain", "0.1", "--repeats", "1", "--warmup", "0", "--decode-tokens", "2",
                 "--json", str(out), "--plot", str(tmp_path / "speed.png")])
    assert code == 0
    assert "| uniform | 0.1 |" in capsys.readouterr().out
    data = json.loads(out.read_text())
    none, uniform = data["rows"]
    assert data["meta"]["layers"] == 6 and none["visual_tokens_in"] == 8 * 196
    assert uniform["visual_tokens_kept"] <= 0.1 * 8 * 196 + 1
    assert uniform["encode_ms"] == none["encode_ms"]  # one shared encoding of the plain tower
    assert 0 < uniform["prefill_flops_ratio"] < 0.2 and uniform["kv_bytes"] < none["kv_bytes"]
    assert (tmp_path / "speed.png").stat().st_size > 0
