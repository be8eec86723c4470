import math
import types
import typing

import pytest
import torch
import torch.nn.functional as F

from selpipe.pipeline.config import LOSS_TYPES, RPO_TOKENS, LossConfig
from selpipe.pipeline.errors import ConfigError
from selpipe.pipeline.loss import LOSSES, selective_dpo_loss

TENSORS = ("policy_chosen", "policy_rejected", "reference_chosen", "reference_rejected", "chosen_mask", "rejected_mask")


def dpo(*tensors, anchor_chosen=None, anchor_rejected=None, **arguments):
    """`selective_dpo_loss` with the tensors positional or by name and the loss's settings as keywords."""
    named = {name: arguments.pop(name) for name in TENSORS if name in arguments}
    return selective_dpo_loss(*tensors, **named, settings=LossConfig(**arguments), anchor_chosen=anchor_chosen,
                              anchor_rejected=anchor_rejected)


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
    out = dpo(**golden_inputs(), top_k=0.5, beta=0.5)
    assert out.chosen_selected.int().tolist() == [[0, 1, 1]]
    assert out.rejected_selected.int().tolist() == [[1, 0]]
    assert out.chosen_rewards.item() == -0.5 and out.rejected_rewards.item() == 0.5
    assert out.losses.item() == pytest.approx(math.log(1 + math.e), abs=1e-6)
    smoothed = dpo(**golden_inputs(), top_k=0.5, beta=0.5, label_smoothing=0.1)
    assert smoothed.losses.item() == pytest.approx(0.9 * math.log(1 + math.e) + 0.1 * math.log(1 + math.exp(-1)), abs=1e-6)


def softplus(x):
    """-log sigmoid(-x) = log(1 + e^x)."""
    return math.log1p(math.exp(x))


# Per loss type: (settings besides k = 0.5 and beta = 0.5, loss, chosen reward, rejected reward).
# A loss added to the registry fails `test_golden_value_of_each_loss` until it has a line here.
GOLDEN = {
    "sigmoid": ({}, softplus(1.0), -0.5, 0.5),
    "sigmoid_norm": ({}, softplus(0.75), -0.5, 0.5),
    "ipo": ({}, 6.25, -0.5, 0.5),
    "hinge": ({}, 2.0, -0.5, 0.5),
    "robust": ({"label_smoothing": 0.1}, softplus(1.0) + 0.125, -0.5, 0.5),
    "simpo": ({"simpo_gamma": 0.5}, softplus(1.25), -1.25, -0.5),
}


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_golden_value_of_each_loss(loss_type):
    """The golden pair of `test_golden_loss` (k = 0.5, beta = 0.5), every loss by hand.

    Selected tokens (from the reference's scores, whatever the loss):
      chosen   mask [0, 1, 1]: sum m (p - a) = -1,  n_w = 2,  sum m p = -2 - 3 = -5
      rejected mask [1, 0]:    sum m (p - a) =  1,  n_l = 1,  sum m p = -1
    Reference-based losses report the masked rewards 0.5 * -1 = -0.5 and 0.5 * 1 = 0.5.

    sigmoid:      z = 0.5 * (-1 - 1) = -1;  loss = log(1 + e^1) = 1.3132617
    sigmoid_norm: means -1/2 and 1/1;  z = 0.5 * (-0.5 - 1) = -0.75;
                  loss = log(1 + e^0.75) = log(3.1170000) = 1.1368710
    ipo:          h = -0.5 - 1 = -1.5;  1 / (2 beta) = 1;  loss = (-1.5 - 1)^2 = 6.25
    hinge:        z = -1;  loss = max(0, 1 - (-1)) = 2
    robust:       eps = 0.1, z = -1;  -log sigmoid(-1) = log(1 + e) = 1.3132617,
                  -log sigmoid(1) = 1.3132617 - 1 = 0.3132617;
                  loss = (0.9 * 1.3132617 - 0.1 * 0.3132617) / 0.8 = (0.8 * 1.3132617 + 0.1) / 0.8
                       = 1.3132617 + 0.125 = 1.4382617
    simpo:        gamma = 0.5;  R_w = 0.5 * (-5 / 2) = -1.25,  R_l = 0.5 * (-1 / 1) = -0.5 (its rewards);
                  z = -1.25 - (-0.5) - 0.5 = -1.25;  loss = log(1 + e^1.25) = log(4.4903430) = 1.5019291
    """
    settings, loss, chosen_reward, rejected_reward = GOLDEN[loss_type]
    out = dpo(**golden_inputs(), top_k=0.5, beta=0.5, loss_type=loss_type, **settings)
    assert out.chosen_selected.int().tolist() == [[0, 1, 1]]
    assert out.rejected_selected.int().tolist() == [[1, 0]]
    assert out.losses.item() == pytest.approx(loss, abs=1e-6)
    assert out.chosen_rewards.item() == pytest.approx(chosen_reward, abs=1e-7)
    assert out.rejected_rewards.item() == pytest.approx(rejected_reward, abs=1e-7)


