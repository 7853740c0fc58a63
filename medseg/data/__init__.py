"""Data: datasets on disk to patches in a batch. `datasets` reads the three layouts, `fingerprint`
checks a dataset and measures it, `preprocess` puts a scan on the model grid, `augment` and `partial`
prepare training subjects, `patches` splits cases and samples patch batches, `phantom` makes the
synthetic sample data."""
