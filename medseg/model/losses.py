"""Dice + cross-entropy that learns only from what each case labelled (partial labels, ignore label).

With every organ contoured and no ignore label, `PartialDiceCELoss` is MONAI's
`DiceCELoss(to_onehot_y=True, softmax=True, include_background=False, batch=True)`: the same value.
Two things differ when a case is partially labelled:

- An organ a case did not contour keeps its place in the softmax, as at inference, but its logit is
  detached there, so its channel gets exactly zero gradient from that case. Its voxels read 0, so
  "background" in such a case means "background or that organ": cross-entropy at a background voxel
  scores -log(p_background + p_organ) (marginal cross-entropy, with the organ's logit detached), and the
  organ's Dice term is left out for that case. Predicting the organ where the case says background
  then costs nothing; where the case says another organ it is still wrong, and costs as it should.
  (Taking the organ out of the softmax instead, as an earlier version did, also gives zero gradient,
  but teaches background to beat the other organs on the organ's own voxels in every case that did not
  contour it: a rarely contoured organ, the esophagus in 35% of the head-and-neck cases, then never got
  above its prior.)
- Voxels holding the task's `ignore_label` (nnU-Net convention) are left out of both terms.

Dice is computed over the batch by default, as with MONAI's `batch=True`: per organ, intersections
and sums run over the cases that contoured it, and organs contoured by no case of the batch are left
out of the mean. With `batch_dice=False` it is per case instead, averaged over the (case, organ) pairs
whose patch holds the organ and whose case contoured it (an organ a patch does not hold gives a
constant Dice of 0 under MONAI's smoothing, so it adds nothing but dilution; cross-entropy already
punishes predicting it there). Cross-entropy is the mean over the voxels not ignored.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from monai.losses import DeepSupervisionLoss
from torch.nn.modules.loss import _Loss

from medseg.config import Task


class PartialDiceCELoss(_Loss):
    """Softmax Dice (organs only) + cross-entropy, per-case organ masks and an optional ignore label.

    Args:
        dice_weight: weight of the Dice term.
        ce_weight: weight of the cross-entropy term.
        ignore_label: label value whose voxels are left out; None: no such value.
        smooth_nr, smooth_dr: added to the Dice numerator and denominator (MONAI's defaults).
        batch_dice: Dice over the batch (True) or per case (False); see the module's docstring.
    """

    def __init__(self, dice_weight: float = 1.0, ce_weight: float = 1.0, ignore_label: int | None = None,
                 smooth_nr: float = 1e-5, smooth_dr: float = 1e-5, batch_dice: bool = True):
        super().__init__()
        if dice_weight < 0 or ce_weight < 0:
            raise ValueError(f"loss weights must be >= 0, got dice {dice_weight} and cross-entropy {ce_weight}")
        self.dice_weight = dice_weight
        self.ce_weight = ce_weight
        self.ignore_label = ignore_label
        self.smooth_nr = smooth_nr
        self.smooth_dr = smooth_dr
        self.batch_dice = batch_dice

    def forward(self, input: torch.Tensor, target: torch.Tensor,
                contoured: torch.Tensor | None = None) -> torch.Tensor:
        """
        Args:
            input: logits (B, C, *spatial).
            target: label map (B, 1, *spatial), integer values (float tensors holding integers work too).
            contoured: (B, C) bool, the channels each case has labels for (see `medseg.partial`);
                None: all. Background (channel 0) is always kept.

        Returns:
            The scalar loss.
        """
        if input.dim() != target.dim() or target.shape[1] != 1 or input.shape[2:] != target.shape[2:]:
            raise ValueError(f"expected logits (B, C, ...) and a label map (B, 1, ...) of the same spatial size, "
                             f"got {tuple(input.shape)} and {tuple(target.shape)}")
        batch, classes = input.shape[:2]
        if contoured is None:
            keep = torch.ones(batch, classes, dtype=torch.bool, device=input.device)
        else:
            if contoured.shape != (batch, classes):
                raise ValueError(f"contoured must be (B, C) = ({batch}, {classes}), got {tuple(contoured.shape)}")
            keep = contoured.to(device=input.device, dtype=torch.bool).clone()
            keep[:, 0] = True
        target = target.long()
        valid = torch.ones_like(target, dtype=torch.bool)
        if self.ignore_label is not None:
            valid &= target != self.ignore_label
        target = torch.where(valid, target, torch.zeros_like(target))
        if (target >= classes).any() or (target < 0).any():
            raise ValueError(f"label values must be in 0..{classes - 1} (or the ignore label), "
                             f"got {int(target.min())}..{int(target.max())}")
        spatial = (1,) * (input.dim() - 2)
        keep_map = keep.view(batch, classes, *spatial)
        # A voxel labelled with an organ its case did not contour contradicts the case's own list
        # (check-dataset reports it); it is ignored rather than scored against an untaught channel.
        valid &= torch.gather(keep_map.expand(-1, -1, *target.shape[2:]), 1, target)
        target = torch.where(valid, target, torch.zeros_like(target))
        # Half-precision logits (autocast) are scored in float32; float64 stays float64.
        logits = input.to(torch.promote_types(input.dtype, torch.float32))
        logits = torch.where(keep_map, logits, logits.detach())  # uncontoured organs: in the softmax, never taught

        log_p = torch.log_softmax(logits, 1)

        loss = logits.new_zeros(())
        if self.ce_weight:
            # "Background" in a case is background or any organ the case did not contour.
            unknown = ~keep_map.clone()
            unknown[:, 0] = True
            background = torch.logsumexp(log_p.masked_fill(~unknown, float("-inf")), 1)  # (B, *spatial)
            ce = -torch.where(target[:, 0] == 0, background, torch.gather(log_p, 1, target)[:, 0])
            ce = torch.where(valid[:, 0], ce, torch.zeros_like(ce))
            loss = loss + self.ce_weight * ce.sum() / valid.sum().clamp_min(1)
        if self.dice_weight:
            loss = loss + self.dice_weight * self._dice(log_p.exp(), target, valid, keep)
        return loss

    def _dice(self, probabilities: torch.Tensor, target: torch.Tensor, valid: torch.Tensor,
              keep: torch.Tensor) -> torch.Tensor:
        """Dice loss over the organ channels, over the batch or per case (`batch_dice`)."""
        weight = valid.to(probabilities.dtype)
        probabilities = probabilities * weight  # (B, C, *spatial)
        onehot = torch.zeros_like(probabilities).scatter_(1, target, 1.0) * weight
        dims = tuple(range(2, probabilities.dim()))
        intersection = (probabilities * onehot).sum(dims)[:, 1:]  # (B, C - 1)
        reference = onehot.sum(dims)[:, 1:]
        denominator = probabilities.sum(dims)[:, 1:] + reference
        if self.batch_dice:
            cases = keep[:, 1:].to(probabilities.dtype)
            intersection = (intersection * cases).sum(0)
            denominator = (denominator * cases).sum(0)
            scored = keep[:, 1:].any(0)
        else:
            scored = keep[:, 1:] & (reference > 0)
        if not scored.any():
            return probabilities.new_zeros(())
        dice = 1.0 - (2.0 * intersection + self.smooth_nr) / (denominator + self.smooth_dr)
        return dice[scored].mean()


class PartialDeepSupervisionLoss(DeepSupervisionLoss):
    """MONAI's deep-supervision wrapper (heads weighted 1, 1/2, 1/4, ...) that passes the masks on."""

    def forward(self, input: torch.Tensor | list[torch.Tensor], target: torch.Tensor,
                contoured: torch.Tensor | None = None) -> torch.Tensor:
        """
        Args:
            input: logits (B, C, *spatial), or a list of them, full resolution first.
            target: label map (B, 1, *spatial); resized nearest-neighbour to smaller heads.
            contoured: (B, C) bool or None, as for `PartialDiceCELoss`.
        """
        if not isinstance(input, (list, tuple)):
            return self.loss(input.float(), target, contoured)
        weights = self.get_weights(levels=len(input))
        loss = torch.zeros((), dtype=torch.float32, device=target.device)
        for weight, head in zip(weights, input):
            level_target = target
            if head.shape[2:] != target.shape[2:]:
                level_target = F.interpolate(target.float(), size=head.shape[2:], mode=self.interp_mode)
            loss = loss + weight * self.loss(head.float(), level_target, contoured)
        return loss


def build_loss(task: Task, deep_supervision: bool) -> torch.nn.Module:
    """The task's loss; call it as `loss(output, target, contoured)` (`contoured` may be None)."""
    loss = PartialDiceCELoss(task.loss.dice_weight, task.loss.ce_weight, task.ignore_label,
                             batch_dice=task.loss.batch_dice)
    return PartialDeepSupervisionLoss(loss, weight_mode="exp") if deep_supervision else loss
