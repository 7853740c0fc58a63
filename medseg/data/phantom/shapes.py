"""Implicit shapes the phantoms are built from: approximate signed distances in mm, negative inside.

Each shape answers `sd(points)` for arrays of patient coordinates (LPS, mm) and `bounds()`, a box that
holds its inside, so that a case is only evaluated near each shape.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import reduce
from typing import Protocol

import numpy as np
from scipy.spatial.transform import Rotation

SPAN_Z = (-120.0, 160.0)  # patient-frame heights every case lies within (bounds of bent tubes)
FAR = 1e4  # mm: "no bound" for shapes without one

Points = tuple[np.ndarray, np.ndarray, np.ndarray]  # x, y, z in patient mm, arrays of one shape


class Shape(Protocol):
    def sd(self, p: Points) -> np.ndarray: ...  # approximate signed distance (mm), negative inside

    def bounds(self) -> tuple[np.ndarray, np.ndarray]: ...  # box (low, high corners) holding the inside


def _floats(values) -> tuple[float, ...]:
    """Plain floats: a NumPy float64 scalar would turn float32 arithmetic into slower float64."""
    return tuple(float(v) for v in np.ravel(values))


def _ellipse_sd(dx, dy, a, b):
    """Signed distance to an axis-aligned ellipse, first-order accurate near the curve."""
    k0 = np.sqrt((dx / a) ** 2 + (dy / b) ** 2)
    k1 = np.sqrt((dx / (a * a)) ** 2 + (dy / (b * b)) ** 2)
    return k0 * (k0 - 1) / (k1 + 1e-9)


@dataclass(frozen=True)
class Ellipsoid:
    centre: tuple[float, float, float]
    radii: tuple[float, float, float]
    tilt: tuple[float, float, float] = (0.0, 0.0, 0.0)  # rotation about x, y, z (degrees)
    taper: float = 0.0  # the axial section grows by this share toward +z (local) and shrinks toward -z

    def sd(self, p: Points) -> np.ndarray:
        centre, radii = _floats(self.centre), _floats(self.radii)
        d = [p[i] - centre[i] for i in range(3)]
        if any(self.tilt):
            r = Rotation.from_euler("xyz", self.tilt, degrees=True).as_matrix().tolist()  # columns: local axes
            d = [r[0][i] * d[0] + r[1][i] * d[1] + r[2][i] * d[2] for i in range(3)]
        if self.taper:
            scale = 1 + self.taper * np.clip(d[2] / radii[2], -1, 1)
            d = [d[0] / scale, d[1] / scale, d[2]]
        k0 = np.sqrt(sum((d[i] / radii[i]) ** 2 for i in range(3)))
        k1 = np.sqrt(sum((d[i] / radii[i] ** 2) ** 2 for i in range(3)))
        return k0 * (k0 - 1) / (k1 + 1e-9)

    def bounds(self):
        reach = max(self.radii) * (1 + self.taper)
        return np.subtract(self.centre, reach), np.add(self.centre, reach)


@dataclass(frozen=True)
class Capsule:
    """Points within `radius` of the segment start-end: a bone shaft or a vessel."""

    start: tuple[float, float, float]
    end: tuple[float, float, float]
    radius: float

    def sd(self, p: Points) -> np.ndarray:
        start, ab = _floats(self.start), _floats(np.subtract(self.end, self.start))
        d = [p[i] - start[i] for i in range(3)]
        t = np.clip(sum(d[i] * ab[i] for i in range(3)) / sum(a * a for a in ab), 0, 1)
        return np.sqrt(sum((d[i] - t * ab[i]) ** 2 for i in range(3))) - self.radius

    def bounds(self):
        return np.minimum(self.start, self.end) - self.radius, np.maximum(self.start, self.end) + self.radius


@dataclass(frozen=True)
class Tube:
    """Elliptical tube along z whose axis moves posteriorly as it rises (rectum), or straight (body)."""

    centre: tuple[float, float, float]  # axis point at height centre[2]
    radii: tuple[float, float]  # left-right, anterior-posterior half-axes (mm)
    bend: tuple[float, float] = (0.0, 0.0)  # axis y moves by bend[0] h + bend[1] h^2 at height h
    narrow_below: float = -FAR  # below this z the section shrinks to 60 % within 15 mm (anal canal)

    def axis_y(self, z):
        (_, y, height), (slope, curve) = _floats(self.centre), _floats(self.bend)
        return y + (z - height) * (slope + curve * (z - height)) if slope or curve else y

    def sd(self, p: Points) -> np.ndarray:
        (x, _, _), (a, b) = _floats(self.centre), _floats(self.radii)
        dx, dy = p[0] - x, p[1] - self.axis_y(p[2])
        if self.narrow_below <= -FAR:
            return _ellipse_sd(dx, dy, a, b)
        scale = 1 - 0.4 * np.clip((float(self.narrow_below) - p[2]) / 15, 0, 1)
        return _ellipse_sd(dx, dy, a * scale, b * scale)

    def bounds(self):
        y = self.axis_y(np.linspace(*SPAN_Z, 64)) + np.zeros(64)
        return (np.array([self.centre[0] - self.radii[0], y.min() - self.radii[1], -FAR]),
                np.array([self.centre[0] + self.radii[0], y.max() + self.radii[1], FAR]))


@dataclass(frozen=True)
class Arch:
    """Bar along the front of an axial ellipse, rising toward its ends: the pubic bones."""

    centre: tuple[float, float, float]  # ellipse centre; z is the height of the bar at the midline
    radii: tuple[float, float]  # ellipse half-axes, left-right and anterior-posterior
    thickness: tuple[float, float]  # bar half-thickness in the axial plane and along z
    rise: float  # how much higher the bar is at the ellipse's left and right ends
    back: float  # the bar stops at this y (posterior cut)

    def sd(self, p: Points) -> np.ndarray:
        (cx, cy, cz), (a, b), (t, tz) = _floats(self.centre), _floats(self.radii), _floats(self.thickness)
        in_plane = _ellipse_sd(p[0] - cx, p[1] - cy, a, b)
        height = (p[2] - cz - float(self.rise) * ((p[0] - cx) / a) ** 2) * (t / tz)
        return np.maximum(np.sqrt(in_plane**2 + height**2) - t, p[1] - float(self.back))

    def bounds(self):
        (cx, cy, cz), (a, b), (t, tz) = self.centre, self.radii, self.thickness
        low, high = min(cz, cz + self.rise) - tz, max(cz, cz + self.rise) + tz
        return np.array([cx - a - t, cy - b - t, low]), np.array([cx + a + t, self.back, high])


@dataclass(frozen=True)
class HalfSpace:
    point: tuple[float, float, float]
    normal: tuple[float, float, float]  # unit, pointing out of the inside

    def sd(self, p: Points) -> np.ndarray:
        point, normal = _floats(self.point), _floats(self.normal)
        return sum((p[i] - point[i]) * normal[i] for i in range(3))

    def bounds(self):
        return np.full(3, -FAR), np.full(3, FAR)


@dataclass(frozen=True)
class Intersect:
    shapes: tuple[Shape, ...]

    def sd(self, p: Points) -> np.ndarray:
        return reduce(np.maximum, (s.sd(p) for s in self.shapes))

    def bounds(self):
        boxes = [s.bounds() for s in self.shapes]
        return np.max([b[0] for b in boxes], 0), np.min([b[1] for b in boxes], 0)


@dataclass(frozen=True)
class Subtract:
    shape: Shape
    hole: Shape

    def sd(self, p: Points) -> np.ndarray:
        return np.maximum(self.shape.sd(p), -self.hole.sd(p))

    def bounds(self):
        return self.shape.bounds()


@dataclass(frozen=True)
class Offset:
    """`shape` grown by `distance` mm (shrunk when negative): a wall's inside, a bone's marrow."""

    shape: Shape
    distance: float

    def sd(self, p: Points) -> np.ndarray:
        return self.shape.sd(p) - self.distance

    def bounds(self):
        low, high = self.shape.bounds()
        return low - max(self.distance, 0), high + max(self.distance, 0)


@dataclass(frozen=True)
class Layer:
    shape: Shape
    hu: float
    texture: float = 0.0  # HU amplitude of the smooth tissue heterogeneity added inside
    label: int = 0  # label set at voxel centres inside the shape; 0 clears what lies beneath
