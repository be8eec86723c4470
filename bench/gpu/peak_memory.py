"""Run a module as `__main__` in this process and record its peak memory when it exits.

    python bench/gpu/peak_memory.py OUT.json MODULE [ARGS...]

bench/peak_rss.py for a module (`selpipe.cli.app train ...`), with the GPU's side added: OUT.json
gets {"peak_allocated_mib": torch.cuda.max_memory_allocated() (null where CUDA was never used),
"peak_rss_mib": ...}, however the module exits.
"""

from __future__ import annotations

import atexit
import json
import runpy
import sys
from pathlib import Path

sys.path.append(str(Path(__file__).resolve().parent.parent))  # bench/, after site-packages: its script names shadow nothing

from peak_rss import peak_rss_mib  # noqa: E402  (bench/peak_rss.py)


def _write_peak(path: Path) -> None:
    torch = sys.modules.get("torch")
    gpu = torch is not None and torch.cuda.is_initialized()
    path.write_text(json.dumps({"peak_allocated_mib": torch.cuda.max_memory_allocated() / 2**20 if gpu else None,
                                "peak_rss_mib": peak_rss_mib()}) + "\n")


def main() -> None:
    if len(sys.argv) < 3:
        sys.exit("usage: python bench/gpu/peak_memory.py OUT.json MODULE [ARGS...]")
    out, module = Path(sys.argv[1]), sys.argv[2]
    atexit.register(_write_peak, out)
    sys.argv = [module, *sys.argv[3:]]
    runpy.run_module(module, run_name="__main__", alter_sys=True)


if __name__ == "__main__":
    main()
