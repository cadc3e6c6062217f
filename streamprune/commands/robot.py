"""`streamprune robot` (closed-loop episodes through the robot stage graph, in-process or as Ray actors) and `streamprune serve-policy` (the same
policy behind the zmq policy server, or openpi's websocket protocol, for robot clients)."""

from __future__ import annotations

import json
import sys

from streamprune.config import RobotConfig, ServePolicyConfig
from streamprune.config.commands import serve_policy_bind
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
    stages, started_ray = None, False
    if config.ray or config.ray_address:
        from streamprune.runtime.ray_connect import init_ray
        from streamprune.runtime.robot_stages import RayRobotStages

        started_ray = init_ray(config.ray_address, include_dashboard=False, log_to_driver=False)
        stages = RayRobotStages(config.model, config.placement, config.env, recipe, config.num_envs, config.seed,
                                config.threads)
    try:
        result = run_episodes(policy, config.env, recipe, config.episodes, config.seed, video_out,
                              progress=sys.stderr.isatty(), num_envs=config.num_envs, stages=stages,
                              target_latency_ms=config.target_latency_ms)
    finally:
        if stages is not None:
            stages.close()
        if started_ray:
            import ray

            ray.shutdown()
    if config.json:
        print(json.dumps(result))
    else:
        print(format_result(result))
    return 0


def format_result(result: dict) -> str:
    """The human-readable summary `streamprune robot` prints."""
    stages = result["stage_ms"]
    line = (f"{result['method']} retain={result['retain']}: success {result['success_rate']:.0%} over "
            f"{result['episodes']} episodes ({result['num_envs']} envs), mean length "
            f"{result['mean_episode_length']:.1f}, step latency median {result['latency_ms_median']:.1f} ms / p95 "
            f"{result['latency_ms_p95']:.1f} ms, {result['control_steps_per_s']:.1f} control steps/s, visual "
            f"tokens kept {result['visual_tokens_kept']:.0f}/{result['visual_tokens_in']:.0f}; stage p50/p99 ms: "
            + ", ".join(f"{name} {v['p50']:.1f}/{v['p99']:.1f}" for name, v in stages.items()))
    if result["cacher_hit_rate"] is not None:
        line += (f"; STC-Cacher hit rate {result['cacher_hit_rate']:.0%}, vision FLOPs saved "
                 f"{result['vision_flops_saved_share']:.0%}")
    if "target_latency_ms" in result:
        line += (f"; target {result['target_latency_ms']:.0f} ms: retain chosen mean "
                 f"{result['retain_chosen_mean']:.3f}, last {result['retain_chosen_last']:.3f}")
    return line


def run_serve(config: ServePolicyConfig) -> int:
    """The policy behind the zmq server (ours) or the openpi websocket server, until Ctrl-C."""
    bind = serve_policy_bind(config)
    if config.protocol == "openpi":
        from streamprune.transport.openpi_server import check_bind

        check_bind(bind, config.allow_remote)  # a bad address fails before the model loads
    recipe = build_recipe(config.method, retain=config.retain)
    policy = load_policy(config.model, config.placement)
    size = policy_image_size(policy)
    if config.protocol == "openpi":
        from streamprune.transport.openpi_server import OpenPIServer, policy_metadata

        metadata = policy_metadata(policy, recipe, (size, size, 3), name=config.model)
        server = OpenPIServer(policy, recipe, bind, (size, size, 3), allow_remote=config.allow_remote,
                              metadata=metadata)
        stop = server.shutdown
    else:
        from streamprune.transport.policy_server import PolicyServer

        server = PolicyServer(policy, recipe, bind, (size, size, 3), allow_remote=config.allow_remote)
        stop = server.stop.set
    print(f"serving {config.method} policy ({config.protocol}) on {server.endpoint} (images {size}x{size}x3 uint8); "
          "Ctrl-C stops", file=sys.stderr)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        stop()
    print(f"answered {server.stats.answered}, errors {server.stats.errors} ({server.stats.malformed} malformed "
          "requests)", file=sys.stderr)
    return 0
