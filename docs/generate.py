"""Regenerate docs/configuration.md from the settings dataclasses (`make docs`).

The dataclasses in selpipe.pipeline.config are the one source of truth, for each command of
selpipe.cli.app.COMMANDS; a test checks that the committed page matches what this script would write.
"""

from pathlib import Path

from selpipe.cli.app import COMMANDS
from selpipe.pipeline.config import settings_table

PAGE = Path(__file__).resolve().parent / "configuration.md"


def render() -> str:
    sections = "\n".join(f"## `selpipe {name}`\n\n{settings_table(command.settings)}\n"
                         for name, command in COMMANDS.items())
    return f"""# Configuration

Generated from `pipeline/config.py` by `make docs`; do not edit by hand.

Every setting is a flag (`--max-length 2048`; a list as `--adam-betas 0.9,0.95`) and a key of a
JSON or YAML config file passed with `--config FILE` (`{{"max_length": 2048}}`, or `max_length:
2048` in a `.yaml`/`.yml` file); flags override the file, the file overrides the defaults. Every
command also takes `--json`: stdout then holds only its summary, one JSON object, and everything
else goes to stderr. Each run saves the resolved settings next to its output
(`config-worker-N.json` in a cache, `config.json` in a training run). A value outside what the
"allowed" column says (every number must also be finite) is refused before anything loads, with
one line naming the flag; a key given twice in a config file is refused too.

`selpipe train`'s settings come in groups, each checked as a whole (in Python
`TrainConfig.loss.top_k`, `cfg.schedule.learning_rate`, ...); flags, config keys and the saved
`config.json` stay flat.

{sections}"""


if __name__ == "__main__":
    PAGE.write_text(render())
    print(f"wrote {PAGE}")
