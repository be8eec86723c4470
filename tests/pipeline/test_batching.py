import pytest
import torch

from selpipe.pipeline.batching import collate_pairs
from selpipe.pipeline.cache import CacheError


def row(row_id, prompt, chosen, rejected, **anchor):
    """A cache row whose reference log-prob of completion token t is -t/10, so alignment is visible."""
    return {"id": row_id, "prompt_ids": prompt, "chosen_ids": chosen, "rejected_ids": rejected,
            "chosen_ref_logps": [-t / 10 for t in chosen], "rejected_ref_logps": [-t / 10 for t in rejected], **anchor}


def test_chosen_rows_first_then_rejected_with_completion_aligned_values():
    """Pairs a = ([1], [5, 6], [7]) and b = ([2, 3], [8], [9, 10, 11]) give 4 sequences, chosen first:
    [1,5,6], [2,3,8], [1,7], [2,3,9,10,11], right-padded to width 5. Completion-aligned values are
    [B, L=3] per row: a's chosen -0.5, -0.6 then padding; b's rejected -0.9, -1.0, -1.1."""
    batch = collate_pairs([row("a", [1], [5, 6], [7]), row("b", [2, 3], [8], [9, 10, 11])], pad_id=0)
    assert batch.input_ids.tolist() == [[1, 5, 6, 0, 0], [2, 3, 8, 0, 0], [1, 7, 0, 0, 0], [2, 3, 9, 10, 11]]
    assert batch.target_mask.int().tolist() == [[0, 1, 1, 0, 0], [0, 0, 1, 0, 0], [0, 1, 0, 0, 0], [0, 0, 1, 1, 1]]
    assert batch.completion_lengths == [2, 1, 1, 3] and batch.pairs == 2
    torch.testing.assert_close(batch.reference, torch.tensor(
        [[-0.5, -0.6, 0.0], [-0.8, 0.0, 0.0], [-0.7, 0.0, 0.0], [-0.9, -1.0, -1.1]]))
    assert torch.equal(batch.anchor, batch.reference)  # no second cache: the reference anchors


def test_anchor_values_come_from_the_anchor_columns():
    batch = collate_pairs([row("a", [1], [5, 6], [7], chosen_anchor_logps=[-1.0, -2.0], rejected_anchor_logps=[-3.0])])
    assert batch.anchor.tolist() == [[-1.0, -2.0], [-3.0, 0.0]]
    assert batch.reference.tolist()[0] == pytest.approx([-0.5, -0.6])


def test_a_row_whose_log_probs_do_not_match_its_tokens_is_refused():
    bad = row("short", [1], [5, 6], [7])
    bad["chosen_ref_logps"] = [-0.5]
    with pytest.raises(CacheError, match="row short: chosen_ref_logps has 1 values for 2 tokens"):
        collate_pairs([bad])
