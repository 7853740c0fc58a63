"""QA flags: per organ and case, what a reviewer should look at first, each with its reason.

The checks compare a prediction with what the model's training set held (the fingerprint's
`organ_statistics`, kept in every model folder's config.json; `medseg.data.fingerprint`):

- **volume**: the organ's volume (a 2D image's: its area, `medseg.units.voxel_size`) is outside the
  training range widened by VOLUME_MARGIN (below min / (1 + margin) or above max × (1 + margin); the
  1st-99th percentiles are quoted, in the unit that reads: mL or mm³, mm² or µm²).
- **pieces**: several significant pieces (`medseg.geometry.significant_pieces`: each at least 10 % of
  the largest and 1 % of the organ's median size in training) of an organ that was one piece in at least
  ONE_PIECE of the training cases (or, without statistics, one the task keeps to its largest piece).
  Counted before the largest-component step, which then keeps only the largest.
- **side**: of a left/right pair (the task's `pairs`), the left organ's centre lies on the patient's
  right of the right organ's (world LPS x grows towards the patient's left), or, with its partner
  missing, more than SIDE_MARGIN_MM on the wrong side of the centre of the unpaired organs found.
- **missing**: no voxel of an organ that training held in at least EXPECTED_PRESENCE of its cases,
  although the scan covers its usual position: the volume-weighted centre of the other organs found,
  moved by the organ's median offset from them in training, lies inside the scan's world extent along
  R-L, A-P and S-I (LPS x, y, z). Where it lies outside along any of them, the organ gets an
  **outside** note instead (severity 0: listed, not counted as a flag): the scan does not show it.
  Model folders whose statistics hold only the S-I offset (trained before the others were recorded)
  check S-I alone. With no organ found at all, every expected organ is flagged (the scan may not show
  this body region).
- **confidence**: the organ's confidence (`medseg.infer.uncertainty`: mean probability where it wins)
  is below the organ's threshold, chosen on the model's validation cases (`medseg.infer.calibration`,
  the folder's confidence.json), or LOW_CONFIDENCE for an organ or model without one; the reason says
  which applied. Only where confidence is computed: with a cross-validation folder or `--uncertainty`.

A model folder from before these statistics existed skips the volume, missing and piece-frequency
parts (`skipped` says so). Severity orders the flags (and the cases) worst first: side 3, missing
2.5, volume 1.5-3 and pieces 1.5-2.5 by how far off, confidence 1-2 by how low; outside notes 0.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING

import numpy as np

from medseg.config import Task
from medseg.geometry import label_boxes, mask_centre, piece_sizes, significant_pieces
from medseg.io import Grid
from medseg.units import SIZE_KEYS, display_unit, number, voxel_size

if TYPE_CHECKING:
    from medseg.infer.calibration import Calibration

VOLUME_MARGIN = 0.25  # volumes within [min / 1.25, max x 1.25] of training pass
ONE_PIECE = 0.9  # an organ is expected in one piece when training had it so in 90 % of cases
EXPECTED_PRESENCE = 0.9  # an organ is expected when training cases held it in 90 % of cases
LOW_CONFIDENCE = 0.8  # confidence below this is flagged where the model has no calibrated threshold for the organ
SIDE_MARGIN_MM = 10.0  # a paired organ found without its partner must lie this far on the wrong side to be flagged
OFFSET_KEYS = ("offset_rl_mm", "offset_ap_mm", "offset_si_mm")  # training's offsets along LPS x, y, z
AXES = (("R-L", "x"), ("A-P", "y"), ("S-I", "z"))  # anatomical name and LPS coordinate of each world axis


@dataclass(frozen=True)
class Flag:
    organ: str
    check: str  # volume, pieces, side, missing, confidence; or outside (a note)
    reason: str  # one sentence a reviewer reads
    severity: float  # higher is worse: flags and cases are listed worst first; 0: a note, not a warning

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class TrainingStats:
    """What the model's training cases held, per organ (the fingerprint's `organ_statistics`)."""

    organs: Mapping[str, dict]

    @classmethod
    def from_fingerprints(cls, fingerprints: Iterable[Mapping]) -> TrainingStats | None:
        """One model's, or the folds' together (each case trained K-1 of K folds: min and max are the whole
        set's, the percentiles the widest fold's); None when no fingerprint has the statistics."""
        found = [fp["organ_statistics"] for fp in fingerprints if isinstance(fp.get("organ_statistics"), Mapping)]
        if not found:
            return None
        return cls({organ: _merge([stats[organ] for stats in found if organ in stats]) for organ in found[0]})


def _merge(entries: list[dict]) -> dict:
    if len(entries) == 1:
        return entries[0]
    present = [e for e in entries if e.get("present")]
    merged = {"cases": max(e["cases"] for e in entries), "present": max(e["present"] for e in entries),
              "presence": float(np.mean([e["present"] / e["cases"] for e in entries if e["cases"]] or [0.0]))}
    if present:
        pick = {"min": min, "p01": min, "p50": np.median, "p99": max, "max": max}
        for size in (key for key in SIZE_KEYS.values() if key in present[0]):  # volume_ml; a 2D task's area_mm2
            merged[size] = {k: float(f([e[size][k] for e in present])) for k, f in pick.items()}
        merged["one_piece"] = float(np.mean([e["one_piece"] for e in present]))
        for key in (*OFFSET_KEYS, "height_si_mm"):
            values = [e[key] for e in present if e.get(key) is not None]
            merged[key] = float(np.median(values)) if values else None
    return merged


def _presence(entry: Mapping) -> float:
    return entry.get("presence", entry["present"] / entry["cases"] if entry.get("cases") else 0.0)


# ----------------------------------------------------------------------------------------- checks


@dataclass(frozen=True)
class _Organ:
    """One organ of a predicted mask: what the checks measure of it."""

    name: str
    volume_ml: float
    centre: np.ndarray | None  # world LPS (mm)
    pieces: list[int]  # voxels of each piece, largest first
    size: float = 0.0  # what the volume check compares: `volume_ml`, or a 2D image's area
    unit: str = "mL"  # of `size`: mL, or mm² (`medseg.units.voxel_size`)


def _measure(labels: np.ndarray, grid: Grid, organs: Mapping[int, str], pieces: Mapping[str, Sequence[int]],
             extent: tuple[slice, ...] | None) -> dict[str, _Organ]:
    """Volume, world centre and pieces of every organ (pieces counted here for those `pieces` lacks)."""
    inside = labels[extent] if extent is not None else labels[:0, :0, :0]
    boxes = label_boxes(inside, max_label=max(organs)) if inside.size else []
    offset = [s.start for s in extent] if extent is not None else [0, 0, 0]
    per_voxel, unit = voxel_size(grid)
    measured = {}
    for label_id, name in organs.items():
        box = boxes[label_id - 1] if label_id - 1 < len(boxes) else None
        if box is None:
            measured[name] = _Organ(name, 0.0, None, [], 0.0, unit)
            continue
        organ = inside[box] == label_id
        whole = tuple(slice(s.start + o, s.stop + o) for s, o in zip(box, offset))
        centre = grid.affine @ np.r_[mask_centre(organ, whole), 1.0]
        sizes = list(pieces[name]) if name in pieces else piece_sizes(organ).tolist()
        voxels = int(organ.sum())
        measured[name] = _Organ(name, voxels * grid.voxel_volume_ml, centre[:3], sizes, voxels * per_voxel, unit)
    return measured


def _volume_flags(found: dict[str, _Organ], stats: TrainingStats) -> list[Flag]:
    flags = []
    for name, organ in found.items():
        seen = stats.organs.get(name, {}).get(SIZE_KEYS[organ.unit])  # volume_ml, or a 2D task's area_mm2
        if organ.size <= 0 or not seen or seen["min"] <= 0:  # min 0: a fingerprint from before sizes kept their
            continue  # significant digits (rounded to 0.0001 mL, a nucleus is 0): no range to compare with
        low, high = seen["min"] / (1 + VOLUME_MARGIN), seen["max"] * (1 + VOLUME_MARGIN)
        if low <= organ.size <= high:
            continue
        above = organ.size > high
        limit = seen["max"] if above else seen["min"]
        far = abs(math.log2(organ.size / limit))
        factor, unit = display_unit(max(organ.size, seen["max"]), organ.unit)  # one unit for the whole sentence
        reason = (f"{'area' if organ.unit == 'mm²' else 'volume'} {number(organ.size * factor)} {unit} is "
                  f"{'above' if above else 'below'} anything in training ({'max' if above else 'min'} "
                  f"{number(limit * factor)} {unit} over {stats.organs[name]['present']} cases; 1st-99th percentile "
                  f"{number(seen['p01'] * factor)}-{number(seen['p99'] * factor)} {unit})")
        flags.append(Flag(name, "volume", reason, round(1.5 + min(far, 1.5), 3)))
    return flags


def _piece_flags(found: dict[str, _Organ], stats: TrainingStats | None, kept_largest: Sequence[str],
                 per_voxel: float) -> list[Flag]:
    """`per_voxel`: a voxel's size in the organs' `unit` (`medseg.units.voxel_size`)."""
    flags = []
    for name, organ in found.items():
        entry = stats.organs.get(name, {}) if stats else {}
        if entry.get("present") and SIZE_KEYS[organ.unit] not in entry:  # a 2D model's statistics from before
            entry = {}  # areas: its pieces were judged against 0.1 mL, so every organ counted as one piece
        one_expected = entry.get("one_piece", 0.0) >= ONE_PIECE if "one_piece" in entry else name in kept_largest
        typical = (entry.get(SIZE_KEYS[organ.unit]) or {}).get("p50")  # training's median size, if known
        count = significant_pieces([size * per_voxel for size in organ.pieces], typical)
        if not one_expected or count < 2:
            continue
        factor, unit = display_unit(organ.pieces[0] * per_voxel, organ.unit)
        sizes = ", ".join(number(s * per_voxel * factor) for s in organ.pieces[:count])  # largest first
        apart = sum(organ.pieces[1:count]) / max(sum(organ.pieces[:count]), 1)
        cleaned = "; only the largest was kept" if name in kept_largest else ""
        reason = f"{count} separate pieces ({sizes} {unit}) where training had one{cleaned}"
        flags.append(Flag(name, "pieces", reason, round(1.5 + min(apart * 2, 1.0), 3)))
    return flags


def _weighted_mean(pairs: Sequence[tuple[float, float]]) -> float:
    """Mean of (value, weight) pairs: the organs' centre weighted by their volumes."""
    values, weights = zip(*pairs)
    return float(np.average(values, weights=weights))


