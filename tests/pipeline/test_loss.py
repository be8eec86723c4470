import math

import pytest
import torch
import torch.nn.functional as F

from selpipe.pipeline.loss import selective_dpo_loss


def pair(values):
    return torch.tensor([values], dtype=torch.float32)


def golden_inputs():
    return dict(
        policy_chosen=pair([-1.0, -2.0, -3.0]), reference_chosen=pair([-2.0, -1.0, -3.0]), chosen_mask=pair([1, 1, 1]).bool(),
        policy_rejected=pair([-1.0, -1.0]), reference_rejected=pair([-2.0, -1.0]), rejected_mask=pair([1, 1]).bool(),
    )


def test_golden_loss():
    """k = 0.5, beta = 0.5.

    chosen:   p = [-1, -2, -3], r = [-2, -1, -3], s = r - p = [-1, 1, 0]; sorted [-1, 0, 1],
              rank 0.5 * 2 = 1 -> tau = 0, mask [0, 1, 1]; sum m (p - r) = (-1) + 0 = -1.
    rejected: p = [-1, -1], r = [-2, -1], s = p - r = [1, 0]; sorted [0, 1],
              rank 0.5 * 1 = 0.5 -> tau = 0.5, mask [1, 0]; sum m (p - r) = 1.
    z = 0.5 * (-1) - 0.5 * 1 = -1;  loss = -log sigmoid(-1) = log(1 + e) = 1.3132616875.
    With eps = 0.1: 0.9 * 1.3132617 + 0.1 * -log sigmoid(1) (= 0.3132617) = 1.2132617.
    """
    out = selective_dpo_loss(**golden_inputs(), top_k=0.5, beta=0.5)
    assert out.chosen_selected.int().tolist() == [[0, 1, 1]]
    assert out.rejected_selected.int().tolist() == [[1, 0]]
    assert out.chosen_rewards.item() == -0.5 and out.rejected_rewards.item() == 0.5
    assert out.losses.item() == pytest.approx(math.log(1 + math.e), abs=1e-6)
    smoothed = selective_dpo_loss(**golden_inputs(), top_k=0.5, beta=0.5, label_smoothing=0.1)
    assert smoothed.losses.item() == pytest.approx(0.9 * math.log(1 + math.e) + 0.1 * math.log(1 + math.exp(-1)), abs=1e-6)


def random_batch(seed, batch=8, width=11):
    generator = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, width + 1, (2, batch), generator=generator)
    masks = [torch.arange(width).unsqueeze(0) < lengths[i].unsqueeze(1) for i in range(2)]
    values = [-torch.rand(batch, width, generator=generator) * 5 * m for m in masks + masks]
    return values, masks


def test_k_one_is_standard_sigmoid_dpo():
    (pc, pr, rc, rr), (mc, mr) = random_batch(1)
    out = selective_dpo_loss(pc, pr, rc, rr, mc, mr, top_k=1.0, beta=0.1)
    standard = -F.logsigmoid(0.1 * (((pc - rc) * mc).sum(1) - ((pr - rr) * mr).sum(1)))
    torch.testing.assert_close(out.losses, standard, rtol=0, atol=1e-7)


@pytest.mark.parametrize("k", [0.1, 0.4, 1.0])
def test_policy_equal_to_anchor_gives_ln2(k):
    (pc, pr, _, _), (mc, mr) = random_batch(2)
    out = selective_dpo_loss(pc, pr, pc.clone(), pr.clone(), mc, mr, top_k=k, beta=0.01)
    assert torch.all(out.losses == torch.tensor(math.log(2.0)))


def test_unselected_tokens_get_exactly_zero_gradient():
    (pc, pr, rc, rr), (mc, mr) = random_batch(3)
    pc, pr = pc.clone().requires_grad_(), pr.clone().requires_grad_()
    out = selective_dpo_loss(pc, pr, rc, rr, mc, mr, top_k=0.4, beta=0.1)
    out.losses.mean().backward()
    for grad, selected in ((pc.grad, out.chosen_selected), (pr.grad, out.rejected_selected)):
        assert torch.all(grad[~selected] == 0.0)
        assert torch.all(grad[selected] != 0.0)


def test_anchor_cache_anchors_the_reward_while_the_reference_scores():
    """Scores (hence the mask) come from the reference; rewards are measured against the anchor."""
    inputs = golden_inputs()
    anchor_chosen, anchor_rejected = pair([0.0, 0.0, 0.0]), pair([0.0, 0.0])
    out = selective_dpo_loss(**inputs, top_k=0.5, beta=0.5, anchor_chosen=anchor_chosen, anchor_rejected=anchor_rejected)
    assert out.chosen_selected.int().tolist() == [[0, 1, 1]]  # same mask as the golden case
    assert out.chosen_rewards.item() == 0.5 * (-2.0 - 3.0)    # masked sum of p - 0
    assert out.rejected_rewards.item() == 0.5 * -1.0


def test_k_one_equals_trls_own_dpo_loss(models, tmp_path):
    """TRL (a peer, not us) computes its sigmoid DPO loss on per-token log-probs; ours at k = 1
    on exactly the same per-token log-probs must agree to float precision."""
    import datasets
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import DPOConfig, DPOTrainer

    tokenizer = AutoTokenizer.from_pretrained(models["policy"])
    rows = [{"prompt": f"What is {a} plus 2?", "chosen": f" {a + 2}. Happy to help!", "rejected": f" {a + 3}."} for a in range(4)]
    args = DPOConfig(output_dir=str(tmp_path), beta=0.1, report_to=[], use_cpu=True, per_device_train_batch_size=4,
                     precompute_ref_log_probs=False)
    policy = AutoModelForCausalLM.from_pretrained(models["policy"])
    trainer = DPOTrainer(model=policy, ref_model=AutoModelForCausalLM.from_pretrained(models["reference"]), args=args,
                         train_dataset=datasets.Dataset.from_list(rows), processing_class=tokenizer)
    batch = next(iter(trainer.get_train_dataloader()))
    completion = batch["completion_mask"][:, 1:].bool()
    labels = batch["input_ids"].masked_fill(batch["completion_mask"] == 0, -100)
    with torch.no_grad():
        outputs = trainer.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=labels,
                                fused_lm_head=True, use_cache=False)
    policy_logps = outputs.log_probs[:, -completion.shape[1]:] * completion
    reference_logps = (policy_logps - torch.rand(policy_logps.shape, generator=torch.Generator().manual_seed(0))) * completion
    pairs = batch["input_ids"].shape[0] // 2
    trainer.precompute_ref_logps = True  # TRL takes the reference's sequence log-probs as given
    batch["ref_chosen_logps"], batch["ref_rejected_logps"] = reference_logps.sum(1).chunk(2)
    trainer.model.eval()
    with torch.no_grad():
        trl_loss = trainer._compute_loss(trainer.model, batch, return_outputs=False)
    ours = selective_dpo_loss(policy_logps[:pairs], policy_logps[pairs:], reference_logps[:pairs], reference_logps[pairs:],
                              completion[:pairs], completion[pairs:], top_k=1.0, beta=0.1)
    assert abs(trl_loss.item() - math.log(2)) > 1e-3  # a non-trivial margin
    assert ours.losses.mean().item() == pytest.approx(trl_loss.item(), abs=1e-6)