@pytest.mark.parametrize("rpo_tokens, nll", [("all", 2.0), ("selected", 2.5)])
def test_golden_rpo_term(rpo_tokens, nll):
    """The golden pair, sigmoid loss 1.3132617, rpo_alpha = 0.5.

    all:      chosen p = [-1, -2, -3], mean NLL = 6 / 3 = 2;  loss = 1.3132617 + 0.5 * 2 = 2.3132617
    selected: mask [0, 1, 1], p = [-2, -3], mean NLL = 5 / 2 = 2.5;  loss = 1.3132617 + 0.5 * 2.5 = 2.5632617
    The rewards do not change.
    """
    out = dpo(**golden_inputs(), top_k=0.5, beta=0.5, rpo_alpha=0.5, rpo_tokens=rpo_tokens)
    assert out.nll.item() == nll
    assert out.losses.item() == pytest.approx(softplus(1.0) + 0.5 * nll, abs=1e-6)
    assert (out.chosen_rewards.item(), out.rejected_rewards.item()) == (-0.5, 0.5)


def random_batch(seed, batch=8, width=11):
    generator = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, width + 1, (2, batch), generator=generator)
    masks = [torch.arange(width).unsqueeze(0) < lengths[i].unsqueeze(1) for i in range(2)]
    values = [-torch.rand(batch, width, generator=generator) * 5 * m for m in masks + masks]
    return values, masks


def test_defaults_are_the_sigmoid_loss_bit_for_bit():
    """The new settings at their defaults leave the loss exactly what it was before they existed."""
    (pc, pr, rc, rr), (mc, mr) = random_batch(4)
    out = dpo(pc, pr, rc, rr, mc, mr, top_k=0.4, beta=0.1, label_smoothing=0.05)
    mc_sel, mr_sel = out.chosen_selected, out.rejected_selected
    chosen, rejected = ((pc - rc) * mc_sel).sum(1), ((pr - rr) * mr_sel).sum(1)
    margins = 0.1 * (chosen - rejected)
    assert torch.equal(out.losses, -(1 - 0.05) * F.logsigmoid(margins) - 0.05 * F.logsigmoid(-margins))
    assert torch.equal(out.chosen_rewards, 0.1 * chosen) and torch.equal(out.rejected_rewards, 0.1 * rejected)


def test_k_one_is_standard_sigmoid_dpo():
    (pc, pr, rc, rr), (mc, mr) = random_batch(1)
    out = dpo(pc, pr, rc, rr, mc, mr, top_k=1.0, beta=0.1)
    standard = -F.logsigmoid(0.1 * (((pc - rc) * mc).sum(1) - ((pr - rr) * mr).sum(1)))
    torch.testing.assert_close(out.losses, standard, rtol=0, atol=1e-7)