def _side_flags(found: dict[str, _Organ], task: Task) -> list[Flag]:
    paired = {name for pair in task.pairs for name in pair}
    middle = [(o.centre[0], o.volume_ml) for o in found.values() if o.centre is not None and o.name not in paired]
    midline = _weighted_mean(middle) if middle else None
    flags = []
    for left, right in task.pairs:
        a, b = found[left].centre, found[right].centre
        if a is not None and b is not None:
            if a[0] < b[0]:
                reason = (f"lies on the patient's right of {{other}} (centre x {a[0]:.1f} mm vs {b[0]:.1f} mm; "
                          f"LPS x grows towards the patient's left)")
                flags += [Flag(left, "side", reason.format(other=right), 3.0),
                          Flag(right, "side", reason.format(other=left).replace("right of", "left of"), 3.0)]
            continue
        for name, centre, wrong in ((left, a, "right"), (right, b, "left")):
            if centre is None or midline is None:
                continue
            if (centre[0] < midline - SIDE_MARGIN_MM) if wrong == "right" else (centre[0] > midline + SIDE_MARGIN_MM):
                flags.append(Flag(name, "side", f"lies on the patient's {wrong} (centre x {centre[0]:.1f} mm, the "
                                  f"unpaired organs' centre x {midline:.1f} mm; its partner was not found)", 3.0))
    return flags


