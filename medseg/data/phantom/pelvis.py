"""One male pelvis in patient coordinates (mm, +x the patient's left, +y posterior, +z superior).

Painted in order, as layers: body and fat, glands and vessels, bones, then the labelled organs last,
so that what a label says is what the image shows. Every size and place is drawn from `rng`, in a
fixed order: the same seed gives the same case.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from medseg.data.phantom.shapes import (Arch, Capsule, Ellipsoid, HalfSpace, Intersect, Layer, Offset, Shape,
                                        Subtract, Tube)

FOV_AP_MM = 160.0  # anterior-posterior field of view; left-right and superior-inferior fit the organs
FOV_SI_MM = (100.0, 106.0)


@dataclass
class _Painter:
    """The layers painted so far, with this case's tissue intensities (HU) and cortical thickness."""

    rng: np.random.Generator
    hu: dict[str, float] = field(default_factory=dict)
    cortex: float = 0.0
    layers: list[Layer] = field(default_factory=list)

    def __post_init__(self) -> None:
        u = self.u
        self.hu = {"fat": u(-110, -85), "muscle": u(45, 58), "peri": u(35, 50), "vessel": u(35, 50),
                   "urine": u(0, 20), "wall": u(35, 45), "gas": u(-990, -900), "cortex": u(700, 1200),
                   "marrow": u(200, 400), "vesicle": u(25, 40),
                   "content": u(-40, 40) if self.rng.random() < 0.4 else u(10, 30)}
        self.hu["prostate"] = float(np.clip(self.hu["peri"] + u(-6, 4), 32, 45))
        self.cortex = u(2.0, 3.0)

    def u(self, low: float, high: float) -> float:
        return self.rng.uniform(low, high)

    def paint(self, shape: Shape, tissue: str, texture: float, label: int = 0) -> None:
        self.layers.append(Layer(shape, self.hu[tissue], texture, label))

    def bone(self, parts: list[Shape], label: int = 0) -> None:
        for part in parts:
            self.paint(part, "cortex", 40, label)
        for part in parts:
            self.paint(Offset(part, -self.cortex), "marrow", 30, label)


@dataclass
class _Organs:
    """Where the organs are: centres and radii (mm), and the head-foot span of the scan."""

    heads: dict[int, tuple[tuple[float, float, float], float]]  # side -> (centre, radius) of a femoral head
    prostate_c: tuple[float, float, float]
    prostate_r: tuple[float, float, float]
    rectum_r: tuple[float, float]
    rectum_wall: float
    rectum: Tube
    bottom: float
    top: float
    bladder_c: tuple[float, float, float]
    bladder_r: tuple[float, float, float]


def _paint_body(p: _Painter) -> None:
    """Subcutaneous fat, a muscle layer, fat in the pelvic cavity and the ischioanal fossae."""
    u = p.u
    body_centre, body_radii, fat = (u(-5, 5), u(10, 25), 0.0), (u(165, 190), u(100, 125)), u(12, 35)
    p.paint(Tube(body_centre, body_radii), "fat", 6)
    p.paint(Tube(body_centre, (body_radii[0] - 1.5 * fat, body_radii[1] - fat)), "muscle", 5)
    p.paint(Ellipsoid((0, 8, 30), (u(48, 55), u(42, 50), 75)), "fat", 6)
    for side in (-1, 1):
        p.paint(Ellipsoid((side * 32, 44, -42), (16, 24, 28)), "fat", 6)
        for y, reach in ((u(45, 70), u(25, 40)), (u(-60, -40), u(12, 20))):  # fat planes between muscles
            p.paint(Ellipsoid((side * u(85, 105), y, u(-20, 30)), (reach, u(2, 3.5), u(40, 70)),
                              tilt=(0, 0, side * u(20, 50))), "fat", 6)


