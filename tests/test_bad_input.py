"""Bad input or usage never ends in a traceback or a hang: the CLI prints exactly one line on
stderr naming the problem and exits 2 (3: a batch finished with failed inputs), within the row's
time bound, and output written before (a batch's earlier results) is left as it was.

One row of `CASES` per case: the command line (`{video}`, `{llava}`, `{vla}`, `{model}` (the
broken copy `setup` made), `{tmp}` and `{port}` are filled in), a substring of the expected line,
and optionally a `setup` that writes or breaks files under tmp. Rows run in-process through
`streamprune.cli.main`; the few whose failure mode is a hang run as a subprocess with a timeout.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from streamprune.cli import main

ROOT = Path(__file__).resolve().parent.parent
Q = "what happens ?"


@dataclass
class Env:
    """What a row's setup and command line may use."""

    tmp: Path
    video: Path
    llava: Path
    qwen: Path
    vla: Path
    monkeypatch: pytest.MonkeyPatch
    finalizers: list[Callable[[], None]] = field(default_factory=list)
    extra: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class Bad:
    argv: tuple[str, ...]
    match: str
    setup: Callable[[Env], None] | None = None
    code: int = 2
    seconds: float = 10.0
    subprocess: bool = False
    kept: tuple[str, ...] = ()  # files under tmp (made by setup) that must be unchanged afterwards


# ---- setups ---------------------------------------------------------------------------------

def broken(mutate: Callable[[Path], None], source: str = "llava") -> Callable[[Env], None]:
    """Copy a tiny model dir to tmp/model, then break it."""
    def setup(env: Env) -> None:
        shutil.copytree(getattr(env, source), env.tmp / "model")
        mutate(env.tmp / "model")
    return setup


def edit_json(name: str, change: Callable[[dict], None], source: str = "llava") -> Callable[[Env], None]:
    def mutate(model: Path) -> None:
        data = json.loads((model / name).read_text())
        change(data)
        (model / name).write_text(json.dumps(data))
    return broken(mutate, source)


def config(change: Callable[[dict], None]) -> Callable[[Env], None]:
    return edit_json("config.json", change)


def text_config(**values) -> Callable[[Env], None]:
    return config(lambda c: c["text_config"].update(values))


def write(name: str, content: str | bytes) -> Callable[[Env], None]:
    def setup(env: Env) -> None:
        path = env.tmp / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(content if isinstance(content, bytes) else content.encode())
    return setup


def weights(transform: Callable[[bytes], bytes]) -> Callable[[Env], None]:
    def mutate(model: Path) -> None:
        file = model / "model.safetensors"
        file.write_bytes(transform(file.read_bytes()))
    return broken(mutate)


def each(*setups: Callable[[Env], None]) -> Callable[[Env], None]:
    def setup(env: Env) -> None:
        for step in setups:
            step(env)
    return setup


def other_family_weights(env: Env) -> None:
    """A LLaVA-OneVision config over Qwen2.5-VL weights."""
    broken(lambda m: shutil.copy(env.qwen / "model.safetensors", m / "model.safetensors"))(env)


def fifo(name: str) -> Callable[[Env], None]:
    return lambda env: os.mkfifo(env.tmp / name)


def not_ray_server(env: Env) -> None:
    """Something listening on {port} that answers like a web server, not a Ray cluster."""
    server = socket.create_server(("127.0.0.1", 0))
    env.extra["port"] = str(server.getsockname()[1])

    def serve() -> None:
        while True:
            try:
                conn, _ = server.accept()
            except OSError:
                return
            with conn:
                conn.sendall(b"HTTP/1.1 400 Bad Request\r\n\r\n")
    threading.Thread(target=serve, daemon=True).start()
    env.finalizers.append(server.close)


def disk_full_on_results(env: Env) -> None:
    """Appending a results line fails as on a full disk."""
    real = os.write

    def write_or_enospc(fd: int, data: bytes) -> int:
        if bytes(data).startswith(b'{"input"'):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real(fd, data)
    env.monkeypatch.setattr(os, "write", write_or_enospc)


