"""The `selpipe` command line: parses settings, calls a stage, prints its summary."""