def _place_organs(u) -> _Organs:
    """Organ sizes and places; the femoral heads sit at +-85..95 mm, the prostate below the bladder."""
    heads = {side: ((side * u(85, 92), u(-4, 4), u(-2, 2)), u(22, 25)) for side in (-1, 1)}
    prostate_c = (u(-3, 3), u(-4, 2), u(-22, -14))
    prostate_r = (u(17.5, 22.5), u(13, 17), u(14, 19))
    rectum_r, rectum_wall = (u(14, 20), u(11, 16)), u(2.5, 4.0)
    rectum = Tube((u(-4, 4), prostate_c[1] + prostate_r[1] + u(1, 3) + rectum_r[1], prostate_c[2]), rectum_r,
                  bend=(u(0.05, 0.15), u(0.0015, 0.0025)), narrow_below=prostate_c[2] - 0.6 * prostate_r[2])
    bottom = min(prostate_c[2] - prostate_r[2], min(c[2] - r for c, r in heads.values())) - 6 - u(0, 5)
    top = bottom + u(*FOV_SI_MM)
    bladder_base = prostate_c[2] + prostate_r[2] + u(0, 3)
    bladder_r = (u(30, 45), u(22, 32), min(u(20, 30), (top - 6 - bladder_base) / 2))
    bladder_c = (u(-5, 5), prostate_c[1] + u(-10, -2), bladder_base + bladder_r[2])
    return _Organs(heads, prostate_c, prostate_r, rectum_r, rectum_wall, rectum, bottom, top, bladder_c, bladder_r)


def _paint_glands_and_vessels(p: _Painter, o: _Organs) -> None:
    """Periprostatic tissue, seminal vesicles, external iliac arteries and veins."""
    p.paint(Ellipsoid(o.prostate_c, np.add(o.prostate_r, (9, 7, 8)), taper=0.15), "peri", 5)
    for side in (-1, 1):
        base = o.prostate_c[2] + o.prostate_r[2]
        p.paint(Ellipsoid((side * 17, o.prostate_c[1] + 0.7 * o.prostate_r[1], base + 5), (15, 5.5, 7),
                          tilt=(0, 0, side * 30)), "vesicle", 4)
        for shift, radius in ((0.0, 4.0), (-9.0, 5.5)):  # external iliac artery and vein
            x = side * (52 + shift)
            p.paint(Capsule((x, 0 + abs(shift) / 2, 90), (x + side * 20, -38, -20), radius), "vessel", 3)


def _paint_pelvic_bones(p: _Painter, o: _Organs) -> None:
    """Pubic arch, acetabula, ischia, inferior pubic rami, ilia, sacrum and coccyx."""
    u = p.u
    symphysis_y = o.prostate_c[1] - o.prostate_r[1] - u(12, 18) - 8
    arch_z = o.prostate_c[2] + u(0, 8)
    pelvis: list[Shape] = [Arch((0, 5, arch_z), (u(55, 60), 5 - symphysis_y), (6, 13), -arch_z, back=13)]
    sacrum_y = o.rectum.axis_y(45) + o.rectum_r[1] + u(10, 16) + 12
    pelvis += [Ellipsoid((0, sacrum_y, 55), (42, 12, 35), tilt=(-25, 0, 0)),
               Capsule((0, o.rectum.axis_y(10) + o.rectum_r[1] + 16, 15),
                       (0, o.rectum.axis_y(-25) + o.rectum_r[1] + 12, -25), 7)]
    for side, (c, r) in o.heads.items():
        x = c[0]
        medial_up = np.array([-side * 0.75, 0.1, 0.65]) / np.linalg.norm([0.75, 0.1, 0.65])
        cup = Subtract(Ellipsoid(c, (r + 11,) * 3), Ellipsoid(c, (r + 2.5,) * 3))
        pelvis += [Intersect((cup, HalfSpace(tuple(np.subtract(c, 0.3 * r * medial_up)), tuple(-medial_up)))),
                   Capsule((x - side * 25, 10, 32), (side * 68, 30, 50), 11),
                   Capsule((x - side * 20, 28, -20), (side * 50, 44, -46), 12),
                   Capsule((side * 12, symphysis_y + 4, arch_z - 14), (side * 52, 30, -46), 6.5),
                   Ellipsoid((side * 70, 28, 55), (8, 45, 40), tilt=(0, 0, side * 34))]
    p.bone(pelvis)