@pytest.mark.parametrize("k", [0.1, 0.4, 1.0])
def test_policy_equal_to_anchor_gives_ln2(k):
    (pc, pr, _, _), (mc, mr) = random_batch(2)
    out = dpo(pc, pr, pc.clone(), pr.clone(), mc, mr, top_k=k, beta=0.01)
    assert torch.all(out.losses == torch.tensor(math.log(2.0)))


# Settings that exercise each loss's own knob where it has one.
SETTINGS = {"robust": {"label_smoothing": 0.1}, "sigmoid": {"label_smoothing": 0.1}, "simpo": {"simpo_gamma": 0.3}}
# Each loss with the policy equal to the anchor (every log-ratio 0), beta = 0.01:
# sigmoid-type losses at z = 0 give ln 2, the hinge 1, IPO (0 - 1 / 0.02)^2. SimPO has no anchor
# (None): there the anchor must not matter at all.
AT_ANCHOR = {"sigmoid": math.log(2.0), "sigmoid_norm": math.log(2.0), "robust": math.log(2.0), "hinge": 1.0,
             "ipo": 2500.0, "simpo": None}


@pytest.mark.parametrize("k", [0.1, 0.4, 1.0])
@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_policy_equal_to_anchor(loss_type, k):
    """With a reference that differs from the anchor, the mask is non-trivial; the value is not."""
    (pc, pr, rc, rr), (mc, mr) = random_batch(2)
    inputs = dict(top_k=k, beta=0.01, loss_type=loss_type, **SETTINGS.get(loss_type, {}))
    out = dpo(pc, pr, rc, rr, mc, mr, anchor_chosen=pc.clone(), anchor_rejected=pr.clone(), **inputs)
    expected = AT_ANCHOR[loss_type]
    if expected is None:  # reference-free: any other anchor gives the very same losses
        other = dpo(pc, pr, rc, rr, mc, mr, anchor_chosen=rc, anchor_rejected=rr, **inputs)
        assert torch.equal(out.losses, other.losses) and torch.equal(out.chosen_rewards, other.chosen_rewards)
    else:
        torch.testing.assert_close(out.losses, torch.full_like(out.losses, expected), rtol=1e-6, atol=0)


@pytest.mark.parametrize("rpo_tokens", [None, "selected"])
@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_unselected_tokens_get_exactly_zero_gradient_in_every_loss(loss_type, rpo_tokens):
    """beta = 0.01 keeps every margin inside the hinge (|z| < 1), so every selected token moves."""
    (pc, pr, rc, rr), (mc, mr) = random_batch(3)
    pc, pr = pc.clone().requires_grad_(), pr.clone().requires_grad_()
    rpo = {} if rpo_tokens is None else {"rpo_alpha": 0.5, "rpo_tokens": rpo_tokens}
    out = dpo(pc, pr, rc, rr, mc, mr, top_k=0.4, beta=0.01, loss_type=loss_type,
                             **SETTINGS.get(loss_type, {}), **rpo)
    out.losses.mean().backward()
    for grad, selected in ((pc.grad, out.chosen_selected), (pr.grad, out.rejected_selected)):
        assert torch.all(grad[~selected] == 0.0)
        assert torch.all(grad[selected] != 0.0)


def test_unselected_tokens_get_exactly_zero_gradient():
    (pc, pr, rc, rr), (mc, mr) = random_batch(3)
    pc, pr = pc.clone().requires_grad_(), pr.clone().requires_grad_()
    out = dpo(pc, pr, rc, rr, mc, mr, top_k=0.4, beta=0.1)
    out.losses.mean().backward()
    for grad, selected in ((pc.grad, out.chosen_selected), (pr.grad, out.rejected_selected)):
        assert torch.all(grad[~selected] == 0.0)
        assert torch.all(grad[selected] != 0.0)


