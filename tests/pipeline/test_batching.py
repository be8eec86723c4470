import numpy as np
import pytest
import torch

from selpipe.pipeline.batching import collate_pairs, length_bucketed_order, order_for_micro_batches, top_k_selector
from selpipe.pipeline.logprobs import to_padded
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


def lengths_row(row_id, prompt, chosen, rejected):
    return row(row_id, list(range(1, prompt + 1)), list(range(1, chosen + 1)), list(range(1, rejected + 1)))


def test_micro_batch_order_is_widest_first_with_ties_by_total_then_id():
    """Widths (prompt + longer completion): a 2+5=7, b 1+6=7, c 4+1=5, d 1+7=8, e 2+5=7.
    d first; a, b, e tie at 7: totals 2*2+5+3=12, 2*1+6+6=14, 2*2+5+3=12, so b, then a and e by id."""
    rows = [lengths_row("e", 2, 5, 3), lengths_row("a", 2, 3, 5), lengths_row("b", 1, 6, 6),
            lengths_row("c", 4, 1, 1), lengths_row("d", 1, 7, 2)]
    assert [r["id"] for r in order_for_micro_batches(rows)] == ["d", "b", "a", "e", "c"]
    assert [r["id"] for r in order_for_micro_batches(rows[::-1])] == ["d", "b", "a", "e", "c"]
    # Packed with shared prompts the width is prompt + both: a 10, b 13, c 6, d 10, e 10 (ties by total, then id).
    assert [r["id"] for r in order_for_micro_batches(rows, shared_prompts=True)] == ["b", "a", "e", "d", "c"]


def random_pairs(count, seed):
    generator = torch.Generator().manual_seed(seed)
    rows = []
    for index in range(count):
        p, c, r = (int(torch.randint(lo, hi, (1,), generator=generator)) for lo, hi in ((1, 12), (1, 40), (1, 40)))
        ids = [torch.randint(3, 500, (n,), generator=generator).tolist() for n in (p, c, r)]
        rows.append({"id": f"q{index:02d}", "prompt_ids": ids[0], "chosen_ids": ids[1], "rejected_ids": ids[2],
                     "chosen_ref_logps": (-8 * torch.rand(c, generator=generator)).tolist(),
                     "rejected_ref_logps": (-8 * torch.rand(r, generator=generator)).tolist()})
    return rows


def step(model, rows, micro):
    """One optimizer step's loss and gradient as the trainer computes them: the mean loss of each
    micro batch, each scaled by 1 / micro batches, gradients summed."""
    from selpipe.pipeline.logprobs import completion_logprobs
    from selpipe.pipeline.config import LossConfig
    from selpipe.pipeline.loss import selective_dpo_loss

    model.zero_grad()
    total, padded, real = 0.0, 0, 0
    count = len(rows) // micro
    for start in range(0, len(rows), micro):
        batch = collate_pairs(rows[start:start + micro])
        flat = completion_logprobs(model, batch.input_ids, batch.attention_mask, batch.target_mask)
        policy, mask = to_padded(flat, batch.completion_lengths)
        b = batch.pairs
        loss = selective_dpo_loss(policy[:b], policy[b:], batch.reference[:b], batch.reference[b:], mask[:b], mask[b:],
                                  LossConfig(beta=0.1)).losses.mean() / count
        loss.backward()
        total += loss.item()
        padded += batch.attention_mask.numel()
        real += int(batch.attention_mask.sum())
    return total, {n: p.grad.clone() for n, p in model.named_parameters()}, 1 - real / padded


def test_sorted_micro_batches_give_the_same_step_with_less_padding(models):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(models["policy"])
    rows = random_pairs(16, seed=0)
    ordered = order_for_micro_batches(rows)
    assert sorted(r["id"] for r in ordered) == sorted(r["id"] for r in rows)
    loss, grads, padding = step(model, rows, micro=4)
    sorted_loss, sorted_grads, sorted_padding = step(model, ordered, micro=4)
    assert sorted_loss == pytest.approx(loss, rel=1e-6)
    for name, grad in grads.items():
        torch.testing.assert_close(sorted_grads[name], grad, rtol=1e-4, atol=1e-7, msg=name)
    assert sorted_padding < 0.7 * padding  # measured 0.215 against 0.341


def test_top_k_selector_picks_what_the_loss_selects():
    from selpipe.pipeline.config import LossConfig
    from selpipe.pipeline.loss import selective_dpo_loss

    batch = collate_pairs(random_pairs(5, seed=1))
    flat = -8 * torch.rand(sum(batch.completion_lengths), generator=torch.Generator().manual_seed(2))
    policy, mask = to_padded(flat, batch.completion_lengths)
    b = batch.pairs
    out = selective_dpo_loss(policy[:b], policy[b:], batch.reference[:b], batch.reference[b:], mask[:b], mask[b:], LossConfig(top_k=0.3))
    expected = torch.cat([out.chosen_selected, out.rejected_selected])[mask]
    assert torch.equal(top_k_selector(batch, 0.3)(flat), expected)


@pytest.mark.parametrize("offset", [0, 3, 8])
def test_length_buckets_are_a_seeded_permutation_of_neighbouring_widths(offset):
    """103 rows in batches of 8, the window starting at stream position `offset`: the batches wholly
    inside the window (they start where position % 8 == 0) are blocks of neighbouring widths."""
    widths = [int(w) for w in np.random.default_rng(0).integers(10, 500, 103)]
    order = length_bucketed_order(widths, 8, np.random.default_rng([7, 0, 3]), offset)
    assert sorted(order) == list(range(103))
    assert order == length_bucketed_order(widths, 8, np.random.default_rng([7, 0, 3]), offset)
    assert order != length_bucketed_order(widths, 8, np.random.default_rng([7, 1, 3]), offset)
    head = (-offset) % 8
    blocks = [sorted(widths[i] for i in order[s:s + 8]) for s in range(head, 103 - 7, 8)]
    assert len(blocks) == (103 - head) // 8
    blocks.sort()  # by smallest width: each block ends before the next begins
    assert all(a[-1] <= b[0] for a, b in zip(blocks, blocks[1:]))
