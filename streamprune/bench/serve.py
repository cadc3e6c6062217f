"""`streamprune bench serve`: the HTTP server under load, measured from its clients.

The server (`serve.app.create_server`, the same one `streamprune serve` runs) starts in this process
on a free loopback port; clients are threads posting real HTTP requests (stdlib `urllib`), each a
chat completion with the clip as a file:// video_url. Two runs of `requests` each: one request at a
time, then `concurrency` in flight. Per run: requests/s (completed over wall time), client-side
latency p50/p99/max, errors (any non-200 or an answer that differs from the first one: a lost or
mixed-up request). The ratio of the two runs' requests/s is the point: on one device the model
answers one request at a time, so concurrency buys overlap of HTTP, decoding and queueing only.
"""

from __future__ import annotations

import json
import tempfile
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

from streamprune.config.serve import BenchServeConfig, ServeConfig
from streamprune.outputs import output_file, write_text

QUESTION = "what colour is the object that appeared last ?"


def bench_clip(directory: Path, model: str | None) -> Path:
    """A held-out synthetic clip of the data version `model` was trained on, H.264-encoded (real
    PyAV encoding) into `directory`."""
    from streamprune.data.synthetic_qa import clip_seed, data_version
    from streamprune.models import resolve_model_dir
    from streamprune.models.default import trained_data_version
    from streamprune.videofile import write_video

    data = data_version(trained_data_version(resolve_model_dir(model)[0]))
    return write_video(directory / "bench_clip.mp4", data.generate_clip(clip_seed("test", 0)).frames, fps=8)


def _post(url: str, body: bytes) -> tuple[float, int, str]:
    start = time.perf_counter()
    request = urllib.request.Request(url, data=body, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=600) as response:
            answer = json.load(response)["choices"][0]["message"]["content"]
            status = response.status
    except urllib.error.HTTPError as err:
        answer, status = err.read().decode(errors="replace"), err.code
    except OSError as err:
        answer, status = str(err), 0
    return (time.perf_counter() - start) * 1000, status, answer


def _run(url: str, body: bytes, requests: int, concurrency: int, expected: str | None) -> dict[str, Any]:
    start = time.perf_counter()
    with ThreadPoolExecutor(max_workers=concurrency) as pool:
        results = list(pool.map(lambda _: _post(url, body), range(requests)))
    wall = time.perf_counter() - start
    latency = [ms for ms, _, _ in results]
    expected = expected if expected is not None else results[0][2]
    errors = sum(1 for _, status, answer in results if status != 200 or answer != expected)
    return {"concurrency": concurrency, "requests": requests, "completed": requests - errors, "errors": errors,
            "wall_s": round(wall, 3), "requests_per_s": round(requests / wall, 3),
            "latency_ms_p50": round(float(np.percentile(latency, 50)), 2),
            "latency_ms_p99": round(float(np.percentile(latency, 99)), 2),
            "latency_ms_max": round(max(latency), 2), "latency_ms": [round(x, 2) for x in latency],
            "answer": expected}


def run_serve_bench(config: BenchServeConfig) -> dict[str, Any]:
    from streamprune.serve.app import create_server

    with tempfile.TemporaryDirectory() as tmp:
        clip = Path(config.video).resolve() if config.video else bench_clip(Path(tmp), config.model)
        server = create_server(ServeConfig(model=config.model, port=0, allowed_local_media_path=str(clip.parent),
                                           max_concurrency=config.max_concurrency, placement=config.placement,
                                           max_new_tokens=config.max_new_tokens)).start()
        try:
            body = json.dumps({"model": server.sessions.engine.model_id, "method": config.method,
                               "retain": config.retain, "num_frames": config.num_frames, "messages": [
                                   {"role": "user", "content": [
                                       {"type": "video_url", "video_url": {"url": clip.as_uri()}},
                                       {"type": "text", "text": QUESTION}]}]}).encode()
            url = f"{server.url}/v1/chat/completions"
            _post(url, body)  # warm-up: first-call allocations and kernels
            one = _run(url, body, config.requests, 1, None)
            many = _run(url, body, config.requests, config.concurrency, one["answer"])
        finally:
            server.stop()
    return {"runs": [one, many], "throughput_ratio": round(many["requests_per_s"] / one["requests_per_s"], 3),
            "video": str(clip) if config.video else "synthetic held-out clip (8 frames, 64x64, H.264)"}


def format_serve_table(result: dict[str, Any]) -> str:
    lines = ["concurrency  requests  errors  req/s   p50 ms   p99 ms   max ms"]
    for r in result["runs"]:
        lines.append(f"{r['concurrency']:>11}  {r['requests']:>8}  {r['errors']:>6}  {r['requests_per_s']:>5.1f}  "
                     f"{r['latency_ms_p50']:>7.1f}  {r['latency_ms_p99']:>7.1f}  {r['latency_ms_max']:>7.1f}")
    lines.append(f"throughput ratio (concurrent / one at a time): {result['throughput_ratio']:.2f}")
    return "\n".join(lines)


def write_serve_json(result: dict[str, Any], path: str | Path, meta: dict[str, Any]) -> None:
    write_text(path, json.dumps({"meta": meta, **result}, indent=1), "--json")


def plot_serve(result: dict[str, Any], path: str | Path, title: str) -> None:
    """Latency of each request, sorted, for both runs (p50 and p99 dashed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axis = plt.subplots(figsize=(7, 4))
    for run, colour in zip(result["runs"], ("tab:blue", "tab:orange")):
        latency = sorted(run["latency_ms"])
        axis.plot(np.arange(1, len(latency) + 1), latency, marker=".", color=colour,
                  label=f"{run['concurrency']} at a time: {run['requests_per_s']:.1f} req/s")
        for q in ("latency_ms_p50", "latency_ms_p99"):
            axis.axhline(run[q], color=colour, linestyle="--", linewidth=0.8)
    axis.set_xlabel("requests, sorted by latency")
    axis.set_ylabel("client-side latency, ms")
    axis.legend(fontsize=8)
    axis.grid(alpha=0.3)
    axis.set_title(title, fontsize=9)
    fig.tight_layout()
    with output_file(path, "--plot") as tmp:
        fig.savefig(tmp, dpi=110)
    plt.close(fig)