def test_rpo_over_all_chosen_tokens_moves_every_chosen_token_and_nothing_else():
    """rpo_tokens="all" (TRL's choice) reaches the chosen tokens the mask left out, not the rejected ones."""
    (pc, pr, rc, rr), (mc, mr) = random_batch(3)
    pc, pr = pc.clone().requires_grad_(), pr.clone().requires_grad_()
    out = dpo(pc, pr, rc, rr, mc, mr, top_k=0.4, beta=0.01, rpo_alpha=1.0, rpo_tokens="all")
    out.losses.mean().backward()
    assert torch.all(pc.grad[mc] != 0.0) and torch.all(pc.grad[~mc] == 0.0)
    assert torch.all(pr.grad[~out.rejected_selected] == 0.0)
    assert (mc & ~out.chosen_selected).any()  # some chosen tokens were left out by the mask


def test_settings_are_validated():
    from selpipe.pipeline import config  # the settings name the registry's losses without importing torch

    assert typing.get_args(config.LossType) == LOSS_TYPES == tuple(LOSSES)
    assert typing.get_args(config.RpoTokens) == RPO_TOKENS == ("all", "selected")
    for bad, message in (({"loss_type": "kto"}, "--loss-type must be one of sigmoid, sigmoid_norm"),
                         ({"beta": 0.0}, "--beta must be positive; got 0.0"),
                         ({"beta": float("nan")}, "--beta must be a finite number; got nan"),
                         ({"label_smoothing": -0.1}, r"--label-smoothing must be in \[0, 0.5\); got -0.1"),
                         ({"loss_type": "hinge", "label_smoothing": 0.1}, "the hinge loss has no label smoothing"),
                         ({"loss_type": "ipo", "label_smoothing": 0.1}, "the ipo loss has no label smoothing"),
                         ({"loss_type": "robust", "label_smoothing": 0.5}, r"--label-smoothing must be in \[0, 0.5\)"),
                         ({"rpo_alpha": -1.0}, "--rpo-alpha must be at least 0; got -1.0"),
                         ({"rpo_tokens": "rejected"}, "--rpo-tokens must be one of all, selected; got 'rejected'")):
        with pytest.raises(ConfigError, match=message):
            LossConfig(**bad)


def test_anchor_cache_anchors_the_reward_while_the_reference_scores():
    """Scores (hence the mask) come from the reference; rewards are measured against the anchor."""
    inputs = golden_inputs()
    anchor_chosen, anchor_rejected = pair([0.0, 0.0, 0.0]), pair([0.0, 0.0])
    out = dpo(**inputs, top_k=0.5, beta=0.5, anchor_chosen=anchor_chosen, anchor_rejected=anchor_rejected)
    assert out.chosen_selected.int().tolist() == [[0, 1, 1]]  # same mask as the golden case
    assert out.chosen_rewards.item() == 0.5 * (-2.0 - 3.0)    # masked sum of p - 0
    assert out.rejected_rewards.item() == 0.5 * -1.0


# ------------------------------------------------------------------------- parity with TRL 1.16


@pytest.fixture(scope="module")
def trl_batch(models, tmp_path_factory):
    """A TRL DPOTrainer, one of its batches, and per-token log-probs on that batch.

    The policy's per-token log-probs are TRL's own; the reference's are made different (random
    offsets) and handed to TRL as its precomputed sequence log-probs, so both sides see exactly
    the same per-token numbers. Chosen responses differ in length, so length normalisations
    and TRL's batch-level token mean are exercised.
    """
    import datasets
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import DPOConfig, DPOTrainer

    tokenizer = AutoTokenizer.from_pretrained(models["policy"])
    rows = [{"prompt": f"What is {a} plus 2?", "chosen": f" {a + 2}." + " Happy to help!" * (a % 3), "rejected": f" {a + 3}."}
            for a in range(4)]
    args = DPOConfig(output_dir=str(tmp_path_factory.mktemp("trl")), beta=0.1, report_to=[], use_cpu=True,
                     per_device_train_batch_size=4, precompute_ref_log_probs=False)
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
    ours = dict(policy_chosen=policy_logps[:pairs], policy_rejected=policy_logps[pairs:], reference_chosen=reference_logps[:pairs],
                reference_rejected=reference_logps[pairs:], chosen_mask=completion[:pairs], rejected_mask=completion[pairs:])
    return types.SimpleNamespace(trainer=trainer, batch=batch, ours=ours)