EARLIER = json.dumps({"input": "/earlier/clip.mp4", "status": "ok", "sha256": "0", "answer": "yes"}) + "\n"
ASK = ("ask", "{video}", "-q", Q)
ASK_MODEL = (*ASK, "--model", "{model}")
RECIPE = (*ASK, "--model", "{llava}", "--method", "{tmp}/recipe.yaml")
BATCH = ("batch", "{video}", "-o", "{tmp}/r.jsonl", "--no-ray")
VIZ = ("viz", "{video}", "--method", "uniform", "--model", "{llava}")
DECODE = ("bench", "decode", "{video}", "--repeats", "1")


CASES: dict[str, Bad] = {
    # model directories (ask, robot --policy, batch --model)
    "model-missing": Bad((*ASK, "--model", "{tmp}/nothing"), "does not exist"),
    "config-is-a-list": Bad(ASK_MODEL, "must hold a JSON object", broken(lambda m: (m / "config.json").write_text("[1, 2]"))),
    "config-not-utf8": Bad(ASK_MODEL, "not UTF-8", broken(lambda m: (m / "config.json").write_bytes(b'{"a": "\xff"}'))),
    "config-empty": Bad(ASK_MODEL, "not valid JSON", broken(lambda m: (m / "config.json").write_text(""))),
    "config-is-a-folder": Bad(ASK_MODEL, "no config.json",
                              broken(lambda m: ((m / "config.json").unlink(), (m / "config.json").mkdir()))),
    "model-type-unknown": Bad(ASK_MODEL, "not supported", config(lambda c: c.update(model_type="gpt2"))),
    "model-type-wrong-for-weights": Bad(ASK_MODEL, "vision_config.depth is missing",
                                        config(lambda c: c.update(model_type="qwen2_5_vl"))),
    "weights-of-another-family": Bad(ASK_MODEL, "no vision patch embedding", other_family_weights),
    "text-config-missing": Bad(ASK_MODEL, "text_config is missing", config(lambda c: c.pop("text_config")),
                               seconds=30, subprocess=True),
    "vision-config-missing": Bad(ASK_MODEL, "vision_config is missing", config(lambda c: c.pop("vision_config"))),
    "vocab-size-missing": Bad(ASK_MODEL, "vocab_size is missing", config(lambda c: c["text_config"].pop("vocab_size"))),
    "hidden-size-a-string": Bad(ASK_MODEL, "hidden_size must be a positive integer", text_config(hidden_size="64")),
    "layers-zero": Bad(ASK_MODEL, "num_hidden_layers must be a positive integer", text_config(num_hidden_layers=0)),
    "layer-types-length": Bad(ASK_MODEL, "layer_types has 3 entries", text_config(num_hidden_layers=5)),
    "layer-types-values": Bad(ASK_MODEL, "rejected by transformers", text_config(layer_types=["x", "y", "z"])),
    "rms-eps-a-string": Bad(ASK_MODEL, "rms_norm_eps", text_config(rms_norm_eps="tiny")),
    "more-layers-than-weights": Bad(ASK_MODEL, "weights hold 3 decoder layers",
                                    text_config(num_hidden_layers=5, layer_types=["full_attention"] * 5)),
    "vocab-of-another-shape": Bad(ASK_MODEL, "embed_tokens.weight has shape [32, 64]", text_config(vocab_size=40)),
    "mlp-of-another-shape": Bad(ASK_MODEL, "intermediate_size", text_config(intermediate_size=96)),
    "safetensors-truncated": Bad(ASK_MODEL, "truncated", weights(lambda b: b[:1000])),
    "safetensors-header-too-large": Bad(ASK_MODEL, "header claims", weights(lambda b: b"\xff" * 100)),
    "safetensors-two-bytes": Bad(ASK_MODEL, "too short", weights(lambda b: b"\x01\x00")),
    "safetensors-header-a-list": Bad(ASK_MODEL, "not an object", weights(lambda b: (3).to_bytes(8, "little") + b"[1]")),
    "safetensors-incomplete-metadata": Bad(ASK_MODEL, "incomplete metadata", weights(lambda b: b + b"\0" * 16)),
    "weights-missing": Bad(ASK_MODEL, "has no model.safetensors", broken(lambda m: (m / "model.safetensors").unlink())),
    "sidecar-invalid-json": Bad(ASK_MODEL, "streamprune.json is not valid JSON",
                                broken(lambda m: (m / "streamprune.json").write_text("{bad"))),
    "sidecar-a-list": Bad(ASK_MODEL, "streamprune.json must hold a JSON object",
                          broken(lambda m: (m / "streamprune.json").write_text("[]"))),
    "sidecar-template-without-video": Bad(ASK_MODEL, "prompt_template must be a string containing",
                                          edit_json("streamprune.json", lambda s: s.update(prompt_template="{question}"))),
    "sidecar-eos-a-number": Bad(ASK_MODEL, "eos_token must be a string",
                                edit_json("streamprune.json", lambda s: s.update(eos_token=2))),
    "tokenizer-garbage": Bad(ASK_MODEL, "is not a tokenizer", broken(lambda m: (m / "tokenizer.json").write_text('{"a": 1}'))),
    "tokenizer-config-a-list": Bad(ASK_MODEL, "tokenizer_config.json must hold a JSON object",
                                   broken(lambda m: (m / "tokenizer_config.json").write_text("[]"))),
    "policy-action-dim-a-string": Bad(("robot", "--policy", "{model}", "--episodes", "1"), "vla.action_dim",
                                      edit_json("streamprune.json", lambda s: s["vla"].update(action_dim="two"), "vla")),
    "policy-config-a-list": Bad(("robot", "--policy", "{model}", "--episodes", "1"), "must hold a JSON object",
                                broken(lambda m: (m / "config.json").write_text("[]"), "vla")),
    "batch-model-broken": Bad((*BATCH, "-q", Q, "--model", "{model}"), "text_config is missing",
                              each(config(lambda c: c.pop("text_config")), write("r.jsonl", EARLIER)), kept=("r.jsonl",)),
    # method recipes (configs/methods style files)
    "recipe-option-wrong-type": Bad(RECIPE, "stages[0].options.layer: expected an integer",
                                    write("recipe.yaml", "stages:\n  - method: fastv\n    options: {layer: two}\n")),
    "recipe-stages-not-a-list": Bad(RECIPE, "stages: expected a list", write("recipe.yaml", "stages: fastv\n")),
    "recipe-options-a-list": Bad(RECIPE, "options: expected a mapping",
                                 write("recipe.yaml", "stages:\n  - method: fastv\n    options: [1, 2]\n")),
    "recipe-unknown-cacher-option": Bad(RECIPE, "unknown key(s) ['bogus']", write(
        "recipe.yaml", "stages:\n  - method: stc_cacher\n    options: {bogus: 1}\n  - method: uniform\n")),
    "recipe-cacher-option-out-of-range": Bad(RECIPE, "update_token_ratio must be in", write(
        "recipe.yaml", "stages:\n  - method: stc_cacher\n    options: {update_token_ratio: 5}\n")),
    "recipe-unknown-stage": Bad(RECIPE, "unknown stage 'nope'", write("recipe.yaml", "stages:\n  - method: nope\n")),
    "recipe-stage-without-method": Bad(RECIPE, "stages[0].method: missing", write("recipe.yaml", "stages:\n  - {}\n")),
    "recipe-retain-out-of-range": Bad(RECIPE, "retain", write("recipe.yaml", "name: uniform\nretain: 2\n")),
    "recipe-retain-nan": Bad(RECIPE, "finite", write("recipe.yaml", "name: uniform\nretain: .nan\n")),
    "recipe-top-level-a-list": Bad(RECIPE, "expected a mapping at the top level", write("recipe.yaml", "- a\n- b\n")),
    "recipe-invalid-yaml": Bad(RECIPE, "invalid YAML", write("recipe.yaml", "name: [x\n")),
    "recipe-not-utf8": Bad(RECIPE, "not UTF-8", write("recipe.yaml", b"name: \xff\n")),
    "recipe-unknown-key": Bad(RECIPE, "unknown key(s) ['stagez']", write("recipe.yaml", "stagez: []\n")),
    "recipe-file-missing": Bad(RECIPE, "recipe file not found"),
    # numbers
    "seed-beyond-64-bits": Bad((*ASK, "--method", "random", "--seed", str(2**70)), "--seed"),
    "robot-seed-negative": Bad(("robot", "--seed", "-1"), "expected a seed in"),
    "viz-fps-huge": Bad((*VIZ, "--out", "{tmp}/v.mp4", "--fps", "1e300"), "--fps"),
    "viz-fps-inf": Bad((*VIZ, "--out", "{tmp}/v.mp4", "--fps", "inf"), "--fps"),
    "generate-nan": Bad(("bench", "decode", "--generate", "nan"), "--generate"),
    "generate-inf": Bad(("bench", "decode", "--generate", "inf"), "--generate"),
    "segment-seconds-nan": Bad((*BATCH, "-q", Q, "--segment-seconds", "nan"), "--segment-seconds"),
    "max-frames-huge": Bad((*ASK, "--max-frames", "1" + "0" * 30), "--max-frames"),
    "max-new-tokens-fraction": Bad((*ASK, "--max-new-tokens", "2.5"), "--max-new-tokens"),
    "retain-nan": Bad((*ASK, "--retain", "nan"), "--retain"),
    # text
    "question-not-utf8": Bad(("ask", "{video}", "-q", "what \udcff ?", "--model", "{llava}"), "--question: not valid UTF-8"),
    "video-path-not-utf8": Bad(("ask", "{tmp}/clip\udcff.mp4", "-q", Q), "VIDEO: not valid UTF-8"),
    "question-empty": Bad(("ask", "{video}", "-q", "   ", "--model", "{llava}"), "question is empty"),
    "question-too-long": Bad(("ask", "{video}", "-q", "what " * 1000, "--model", "{llava}"), "at most 4000"),
    "prompt-file-not-utf8": Bad((*BATCH, "--prompt-file", "{tmp}/q.txt"), "not UTF-8", write("q.txt", b"what \xff ?\n")),
    "prompt-file-3mb": Bad((*BATCH, "--prompt-file", "{tmp}/q.txt"), "a question is at most",
                           write("q.txt", "what ? " * 450_000)),
    "prompt-file-fifo": Bad((*BATCH, "--prompt-file", "{tmp}/q.fifo"), "not a regular file", fifo("q.fifo"),
                            seconds=20, subprocess=True),
    "prompt-file-a-folder": Bad((*BATCH, "--prompt-file", "{tmp}"), "not a regular file"),
    # output paths
    "viz-out-a-folder": Bad((*VIZ, "--out", "{tmp}/sheet.png"), "is a folder", lambda env: (env.tmp / "sheet.png").mkdir()),
    "viz-out-under-a-file": Bad((*VIZ, "--out", "{tmp}/file/sheet.png"), "a file is in the way", write("file", "x")),
    "viz-out-in-proc": Bad((*VIZ, "--out", "/proc/sheet.png"), "cannot be written"),
    "bench-json-dev-full": Bad((*DECODE, "--json", "/dev/full"), "not a regular file"),
    "bench-json-a-folder": Bad((*DECODE, "--json", "{tmp}"), "is a folder"),
    "bench-json-a-fifo": Bad((*DECODE, "--json", "{tmp}/out.fifo"), "not a regular file", fifo("out.fifo")),
    "batch-output-a-folder": Bad(("batch", "{video}", "-o", "{tmp}", "--no-ray", "-q", Q), "is a folder"),
    "batch-output-a-fifo": Bad(("batch", "{video}", "-o", "{tmp}/r.fifo", "--no-ray", "-q", Q, "--model", "{llava}"),
                               "not a regular file", fifo("r.fifo"), seconds=20, subprocess=True),
    "batch-output-disk-full": Bad((*BATCH, "-q", Q, "--model", "{llava}"), "No space left on device",
                                  each(write("r.jsonl", EARLIER), disk_full_on_results), kept=("r.jsonl",)),
    "robot-video-out-a-file": Bad(("robot", "--policy", "{vla}", "--episodes", "1", "--video-out", "{tmp}/v.mp4"),
                                  "is a file, not a folder", write("v.mp4", "x")),
    "live-stats-json-a-folder": Bad(("live", "--source", "synthetic:", "--no-ray", "--model", "{llava}",
                                     "--stats-json", "{tmp}"), "is a folder"),
    # network-facing commands
    "ray-address-refused": Bad(("batch", "{video}", "-q", Q, "-o", "{tmp}/r.jsonl", "--model", "{llava}",
                                "--ray-address", "127.0.0.1:1"), "no Ray cluster at 127.0.0.1:1",
                               write("r.jsonl", EARLIER), seconds=30, subprocess=True, kept=("r.jsonl",)),
    "ray-address-not-ray": Bad(("batch", "{video}", "-q", Q, "-o", "{tmp}/r.jsonl", "--model", "{llava}",
                                "--ray-address", "127.0.0.1:{port}"), "not as a Ray cluster", not_ray_server),
    "ray-address-malformed": Bad(("batch", "{video}", "-q", Q, "-o", "{tmp}/r.jsonl", "--model", "{llava}",
                                  "--ray-address", "no-port"), "must be auto or HOST:PORT"),
    "live-robot-only-method": Bad(("live", "--source", "synthetic:", "--no-ray", "--model", "{llava}",
                                   "--method", "vla_pruner"), "action attention"),
    "live-inner-method-with-incremental-kv": Bad(("live", "--source", "synthetic:", "--no-ray", "--model", "{llava}",
                                                  "--method", "fastv", "--incremental-kv"), "incremental KV"),
    "live-deadline-with-incremental-kv": Bad(("live", "--source", "synthetic:", "--no-ray", "--model", "{llava}",
                                              "--target-latency-ms", "50", "--incremental-kv"), "use one of them"),
    "robot-ray-address-refused": Bad(("robot", "--policy", "{vla}", "--episodes", "1", "--ray-address",
                                      "127.0.0.1:1"), "no Ray cluster at 127.0.0.1:1", seconds=30,
                                     subprocess=True),
    "live-zmq-without-port": Bad(("live", "--source", "zmq://127.0.0.1", "--no-ray"), "must be zmq://HOST:PORT"),
    "publish-from-zmq": Bad(("publish", "--source", "zmq://127.0.0.1:5"), "not zmq"),
    "serve-policy-bad-bind": Bad(("serve-policy", "--policy", "{vla}", "--bind", "tcp://127.0.0.1:notaport"),
                                 "cannot bind"),
    "eval-data-missing": Bad(("eval", "{tmp}/none.json"), "data file not found"),
    "eval-data-not-json": Bad(("eval", "{tmp}/d.json"), "not JSON", write("d.json", "{not json\n")),
    "eval-data-not-utf8": Bad(("eval", "{tmp}/d.json"), "not UTF-8", write("d.json", b"\xff\xfe[]")),
    "eval-bad-layout": Bad(("eval", "--layout", "kinetics"), "unknown data layout"),
    "eval-bad-prompt": Bad(("eval", "--prompt", "chatty"), "--prompt must be one of"),
    "eval-video-root-missing": Bad(("eval", "--video-root", "{tmp}/nowhere"), "is not a directory"),
    "eval-unknown-method": Bad(("eval", "--methods", "no_such"), "no_such"),
    "eval-item-without-options": Bad(("eval", "{tmp}/d.json"), "options must be a list",
                                     write("d.json", '[{"video": "a.mp4", "question": "q", "answer": 0}]')),
    "bench-accuracy-unknown-data-version": Bad(("bench", "accuracy", "--data-version", "9"), "unknown data version"),
    "bench-redundancy-missing-video": Bad(("bench", "redundancy", "{tmp}/none.mp4"), "video file not found"),
    "serve-port-out-of-range": Bad(("serve", "--port", "70000"), "port must be in [0, 65535]"),
    "serve-media-dir-missing": Bad(("serve", "--allowed-local-media-path", "{tmp}/nowhere"), "is not a directory"),
    "serve-port-in-use": Bad(("serve", "--model", "{llava}", "--port", "{port}"), "cannot listen on",
                             not_ray_server),
    "bench-serve-missing-video": Bad(("bench", "serve", "--video", "{tmp}/missing.mp4"), "video file not found"),
    "serve-unknown-method": Bad(("serve", "--model", "{llava}", "--method", "no_such"), "no_such"),
    # a batch with a bad input finishes the others and says so: exit 3
    "batch-with-a-failed-input": Bad(("batch", "{video}", "{tmp}/notes.mp4", "-q", Q, "-o", "{tmp}/r.jsonl",
                                      "--no-ray", "--model", "{llava}"), "1 ok, 1 failed",
                                     write("notes.mp4", "not a video\n" * 50), code=3, seconds=30),
}


