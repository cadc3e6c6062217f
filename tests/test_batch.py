"""`streamprune batch` (pipelines/batch_video.py): real encoded files, tiny real models, a real Ray
instance (one per module) and a real two-node Ray cluster on this machine."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import signal
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from streamprune.cliargs import parse_config
from streamprune.commands.batch import build_job, run
from streamprune.config import BatchConfig, load_command_defaults
from streamprune.errors import EXIT_PARTIAL, ConfigError, InputError
from streamprune.runtime.batch_inputs import find_inputs, split_segments
from streamprune.runtime.batch_job import run_job
from streamprune.videofile import write_video

QUESTION = "what happens ?"
RAY_CPUS = 2


def parse(argv: list[str]) -> BatchConfig:
    return parse_config(load_command_defaults(BatchConfig, "batch"), argv, prog="batch")


def lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def wait_until(condition, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(0.05)


@pytest.fixture(scope="module")
def ray_instance():
    """One local Ray instance for the module's Ray tests (startup takes ~15 s on 2 cores)."""
    ray = pytest.importorskip("ray")
    ray.shutdown()
    ray.init(address="local", num_cpus=RAY_CPUS, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()


@pytest.fixture
def local_ray(ray_instance):
    if not ray_instance.is_initialized():  # a cluster test earlier in a custom order shut it down
        ray_instance.init(address="local", num_cpus=RAY_CPUS, include_dashboard=False, log_to_driver=False)
    return ray_instance


def _cut_in_half(src: Path, dst: Path) -> Path:
    data = src.read_bytes()
    dst.write_bytes(data[: len(data) // 2])
    return dst


@pytest.fixture
def mixed_folder(make_video, tmp_path: Path) -> tuple[Path, set[str]]:
    """20 inputs in nested folders: 17 good clips, a plain MP4 cut in half (its index is gone: probe
    fails), a faststart MP4 cut in half (opens, decoding runs out) and a text file named .mp4."""
    root = tmp_path / "inputs"
    good = []
    for i in range(17):
        clip = make_video(frames=8 + i % 5, fps=8.0, gop=4, name=f"clip{i:02d}")
        dest = root / ("a" if i % 2 else "b") / clip.name
        dest.parent.mkdir(parents=True, exist_ok=True)
        clip.rename(dest)
        good.append(dest)
    _cut_in_half(make_video(frames=24, fps=8.0, gop=4, name="whole_a"), root / "cut_index.mp4")
    _cut_in_half(make_video(frames=24, fps=8.0, gop=4, faststart=True, name="whole_b"), root / "b" / "cut_stream.mp4")
    (root / "a" / "notes.mp4").write_text("this is not a video\n" * 20)
    (root / "a" / "readme.txt").write_text("not an input: no video extension\n")
    return root, {str(p.resolve()) for p in good}


def test_find_inputs_recurses_folders_by_extension_and_expands_globs(mixed_folder, tmp_path):
    root, good = mixed_folder
    found = find_inputs([str(root)])
    assert len(found) == 20 and good < set(found)
    assert not any(p.endswith("readme.txt") for p in found)
    # a file named explicitly is taken whatever its extension; a glob and a folder overlap: each once
    both = find_inputs([str(root / "a" / "readme.txt"), str(root / "**" / "clip0*.mp4"), str(root / "a")])
    assert both[0].endswith("readme.txt") and len(both) == len(set(both))
    assert {p for p in both if "clip0" in p} == {p for p in good if "clip0" in Path(p).name}
    with pytest.raises(InputError, match="no such file or folder"):
        find_inputs([str(tmp_path / "missing.mp4")])
    with pytest.raises(InputError, match="no video inputs matched"):
        find_inputs([str(tmp_path / "nothing*.mkv")])


def test_segments_cover_the_clip_with_an_open_last_window():
    assert split_segments(10.0, 60.0) == [(None, None)]
    assert split_segments(10.0, 4.0) == [(None, 4.0), (4.0, 8.0), (8.0, None)]
    assert split_segments(8.0, 4.0) == [(None, 4.0), (4.0, None)]


def test_usage_errors_exit_2_before_any_work(mixed_folder, tmp_path, tiny_model_dirs):
    root, _ = mixed_folder
    model = str(tiny_model_dirs["llava_onevision"])
    with pytest.raises(ConfigError, match="a file is in the way"):
        (tmp_path / "file").write_text("x")
        run(parse([str(root), "-q", QUESTION, "-o", str(tmp_path / "file" / "out.jsonl"), "--no-ray",
                   "--model", model]))
    with pytest.raises(ConfigError, match="is a folder"):
        run(parse([str(root), "-q", QUESTION, "-o", str(tmp_path), "--no-ray", "--model", model]))
    with pytest.raises(ConfigError, match="--no-ray"):
        run(parse([str(root), "-q", QUESTION, "-o", str(tmp_path / "o.jsonl"), "--no-ray", "--ray-address", "auto"]))
    with pytest.raises(ConfigError, match="NAME=AMOUNT"):
        build_job(parse([str(root), "-q", QUESTION, "-o", str(tmp_path / "o.jsonl"), "--actor-resource", "GPU"]))
    with pytest.raises(ConfigError, match="unknown method"):
        run(parse([str(root), "-q", QUESTION, "-o", str(tmp_path / "o.jsonl"), "--no-ray", "--method", "nope"]))
    with pytest.raises(ConfigError, match="question is empty"):
        empty = tmp_path / "q.txt"
        empty.write_text("  \n")
        run(parse([str(root), "--prompt-file", str(empty), "-o", str(tmp_path / "o.jsonl"), "--no-ray"]))
    assert not (tmp_path / "o.jsonl").exists() or (tmp_path / "o.jsonl").read_text() == ""


def test_cli_batch_exits_2_with_one_line_when_nothing_matches(tmp_path, capsys):
    from streamprune.cli import main

    code = main(["batch", str(tmp_path / "*.mp4"), "-q", QUESTION, "-o", str(tmp_path / "o.jsonl"), "--no-ray"])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "no video inputs matched" in err


def test_mixed_batch_on_ray_writes_one_line_per_input_and_resumes_without_reprocessing(
        mixed_folder, tmp_path, tiny_model_dirs, local_ray, capsys):
    root, good = mixed_folder
    out = tmp_path / "results.jsonl"
    argv = [str(root), "-q", QUESTION, "-o", str(out), "--model", str(tiny_model_dirs["llava_onevision"]),
            "--method", "uniform", "--retain", "0.5", "--fps", "4", "--max-frames", "4",
            "--max-new-tokens", "3", "--num-workers", "2", "--segment-seconds", "1"]
    assert run(parse(argv)) == EXIT_PARTIAL
    first = lines(out)
    assert len(first) == 20 and len({r["input"] for r in first}) == 20
    ok = {r["input"]: r for r in first if r["status"] == "ok"}
    errors = {Path(r["input"]).name: r["error"] for r in first if r["status"] == "error"}
    assert set(ok) == good
    assert set(errors) == {"cut_index.mp4", "cut_stream.mp4", "notes.mp4"}
    assert all("\n" not in e and ("truncated or corrupt" in e or "not a readable video" in e) for e in errors.values())
    # the faststart cut probes fine (3 segments planned) and fails while decoding
    assert errors["cut_stream.mp4"].startswith("truncated or corrupt video")
    assert next(r["segments"] for r in first if r["input"].endswith("cut_stream.mp4")) == 3
    for record in ok.values():
        assert record["sha256"] == hashlib.sha256(Path(record["input"]).read_bytes()).hexdigest()
        assert record["answer"] is not None and record["frames"] == 4
        assert record["visual_tokens_kept"] == record["visual_tokens_in"] // 2
        assert {"hash_ms", "video_decode_ms", "encode_ms", "prefill_ms", "decode_ms"} <= set(record["timings_ms"])
    assert max(r["segments"] for r in ok.values()) == 2  # clips over 1 s were split
    assert "17 ok, 3 failed, 0 skipped of 20" in capsys.readouterr().err

    # an interrupted run left a partial line: ignored and dropped; ok inputs are not redone
    with open(out, "a") as fh:
        fh.write('{"input": "' + sorted(good)[0] + '", "status": "ok", "sha2')
    assert run(parse(argv)) == EXIT_PARTIAL
    second = lines(out)
    assert len(second) == 20 and len({r["input"] for r in second}) == 20
    assert {r["input"]: r for r in second if r["status"] == "ok"} == ok  # same timings: not re-run
    assert "0 ok, 3 failed, 17 skipped of 20" in capsys.readouterr().err

    one = sorted(good)[0]
    assert run(parse([one, *argv[1:], "--overwrite", "--no-ray"])) == 0
    assert [r["input"] for r in lines(out)] == [one]


def test_changed_input_is_redone_and_keeps_a_single_line(make_video, tmp_path, tiny_model_dirs, capsys):
    a, b = make_video(frames=8, fps=8.0, name="a"), make_video(frames=8, fps=8.0, name="b")
    out = tmp_path / "r.jsonl"
    argv = [str(a), str(b), "-q", QUESTION, "-o", str(out), "--no-ray", "--max-new-tokens", "2",
            "--model", str(tiny_model_dirs["llava_onevision"])]
    assert run(parse(argv)) == 0
    before = {r["input"]: r for r in lines(out)}
    make_video(frames=10, fps=8.0, name="b")  # same path, new content
    assert run(parse(argv)) == 0
    after = {r["input"]: r for r in lines(out)}
    assert len(lines(out)) == 2 and after[str(a.resolve())] == before[str(a.resolve())]
    assert after[str(b.resolve())]["sha256"] == hashlib.sha256(b.read_bytes()).hexdigest() != before[str(b.resolve())]["sha256"]
    assert "1 ok, 0 failed, 1 skipped of 2" in capsys.readouterr().err


def _noise_clips(directory: Path, count: int) -> list[Path]:
    """Clips of random frames, so a tiny random model answers each differently."""
    rng = np.random.RandomState(7)
    return [write_video(directory / f"noise{i}", rng.randint(0, 255, (16, 48, 64, 3), dtype=np.uint8), 8.0,
                        "h264", gop=4) for i in range(count)]


def test_answers_identical_in_process_or_on_ray_with_any_worker_count_and_segmenting(
        tmp_path, tiny_model_dirs, local_ray):
    from streamprune.decode import decode_frames
    from streamprune.models import load_adapter
    from streamprune.pruning.base import PruneContext
    from streamprune.pruning.recipe import build_recipe

    clips = _noise_clips(tmp_path / "clips", 3)
    model = str(tiny_model_dirs["qwen2_5_vl"])
    common = [*map(str, clips), "-q", QUESTION, "--model", model, "--method", "random", "--retain", "0.5",
              "--seed", "3", "--fps", "4", "--max-frames", "6", "--max-new-tokens", "4"]
    runs = {
        "in-process, whole clips": ["--no-ray", "--segment-seconds", "100"],
        "in-process, 4 segments": ["--no-ray", "--segment-seconds", "0.5"],
        "ray, 1 worker, 4 segments": ["--num-workers", "1", "--segment-seconds", "0.5"],
        "ray, 2 workers, 2 segments": ["--num-workers", "2", "--segment-seconds", "1"],
    }
    answers = {}
    for name, flags in runs.items():
        out = tmp_path / f"{len(answers)}.jsonl"
        assert run(parse([*common, "-o", str(out), *flags])) == 0, name
        answers[name] = {r["input"]: (r["answer"], r["frames"], r["visual_tokens_kept"]) for r in lines(out)}

    # the reference: the adapter called directly on the whole clip
    adapter = load_adapter(model)
    recipe = build_recipe("random", retain=0.5)
    reference = {}
    for clip in clips:
        frames = np.stack([f.image for f in decode_frames(clip, fps=4, max_frames=6)])
        result = adapter.answer(frames, QUESTION, recipe, PruneContext(seed=3), fps=4, max_new_tokens=4)
        reference[str(clip.resolve())] = (result.text, len(frames), result.visual_tokens_kept)
    assert len({text for text, _, _ in reference.values()}) > 1  # answers depend on the clip: a mix-up would show
    for name, got in answers.items():
        assert got == reference, name


def _node_processes(node) -> list[int]:
    """Pids of every process under a Ray test node's raylet (its workers and actors), from /proc."""
    parents = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError):
            fields = stat.read_text().rsplit(")", 1)[1].split()
            parents[int(stat.parent.name)] = int(fields[1])  # fields after "(comm)": state, ppid, ...
    found, frontier = [], [node.all_processes["raylet"][0].process.pid]
    while frontier:
        parent = frontier.pop()
        children = [pid for pid, ppid in parents.items() if ppid == parent]
        found += children
        frontier += children
    return found


@pytest.fixture
def cluster():
    """A Ray cluster on this machine: a head with CPU only (decoding) and one node with room for two
    model actors (custom resource `batch_model`), so the whole model pool lands on that node; node
    failures are detected within ~1.5 s."""
    ray = pytest.importorskip("ray")
    from ray.cluster_utils import Cluster

    ray.shutdown()  # one driver connection per process: leave the module's local instance, if any
    cluster = Cluster(initialize_head=True, head_node_args={
        "num_cpus": 1,
        "_system_config": {"health_check_initial_delay_ms": 0, "health_check_period_ms": 500,
                           "health_check_failure_threshold": 3}})
    model_node = cluster.add_node(num_cpus=1, resources={"batch_model": 2})
    cluster.wait_for_nodes()
    yield cluster, model_node
    ray.shutdown()
    cluster.shutdown()


def test_losing_the_model_node_mid_batch_resubmits_its_inputs_and_writes_each_once(
        make_video, tmp_path, tiny_model_dirs, cluster):
    import ray

    cluster, model_node = cluster
    clips = [make_video(frames=8, fps=8.0, gop=4, name=f"c{i:02d}") for i in range(24)]
    out = tmp_path / "results.jsonl"
    job = build_job(parse([*map(str, clips), "-q", QUESTION, "-o", str(out), "--model",
                           str(tiny_model_dirs["llava_onevision"]), "--max-frames", "4", "--max-new-tokens", "8",
                           "--ray-address", cluster.address, "--num-workers", "2", "--actor-resource", "batch_model=1"]))
    outcome: dict = {}

    def batch() -> None:
        try:
            outcome["report"] = run_job(job)
        except BaseException as err:  # noqa: BLE001 - re-raised in the test thread
            outcome["error"] = err

    thread = threading.Thread(target=batch, daemon=True)
    thread.start()
    wait_until(lambda: "error" in outcome or (out.exists() and len(lines(out)) >= 2), 180, "two results")
    assert "error" not in outcome, outcome.get("error")
    lost = model_node.node_id[:12]
    # a lost machine takes all its processes at once; Ray's remove_node kills the raylet, and actor
    # processes would otherwise notice only after a while (on a fast machine the batch ended first)
    actors = _node_processes(model_node)
    assert actors, "no processes found under the model node's raylet"
    cluster.remove_node(model_node, allow_graceful=False)
    for pid in actors:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    before = lines(out)
    assert len(before) < len(clips), "the batch finished before the node could be removed"
    assert all(r["worker"].startswith(lost) for r in before)
    cluster.add_node(num_cpus=1, resources={"batch_model": 1})  # a replacement joins
    thread.join(timeout=180)
    assert not thread.is_alive(), "batch did not finish after the node was lost"
    assert not ray.is_initialized()  # the job disconnects from the cluster it connected to
    assert "error" not in outcome, outcome.get("error")
    report = outcome["report"]
    records = lines(out)
    assert sorted(r["input"] for r in records) == sorted(str(c.resolve()) for c in clips)  # each exactly once
    assert all(r["status"] == "ok" for r in records)
    assert report.ok == len(clips) and report.workers_lost >= 1 and report.resubmitted >= 1
    assert any(r["attempts"] >= 1 for r in records)  # an input in flight on the lost node was redone
    assert not records[-1]["worker"].startswith(lost)  # finished on the replacement node
