"""`streamprune robot` (closed-loop episodes in-process) and `streamprune serve-policy` (the same
policy behind the zmq policy server for robot clients)."""

from __future__ import annotations

import json
import sys

from streamprune.config import RobotConfig, ServePolicyConfig
from streamprune.outputs import output_folder
from streamprune.pruning.recipe import build_recipe
from streamprune.runtime.robot import load_policy, policy_image_size, run_episodes


def run(config: RobotConfig) -> int:
    from envs import known_env_ids, make_env

    if config.env not in known_env_ids():
        make_env(config.env)  # raises the one-line ConfigError listing known ids
    recipe = build_recipe(config.method, retain=config.retain)
    video_out = output_folder(config.video_out, "--video-out") if config.video_out else None
    policy = load_policy(config.model, config.placement)
    result = run_episodes(policy, config.env, recipe, config.episodes, config.seed, video_out,
                          progress=sys.stderr.isatty())
    if config.json:
        print(json.dumps(result))
    else:
        print(f"{result['method']} retain={result['retain']}: success {result['success_rate']:.0%} over "
              f"{config.episodes} episodes, mean length {result['mean_episode_length']:.1f}, latency median "
              f"{result['latency_ms_median']:.1f} ms / p95 {result['latency_ms_p95']:.1f} ms, "
              f"{result['control_steps_per_s']:.1f} control steps/s, visual tokens kept "
              f"{result['visual_tokens_kept']:.0f}/{result['visual_tokens_in']:.0f}")
    return 0


def run_serve(config: ServePolicyConfig) -> int:
    from streamprune.transport.policy_server import PolicyServer

    recipe = build_recipe(config.method, retain=config.retain)
    policy = load_policy(config.model, config.placement)
    size = policy_image_size(policy)
    server = PolicyServer(policy, recipe, config.bind, (size, size, 3), allow_remote=config.allow_remote)
    print(f"serving {config.method} policy on {server.endpoint} (images {size}x{size}x3 uint8); Ctrl-C stops",
          file=sys.stderr)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    print(f"answered {server.stats.answered}, errors {server.stats.errors} ({server.stats.malformed} malformed "
          "requests)", file=sys.stderr)
    return 0
