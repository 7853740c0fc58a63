"""Structure names to organs: TG-263, organ names, clinic spellings, the mapping file, and refusals."""

from __future__ import annotations

import json

import pytest

from medseg.config import load_task
from medseg.dicom.names import (
    AMBIGUOUS,
    IGNORED,
    MAPPED,
    ORGAN_NAME,
    OVERRULED,
    SYNONYM,
    TG263,
    UNMATCHED,
    StructureMatch,
    load_mapping,
    match_structures,
    name_key,
    organs_found,
)
from medseg.errors import InputError

HEADNECK = load_task("headneck").labels
PROSTATE = load_task("prostate").labels


@pytest.mark.parametrize("name, key", [
    ("Parotid_L", ("parotid", "L")),
    ("Lt Parotid", ("parotid", "L")),
    ("PAROTID LEFT", ("parotid", "L")),
    ("parotid-rt", ("parotid", "R")),
    ("LParotid", ("parotid", "L")),
    ("Right Parotid Gland", ("parotid", "R")),
    ("Spinal Cord", ("spinalcord", None)),
    ("CORD", ("spinalcord", None)),
    ("Brain Stem", ("brainstem", None)),
    ("femoral head rt", ("femurhead", "R")),
    ("Rectum", ("rectum", None)),  # one word: an R at its start is not a side
    ("L", ("l", None)),
    ("Parotid_L_1", ("parotidl1", None)),  # a side only at either end
])
def test_name_key(name, key):
    assert name_key(name) == key


@pytest.mark.parametrize("structure, organ, how", [
    ("Brainstem", "brainstem", TG263),
    ("BRAIN_STEM", "brainstem", TG263),
    ("Brain Stem", "brainstem", TG263),
    ("SpinalCord", "spinal_cord", TG263),
    ("Spinal Cord", "spinal_cord", TG263),
    ("spinal_cord", "spinal_cord", TG263),
    ("Cord", "spinal_cord", SYNONYM),
    ("Parotid_L", "left_parotid", TG263),
    ("Parotid_Lt", "left_parotid", SYNONYM),
    ("Lt Parotid", "left_parotid", SYNONYM),
    ("PAROTID LEFT", "left_parotid", SYNONYM),
    ("left_parotid", "left_parotid", ORGAN_NAME),
    ("Rt Parotid", "right_parotid", SYNONYM),
    ("R_Parotid", "right_parotid", SYNONYM),
    ("Oesophagus", "esophagus", SYNONYM),
    ("ESOPHAGUS", "esophagus", TG263),
    ("Mandible", "mandible", ORGAN_NAME),
    ("Bone_Mandible", "mandible", TG263),
    ("Larynx", "larynx", TG263),
    ("Parotids", None, UNMATCHED),  # both parotids in one structure: no side, no organ
    ("Parotid", None, UNMATCHED),
    ("PTV_70", None, UNMATCHED),
    ("z_Parotid_L_opt", None, UNMATCHED),  # a planning helper, not the organ
    ("Parotid_L_PRV", None, UNMATCHED),
    ("SpinalCanal", None, UNMATCHED),
])
def test_headneck_structures(structure, organ, how):
    assert match_structures([structure], HEADNECK) == [StructureMatch(structure, organ, how)]


@pytest.mark.parametrize("structure, organ", [
    ("Prostate", "prostate"), ("BLADDER", "bladder"), ("Rectum", "rectum"), ("Femur_Head_L", "femoral_head_left"),
    ("femoral head rt", "femoral_head_right"), ("FemoralHead_Lt", "femoral_head_left"),
    ("Femur_L", None), ("Femur_Head", None), ("Bladder_Wall", None),
])
def test_prostate_structures(structure, organ):
    assert match_structures([structure], PROSTATE)[0].organ == organ


def test_two_structures_for_one_organ_are_ambiguous():
    matches = match_structures(["Parotid_L", "Lt Parotid", "Brainstem"], HEADNECK)
    assert [(m.organ, m.how) for m in matches] == [(None, AMBIGUOUS), (None, AMBIGUOUS), ("brainstem", TG263)]
    assert organs_found(matches) == {"brainstem": ["Brainstem"]}


def test_the_mapping_file_wins():
    mapping = {"Lt Parotid": None, "PG_R": "right_parotid", "cord prv": None, "Myelon": "SpinalCord",
               "Brainstem": "larynx"}
    matches = match_structures(["Parotid_L", "Lt Parotid", "PG_R", "Rt Parotid", "Cord PRV", "Myelon", "Cord",
                                "Brainstem"], HEADNECK, mapping)
    assert [(m.organ, m.how) for m in matches] == [
        ("left_parotid", TG263),  # its rival is ignored by the mapping: no longer ambiguous
        (None, IGNORED),
        ("right_parotid", MAPPED),
        (None, OVERRULED),  # the mapping gave its organ to PG_R
        (None, IGNORED),  # mapping keys ignore case and separators
        ("spinal_cord", MAPPED),  # a TG-263 name as the mapping's value
        (None, OVERRULED),
        ("larynx", MAPPED),  # even against the rules
    ]


def test_structures_mapped_to_one_organ_are_merged():
    matches = match_structures(["Mand_upper", "Mand_lower"], HEADNECK, {"Mand_upper": "mandible",
                                                                       "Mand_lower": "mandible"})
    assert organs_found(matches) == {"mandible": ["Mand_upper", "Mand_lower"]}


@pytest.mark.parametrize("text, suffix, message", [
    (json.dumps({"PG_L": "left_parotid", "X": None}), ".json", None),
    ("PG_L: left_parotid\nX: null\n", ".yaml", None),
    (json.dumps({"PG_L": "parotid"}), ".json", (r"map\.json: key 'PG_L' maps to 'parotid', which is not an organ "
                                                r"of the task \(brainstem, .*; or null to ignore the structure\)")),
    (json.dumps(["PG_L"]), ".json", r"map\.json: expected a mapping of structure name to organ name"),
    ("{PG_L: [", ".yaml", r"map\.yaml: not valid YAML"),
])
def test_load_mapping(tmp_path, text, suffix, message):
    path = tmp_path / f"map{suffix}"
    path.write_text(text)
    if message is None:
        assert load_mapping(path, HEADNECK) == {"PG_L": "left_parotid", "X": None}
    else:
        with pytest.raises(InputError, match=message):
            load_mapping(path, HEADNECK)


def test_missing_mapping_file(tmp_path):
    with pytest.raises(InputError, match=r"nope\.yaml: no such mapping file"):
        load_mapping(tmp_path / "nope.yaml", HEADNECK)
