"""medseg.units: sizes shown in the unit that reads, stored in mm, mm² and mL."""

from __future__ import annotations

import pytest
from conftest import make_grid

from medseg.units import display_unit, number, plain, readable, voxel_size


@pytest.mark.parametrize("value, unit, shown", [
    pytest.param(8e-5, "mm²", "80.0 µm²", id="nucleus-area"),
    pytest.param(0.0043, "mm²", "4300 µm²", id="cell-area"),
    pytest.param(0.0123, "mm²", "0.012 mm²", id="just-above-the-switch"),
    pytest.param(12.34, "mL", "12.3 mL", id="organ-volume"),
    pytest.param(345.6, "mL", "346 mL", id="bladder"),
    pytest.param(0.004, "mL", "4.0 mm³", id="tiny-volume"),
    pytest.param(0.0015, "mm", "1.5 µm", id="microscopy-distance"),
    pytest.param(2.5, "mm", "2.5 mm", id="ct-distance"),
    pytest.param(0.0, "mm²", "0 mm²", id="nothing"),
])
def test_readable_picks_the_unit_and_about_three_digits(value, unit, shown):
    assert readable(value, unit) == shown


def test_a_row_keeps_one_unit_and_pictures_get_ascii():
    assert readable(0.0, "mm²", like=8e-5) == "0 µm²"  # an empty organ beside its 80 um2 reference
    assert readable(8e-5, "mm²", ascii=True) == "80.0 um2" and plain("mm³") == "mm3"
    assert display_unit(0.05, "mm") == (1e3, "µm") and display_unit(0.5, "mm") == (1.0, "mm")
    assert number(-0.0341) == "-0.034" and number(1234.4) == "1234"
    with pytest.raises(ValueError, match="unit 'cm' is not one of mm, mm², mL"):
        display_unit(1.0, "cm")


def test_a_voxel_adds_its_volume_a_pixel_of_a_2d_image_its_area():
    scan = make_grid("LPS", shape=(4, 4, 3), spacing=(1.0, 2.0, 3.0))
    image = make_grid("LPS", shape=(4, 4, 1), spacing=(0.0005, 0.0005, 1.0))
    assert voxel_size(scan) == (pytest.approx(0.006), "mL")
    assert voxel_size(image) == (pytest.approx(2.5e-7), "mm²")  # 0.25 um2; the third spacing is no thickness
