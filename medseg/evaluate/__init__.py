"""Evaluation: `metrics` only score (pure functions on arrays), `cases` turns mask pairs into rows,
`matching` pairs files by case, `report` writes the rows and `run` is `medseg evaluate`."""