def _scan_extent(grid: Grid) -> np.ndarray:
    """(3, 2) world LPS min and max of the scan's voxel centres along x, y, z (its 8 corners)."""
    corners = np.array(np.meshgrid(*[[0, n - 1] for n in grid.shape], indexing="ij")).reshape(3, -1)
    world = grid.affine[:3, :3] @ corners + grid.affine[:3, 3:]
    return np.stack([world.min(1), world.max(1)], 1)


def _place(name: str, entry: Mapping, others: Sequence[_Organ], extent: np.ndarray, seen: str) -> Flag | None:
    """Missing (the scan covers where the organ usually lies), outside (it does not), or None (no offsets)."""
    axes = [a for a, key in enumerate(OFFSET_KEYS) if entry.get(key) is not None]
    if not axes:
        return None
    centre = np.average([o.centre for o in others], axis=0, weights=[o.volume_ml for o in others])
    expected = {a: float(centre[a] + entry[OFFSET_KEYS[a]]) for a in axes}
    beyond = [a for a in axes if not extent[a, 0] <= expected[a] <= extent[a, 1]]
    if beyond:
        where = "; ".join(f"{AXES[a][0]}: {AXES[a][1]} {expected[a]:.0f} mm, the scan {extent[a, 0]:.0f} to "
                          f"{extent[a, 1]:.0f} mm" for a in beyond)
        return Flag(name, "outside", f"not found, and its usual position lies outside the scan's field of view "
                    f"({where}); not flagged missing", 0.0)
    position = ", ".join(f"{AXES[a][1]} {expected[a]:.0f}" for a in axes)
    offset = ", ".join(f"{entry[OFFSET_KEYS[a]]:+.0f}" for a in axes)
    unchecked = "" if len(axes) == 3 else f"; only {', '.join(AXES[a][0] for a in axes)} known from training"
    return Flag(name, "missing", f"not found ({seen}), although the scan covers its usual position, {position} mm "
                f"LPS ({offset} mm from the other organs' centre{unchecked})", 2.5)


