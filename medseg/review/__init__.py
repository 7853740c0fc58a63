"""Review: what a clinician looks at. Overlay montages of a scan with its organ outlines, viewer files
that open with names and colours in 3D Slicer and ITK-SNAP, and the review page of a batch.

Three layers for the overlays, as in nnU-Net: `render.render_slice` is a pure function from one 2D
slice, its labels, the colours and the window to an RGB array; `views` orients the scan and chooses
the slices; `montage` lays tiles out with legend and annotations (PIL, imported lazily);
`overlays.write_overlays` reads, checks and writes the PNG files. `viewers` writes the viewer files
and `page` the review page.

Every picture is drawn from a copy of the scan whose voxel axes point to the patient's Left, Posterior
and Superior (`views.canonical`: permuting and flipping axes, never resampling), so the voxel order of
the file never changes it; tiles run as a radiologist scrolls, in radiological convention.
"""