@pytest.fixture(scope="module")
def models(tiny_model_dirs, tmp_path_factory) -> dict[str, Path]:
    from streamprune.models.tiny import save_tiny_vla

    return {"llava": tiny_model_dirs["llava_onevision"], "qwen": tiny_model_dirs["qwen2_5_vl"],
            "vla": save_tiny_vla(tmp_path_factory.mktemp("vla") / "vla", image_size=32)}


def _run_in_process(argv: list[str], capsys) -> tuple[int, str]:
    try:
        code = main(argv)
    except SystemExit as exit_:
        code = exit_.code
    return code, capsys.readouterr().err


def _run_subprocess(argv: list[str], seconds: float) -> tuple[int, str]:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    try:
        done = subprocess.run([sys.executable, "-m", "streamprune.cli", *argv], cwd=ROOT, env=env,
                              capture_output=True, timeout=seconds, stdin=subprocess.DEVNULL, check=False)
    except subprocess.TimeoutExpired:
        pytest.fail(f"still running after {seconds:g} s (hung): {argv}")
    return done.returncode, done.stderr.decode("utf-8", "replace")


@pytest.mark.parametrize("name", list(CASES))
def test_bad_input_is_one_line_and_an_exit_code(name, models, h264_video, tmp_path, monkeypatch, capsys):
    case = CASES[name]
    env = Env(tmp=tmp_path, video=h264_video, llava=models["llava"], qwen=models["qwen"], vla=models["vla"],
              monkeypatch=monkeypatch)
    if case.setup is not None:
        case.setup(env)
    before = {kept: (tmp_path / kept).read_bytes() for kept in case.kept}
    fill = {"video": str(h264_video), "llava": str(models["llava"]), "vla": str(models["vla"]),
            "model": str(tmp_path / "model"), "tmp": str(tmp_path), **env.extra}
    argv = [arg.format(**fill) for arg in case.argv]
    start = time.monotonic()
    try:
        code, err = _run_subprocess(argv, case.seconds) if case.subprocess else _run_in_process(argv, capsys)
    finally:
        for finalize in env.finalizers:
            finalize()
    elapsed = time.monotonic() - start
    lines = err.strip().splitlines()
    assert "Traceback" not in err, err
    assert code == case.code, err
    assert len(lines) == 1, err
    assert case.match in lines[0], lines[0]
    assert case.code == 3 or lines[0].startswith("streamprune: error: "), lines[0]
    assert elapsed < case.seconds, f"took {elapsed:.1f} s"
    for kept, content in before.items():
        assert (tmp_path / kept).read_bytes() == content, f"{kept} changed"


