import importlib.util
import json
import subprocess
import sys

import pytest

from selpipe.pipeline.config import (
    ConfigError, ScheduleConfig, ScoreConfig, TrainConfig, VerifyConfig, build_config, load_config_file,
    setting_fields,
)

from ..conftest import REPO, run_cli


@pytest.mark.parametrize("command, cls", [("score-ref", ScoreConfig), ("train", TrainConfig), ("verify", VerifyConfig)])
def test_every_setting_is_a_flag_with_its_help_and_default(command, cls):
    help_text = " ".join(run_cli(command, "--help", env={"COLUMNS": "1000"}).stdout.split())
    for _, field, _ in setting_fields(cls):
        flag = field.name.upper() if field.metadata["argument"] else f"--{field.name.replace('_', '-')}"
        assert flag in help_text, field.name
        assert " ".join(field.metadata["help"].split())[:40] in help_text, field.name
    assert "--json" in help_text and "--config" in help_text
    if command == "score-ref":
        assert "Most tokens in prompt + one completion. [default: 1024]" in help_text
        assert "or `vllm`. One of: hf, vllm. [default: hf]" in help_text
        assert "Show a progress bar. [default: --progress]" in help_text
        assert "(created if missing; a rerun resumes it). [required]" in help_text
        assert "INT|auto" in help_text
    if command == "verify":
        assert "Usage: selpipe verify [OPTIONS] [CACHE]" in help_text and "Score cache directory. [required]" in help_text
    if command == "train":
        assert "AdamW betas (beta1,beta2). Comma-separated. [default: 0.9,0.999]" in help_text
        assert "DPO temperature beta" in help_text and "[default: 0.01]" in help_text


def test_required_settings_are_found_by_asking_the_class():
    from selpipe.cli.options import required_settings

    assert required_settings(ScoreConfig) == {"input", "output", "model"}
    assert required_settings(TrainConfig) == {"cache", "policy", "output"}
    assert required_settings(VerifyConfig) == {"cache", "model"}


def test_list_and_number_or_word_settings_parse_as_flags():
    """`--adam-betas 0.9,0.95` is [0.9, 0.95]; `--num-workers auto` stays a word, `--num-workers 4` a number."""
    from typer.testing import CliRunner

    import typer

    from selpipe.cli.options import Report, config_command

    seen = []
    app = typer.Typer()
    app.command("train")(config_command(TrainConfig, lambda cfg: seen.append(cfg) or Report({})))
    app.command("score")(config_command(ScoreConfig, lambda cfg: seen.append(cfg) or Report({})))
    runner = CliRunner()
    result = runner.invoke(app, ["train", "--cache", "c", "--policy", "p", "--output", "o", "--adam-betas", "0.9,0.95"])
    assert result.exit_code == 0, result.output
    assert seen[-1].schedule.adam_betas == [0.9, 0.95]
    assert runner.invoke(app, ["train", "--cache", "c", "--policy", "p", "--output", "o", "--adam-betas", "0.9,x"]).exit_code == 2
    for value, expected in (("auto", "auto"), ("4", 4)):
        assert runner.invoke(app, ["score", "--input", "i", "--output", "o", "--model", "m", "--num-workers", value]).exit_code == 0
        assert seen[-1].num_workers == expected


def test_flags_override_the_config_file_which_overrides_defaults(tmp_path):
    cfg = build_config(TrainConfig, {"cache": "c", "policy": "p", "output": "o", "beta": 0.2, "top_k": 0.5}, {"beta": 0.3})
    assert (cfg.loss.beta, cfg.loss.top_k, cfg.schedule.learning_rate) == (0.3, 0.5, ScheduleConfig.learning_rate)
    with pytest.raises(ConfigError, match="unknown setting.*: betta"):
        build_config(TrainConfig, {"cache": "c", "policy": "p", "output": "o", "betta": 0.2}, {})


def test_errors_are_one_line_and_exit_2(tmp_path):
    config = tmp_path / "run.json"
    config.write_text(json.dumps({"cache": "c", "policy": "p", "output": "o", "top_k": 2}))
    result = run_cli("train", "--config", config, check=False)
    assert result.returncode == 2 and result.stderr.strip() == "error: --top-k must be in (0, 1]; got 2.0"
    missing = run_cli("score-ref", "--input", tmp_path / "none.jsonl", "--output", tmp_path / "c", "--model", "m", check=False)
    assert missing.returncode == 2 and "error:" in missing.stderr and "Traceback" not in missing.stderr


@pytest.mark.parametrize("args, line", [
    (("train", "--cache", "c", "--policy", "p", "--output", "o", "--gradient-clipping", "-1"),
     "error: --gradient-clipping must be at least 0; got -1.0"),
    (("train", "--cache", "c", "--policy", "p", "--output", "o", "--learning-rate", "nan"),
     "error: --learning-rate must be a finite number; got nan"),
    (("score-ref", "--input", "i", "--output", "o", "--model", "m", "--gpu-memory-utilization", "inf"),
     "error: --gpu-memory-utilization must be a finite number; got inf"),
])
def test_one_bad_number_is_one_line_and_exit_2_before_anything_loads(args, line, tmp_path):
    """The paths do not exist: the settings are refused before any of them is looked at."""
    result = run_cli(*args, check=False)
    assert (result.returncode, result.stderr.strip(), result.stdout) == (2, line, "")


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
    with pytest.raises(ConfigError, match="--beta must be a number; got 'high'"):
        build_config(TrainConfig, {"cache": "c", "policy": "p", "output": "o", "beta": "high"}, {})
    assert build_config(TrainConfig, {"cache": "c", "policy": "p", "output": "o", "beta": 1}, {}).loss.beta == 1.0