def _missing_flags(found: dict[str, _Organ], stats: TrainingStats, grid: Grid) -> list[Flag]:
    extent = _scan_extent(grid)
    others = [o for o in found.values() if o.centre is not None]
    flags = []
    for name, organ in found.items():
        entry = stats.organs.get(name, {})
        if organ.volume_ml > 0 or not entry.get("cases") or _presence(entry) < EXPECTED_PRESENCE:
            continue
        seen = f"training had it in {entry['present']} of {entry['cases']} cases"
        if not others:
            flags.append(Flag(name, "missing", f"not found, nor any other organ ({seen}); does the scan show "
                              "this body region?", 2.0))
            continue
        flag = _place(name, entry, others, extent, seen)
        if flag is not None:
            flags.append(flag)
    return flags


def _confidence_flags(confidence: Mapping[str, Mapping], score: str, calibration: Calibration | None) -> list[Flag]:
    flags = []
    for name, scores in confidence.items():
        value = scores.get(score)
        limit, which = (calibration.threshold(name) if calibration is not None
                        else (LOW_CONFIDENCE, "the default; the model has no calibration (`medseg calibrate`)"))
        if value is not None and value < limit:
            reason = f"low confidence {value:.2f} (mean probability where it is predicted; flagged below {limit}, {which})"
            flags.append(Flag(name, "confidence", reason, round(1.0 + min((limit - value) * 4, 1.0), 3)))
    return flags


def check_segmentation(seg, task: Task, stats: TrainingStats | None, kept_largest: Sequence[str] = (),
                       calibration: Calibration | None = None) -> list[Flag]:
    """Every flag of one predicted case (a `medseg.infer.predictor.Segmentation`), worst first.

    Args:
        stats: what training held (`TrainingStats.from_fingerprints`); None skips the checks that need it.
        kept_largest: the organs the prediction kept to their largest piece.
        calibration: per-organ confidence thresholds (`medseg.infer.calibration.read_calibration`); None:
            LOW_CONFIDENCE for every organ.
    """
    from medseg.infer.uncertainty import CONFIDENCE_SCORE

    found = _measure(seg.labels, seg.grid, seg.organs, seg.pieces, seg.extent)
    flags = _side_flags(found, task) + _piece_flags(found, stats, kept_largest, voxel_size(seg.grid)[0])
    if stats is not None:
        flags += _volume_flags(found, stats) + _missing_flags(found, stats, seg.grid)
    flags += _confidence_flags(seg.confidence, CONFIDENCE_SCORE, calibration)
    return sorted(flags, key=lambda f: (-f.severity, f.organ, f.check))