def trl_dpo_loss(trl, loss_types, loss_weights=None, label_smoothing=0.0):
    """TRL DPOTrainer's own batch loss (mean over pairs) for the given loss types."""
    trl.trainer.loss_types, trl.trainer.loss_weights = list(loss_types), list(loss_weights or [1.0] * len(loss_types))
    trl.trainer.label_smoothing = label_smoothing
    with torch.no_grad():
        return trl.trainer._compute_loss(trl.trainer.model, trl.batch, return_outputs=False).item()


def trl_simpo_loss(trl, beta, gamma, label_smoothing=0.0):
    """TRL's SimPO (CPOTrainer.cpo_loss, loss_type="simpo") on the mean completion log-probs.

    CPO's `get_batch_logps(average_log_prob=True)` is the sum over completion tokens over their count.
    """
    from trl.experimental.cpo import CPOTrainer

    averages = [(trl.ours[f"policy_{side}"] * trl.ours[f"{side}_mask"]).sum(1) / trl.ours[f"{side}_mask"].sum(1)
                for side in ("chosen", "rejected")]
    cpo = types.SimpleNamespace(loss_type="simpo", alpha=0.0, beta=beta, simpo_gamma=gamma, label_smoothing=label_smoothing,
                                accelerator=types.SimpleNamespace(device=torch.device("cpu")))
    losses, chosen_rewards, rejected_rewards = CPOTrainer.cpo_loss(cpo, *averages)
    return losses.mean().item(), chosen_rewards, rejected_rewards


def test_k_one_equals_trls_own_dpo_loss(trl_batch):
    """TRL (a peer, not us) computes its sigmoid DPO loss on per-token log-probs; ours at k = 1
    on exactly the same per-token log-probs must agree to float precision."""
    trl_loss = trl_dpo_loss(trl_batch, ["sigmoid"])
    ours = dpo(**trl_batch.ours, top_k=1.0, beta=0.1)
    assert abs(trl_loss - math.log(2)) > 1e-3  # a non-trivial margin
    assert ours.losses.mean().item() == pytest.approx(trl_loss, abs=1e-6)


# Each loss's TRL 1.16 counterpart at k = 1, with settings where TRL's formula is ours: for the
# reference-based ones DPOTrainer's loss type of the same name (beta = 0.1 from its config), for
# SimPO CPOTrainer's. A loss TRL lacks would map to None and be skipped by name.
TRL_PARITY = {
    "sigmoid": lambda trl: (trl_dpo_loss(trl, ["sigmoid"]), {}),
    "sigmoid_norm": lambda trl: (trl_dpo_loss(trl, ["sigmoid_norm"]), {}),
    "ipo": lambda trl: (trl_dpo_loss(trl, ["ipo"]), {}),
    "hinge": lambda trl: (trl_dpo_loss(trl, ["hinge"]), {}),
    "robust": lambda trl: (trl_dpo_loss(trl, ["robust"], label_smoothing=0.2), {"label_smoothing": 0.2}),
    "simpo": lambda trl: (trl_simpo_loss(trl, beta=2.0, gamma=0.7, label_smoothing=0.1)[0],
                          {"beta": 2.0, "simpo_gamma": 0.7, "label_smoothing": 0.1}),
}


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_k_one_equals_trl_for_each_loss(trl_batch, loss_type):
    """At k = 1 each loss is TRL's loss of the same kind, on the same per-token log-probs."""
    if TRL_PARITY[loss_type] is None:
        pytest.skip(f"TRL 1.16 has no {loss_type} loss")
    trl_loss, settings = TRL_PARITY[loss_type](trl_batch)
    ours = dpo(**trl_batch.ours, top_k=1.0, **{"beta": 0.1, **settings}, loss_type=loss_type)
    assert ours.chosen_selected.equal(trl_batch.ours["chosen_mask"])  # k = 1 keeps every token
    if AT_ANCHOR[loss_type] is not None:
        assert abs(trl_loss - AT_ANCHOR[loss_type]) > 1e-3  # not the trivial value of a zero margin
    assert ours.losses.mean().item() == pytest.approx(trl_loss, rel=1e-6, abs=1e-6)


