"""selpipe's core: formats, cache schema and I/O, tokenization, log-prob math, selection, losses.

Pure functions and plain data; no process groups, no CLI.
"""

__version__ = "0.1.0"
