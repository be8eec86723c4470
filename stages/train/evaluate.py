"""Evaluation on a held-out score cache: the training metrics, plus how stable the token mask is."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from selpipe.pipeline.cache import read_rows_at
from selpipe.pipeline.config import TrainConfig
from selpipe.pipeline.forward import PolicyForward
from selpipe.pipeline.metrics import add_sums, reduce_sums
from selpipe.pipeline.stream import eval_shards

from .loop import forward_loss, micro_batches


class Evaluator:
    """Scores the eval cache; tracks the overlap (Jaccard) of its token masks between evals."""

    def __init__(self, path: str, manifest: dict[str, Any], engine: Any, all_reduce: Callable[[torch.Tensor], None],
                 rank: int, world_size: int, cfg: TrainConfig, pad_id: int):
        indices, self.micro_batches = eval_shards(manifest["totals"]["rows"], rank, world_size,
                                                  cfg.batch.micro_batch_size)
        # Only this rank's block of rows, read from the row groups that hold them.
        self.rows = read_rows_at(path, manifest, indices)
        # What pads a short block (a rank may have no row at all when the cache is smaller than the job).
        self.filler = self.rows[0] if self.rows else read_rows_at(path, manifest, [0])[0]
        self.engine, self.all_reduce, self.cfg, self.pad_id = engine, all_reduce, cfg, pad_id
        self.forward = PolicyForward.of(cfg.model, cfg.loss)
        self.previous_masks: list[torch.Tensor] | None = None

    @torch.no_grad()
    def __call__(self, step: int) -> dict[str, float]:
        engine = self.engine
        engine.eval()
        totals: dict[str, torch.Tensor] = {}
        masks = []
        overlap = torch.zeros(2)  # |this mask & last eval's|, |this mask | last eval's|, over real pairs
        size = self.cfg.batch.micro_batch_size
        for micro in range(self.micro_batches):
            chunk = self.rows[micro * size:(micro + 1) * size]
            # Every rank runs the same number of forwards (ZeRO-3 gathers collectively): pad with weight-0 rows.
            weights = [1.0] * len(chunk) + [0.0] * (size - len(chunk))
            rows = chunk + [self.filler] * (size - len(chunk))
            [(batch, packed)] = micro_batches(rows, self.cfg.batch, self.forward, self.pad_id, engine.device, weights)
            _, sums, out = forward_loss(engine, batch, packed, self.cfg.loss, self.forward)
            add_sums(totals, sums)
            real = batch.weights.bool().unsqueeze(1).cpu()
            selected = torch.cat([(out.chosen_selected.cpu() & real).flatten(), (out.rejected_selected.cpu() & real).flatten()])
            if self.previous_masks is not None:
                before = self.previous_masks[micro]
                overlap += torch.tensor([float((selected & before).sum()), float((selected | before).sum())])
            masks.append(selected)
        engine.train()
        metrics = reduce_sums(totals, self.all_reduce)
        if self.previous_masks is not None:
            overlap = overlap.to(engine.device)
            self.all_reduce(overlap)
            metrics["mask_overlap"] = float(overlap[0] / overlap[1].clamp(min=1.0))
        # A mask taken while every score ties (the policy still equals the reference) selects
        # everything; overlap with it would only restate the selected fraction.
        all_tied = metrics["selected_fraction/chosen"] == 1.0 and metrics["selected_fraction/rejected"] == 1.0
        self.previous_masks = None if all_tied else masks
        return {f"eval/{k}": v for k, v in metrics.items() if k not in ("tokens",)}
