"""medseg.data.patches: the case split and patch batches."""

from __future__ import annotations

import pytest

from medseg.data.patches import make_split


def test_split_is_deterministic_and_disjoint():
    names = [f"case_{i:03d}" for i in range(17)]
    folds = [make_split(names, 5, fold, seed=3) for fold in range(5)]
    assert folds[0] == make_split(names, 5, 0, seed=3)
    held_out = [name for split in folds for name in split["validation"]]
    assert sorted(held_out) == names  # every case is validated exactly once over the folds
    for split in folds:
        assert not set(split["train"]) & set(split["validation"])
    with pytest.raises(ValueError, match="--fold 5 is out of range"):
        make_split(names, 5, 5, seed=0)
