"""Inference: `predictor.Predictor` segments one scan (window `stitching`, `tta` flips, `resample` back
to the scan's grid, `postprocess`); `ensemble` averages the folds of a cross-validation (`uncertainty`:
maps and confidence; `qa`: flags); `batch` is `medseg predict`, many scans with all their outputs."""
