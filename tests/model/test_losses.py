"""Partial-label loss: an uncontoured organ gets no gradient; a fully contoured batch is plain DiceCE."""

from __future__ import annotations

import pytest
import torch
from monai.losses import DeepSupervisionLoss, DiceCELoss

from medseg.model.losses import PartialDeepSupervisionLoss, PartialDiceCELoss

CLASSES = 4  # background + organs 1, 2, 3
SHAPE = (10, 9, 8)


def batch(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Random logits (2, 4, 10, 9, 8) and a label map (2, 1, 10, 9, 8) with every organ in both cases."""
    generator = torch.Generator().manual_seed(seed)
    logits = torch.randn(2, CLASSES, *SHAPE, generator=generator, dtype=torch.float64)
    target = torch.zeros(2, 1, *SHAPE, dtype=torch.long)
    target[:, :, 1:4, 1:5, 1:4] = 1
    target[:, :, 5:9, 2:6, 2:5] = 2
    target[:, :, 2:6, 6:9, 5:8] = 3
    return logits, target


def plain_dice_ce() -> DiceCELoss:
    return DiceCELoss(to_onehot_y=True, softmax=True, include_background=False, batch=True)


def test_fully_contoured_batch_is_plain_dice_ce():
    logits, target = batch()
    expected = plain_dice_ce()(logits, target)
    everything = torch.ones(2, CLASSES, dtype=torch.bool)
    assert torch.allclose(PartialDiceCELoss()(logits, target), expected, rtol=1e-12, atol=0)
    assert torch.allclose(PartialDiceCELoss()(logits, target, everything), expected, rtol=1e-12, atol=0)


def test_fully_contoured_deep_supervision_is_plain():
    logits, target = batch()
    heads = [logits, logits.flip(2) * 0.5, logits * 2.0]
    expected = DeepSupervisionLoss(plain_dice_ce(), weight_mode="exp")(heads, target)
    got = PartialDeepSupervisionLoss(PartialDiceCELoss(), weight_mode="exp")(heads, target, None)
    assert torch.allclose(got, expected, rtol=1e-6, atol=0)  # MONAI sums the heads in float32


@pytest.mark.parametrize("deep_supervision", [False, True], ids=["one-head", "deep-supervision"])
def test_uncontoured_organ_gets_exactly_zero_gradient(deep_supervision):
    logits, target = batch()
    target[1][target[1] == 2] = 0  # case 1 did not contour organ 2: its voxels read background
    contoured = torch.tensor([[True, True, True, True], [True, True, False, True]])
    logits.requires_grad_(True)
    if deep_supervision:
        loss_fn = PartialDeepSupervisionLoss(PartialDiceCELoss())
        loss = loss_fn([logits, logits * 0.5], target, contoured)
    else:
        loss = PartialDiceCELoss()(logits, target, contoured)
    loss.backward()
    grad = logits.grad
    assert torch.equal(grad[1, 2], torch.zeros(SHAPE, dtype=grad.dtype))  # exactly zero, every voxel
    for case, channel in [(1, 0), (1, 1), (1, 3), (0, 2)]:  # contoured channels still learn
        assert grad[case, channel].abs().sum() > 0, (case, channel)


def test_predicting_an_uncontoured_organ_where_the_case_says_background_costs_nothing():
    logits, target = batch()
    target[1][target[1] == 2] = 0
    contoured = torch.tensor([[True, True, True, True], [True, True, False, True]])
    loss_fn = PartialDiceCELoss()
    shouting = logits.clone()
    background = target[1, 0] == 0
    shouting[1, 2][background] = 50.0  # the network calls organ 2 wherever case 1 reads background
    # it counts as background there: no cost (the loss even drops, since p_background + p_organ -> 1)
    assert loss_fn(shouting, target, contoured) <= loss_fn(logits, target, contoured)
    # where the case says another organ, calling it organ 2 is wrong, and costs
    wrong = logits.clone()
    wrong[1, 2][target[1, 0] == 1] = 50.0
    assert loss_fn(wrong, target, contoured) > loss_fn(logits, target, contoured) + 1.0
    # and in a case that did contour organ 2, calling it on background is punished
    everything = torch.ones(2, CLASSES, dtype=torch.bool)
    assert loss_fn(shouting, target, everything) > loss_fn(logits, target, everything) + 1.0


def test_background_is_background_or_the_uncontoured_organ():
    """Marginal cross-entropy: -log(p_background + p_organ) at background voxels of that case."""
    logits, target = batch()
    target[1][target[1] == 2] = 0
    contoured = torch.tensor([[True, True, True, True], [True, True, False, True]])
    log_p = torch.log_softmax(logits, 1)
    merged = log_p.clone()
    merged[1, 0] = torch.logaddexp(log_p[1, 0], log_p[1, 2])
    expected = -torch.gather(merged, 1, target).mean()
    assert torch.allclose(PartialDiceCELoss(dice_weight=0.0)(logits, target, contoured), expected, rtol=1e-12)


def test_organ_contoured_by_no_case_leaves_the_dice_mean():
    from monai.losses import DiceLoss

    logits, target = batch()
    target[target == 3] = 0
    contoured = torch.tensor([[True, True, True, False], [True, True, True, False]])
    dice_only = PartialDiceCELoss(ce_weight=0.0)
    per_organ = DiceLoss(to_onehot_y=True, softmax=True, include_background=False, batch=True, reduction="none")
    # organs 1 and 2 of the full softmax (organ 3 keeps its place there, as at inference), organ 3 left out
    expected = per_organ(logits, target).flatten()[:2].mean()
    assert torch.allclose(dice_only(logits, target, contoured), expected, rtol=1e-12, atol=0)


def test_per_case_dice_is_monai_per_case_dice_when_every_patch_holds_every_organ():
    from monai.losses import DiceLoss

    logits, target = batch()
    per_case = DiceLoss(to_onehot_y=True, softmax=True, include_background=False, batch=False)
    got = PartialDiceCELoss(ce_weight=0.0, batch_dice=False)(logits, target)
    assert torch.allclose(got, per_case(logits, target), rtol=1e-12, atol=0)
    assert not torch.allclose(got, PartialDiceCELoss(ce_weight=0.0)(logits, target), rtol=1e-6, atol=0)


def test_per_case_dice_leaves_out_an_organ_the_patch_does_not_hold():
    from monai.losses import DiceLoss

    logits, target = batch()
    target[1][target[1] == 2] = 0  # case 1's patch holds no organ 2 (contoured, just not in this patch)
    per_pair = DiceLoss(to_onehot_y=True, softmax=True, include_background=False, batch=False, reduction="none")
    pairs = per_pair(logits, target).flatten(1)  # (case, organ)
    expected = torch.cat([pairs[0], pairs[1, [0, 2]]]).mean()
    got = PartialDiceCELoss(ce_weight=0.0, batch_dice=False)(logits, target)
    assert torch.allclose(got, expected, rtol=1e-12, atol=0)


def test_ignore_label_voxels_get_no_gradient_and_do_not_count():
    logits, target = batch()
    target[0, 0, 0:3] = 9  # an ignore region
    logits.requires_grad_(True)
    loss = PartialDiceCELoss(ignore_label=9)(logits, target)
    loss.backward()
    assert torch.equal(logits.grad[0, :, 0:3], torch.zeros_like(logits.grad[0, :, 0:3]))
    assert logits.grad[0, :, 3:].abs().sum() > 0


def test_bad_shapes_and_values_are_refused():
    logits, target = batch()
    with pytest.raises(ValueError, match=r"contoured must be \(B, C\) = \(2, 4\), got \(2, 3\)"):
        PartialDiceCELoss()(logits, target, torch.ones(2, 3, dtype=torch.bool))
    with pytest.raises(ValueError, match="label values must be in 0..3"):
        PartialDiceCELoss()(logits, target + 4)
    with pytest.raises(ValueError, match="expected logits"):
        PartialDiceCELoss()(logits, target[:, 0])
