"""`streamprune methods`: every registered method and every configs/methods recipe, one line each."""

from __future__ import annotations

from streamprune.config import CONFIG_DIR, MethodsConfig, method_config


def run(config: MethodsConfig) -> int:
    from streamprune.pruning.registry import available, describe

    print("registered methods:")
    for name in available():
        print(f"  {describe(name)}")
    files = sorted((CONFIG_DIR / "methods").glob("*.yaml"))
    if files:
        print("recipes (configs/methods):")
        for path in files:
            cfg = method_config(path.stem)
            stages = " -> ".join(s.method for s in cfg.stages)
            print(f"  {path.stem}: {cfg.description or stages} [stages: {stages}; retain={cfg.retain}]")
    return 0
