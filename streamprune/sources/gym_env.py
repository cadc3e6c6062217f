"""A gymnasium env's camera as a live stream (`gym:ENV_ID`): the env is driven by its scripted
expert, episode after episode, and each observation's image is one frame at the env's
`render_fps`. This is how a robot camera feeds the question-answering graph; the closed loop, where
a VLA's actions drive the env, is the robot graph (runtime/robot_stages.py)."""

from __future__ import annotations

from collections.abc import Iterator

from streamprune.sources.base import FrameSource, Pacer
from streamprune.types import Frame

DEFAULT_ENV_FPS = 10.0


class GymEnvSource(FrameSource):
    """Frames of `env_id` under its scripted expert; `seed` seeds the first episode, the next ones
    count up from it. `max_episodes` None = endless."""

    def __init__(self, env_id: str, seed: int = 0, realtime: bool = True, max_episodes: int | None = None) -> None:
        from envs import make_env

        super().__init__()
        self.env = make_env(env_id)  # a ConfigError listing the known ids for an unknown one
        self.fps = float(self.env.metadata.get("render_fps") or DEFAULT_ENV_FPS)
        self.seed, self.realtime, self.max_episodes = seed, realtime, max_episodes

    def _frames(self) -> Iterator[Frame]:
        from envs import expert_action

        pacer = Pacer(self._stop) if self.realtime else None
        index, episode = 0, 0
        try:
            while self.max_episodes is None or episode < self.max_episodes:
                obs, _ = self.env.reset(seed=self.seed + episode)
                done = False
                while not done:
                    ts = index / self.fps
                    if pacer is not None and not pacer.wait(ts):
                        return
                    yield Frame(image=obs["image"], timestamp=ts, index=index)
                    index += 1
                    obs, _, terminated, truncated, _ = self.env.step(expert_action(self.env))
                    done = terminated or truncated
                episode += 1
        finally:
            self.env.close()