def test_the_table_has_at_least_sixty_cases():
    assert len(CASES) >= 60


def test_outputs_into_a_missing_folder_create_it(h264_video, tmp_path, capsys):
    out = tmp_path / "new" / "folder" / "decode.json"
    assert main(["bench", "decode", str(h264_video), "--repeats", "1", "--json", str(out)]) == 0
    assert json.loads(out.read_text())
    assert not [p for p in out.parent.iterdir() if p.name != out.name], "a temporary file was left"


def test_viz_of_a_tiny_odd_sized_video_writes_its_clip(models, tmp_path, capsys):
    import av
    import numpy as np

    video = tmp_path / "tiny.mkv"
    with av.open(str(video), "w") as container:  # FFV1 keeps odd sizes (H.264 needs even ones)
        stream = container.add_stream("ffv1", rate=4)
        stream.width, stream.height, stream.pix_fmt = 9, 7, "yuv444p"
        for i in range(4):
            image = np.full((7, 9, 3), 40 * i, np.uint8)
            container.mux(stream.encode(av.VideoFrame.from_ndarray(image, format="rgb24")))
        container.mux(stream.encode(None))
    out = tmp_path / "tiny.mp4"
    code = main(["viz", str(video), "--method", "uniform", "--retain", "0.5", "--model", str(models["llava"]),
                 "--out", str(out), "--fps", "4"])
    assert code == 0, capsys.readouterr().err
    assert out.stat().st_size > 0
