"""Regenerate docs/configuration.md from the settings dataclasses (`make docs`).

The dataclasses in selpipe.pipeline.config are the one source of truth; a test checks that the
committed page matches what this script would write.
"""

from pathlib import Path

from selpipe.pipeline.config import ExportConfig, InspectConfig, ScoreConfig, TrainConfig, VerifyConfig, settings_table

PAGE = Path(__file__).resolve().parent / "configuration.md"


def render() -> str:
    return f"""# Configuration

Generated from `pipeline/config.py` by `make docs`; do not edit by hand.

Every setting is a flag (`--max-length 2048`; a list as `--adam-betas 0.9,0.95`) and a key of a
JSON or YAML config file passed with `--config FILE` (`{{"max_length": 2048}}`, or `max_length:
2048` in a `.yaml`/`.yml` file); flags override the file, the file overrides the defaults. Every
command also takes `--json`: stdout then holds only its summary, one JSON object, and everything
else goes to stderr. Each run saves the resolved settings next to its output
(`config-worker-N.json` in a cache, `config.json` in a training run).

## `selpipe score-ref`

{settings_table(ScoreConfig)}

## `selpipe train`

{settings_table(TrainConfig)}

## `selpipe export`

{settings_table(ExportConfig)}

## `selpipe inspect`

{settings_table(InspectConfig)}

## `selpipe verify`

{settings_table(VerifyConfig)}
"""


if __name__ == "__main__":
    PAGE.write_text(render())
    print(f"wrote {PAGE}")
