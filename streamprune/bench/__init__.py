"""Benchmarks: decoding throughput against the ffmpeg CLI, accuracy and latency of the pipelines."""