def test_inspect_prints_the_summary_and_writes_the_selection_page(demo_cache, models, tmp_path):
    result = run_cli("inspect", demo_cache, "--html", tmp_path / "sel.html", "--policy", models["other"], "--samples", "2")
    assert "96 scored of 96 read" in result.stdout and "bytes per completion token" in result.stdout
    page = (tmp_path / "sel.html").read_text()
    assert page.startswith("<!DOCTYPE html>") or page.lower().startswith("<!doctype html>")
    assert "http://" not in page and "https://" not in page


def test_yaml_config_files_with_flags_over_them(tmp_path):
    """YAML reads `5e-7` as a number (PyYAML alone would give the string '5e-7')."""
    path = tmp_path / "run.yaml"
    path.write_text("# stage two\ncache: c\npolicy: p\noutput: o\nlearning-rate: 5e-7\nadam_betas: [0.9, 0.95]\nbeta: 0.2\n")
    cfg = build_config(TrainConfig, load_config_file(path), {"beta": 0.3})
    assert (cfg.schedule.learning_rate, cfg.schedule.adam_betas, cfg.loss.beta) == (5e-7, [0.9, 0.95], 0.3)
    (tmp_path / "bad.yml").write_text("beta: [1,\n")
    with pytest.raises(ConfigError, match=r"config file .*bad\.yml is not valid YAML"):
        load_config_file(tmp_path / "bad.yml")
    (tmp_path / "list.yaml").write_text("- 1\n")
    with pytest.raises(ConfigError, match="must hold a YAML mapping of settings"):
        load_config_file(tmp_path / "list.yaml")


NOISY = """
import os, subprocess, sys
import typer
from selpipe.cli.options import Report, config_command
from selpipe.pipeline.config import TrainConfig

def noisy(cfg):
    print("a notice from a library")
    os.write(1, b"a line from C\\n")
    subprocess.run(["echo", "a child process"], check=True)
    return Report({"beta": cfg.loss.beta})

app = typer.Typer()
app.command("train")(config_command(TrainConfig, noisy))
app.command("other")(lambda: None)
app()
"""


def test_json_mode_keeps_stdout_for_the_summary_whatever_the_command_prints():
    """The mechanism every command uses (train included): fd 1 goes to stderr while the stage runs."""
    result = subprocess.run([sys.executable, "-c", NOISY, "train", "--cache", "c", "--policy", "p", "--output", "o",
                             "--beta", "0.2", "--json"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout) == {"beta": 0.2}
    assert "a notice from a library" in result.stderr and "a line from C" in result.stderr and "a child process" in result.stderr


def test_score_ref_and_inspect_json_are_one_object_on_stdout(tmp_path, models, demo_rows):
    from ..conftest import score, write_jsonl

    rows = write_jsonl(tmp_path / "in.jsonl", demo_rows[:6])
    result = score(rows, tmp_path / "c", models["reference"], "--json", "--progress")
    summary = json.loads(result.stdout)
    assert summary["complete"] and summary["rows"] == 6 and summary["cache"] == str(tmp_path / "c")
    assert "score-ref worker 0" in result.stderr  # the progress bar, on stderr
    report = json.loads(run_cli("inspect", tmp_path / "c", "--json", "--html", tmp_path / "page.html").stdout)
    assert report["totals"]["rows"] == 6 and report["html"] == str(tmp_path / "page.html")


EXIT_CODE = """
import sys
from selpipe.cli import app as cli
from selpipe.pipeline.errors import SelpipeError

class Stopped(SelpipeError):
    exit_code = 75

@cli.app.command("boom")
def boom(which: str) -> None:
    if which == "failed":
        raise cli.typer.Exit(1)  # what a command's Report(failure=...) ends with
    if which != "done":
        raise Stopped("stopped by a signal") if which == "stopped" else SelpipeError("bad input")

cli.main()
"""


@pytest.mark.parametrize("args, status, line", [
    (("boom", "stopped"), 75, "error: stopped by a signal"),
    (("boom", "bad"), 2, "error: bad input"),
    (("boom", "failed"), 1, ""),
    (("boom", "done"), 0, ""),
    (("train", "--cache", "c", "--policy", "p", "--output", "o", "--beta", "x"), 2,
     "error: Invalid value for '--beta': Input should be a valid number, unable to parse string as a number "
     "(see `selpipe train --help`)"),
    (("train", "--bta", "1"), 2, "error: No such option: --bta (Possible options: --beta) (see `selpipe train --help`)"),
])
def test_an_error_may_name_its_exit_status_else_2(args, status, line):
    """A preempted run exits 75 (rerun with --resume); every other user-fixable error exits 2, a
    flag typer cannot parse included; one line each, never a traceback."""
    result = subprocess.run([sys.executable, "-c", EXIT_CODE, *args], capture_output=True, text=True, timeout=120)
    assert (result.returncode, result.stderr.strip()) == (status, line)
