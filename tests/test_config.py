"""Configs load from YAML into dataclasses; bad keys and names are one-line errors."""

from __future__ import annotations

import pytest

from streamprune.config import (CONFIG_DIR, AskConfig, MethodConfig, from_dict, load_command_defaults,
                                method_config, resolve_model)
from streamprune.errors import ConfigError
from streamprune.pruning.recipe import build_recipe


def test_ask_defaults_come_from_the_yaml_file():
    cfg = load_command_defaults(AskConfig, "ask")
    assert (CONFIG_DIR / "pipelines" / "ask.yaml").is_file()
    assert cfg.fps == 1.0 and cfg.max_frames == 16 and cfg.method == "none"


def test_unknown_key_is_a_config_error():
    with pytest.raises(ConfigError, match="unknown key"):
        from_dict(AskConfig, {"decode": {"fps": 1.0, "frames": 3}})


def test_every_method_file_builds_a_pipeline():
    for path in sorted((CONFIG_DIR / "methods").glob("*.yaml")):
        cfg = method_config(path.stem)
        assert isinstance(cfg, MethodConfig) and cfg.stages
        recipe = build_recipe(path.stem)
        assert recipe.budget.retain == cfg.retain


def test_flag_budget_overrides_the_method_file():
    assert build_recipe("fastvid", retain=0.5).budget.retain == 0.5
    assert build_recipe("fastvid").budget.retain == method_config("fastvid").retain


def test_model_names_resolve_to_repository_paths(tmp_path):
    assert resolve_model(None).path is None and resolve_model(None).embedded == "videoqa"
    assert resolve_model(str(tmp_path)).path == str(tmp_path)
    assert resolve_model("default_vla").embedded == "vla"
    from streamprune.models import resolve_model_dir

    assert resolve_model_dir("default_vla")[0] == CONFIG_DIR.parent / "streamprune/assets/default_vla"
    assert resolve_model_dir(None)[0] == CONFIG_DIR.parent / "streamprune/assets/default_videoqa"
