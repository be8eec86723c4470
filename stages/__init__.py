"""The two stages: `score_ref` (stage one, with its backends) and `train` (stage two, on DeepSpeed)."""
