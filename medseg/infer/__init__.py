"""Inference: `predictor.Predictor` segments one scan (window `stitching`, `tta` flips, `resample` back
to the scan's grid, `postprocess`); `batch` is `medseg predict`, many scans with all their outputs."""
