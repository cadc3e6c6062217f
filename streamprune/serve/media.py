"""The frames of one request: a `video_url` (http(s), `file://` under the allowed directory, or a
`data:` URL) decoded with PyAV at the request's fps and frame cap, or `image_url` parts taken in order
as the frames of one video. Every failure is an ApiError 400 that names the part."""

from __future__ import annotations

import base64
import binascii
import io
import tempfile
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

import numpy as np

from streamprune.errors import StreampruneError
from streamprune.serve.protocol import ApiError, MediaPart

FETCH_TIMEOUT_S = 30.0


def local_path(path: str, allowed: Path | None, what: str) -> Path:
    """`path` resolved, when it lies under the `allowed` directory (symlinks followed)."""
    if allowed is None:
        raise ApiError(400, f"{what} names a local file; start the server with --allowed-local-media-path DIR "
                            "to allow files under DIR")
    resolved = Path(path).expanduser().resolve()
    if not resolved.is_relative_to(allowed):
        raise ApiError(400, f"{what} {path!r} is not under the allowed media directory")
    if not resolved.is_file():
        raise ApiError(400, f"{what} {path!r} is not a file")
    return resolved


def media_bytes(url: str, what: str, max_bytes: int, allowed: Path | None) -> bytes | Path:
    """The bytes behind `url`, or the local path of a file:// URL (decoded in place)."""
    scheme = urllib.parse.urlsplit(url).scheme.lower()
    if scheme == "data":
        head, sep, payload = url.partition(",")
        if not sep or not head.endswith(";base64"):
            raise ApiError(400, f"{what}: a data URL must be base64 (data:TYPE;base64,...)")
        if len(payload) * 3 // 4 > max_bytes:
            raise ApiError(400, f"{what} is larger than the server's --max-media-mb")
        try:
            return base64.b64decode(payload, validate=True)
        except (binascii.Error, ValueError):
            raise ApiError(400, f"{what}: the data URL is not valid base64") from None
    if scheme == "file":
        return local_path(urllib.parse.unquote(urllib.parse.urlsplit(url).path), allowed, what)
    if scheme in ("http", "https"):
        try:
            with urllib.request.urlopen(url, timeout=FETCH_TIMEOUT_S) as response:
                data = response.read(max_bytes + 1)
        except urllib.error.HTTPError as err:
            raise ApiError(400, f"{what}: fetching {url} gave HTTP {err.code}") from None
        except (urllib.error.URLError, OSError, ValueError) as err:
            raise ApiError(400, f"{what}: cannot fetch {url}: {getattr(err, 'reason', err)}") from None
        if len(data) > max_bytes:
            raise ApiError(400, f"{what} is larger than the server's --max-media-mb")
        return data
    raise ApiError(400, f"{what}: unsupported URL scheme {scheme or '(none)'!r}; use http(s), file:// or data:")


def video_frames(part: MediaPart, fps: float, num_frames: int, max_bytes: int, allowed: Path | None
                 ) -> np.ndarray:
    """`[T, H, W, 3]` uint8 frames of a video_url part, sampled as `streamprune ask` samples."""
    from streamprune.decode import decode_frames

    source = media_bytes(part.url, "video_url", max_bytes, allowed)
    try:
        if isinstance(source, Path):
            frames = decode_frames(source, fps=fps, max_frames=num_frames)
        else:
            with tempfile.NamedTemporaryFile(suffix=".video") as tmp:
                tmp.write(source)
                tmp.flush()
                frames = decode_frames(tmp.name, fps=fps, max_frames=num_frames)
    except StreampruneError as err:
        raise ApiError(400, f"video_url: {err}") from None
    if not frames:
        raise ApiError(400, "video_url: no frames could be decoded")
    return np.stack([f.image for f in frames])


def image_frames(parts: list[MediaPart], num_frames: int, max_bytes: int, allowed: Path | None) -> np.ndarray:
    """`[T, H, W, 3]` uint8 from image_url parts in order (evenly thinned to `num_frames`)."""
    from PIL import Image, UnidentifiedImageError

    images = []
    for i, part in enumerate(parts):
        what = f"image_url {i}"
        source = media_bytes(part.url, what, max_bytes, allowed)
        try:
            with Image.open(source if isinstance(source, Path) else io.BytesIO(source)) as image:
                images.append(np.asarray(image.convert("RGB")))
        except (UnidentifiedImageError, OSError, ValueError):
            raise ApiError(400, f"{what} is not an image PIL can read") from None
        if images[-1].shape != images[0].shape:
            raise ApiError(400, f"{what} is {images[-1].shape[1]}x{images[-1].shape[0]}, the first frame "
                                f"{images[0].shape[1]}x{images[0].shape[0]}: the frames of a video share one size")
    if len(images) > num_frames:
        keep = np.linspace(0, len(images) - 1, num_frames).round().astype(int)
        images = [images[k] for k in keep]
    return np.stack(images)


def request_frames(media: list[MediaPart], fps: float, num_frames: int, max_bytes: int,
                   allowed: Path | None) -> np.ndarray:
    """The one video a request carries: a single video_url, or only image_url parts."""
    videos = [m for m in media if m.kind == "video_url"]
    if videos and len(media) > 1:
        raise ApiError(400, "send one video_url, or image_url parts as the frames of one video, not both")
    if videos:
        return video_frames(videos[0], fps, num_frames, max_bytes, allowed)
    return image_frames(media, num_frames, max_bytes, allowed)
