"""Which prediction goes with which reference: files, folders of masks, or a dataset folder.

Two folders are matched by case name (`<case>_seg.nii.gz`, as `medseg predict` writes, matches
`<case>.nii.gz`). With a dataset folder (`medseg.data.datasets` layouts) as reference, each case's
`contoured` organs travel along, so that organs a case did not contour are skipped, not scored as misses.
"""

from __future__ import annotations

from pathlib import Path

from medseg.errors import InputError
from medseg.io import IMAGE_SUFFIXES, case_name, is_image_path

Pair = tuple[str, Path, Path]  # (case, prediction file, reference file)


PRED_SUFFIX = "_seg"  # `medseg predict` writes <case>_seg.nii.gz


def _mask_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir()
                  if p.is_file() and is_image_path(p) and not p.name.startswith("."))


def match_cases(pred: str | Path, ref: str | Path) -> tuple[list[Pair], list[str], list[str]]:
    """Pair prediction and reference files by case name.

    Two files make one pair. Two folders are matched by `case_name`; a prediction `<case>_seg.nii.gz`
    matches the reference `<case>.nii.gz`.

    Returns:
        (pairs as (case, pred, ref), predictions without a reference, references without a prediction).
    """
    pred, ref = Path(pred), Path(ref)
    for path, what in ((pred, "prediction"), (ref, "reference")):
        if not path.exists():
            raise InputError(f"{path}: no such {what} file or folder")
    if pred.is_file() and ref.is_file():
        return [(case_name(ref), pred, ref)], [], []
    if pred.is_file() != ref.is_file():
        raise InputError(f"--pred {pred} and --ref {ref}: give two mask files or two folders, "
                         "not one of each")
    refs = {case_name(p): p for p in _mask_files(ref)}
    if not refs:
        raise InputError(f"{ref}: folder holds no mask files ({', '.join(IMAGE_SUFFIXES)})")
    preds = _predictions(pred, set(refs))
    pairs = [(name, preds[name], refs[name]) for name in sorted(preds) if name in refs]
    return pairs, sorted(set(preds) - set(refs)), sorted(set(refs) - set(preds))


def _predictions(folder: Path, references: set[str]) -> dict[str, Path]:
    """Prediction files of a folder by case name (`<case>_seg` counts as `<case>`)."""
    preds: dict[str, Path] = {}
    files = _mask_files(folder)
    masks = [p for p in files if case_name(p).endswith(PRED_SUFFIX)]
    # A `medseg predict` folder also holds probability maps and viewer copies (.seg.nrrd): its masks
    # are the `<case>_seg` files alone.
    for path in masks or files:
        name = case_name(path)
        if name not in references and name.endswith(PRED_SUFFIX):
            name = name[: -len(PRED_SUFFIX)]
        if name in preds and path.suffix.lower() == ".png" and case_name(preds[name]) == case_name(path):
            continue  # a 2D prediction's PNG copy beside its NIfTI (`medseg predict`): the NIfTI is scored
        if name in preds and not (preds[name].suffix.lower() == ".png" and case_name(preds[name]) == case_name(path)):
            raise InputError(f"{preds[name]} and {path}: two predictions for case '{name}'")
        preds[name] = path
    if not preds:
        raise InputError(f"{folder}: folder holds no mask files ({', '.join(IMAGE_SUFFIXES)})")
    return preds


def is_dataset_folder(path: str | Path) -> bool:
    """A dataset folder (dataset.json, or images/ + labels/) rather than a folder of masks."""
    path = Path(path)
    return (path / "dataset.json").is_file() or ((path / "images").is_dir() and (path / "labels").is_dir())


def match_dataset(pred: str | Path, root: str | Path
                  ) -> tuple[list[Pair], list[str], dict[str, tuple[str, ...] | None]]:
    """Pair a folder of predictions with the labelled cases (training and test) of a dataset folder.

    Returns:
        (pairs as (case, pred, ref), predictions without a labelled case, case -> contoured organs
        or None where the case is fully labelled). Dataset cases without a prediction are not listed:
        evaluating part of a dataset (a validation split) is the usual use.
    """
    from medseg.data.datasets import load_dataset

    pred = Path(pred)
    if not pred.is_dir():
        raise InputError(f"--pred {pred}: with a dataset folder as --ref, give a folder of predictions")
    cases = {c.name: c for c in load_dataset(root, "train") + load_dataset(root, "test") if c.label is not None}
    preds = _predictions(pred, set(cases))
    pairs = [(name, preds[name], cases[name].label) for name in sorted(preds) if name in cases]
    return pairs, sorted(set(preds) - set(cases)), {name: cases[name].contoured for name, _, _ in pairs}
