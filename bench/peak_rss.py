"""Run a Python script in this process and record its peak resident memory when it exits.

    python bench/peak_rss.py OUT.json SCRIPT [ARGS...]

Used to measure a console script (`.venv/bin/selpipe train ...`) or a benchmark worker without
changing it. The peak is the kernel's high-water mark of this process's resident memory
(`VmHWM`, model loads included), written to OUT.json as {"peak_rss_mib": ...} however the
script exits. Not `getrusage().ru_maxrss`: Linux carries that across fork and exec, so a child
of a large parent would report the parent's size.
"""

from __future__ import annotations

import atexit
import json
import runpy
import sys
from pathlib import Path


def peak_rss_mib() -> float:
    """This process's resident-memory high-water mark since it started (Linux /proc)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024  # kB
    raise RuntimeError("no VmHWM in /proc/self/status (peak memory is measured on Linux only)")


def _write_peak(path: Path) -> None:
    path.write_text(json.dumps({"peak_rss_mib": peak_rss_mib()}) + "\n")


def main() -> None:
    if len(sys.argv) < 3:
        sys.exit("usage: python bench/peak_rss.py OUT.json SCRIPT [ARGS...]")
    out, script = Path(sys.argv[1]), sys.argv[2]
    atexit.register(_write_peak, out)
    sys.argv = [script, *sys.argv[3:]]
    runpy.run_path(script, run_name="__main__")


if __name__ == "__main__":
    main()
