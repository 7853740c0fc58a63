"""Training: TorchIO patch queues feeding a MONAI network, as a few plain functions.

`run` opens the run folder and alternates epochs and validation (`fit`), `steps` holds the optimiser,
the schedule and the steps, `validation` the full-volume Dice on held-out cases, `runfolder` the
metrics table, curve, TensorBoard and log; `crossval` trains every fold (`--fold all`) and summarises them.
"""

from medseg.train.run import TrainOptions, fit

__all__ = ["TrainOptions", "fit"]
