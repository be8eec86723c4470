"""The house's layout rules (issue 16, "Must show"), checked on the source itself with `ast`:

- pipeline/ (the core) imports nothing from stages/ or cli/;
- a stage-one module (stages/*.py) imports nothing from stage two (stages/train/) and the reverse;
- exactly one file of the package calls `<Something>ForCausalLM.from_pretrained` (pipeline/model.py's
  loader; bench/ and data/ are outside the package: the peers in bench/ load models their own way on purpose);
- no function in pipeline/, stages/ or cli/ is over 60 lines.

Each rule fails on a planted violation (the `_violations_*` helpers are tested on a snippet), so
the checks are not vacuous.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
MAX_FUNCTION_LINES = 60


def _sources(*folders: str) -> list[Path]:
    return sorted(p for folder in folders for p in (ROOT / folder).rglob("*.py"))


def _layer(path: Path) -> str:
    """'pipeline', 'cli', 'stage1' (stages/*.py) or 'stage2' (stages/train/)."""
    parts = path.relative_to(ROOT).parts
    if parts[0] == "stages":
        return "stage2" if len(parts) > 2 and parts[1] == "train" else "stage1"
    return parts[0]


def _imported_layers(tree: ast.AST, path: Path) -> set[str]:
    """The layers a module imports from, by absolute (`selpipe.stages.train...`, `stages...`)
    or relative (`from ..train import x`, `from .cache import x`) import."""
    package = list(path.relative_to(ROOT).parts[:-1])
    found: set[str] = set()
    for node in ast.walk(tree):
        names: list[list[str]] = []
        if isinstance(node, ast.Import):
            names = [alias.name.split(".") for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            module = (node.module or "").split(".") if node.module else []
            if node.level:
                base = package[: len(package) - (node.level - 1)] if node.level > 1 else package
                stems = [base + module] if module else [base + [alias.name] for alias in node.names]
                names = stems
            else:
                names = [module + [alias.name] for alias in node.names]
        for parts in names:
            if parts and parts[0] == "selpipe":
                parts = parts[1:]
            if not parts:
                continue
            if parts[0] == "stages":
                found.add("stage2" if len(parts) > 1 and parts[1] == "train" else "stage1")
            elif parts[0] in ("pipeline", "cli"):
                found.add(parts[0])
    return found


FORBIDDEN = {"pipeline": {"stage1", "stage2", "cli"}, "stage1": {"stage2", "cli"}, "stage2": {"stage1", "cli"}}


def _import_violations(path: Path, source: str) -> list[str]:
    layer = _layer(path)
    bad = _imported_layers(ast.parse(source), path) & FORBIDDEN.get(layer, set())
    # stages/__init__.py is the package itself, not a stage-one module importing stage two.
    if path.relative_to(ROOT).parts[-1] == "__init__.py" and layer == "stage1":
        bad.discard("stage2")
    return [f"{path.relative_to(ROOT)} ({layer}) imports {sorted(bad)}"] if bad else []


def _calls_causal_lm_from_pretrained(source: str) -> bool:
    for node in ast.walk(ast.parse(source)):
        if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
                and node.func.attr == "from_pretrained"):
            owner = node.func.value
            name = owner.id if isinstance(owner, ast.Name) else getattr(owner, "attr", "")
            if name.endswith("ForCausalLM"):
                return True
    return False


def _long_functions(path: Path, source: str) -> list[str]:
    return [f"{path.relative_to(ROOT)}:{node.lineno} {node.name} is {node.end_lineno - node.lineno + 1} lines"
            for node in ast.walk(ast.parse(source))
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))
            and node.end_lineno - node.lineno + 1 > MAX_FUNCTION_LINES]


def test_no_layer_imports_one_it_must_not():
    violations = [v for p in _sources("pipeline", "stages", "cli") for v in _import_violations(p, p.read_text())]
    assert violations == []


def test_exactly_one_file_loads_a_causal_lm_and_it_is_the_model_module():
    callers = [p.relative_to(ROOT).as_posix() for p in _sources("pipeline", "stages", "cli")
               if _calls_causal_lm_from_pretrained(p.read_text())]
    assert callers == ["pipeline/model.py"]


def test_no_function_in_pipeline_stages_or_cli_is_over_60_lines():
    violations = [v for p in _sources("pipeline", "stages", "cli") for v in _long_functions(p, p.read_text())]
    assert violations == []


@pytest.mark.parametrize("where, source, expected", [
    ("pipeline/x.py", "from ..stages.train import run\n", ["stage2"]),
    ("pipeline/x.py", "from selpipe.cli import app\n", ["cli"]),
    ("stages/x.py", "from .train.export import merge_adapter\n", ["stage2"]),
    ("stages/x.py", "from . import train\n", ["stage2"]),
    ("stages/train/x.py", "from ..verify import run_verify\n", ["stage1"]),
    ("stages/train/x.py", "import selpipe.stages.backends\n", ["stage1"]),
    ("stages/train/x.py", "from ...pipeline.cache import open_cache\nfrom .loop import fit\n", []),
])
def test_the_import_rule_catches_a_planted_violation(where, source, expected):
    found = _import_violations(ROOT / where, source)
    assert [sorted(FORBIDDEN[_layer(ROOT / where)] & _imported_layers(ast.parse(source), ROOT / where))] == (
        [expected] if expected else [[]])
    assert bool(found) == bool(expected)


def test_the_loader_and_length_rules_catch_a_planted_violation():
    assert _calls_causal_lm_from_pretrained("m = Qwen2ForCausalLM.from_pretrained(p)\n")
    assert _calls_causal_lm_from_pretrained("m = transformers.AutoModelForCausalLM.from_pretrained(p)\n")
    assert not _calls_causal_lm_from_pretrained("t = AutoTokenizer.from_pretrained(p)\n")
    long_body = "def f():\n" + "    x = 1\n" * MAX_FUNCTION_LINES
    assert _long_functions(ROOT / "pipeline/x.py", long_body) == ["pipeline/x.py:1 f is 61 lines"]
    assert _long_functions(ROOT / "pipeline/x.py", "def f():\n" + "    x = 1\n" * (MAX_FUNCTION_LINES - 1)) == []