def test_simpo_rewards_are_trls(trl_batch):
    """SimPO's reported reward is beta times the mean (selected) policy log-prob, as CPOTrainer's."""
    _, chosen_rewards, rejected_rewards = trl_simpo_loss(trl_batch, beta=2.0, gamma=0.7)
    ours = dpo(**trl_batch.ours, top_k=1.0, beta=2.0, loss_type="simpo", simpo_gamma=0.7)
    torch.testing.assert_close(ours.chosen_rewards, chosen_rewards, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(ours.rejected_rewards, rejected_rewards, rtol=1e-6, atol=1e-6)


def test_trl_sigmoid_ignores_label_smoothing(trl_batch):
    """TRL 1.16's `sigmoid` has no eps (only robust, exo_pair and aot read it): k = 1 equals TRL at eps = 0 only."""
    assert trl_dpo_loss(trl_batch, ["sigmoid"], label_smoothing=0.1) == trl_dpo_loss(trl_batch, ["sigmoid"])
    assert trl_dpo_loss(trl_batch, ["sigmoid_norm"], label_smoothing=0.1) == trl_dpo_loss(trl_batch, ["sigmoid_norm"])
    smoothed = dpo(**trl_batch.ours, top_k=1.0, beta=0.1, label_smoothing=0.1).losses.mean().item()
    assert abs(smoothed - trl_dpo_loss(trl_batch, ["sigmoid"])) > 1e-3


def test_rpo_term_against_trls_sft_term(trl_batch):
    """RPO in TRL 1.16 is loss_type=["sigmoid", "sft"] with loss_weights=[1, alpha]; its sft term is
    -mean of p over every chosen token of the batch, so a pair weighs by its chosen length. Ours is
    the per-pair mean (the RPO paper's), then averaged over pairs: the two agree exactly once each
    pair's NLL is weighted by its token count, and differ when chosen lengths differ (here)."""
    alpha = 0.5
    trl_loss = trl_dpo_loss(trl_batch, ["sigmoid", "sft"], [1.0, alpha])
    bare = trl_dpo_loss(trl_batch, ["sigmoid"])
    ours = dpo(**trl_batch.ours, top_k=1.0, beta=0.1, rpo_alpha=alpha, rpo_tokens="all")
    counts = trl_batch.ours["chosen_mask"].sum(1).float()
    assert len(set(counts.tolist())) > 1  # chosen lengths differ, so the normalisations differ
    token_mean_nll = (ours.nll * counts).sum() / counts.sum()
    assert (trl_loss - bare) / alpha == pytest.approx(token_mean_nll.item(), rel=1e-6)
    assert ours.losses.mean().item() == pytest.approx(bare + alpha * ours.nll.mean().item(), rel=1e-6)
    assert abs(ours.losses.mean().item() - trl_loss) > 1e-4
    # A batch of one pair has nothing to weigh: there TRL's loss and ours are the same number.
    full, pairs = trl_batch.batch, len(counts)
    for i in range(pairs):
        one = {key: value[[i, pairs + i]] for key, value in full.items() if not key.startswith("ref_")}
        one.update(ref_chosen_logps=full["ref_chosen_logps"][[i]], ref_rejected_logps=full["ref_rejected_logps"][[i]])
        trl_one = trl_dpo_loss(types.SimpleNamespace(trainer=trl_batch.trainer, batch=one), ["sigmoid", "sft"], [1.0, alpha])
        assert ours.losses[i].item() == pytest.approx(trl_one, rel=1e-6, abs=1e-6)