def skipped_checks(stats: TrainingStats | None, with_confidence: bool) -> list[str]:
    """Which checks did not run, and why (for summary.json)."""
    skipped = []
    if stats is None:
        skipped.append("volume, missing: the model folder has no organ statistics in its fingerprint (trained "
                       "before they were recorded); pieces: judged by the task's largest_component list")
    elif not any(entry.get("offset_rl_mm") is not None for entry in stats.organs.values()):
        skipped.append("missing: the field of view is checked head-foot only; the model folder's statistics "
                       "predate the R-L and A-P offsets")
    if not with_confidence:
        skipped.append("confidence: computed only with a cross-validation folder or --uncertainty")
    return skipped


def format_flags(case: str, flags: Sequence[Mapping]) -> list[str]:
    """Lines for the terminal, one per flag (a note, severity 0, says so)."""
    return [f"  {'flag' if f['severity'] > 0 else 'note'} {case} / {f['organ']} [{f['check']}]: {f['reason']}"
            for f in flags]


class Checker:
    """The QA checks of one `medseg predict` run: the model's training statistics, read once.

    Args:
        folders: the model folders predicting (one, or the folds of a cross-validation folder).
        kept_largest: the organs the prediction keeps to their largest piece.
        with_confidence: whether segmentations carry a confidence (ensembles, --uncertainty).
        calibration: the per-organ confidence thresholds of the model (`medseg.infer.calibration`).
    """

    def __init__(self, folders: Sequence, task: Task, kept_largest: Sequence[str] = (), with_confidence: bool = False,
                 calibration: Calibration | None = None):
        from medseg.model.folder import read_run_config

        self.task = task
        self.kept_largest = tuple(kept_largest)
        self.stats = TrainingStats.from_fingerprints(read_run_config(f).fingerprint for f in folders)
        self.with_confidence = with_confidence
        self.calibration = calibration

    def __call__(self, seg) -> list[dict]:
        """The flags of one case as plain dicts, worst first. Where the calibration has fitted lines, each
        organ's scores in `seg.confidence` also get its "estimated_dice" (`Calibration.estimated_dice`)."""
        if self.calibration is not None:
            self.calibration.add_estimates(seg.confidence)
        flags = check_segmentation(seg, self.task, self.stats, self.kept_largest, self.calibration)
        return [f.to_dict() for f in flags]

    def report(self, rows: Sequence[Mapping]) -> dict:
        """For summary.json: which checks ran (and which not, why), and every case's flags, worst first."""
        flags = [{"case": row["case"], **flag} for row in rows for flag in row.get("flags", [])]
        return {"qa": {"checks": ["volume", "pieces", "side", "missing", "confidence"], "notes": ["outside"],
                       "skipped": skipped_checks(self.stats, self.with_confidence),
                       "thresholds": {"volume_margin": VOLUME_MARGIN, "one_piece": ONE_PIECE,
                                      "side_margin_mm": SIDE_MARGIN_MM,
                                      "expected_presence": EXPECTED_PRESENCE, "low_confidence": LOW_CONFIDENCE},
                       "confidence_calibration": self.calibration.report() if self.calibration else None},
                "flags": sorted(flags, key=lambda f: (-f["severity"], f["case"], f["organ"]))}

    @staticmethod
    def closing_line(rows: Sequence[Mapping]) -> str:
        """How many flags in how many cases; notes (organs outside the field of view) counted apart."""
        warned = [[f for f in row.get("flags", []) if f["severity"] > 0] for row in rows]
        count, cases = sum(map(len, warned)), sum(1 for w in warned if w)
        notes = sum(len(row.get("flags", [])) for row in rows) - count
        outside = f"; {notes} organ{'s' if notes != 1 else ''} outside the field of view" if notes else ""
        if not count:
            return "QA: no flags" + outside
        return (f"QA: {count} flag{'s' if count != 1 else ''} in {cases} of {len(rows)} cases{outside} "
                f"(worst first in summary.json and at the top of review.html)")
