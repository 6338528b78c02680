import math

import torch
import torch.nn.functional as F

from lib.selection.losses import (
    causal_lm_loss,
    garbage_log_mass,
    load_balancing_loss,
    routing_entropy,
    routing_loss,
)
from lib.selection.scores import auroc, garbage_mass_per_token, row_garbage_mass


def test_routing_loss_matches_hand_computed_bce():
    # Two experts, expert 1 is the garbage bin. Token 0 good with m = 0.5, token 1 garbage with m = 0.75,
    # token 2 is padding with an extreme value that must not count.
    logits = torch.tensor([[0.0, 0.0], [0.0, math.log(3.0)], [50.0, -50.0]])
    gmask = torch.tensor([False, True])
    is_garbage = torch.tensor([False, True, True])
    token_mask = torch.tensor([True, True, False])
    loss = routing_loss([logits], [gmask], is_garbage, token_mask)
    expected = (-math.log(0.5) - math.log(0.75)) / 2
    assert math.isclose(loss.item(), expected, rel_tol=1e-6)


def test_routing_loss_averages_layers_and_pushes_the_right_way():
    gmask = torch.tensor([False, False, True, True])
    logits = torch.zeros(4, 4, requires_grad=True)
    is_garbage = torch.tensor([True, True, False, False])
    loss = routing_loss([logits, logits * 2], [gmask, gmask], is_garbage, torch.ones(4, dtype=torch.bool))
    loss.backward()
    # Garbage tokens' gradient descent raises garbage-expert logits; good tokens' lowers them.
    step = -logits.grad
    assert (step[:2, 2:] > 0).all() and (step[:2, :2] < 0).all()
    assert (step[2:, 2:] < 0).all() and (step[2:, :2] > 0).all()


def test_garbage_log_mass_is_finite_at_extremes():
    logits = torch.tensor([[100.0, -100.0], [-100.0, 100.0]])
    log_m, log_q = garbage_log_mass(logits, torch.tensor([False, True]))
    assert torch.isfinite(log_m).all() and torch.isfinite(log_q).all()
    assert math.isclose(log_m[1].exp().item(), 1.0, rel_tol=1e-6)


def test_load_balancing_uniform_and_collapsed():
    mask = torch.ones(2, dtype=torch.bool)
    balanced = load_balancing_loss([torch.tensor([[1.0, 0.0], [0.0, 1.0]])], top_k=1, token_mask=mask)
    assert math.isclose(balanced.item(), 1.0, rel_tol=1e-6)
    collapsed = load_balancing_loss([torch.tensor([[2.0, 0.0], [2.0, 0.0]])], top_k=1, token_mask=mask)
    assert math.isclose(collapsed.item(), 2 * torch.softmax(torch.tensor([2.0, 0.0]), 0)[0].item(), rel_tol=1e-6)
    # Padding rows do not count.
    padded = load_balancing_loss([torch.tensor([[1.0, 0.0], [0.0, 1.0], [9.0, 0.0]])], top_k=1,
                                 token_mask=torch.tensor([True, True, False]))
    assert math.isclose(padded.item(), 1.0, rel_tol=1e-6)


def test_entropy_of_uniform_routing_is_log_e():
    ent = routing_entropy([torch.zeros(3, 8)], torch.ones(3, dtype=torch.bool))
    assert math.isclose(ent.item(), math.log(8), rel_tol=1e-6)


def test_causal_lm_loss_matches_reference_and_handles_no_targets():
    logits = torch.randn(2, 5, 11)
    labels = torch.randint(0, 11, (2, 5))
    labels[1] = -100
    ref = F.cross_entropy(logits[0, :-1], labels[0, 1:])
    assert torch.allclose(causal_lm_loss(logits, labels), ref, atol=1e-6)
    none = causal_lm_loss(logits.requires_grad_(), torch.full((2, 5), -100))
    assert none.item() == 0.0
    none.backward()  # stays differentiable


def test_row_garbage_mass_ignores_padding():
    logits = torch.randn(2 * 4, 6)
    gmask = torch.tensor([False] * 4 + [True] * 2)
    attn = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0]])
    rows = row_garbage_mass([logits], [gmask], attn)
    per_tok = garbage_mass_per_token([logits], [gmask])[0].reshape(2, 4)
    assert torch.allclose(rows[0], per_tok[0].mean())
    assert torch.allclose(rows[1], per_tok[1, :2].mean())
    empty = row_garbage_mass([logits], [gmask], torch.zeros(2, 4, dtype=torch.long))
    assert torch.isnan(empty).all()


def test_auroc_against_hand_counts():
    assert auroc([0.1, 0.4, 0.35, 0.8], [0, 0, 1, 1]) == 0.75
    assert auroc([1.0, 1.0], [0, 1]) == 0.5  # ties count half
    assert auroc([0.9, 0.8, 0.1], [1, 1, 0]) == 1.0
    assert auroc([0.1, float("nan"), 0.9], [0, 1, 1]) == 1.0  # NaN scores are dropped
    assert math.isnan(auroc([0.3, 0.4], [1, 1]))


def test_probe_counts_follow_hand_made_routing():
    from lib.selection.scores import expert_slot_counts

    # 2 rows x 2 tokens, 4 experts, top-2; the last token of row 1 is padding and must not count.
    logits = torch.tensor([[5.0, 4.0, 0.0, 0.0],   # experts 0, 1
                           [0.0, 5.0, 4.0, 0.0],   # experts 1, 2
                           [4.0, 0.0, 0.0, 5.0],   # experts 3, 0
                           [9.0, 9.5, 0.0, 0.0]])  # padding
    mask = torch.tensor([[1, 1], [1, 0]])
    counts = expert_slot_counts([logits, logits.flip(-1)], mask, top_k=2)
    assert counts.tolist() == [[2, 2, 1, 1], [1, 1, 2, 2]]
