"""Overlay montages for clinician review: a scan with its organ outlines, in radiological convention.

Three layers, as in nnU-Net: `render.render_slice` is a pure function from one 2D slice, its labels,
the colours and the window to an RGB array; `views` orients the scan and chooses the slices;
`montage.render_view` renders the tiles of one view, `montage.montage` lays them out with legend and
annotations (PIL, imported lazily) and `montage.thumbnail` makes the review page's one-slice preview;
`write.write_overlays` reads, checks and writes the PNG files.

Slices follow the organs: spread over the slices that hold one, denser where organs meet, each organ
crossed through its central half, and with a reference the slices where it and the prediction differ
most. Tiles run as a radiologist scrolls (axial head to feet, coronal front to back, sagittal right
to left). The legend names each organ with its volume in mL (and, with a reference, the reference
volume and the Dice).

Every picture is drawn from a copy of the scan whose voxel axes point to the patient's Left, Posterior
and Superior (`canonical`: the nearest axis-aligned orientation, as `sitk.DICOMOrient(image, "LPS")`,
by permuting and flipping axes, never resampling), so the voxel order of the file never changes it:

- axial: viewed from the feet, patient's right on the image left, anterior up;
- coronal: viewed from the front, patient's right on the image left, superior up;
- sagittal: viewed from the patient's left, anterior on the image left, superior up.

Pixels are square in millimetres (thick slices are stretched, never squashed), and each tile carries
orientation letters on its edges and its position in scanner (LPS) coordinates, written with the
direction letter, e.g. `S 12.5 mm`.
"""

from medseg.overlay.montage import THUMB_SIZE, WIDTH, Tile, montage, render_view, thumbnail
from medseg.overlay.render import render_slice
from medseg.overlay.views import VIEWS, View, canonical, choose_slices, view_slice, view_spacing
from medseg.overlay.write import legend_entries, write_overlays

__all__ = ["THUMB_SIZE", "VIEWS", "WIDTH", "Tile", "View", "canonical", "choose_slices", "legend_entries", "montage",
           "render_slice", "render_view", "thumbnail", "view_slice", "view_spacing", "write_overlays"]
