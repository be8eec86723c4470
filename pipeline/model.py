"""The one place a causal LM (and its config) is loaded from disk.

Every command loads through `load_causal_lm` and `load_model_config`, so every way a model
directory can be unusable (no weights, a truncated safetensors file, a `pytorch_model.bin` that
would run code to unpickle, a config that cannot be read, weights of another size than the config,
a state of another size) is refused the same way: one line naming the flag and the path, the
library's reason and the fix (`errors.library_errors`).

Nothing here unpickles with code: transformers loads `.bin` files with `torch.load(weights_only=True)`,
which refuses any global outside its tensor allow-list before anything runs.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from .errors import ConfigError, first_line, library_errors

GIVE_A_MODEL = "give a complete local model directory (config.json and its weights)"


def _looks_local(path: str | Path) -> bool:
    """A name transformers would never find on the Hub: an absolute or dotted path, or one of more
    than two parts (a Hub id is `name` or `owner/name`)."""
    text = str(path)
    return Path(text).is_absolute() or text.startswith(".") or len(Path(text).parts) > 2


def _refuse_missing(path: str | Path, flag: str) -> None:
    if _looks_local(path) and not Path(path).exists():
        raise ConfigError(f"{flag} {path}: does not exist; {GIVE_A_MODEL}")
    if Path(path).is_file():
        raise ConfigError(f"{flag} {path}: is a file, not a model directory; {GIVE_A_MODEL}")


def load_fix(err: BaseException) -> str:
    """The advice for a failed model load, by what the library said."""
    text = str(err)
    if type(err).__name__ == "SafetensorError" or "deserializing header" in text:
        return "a .safetensors weight file is truncated or damaged; copy the model again"
    if "Weights only load failed" in text or "weights_only" in text:
        return ("its pytorch_model.bin holds Python objects beyond tensors and was NOT unpickled (unpickling it "
                "could run code); convert it to safetensors from a copy you trust")
    if "no file named" in text:
        return "it holds no weights (model.safetensors or pytorch_model.bin); copy the model whole"
    if "ignore_mismatched_sizes" in text or "size mismatch" in text:
        return "its weights are of another size than its config.json says; the directory mixes two models"
    if "config" in text.lower():
        return "its config.json cannot be read; copy the model again"
    return GIVE_A_MODEL


@contextmanager
def quiet_loading() -> Iterator[None]:
    """No progress bar and no load report from transformers while a model loads: a failure is the
    one line raised, and a success prints nothing (its report would bury that line otherwise)."""
    from transformers.utils import logging

    bar, verbosity = logging.is_progress_bar_enabled(), logging.get_verbosity()
    logging.disable_progress_bar()
    logging.set_verbosity_error()
    try:
        yield
    finally:
        logging.set_verbosity(verbosity)
        if bar:
            logging.enable_progress_bar()


def load_model_config(path: str | Path, flag: str = "--policy", revision: str | None = None) -> Any:
    """The model's `AutoConfig`, or one line naming `flag`, the path and the fix."""
    from transformers import AutoConfig

    _refuse_missing(path, flag)
    with library_errors("read the model's config", f"{flag} {path}", load_fix):
        return AutoConfig.from_pretrained(path, revision=revision)


def load_causal_lm(path: str | Path, *, dtype: Any, flag: str = "--policy", revision: str | None = None,
                   state: Mapping[str, Any] | None = None, **kwargs: Any) -> Any:
    """`AutoModelForCausalLM.from_pretrained(path, dtype=dtype, revision=revision, **kwargs)`, or
    one line naming `flag` and the path, the library's reason and the fix.

    `state`: weights to load over the model afterwards (a checkpoint's), strictly: every name of
    the model and no other, every shape the model's; anything else is one line (a checkpoint of
    another model, or a policy of another size than the run trained).
    """
    from transformers import AutoModelForCausalLM

    _refuse_missing(path, flag)
    with library_errors("load the model", f"{flag} {path}", load_fix), quiet_loading():
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, revision=revision, **kwargs)
    if state is not None:
        load_state_exactly(model, state, f"{flag} {path}")
    return model


def _names(keys: set[str]) -> str:
    listed = sorted(keys)
    return ", ".join(listed[:3]) + (f" and {len(listed) - 3} more" if len(listed) > 3 else "")


def load_state_exactly(module: Any, state: Mapping[str, Any], where: str,
                       fix: str = "give the model the checkpoint was trained from") -> None:
    """Load `state` into `module`: exactly its names, every shape fitting; else one line
    naming `where`, the first difference and `fix`."""
    expected = set(module.state_dict())
    missing, unexpected = expected - state.keys(), state.keys() - expected
    reasons = ([f"missing {_names(missing)}"] if missing else []) + ([f"unexpected {_names(unexpected)}"] if unexpected else [])
    if not reasons:
        try:
            module.load_state_dict(dict(state), strict=True)
        except RuntimeError as err:  # shapes that differ: torch lists one per line below its heading
            details = [line.strip() for line in str(err).splitlines()[1:] if line.strip()] or [first_line(err)]
            reasons = [details[0][:200] + (f" and {len(details) - 1} more" if len(details) > 1 else "")]
    if reasons:
        raise ConfigError(f"{where}: the weights do not fit this model ({'; '.join(reasons)}); {fix}")
