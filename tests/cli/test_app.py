import dataclasses
import importlib.util
import json

import pytest

from selpipe.pipeline.config import ConfigError, ScoreConfig, TrainConfig, build_config

from ..conftest import REPO, run_cli


@pytest.mark.parametrize("command, cls", [("score-ref", ScoreConfig), ("train", TrainConfig)])
def test_every_setting_is_a_flag_with_its_help(command, cls):
    help_text = run_cli(command, "--help", env={"COLUMNS": "400"}).stdout
    for field in dataclasses.fields(cls):
        if field.metadata["cli"]:
            assert f"--{field.name.replace('_', '-')}" in help_text, field.name
            assert field.metadata["help"][:40] in help_text, field.name


def test_flags_override_the_config_file_which_overrides_defaults(tmp_path):
    cfg = build_config(TrainConfig, {"cache": "c", "policy": "p", "output": "o", "beta": 0.2, "top_k": 0.5}, {"beta": 0.3})
    assert (cfg.beta, cfg.top_k, cfg.learning_rate) == (0.3, 0.5, TrainConfig.learning_rate)
    with pytest.raises(ConfigError, match="unknown setting.*: betta"):
        build_config(TrainConfig, {"cache": "c", "policy": "p", "output": "o", "betta": 0.2}, {})


def test_errors_are_one_line_and_exit_2(tmp_path):
    config = tmp_path / "run.json"
    config.write_text(json.dumps({"cache": "c", "policy": "p", "output": "o", "top_k": 2}))
    result = run_cli("train", "--config", config, check=False)
    assert result.returncode == 2 and result.stderr.strip() == "error: --top-k must be in (0, 1]; got 2.0. Use 1 for plain DPO."
    missing = run_cli("score-ref", "--input", tmp_path / "none.jsonl", "--output", tmp_path / "c", "--model", "m", check=False)
    assert missing.returncode == 2 and "error:" in missing.stderr and "Traceback" not in missing.stderr


def test_configuration_docs_are_generated_from_the_settings():
    spec = importlib.util.spec_from_file_location("generate", REPO / "docs" / "generate.py")
    generate = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(generate)
    assert (REPO / "docs" / "configuration.md").read_text() == generate.render(), "run `make docs`"


def test_shipped_configs_name_their_command_and_hold_only_known_settings():
    for path in sorted((REPO / "configs").glob("*.json")):
        data = json.loads(path.read_text())
        assert next(iter(data)) == "//" and "selpipe" in data["//"], path.name
        if path.name.startswith("demo-"):
            cls = ScoreConfig if "score" in path.name else TrainConfig
            build_config(cls, {k: v for k, v in data.items() if k != "//"}, {})


def test_config_file_types_are_checked():
    with pytest.raises(ConfigError, match="setting 'beta' must be float; got 'high'"):
        build_config(TrainConfig, {"cache": "c", "policy": "p", "output": "o", "beta": "high"}, {})
    assert build_config(TrainConfig, {"cache": "c", "policy": "p", "output": "o", "beta": 1}, {}).beta == 1.0


def test_inspect_prints_the_summary_and_writes_the_selection_page(demo_cache, models, tmp_path):
    result = run_cli("inspect", demo_cache, "--html", tmp_path / "sel.html", "--policy", models["other"], "--samples", "2")
    assert "96 scored of 96 read" in result.stdout and "bytes per completion token" in result.stdout
    page = (tmp_path / "sel.html").read_text()
    assert page.startswith("<!DOCTYPE html>") or page.lower().startswith("<!doctype html>")
    assert "http://" not in page and "https://" not in page