def _paint_femurs(p: _Painter, o: _Organs) -> None:
    """Neck, greater trochanter and shaft, then the labelled head over them."""
    for side, (c, r) in o.heads.items():
        neck = np.array([side * 0.72, -0.25, -0.65]) / np.linalg.norm([0.72, -0.25, -0.65])
        trochanter = np.add(c, 48 * neck) + (side * 10, 6, 6)
        p.bone([Capsule(c, tuple(np.add(c, 48 * neck)), p.u(13, 15)), Ellipsoid(tuple(trochanter), (16, 20, 22)),
                Capsule(tuple(trochanter - (0, 0, 20)), tuple(trochanter + (-side * 5, 5, -100)), 14)])
        p.bone([Ellipsoid(c, (r, r, r))], label=4 if side > 0 else 5)  # +x is the patient's left


def _paint_labelled_organs(p: _Painter, o: _Organs) -> None:
    """Bladder, prostate and rectum (wall, content, a gas pocket and bubbles), painted last."""
    u, rectum = p.u, o.rectum
    bladder = Ellipsoid(o.bladder_c, o.bladder_r)
    p.paint(bladder, "wall", 3, 2)
    p.paint(Offset(bladder, -u(2, 4)), "urine", 1, 2)
    p.paint(Ellipsoid(o.prostate_c, o.prostate_r, taper=0.18), "prostate", 8, 1)
    p.paint(rectum, "wall", 4, 3)
    lumen = Offset(rectum, -o.rectum_wall)
    p.paint(lumen, "content", 15, 3)
    gas_z = u(o.prostate_c[2], o.prostate_c[2] + 40)
    gas_level = rectum.axis_y(gas_z) + u(-0.3, 0.5) * o.rectum_r[1]  # supine: gas rises anteriorly (-y)
    pocket = Ellipsoid((rectum.centre[0], rectum.axis_y(gas_z), gas_z), (o.rectum_r[0], o.rectum_r[1] + 6, u(15, 30)))
    p.paint(Intersect((lumen, pocket, HalfSpace((0, gas_level, 0), (0, 1, 0)))), "gas", 0, 3)
    for _ in range(int(p.rng.integers(2, 12))):  # bubbles in stool or mucus
        z = u(o.bottom, o.top)
        spot = (rectum.centre[0] + u(-0.6, 0.6) * o.rectum_r[0], rectum.axis_y(z) + u(-0.6, 0.6) * o.rectum_r[1], z)
        p.paint(Intersect((Ellipsoid(spot, (u(1.5, 4.5),) * 3), lumen)), "gas", 0, 3)


def pelvis(rng: np.random.Generator) -> tuple[list[Layer], np.ndarray, np.ndarray]:
    """The layers in painting order and the field of view's low and high corners (mm)."""
    p = _Painter(rng)
    _paint_body(p)
    o = _place_organs(p.u)
    _paint_glands_and_vessels(p, o)
    _paint_pelvic_bones(p, o)
    _paint_femurs(p, o)
    _paint_labelled_organs(p, o)
    u = p.u
    back = max(o.rectum.axis_y(z) + o.rectum_r[1] for z in np.linspace(o.bottom, o.top, 32)) + 6 + u(0, 8)
    reach = max(abs(c[0]) + r for c, r in o.heads.values()) + 6
    low = np.array([-reach - u(0, 4), back - FOV_AP_MM, o.bottom])
    high = np.array([reach + u(0, 4), back, o.top])
    return p.layers, low, high
