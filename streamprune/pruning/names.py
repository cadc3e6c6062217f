"""Method names as the benchmarks take them: 'all', or a checked list."""

from __future__ import annotations

from streamprune.config import CONFIG_DIR, method_config


def checked_method_names(names: list[str]) -> list[str]:
    for name in names:
        method_config(name)  # raises a one-line error for unknown names
    return names


def method_names(names: list[str]) -> list[str]:
    """'all': every registered method and every recipe file of another name (stc); else the names, checked."""
    from streamprune.pruning.registry import available

    if list(names) != ["all"]:
        return checked_method_names(list(names))
    registered = available()
    files = sorted(p.stem for p in (CONFIG_DIR / "methods").glob("*.yaml"))
    return [m for m in registered if m != "none"] + [f for f in files if f not in registered]
