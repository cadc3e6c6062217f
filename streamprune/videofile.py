"""Write RGB frames to a real encoded video file (H.264/MP4, VP9/WebM, MPEG-4 Part 2).

Used to build test clips and benchmark inputs, and by pipelines that save what they saw. Also holds
the test pattern: every frame carries its own index as a row of black/white blocks, so a decoder
test can tell exactly WHICH frame came back after lossy encoding.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator
from fractions import Fraction
from pathlib import Path

import av
import numpy as np

from streamprune.errors import ConfigError, InputError

log = logging.getLogger(__name__)

# codec name -> (encoder names to try in order, pixel format, extra encoder options)
_CODECS: dict[str, tuple[tuple[str, ...], str, dict[str, str]]] = {
    # crf 18 keeps the index blocks crisp; "veryfast" keeps writing cheap on 2 cores.
    "h264": (("libx264", "h264"), "yuv420p", {"crf": "18", "preset": "veryfast"}),
    # constant quality (b=0 + crf); realtime deadline, otherwise libvpx-vp9 takes seconds per clip.
    "vp9": (("libvpx-vp9", "vp9"), "yuv420p", {"crf": "20", "b": "0", "deadline": "realtime", "cpu-used": "8"}),
    "mpeg4": (("mpeg4",), "yuv420p", {"qscale": "2"}),
    # lossless RGB H.264 (High 4:4:4): decoded frames equal the written ones (the eval example set)
    "h264_lossless": (("libx264rgb",), "rgb24", {"crf": "0", "preset": "veryslow"}),
}
DEFAULT_SUFFIX = {"h264": ".mp4", "vp9": ".webm", "mpeg4": ".mp4", "h264_lossless": ".mp4"}

MARKER_BLOCK = 8  # marker blocks are 8x8: aligned to the codecs' macroblocks, so they survive compression


def _encoder(codec: str) -> tuple[str, str, dict[str, str]]:
    """The first available encoder for `codec`; H.264 falls back to MPEG-4 Part 2 if no encoder exists."""
    if codec not in _CODECS:
        raise ConfigError(f"unknown codec {codec!r}: choose one of {sorted(_CODECS)}")
    names, pix_fmt, options = _CODECS[codec]
    for name in names:
        if name in av.codecs_available:
            try:
                av.codec.Codec(name, "w")
            except Exception:  # a decoder-only build of the codec
                continue
            return name, pix_fmt, options
    if codec == "h264":
        log.warning("no H.264 encoder in this FFmpeg build; writing MPEG-4 Part 2 instead")
        return _encoder("mpeg4")
    raise ConfigError(f"codec {codec!r} has no encoder in this FFmpeg build")


def _even(frame: np.ndarray) -> np.ndarray:
    """Pad an odd height/width by repeating the last row/column: yuv420p needs even dimensions."""
    h, w = frame.shape[:2]
    if h % 2 or w % 2:
        frame = np.pad(frame, ((0, h % 2), (0, w % 2), (0, 0)), mode="edge")
    return frame


def write_video(
    path: str | Path,
    frames: np.ndarray | Iterable[np.ndarray],
    fps: float,
    codec: str = "h264",
    gop: int | None = None,
    faststart: bool = False,
) -> Path:
    """Encode RGB uint8 frames (`[T, H, W, 3]` array or an iterable of `[H, W, 3]`) to `path`.

    The container follows the path's suffix (.mp4, .webm, .mkv, ...); a path without a suffix gets
    the codec's usual one (h264 -> .mp4, vp9 -> .webm). Odd frame sizes are padded to even ones.
    `gop` is the keyframe interval in frames (the encoder's default when None). `faststart` puts an
    MP4's index before the media data, as files served over HTTP have it. Returns the path.
    """
    if not fps > 0:
        raise ConfigError(f"fps must be > 0, got {fps}")
    encoder, pix_fmt, options = _encoder(codec)
    path = Path(path)
    if not path.suffix:
        path = path.with_suffix(DEFAULT_SUFFIX[codec])
    path.parent.mkdir(parents=True, exist_ok=True)
    rate = Fraction(fps).limit_denominator(100_000)
    opts = dict(options)
    if gop is not None:
        # also pin the minimum interval and disable scene cuts so keyframes land exactly every `gop`
        opts.update({"g": str(gop)} if encoder != "libx264" else {"x264-params": f"keyint={gop}:min-keyint={gop}:scenecut=0"})

    n = 0
    container_options = {"movflags": "faststart"} if faststart else {}
    with av.open(str(path), mode="w", options=container_options) as container:
        stream = None
        for i, image in enumerate(frames):
            image = np.asarray(image)
            if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
                raise InputError(f"frame {i} must be uint8 [H, W, 3], got {image.dtype} {list(image.shape)}")
            image = _even(image)
            if stream is None:
                stream = container.add_stream(encoder, rate=rate, options=opts)
                stream.height, stream.width = image.shape[:2]
                stream.pix_fmt = pix_fmt
                if gop is not None:
                    stream.codec_context.gop_size = gop
            elif image.shape[:2] != (stream.height, stream.width):
                raise InputError(f"frame {i} is {image.shape[1]}x{image.shape[0]}, the video is {stream.width}x{stream.height}")
            frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(image), format="rgb24")
            frame.pts = i
            frame.time_base = 1 / rate
            container.mux(stream.encode(frame))
            n += 1
        if stream is None:
            raise InputError("no frames to write")
        container.mux(stream.encode(None))
    log.debug("wrote %d frames to %s (%s, %s fps)", n, path, encoder, rate)
    return path


def pattern_frames(n: int, width: int = 64, height: int = 48, bits: int = 16) -> Iterator[np.ndarray]:
    """`n` RGB frames `[height, width, 3]`: a moving diagonal gradient under an index marker.

    The marker is the frame index in binary, most significant bit first, as 8x8 black/white blocks
    filling the top rows left to right (`bits` blocks; needs width*ceil(...) room, see read_marker).
    The moving part makes consecutive frames differ, so encoders emit real inter frames.
    """
    per_row = width // MARKER_BLOCK
    rows = -(-bits // per_row)
    if per_row < 1 or rows * MARKER_BLOCK > height:
        raise ValueError(f"{width}x{height} has no room for {bits} marker blocks of {MARKER_BLOCK}px")
    if n >= 2**bits:
        raise ValueError(f"{n} frames need more than {bits} marker bits")
    yy, xx = np.mgrid[0:height, 0:width]
    for i in range(n):
        img = np.empty((height, width, 3), np.uint8)
        img[..., 0] = (xx * 4 + i * 3) % 256
        img[..., 1] = (yy * 4 + i * 5) % 256
        img[..., 2] = ((xx + yy) * 2 + i * 7) % 256
        img[: rows * MARKER_BLOCK] = 0
        for b in range(bits):
            if (i >> (bits - 1 - b)) & 1:
                r, c = divmod(b, per_row)
                img[r * MARKER_BLOCK : (r + 1) * MARKER_BLOCK, c * MARKER_BLOCK : (c + 1) * MARKER_BLOCK] = 255
        yield img


def read_marker(image: np.ndarray, bits: int = 16) -> int:
    """The frame index that `pattern_frames` drew into `image` (`[H, W, 3]` uint8), after decoding."""
    per_row = image.shape[1] // MARKER_BLOCK
    value = 0
    for b in range(bits):
        r, c = divmod(b, per_row)
        # the block's centre only: edges bleed from neighbours under lossy coding
        y, x = r * MARKER_BLOCK + 2, c * MARKER_BLOCK + 2
        bit = image[y : y + MARKER_BLOCK - 4, x : x + MARKER_BLOCK - 4].mean() > 127
        value = (value << 1) | int(bit)
    return value
