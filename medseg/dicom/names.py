"""Which RTSTRUCT structure is which organ of a task: by name, never by guess.

A clinic writes the left parotid as `Parotid_L` (TG-263), `Lt Parotid`, `PAROTID LEFT` or
`parotid_lt`. A structure name is split into words (at spaces, `_`, `-`, other punctuation and
camelCase), one laterality word at its start or end (`L`, `Lt`, `Left`, `R`, `Rt`, `Right`) is taken
off as the side, and the rest is joined lower-case into a base name, mapped through a short table of
synonyms (`cord` -> `spinalcord`, `femoral head` -> `femur head`, `mandible` -> `bone mandible`, ...).
A structure matches an organ when base and side equal those of the organ's TG-263 name or its organ
name. A mapping file `{structure name: organ name, or null to ignore}` is applied first and wins.

What matches nothing is reported as unmatched; two structures that match one organ by these rules are
both reported as ambiguous and neither is used (a mapping entry settles it); structures the mapping
sends to one organ are merged. All functions are pure.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from medseg.errors import InputError

SIDES = {"l": "L", "lt": "L", "left": "L", "r": "R", "rt": "R", "right": "R"}
SYNONYMS = {  # base name (words joined, lower case, side removed) -> the TG-263 base name it means
    "cord": "spinalcord",
    "oesophagus": "esophagus",
    "mandible": "bonemandible",
    "parotidgland": "parotid",
    "femoralhead": "femurhead",
    "headoffemur": "femurhead",
    "urinarybladder": "bladder",
    "prostategland": "prostate",
}
_WORDS = re.compile(r"[A-Z]+(?=[A-Z][a-z])|[A-Z]?[a-z]+|[A-Z]+|[0-9]+")

# how a structure was matched (`StructureMatch.how`)
TG263, ORGAN_NAME, SYNONYM, MAPPED = "TG-263 name", "organ name", "synonym", "mapping file"
IGNORED, UNMATCHED, AMBIGUOUS, OVERRULED = "ignored by the mapping file", "no match", "ambiguous", "overruled by the mapping file"


@dataclass(frozen=True)
class StructureMatch:
    """What became of one structure: the organ it fills (None: not used) and why."""

    structure: str
    organ: str | None
    how: str  # one of TG263, ORGAN_NAME, SYNONYM, MAPPED (used) or IGNORED, UNMATCHED, AMBIGUOUS, OVERRULED


def words(name: str) -> list[str]:
    """Lower-case words of a name: `LtParotid_gland` -> ['lt', 'parotid', 'gland']."""
    return [w.lower() for w in _WORDS.findall(name)]


def name_key(name: str) -> tuple[str, str | None]:
    """(base, side) of a structure or organ name: `PAROTID LEFT` -> ('parotid', 'L'), `Cord` -> ('spinalcord', None)."""
    parts = words(name)
    side = None
    if len(parts) > 1 and parts[-1] in SIDES:
        side, parts = SIDES[parts[-1]], parts[:-1]
    elif len(parts) > 1 and parts[0] in SIDES:
        side, parts = SIDES[parts[0]], parts[1:]
    base = "".join(parts)
    return SYNONYMS.get(base, base), side


def _rule(structure: str, labels: Sequence) -> tuple[list[str], str]:
    """The organs a structure matches by rule, and how (the most literal way it matched)."""
    flat, key = "".join(words(structure)), name_key(structure)
    found, how = [], UNMATCHED
    for label in labels:
        tg263 = getattr(label, "tg263", None)
        if tg263 and flat == "".join(words(tg263)):
            found.append(label.name)
            how = TG263
        elif flat == "".join(words(label.name)):
            found.append(label.name)
            how = ORGAN_NAME
        elif key == name_key(label.name) or (tg263 and key == name_key(tg263)):
            found.append(label.name)
            how = SYNONYM if how == UNMATCHED else how
    return found, how


def _mapped(structure: str, mapping: Mapping[str, str | None]) -> tuple[bool, str | None]:
    """(listed, organ): the mapping entry for a structure, by exact name, else case and separators ignored."""
    if structure in mapping:
        return True, mapping[structure]
    flat = "".join(words(structure))
    for key, organ in mapping.items():
        if "".join(words(key)) == flat:
            return True, organ
    return False, None


def match_structures(structures: Sequence[str], labels: Sequence,
                     mapping: Mapping[str, str | None] | None = None) -> list[StructureMatch]:
    """How each structure name maps to the task's organs (see the module), in the order given.

    Args:
        structures: structure (ROI) names of one RTSTRUCT.
        labels: the task's labels (`medseg.config.Label`: `name`, optionally `tg263`).
        mapping: structure name -> organ name (or TG-263 name), or None to ignore the structure
            (`load_mapping` reads one from a file).
    """
    mapping = check_mapping(dict(mapping or {}), labels, "mapping")
    first: list[tuple[str, str | None, str]] = []  # (structure, organ, how) before conflicts are settled
    for structure in structures:
        listed, organ = _mapped(structure, mapping)
        if listed:
            first.append((structure, organ, MAPPED if organ else IGNORED))
            continue
        found, how = _rule(structure, labels)
        first.append((structure, found[0] if len(found) == 1 else None, how if len(found) <= 1 else AMBIGUOUS))
    by_mapping = {organ for _, organ, how in first if how == MAPPED}
    by_rule: dict[str, int] = {}
    for _, organ, how in first:
        if organ and how != MAPPED:
            by_rule[organ] = by_rule.get(organ, 0) + 1
    results = []
    for structure, organ, how in first:
        if organ and how != MAPPED and organ in by_mapping:
            results.append(StructureMatch(structure, None, OVERRULED))
        elif organ and how != MAPPED and by_rule[organ] > 1:
            results.append(StructureMatch(structure, None, AMBIGUOUS))
        else:
            results.append(StructureMatch(structure, organ, how))
    return results


def organs_found(matches: Sequence[StructureMatch]) -> dict[str, list[str]]:
    """Organ -> the structures that fill it (several only where the mapping file merges them)."""
    organs: dict[str, list[str]] = {}
    for match in matches:
        if match.organ:
            organs.setdefault(match.organ, []).append(match.structure)
    return organs


def check_mapping(raw: object, labels: Sequence, source: str) -> dict[str, str | None]:
    """A mapping `{structure: organ or null}` with every organ a name (or TG-263 name) of the task."""
    if not isinstance(raw, dict):
        raise InputError(f"{source}: expected a mapping of structure name to organ name (or null), got "
                         f"{type(raw).__name__}")
    names = {label.name: label.name for label in labels}
    names.update({label.tg263: label.name for label in labels if getattr(label, "tg263", None)})
    checked = {}
    for structure, organ in raw.items():
        if organ is not None and organ not in names:
            raise InputError(f"{source}: key '{structure}' maps to '{organ}', which is not an organ of the task "
                             f"({', '.join(label.name for label in labels)}; or null to ignore the structure)")
        checked[str(structure)] = names[organ] if organ is not None else None
    return checked


def load_mapping(path: str | Path, labels: Sequence) -> dict[str, str | None]:
    """Read a YAML or JSON mapping file for `match_structures`, checked against the task's labels."""
    from medseg.config import read_mapping

    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: no such mapping file")
    return check_mapping(read_mapping(path) or {}, labels, str(path))
