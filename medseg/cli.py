"""The `medseg` command: parse arguments, call the library, print. Heavy imports live inside commands
so that `medseg --help` answers at once."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING, List, Optional

import typer

from medseg.errors import InputError

if TYPE_CHECKING:
    from medseg.train import TrainOptions

app = typer.Typer(
    name="medseg",
    help="3D medical image segmentation: train, predict, evaluate and review.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)


@app.callback()
def _root(debug: bool = typer.Option(False, "--debug", help="Show full tracebacks on errors.")) -> None:
    """3D medical image segmentation: train, predict, evaluate and review."""


def _echo(message: str) -> None:
    typer.echo(message, err=True)


PRECISION_HELP = ("auto, bf16 or fp32. auto: bf16 autocast where the CPU (AVX512-BF16/AMX) or GPU runs bf16 "
                  "natively, else fp32.")


def _start_compute(precision: str) -> None:
    """Check --precision before any work, and let glibc keep freed memory (medseg.runtime)."""
    from medseg.runtime import PRECISIONS, keep_freed_memory

    if precision not in PRECISIONS:
        raise InputError(f"--precision '{precision}' is not one of {', '.join(PRECISIONS)}")
    keep_freed_memory()


@app.command("sample-data")
def sample_data(
    task: str = typer.Option("prostate", "--task", "-t", help="Task whose phantom to generate."),
    out: Path = typer.Option(..., "--out", "-o", help="Folder for the dataset (MSD layout)."),
    cases: int = typer.Option(16, "--cases", "-n", min=1, help="Training cases."),
    test_cases: int = typer.Option(4, "--test-cases", min=0, help="Test cases (imagesTs/labelsTs)."),
    seed: int = typer.Option(0, "--seed", help="Random seed; the bundled set uses the default."),
) -> None:
    """Generate synthetic CT phantoms with labels (the bundled sample data is made this way)."""
    from medseg.data.phantom import write_sample_dataset

    root = write_sample_dataset(out, task=task, n_train=cases, n_test=test_cases, seed=seed)
    typer.echo(f"wrote {cases} training and {test_cases} test cases to {root}")


@app.command("check-dataset")
def check_dataset(
    path: Path = typer.Argument(..., help="Dataset folder: MSD, nnU-Net v2 raw, or images/ + labels/."),
    task: str = typer.Option("prostate", "--task", "-t", help="Task name or task file."),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="Fingerprint JSON file, or a folder for it; "
                                       "default ./<dataset>_fingerprint.json (never inside the dataset)."),
) -> None:
    """Check every file of a dataset before training and write its fingerprint.

    Lists every problem (unreadable files, channels, grids, label values);
    exits 1 if there is any. Only a dataset without problems gets its
    fingerprint (median spacing in RAS order, intensities, organ volumes)
    written: by default to ./<dataset folder name>_fingerprint.json,
    never inside the dataset.
    """
    from medseg.config import load_task
    from medseg.data.fingerprint import check_dataset as run_check

    report = run_check(path, load_task(task), fingerprint_path=out)
    typer.echo(report.summary())
    if report.problems:
        raise typer.Exit(1)


@app.command()
def train(
    task: str = typer.Option("prostate", "--task", "-t", help="Task name (pipelines/) or task file."),
    data: Optional[Path] = typer.Option(None, "--data", "-d", help="Dataset folder; default: the task's bundled sample data."),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="Run folder; default runs/<task>/<timestamp>."),
    epochs: Optional[int] = typer.Option(None, "--epochs", min=1, help="Override the task's epochs."),
    max_minutes: Optional[float] = typer.Option(None, "--max-minutes", help="Wall-clock budget of the whole run "
                                                "(preprocessing, steps, validation); the LR schedule and validations fit it."),
    device: str = typer.Option("auto", "--device", help="auto, cpu, cuda or cuda:N."),
    seed: int = typer.Option(0, "--seed", help="Random seed for splits, sampling and weights."),
    folds: int = typer.Option(5, "--folds", min=2, help="Cross-validation folds."),
    fold: int = typer.Option(0, "--fold", min=0, help="Which fold to hold out for validation."),
    resume: bool = typer.Option(False, "--resume", help="Continue the run in --out from last.pt."),
    compile: bool = typer.Option(False, "--compile", help="torch.compile the network."),
    nproc: int = typer.Option(1, "--nproc", min=1, help="Train with this many processes on this machine, one "
                              "per GPU (starts torchrun). Under torchrun, leave it out."),
    precision: str = typer.Option("auto", "--precision", help=PRECISION_HELP),
) -> None:
    """Train a 3D U-Net on a dataset (default: the bundled sample data, on the CPU).

    Under torchrun (or with --nproc) the processes train one model together
    with DistributedDataParallel; rank 0 writes the run folder.
    """
    _start_compute(precision)
    from medseg.distributed import joined
    from medseg.train import TrainOptions, fit

    options = TrainOptions(task=task, data=data, out=out, epochs=epochs, max_minutes=max_minutes, device=device,
                           seed=seed, folds=folds, fold=fold, resume=resume, compile=compile, precision=precision)
    if nproc > 1:
        raise typer.Exit(_run_torchrun(nproc, options))
    with joined(device, os.environ) as world:
        run_dir = fit(options, world)
    if world.is_main:
        typer.echo(f"model folder: {run_dir}")


def train_arguments(options: TrainOptions) -> list[str]:
    """`medseg train` arguments that give back `options` (a `TrainOptions`)."""
    import dataclasses

    arguments = ["train"]
    for field in dataclasses.fields(options):
        value = getattr(options, field.name)
        flag = "--" + field.name.replace("_", "-")
        if value is True:
            arguments.append(flag)
        elif value is not None and value is not False:
            arguments += [flag, str(value)]
    return arguments


def _run_torchrun(nproc: int, options: TrainOptions) -> int:
    """Train with `nproc` processes on this machine, started by torchrun; returns the exit code."""
    from medseg.distributed import launch, torchrun_ranks

    if torchrun_ranks(os.environ) is not None:
        raise InputError(f"--nproc {nproc} starts torchrun, but this process already runs under torchrun; "
                         f"leave --nproc out and use torchrun's --nproc_per_node")
    return launch(nproc, train_arguments(options))


@app.command()
def predict(
    inputs: List[Path] = typer.Argument(..., help="Image files, DICOM folders, or a folder of images."),
    out: Path = typer.Option(Path("predictions"), "--out", "-o", help="Output folder."),
    model: Optional[Path] = typer.Option(None, "--model", "-m", help="Run folder from `medseg train`; default: newest for --task."),
    task: str = typer.Option("prostate", "--task", "-t", help="Task used to find the newest model under runs/."),
    device: str = typer.Option("auto", "--device", help="auto, cpu, cuda or cuda:N."),
    fast: bool = typer.Option(False, "--fast", help="Lower window overlap: faster, slightly less smooth."),
    tta: bool = typer.Option(False, "--tta", help="Test-time flips (paired organs swapped on left-right flips)."),
    probabilities: bool = typer.Option(False, "--probabilities", help="Also write per-organ probability maps."),
    reference: Optional[List[Path]] = typer.Option(None, "--reference", "-r", help="Reference label map(s) or folder: also write metrics."),
    overlays: bool = typer.Option(True, "--overlays/--no-overlays", help="Write overlay PNGs for review."),
    precision: str = typer.Option("auto", "--precision", help=PRECISION_HELP),
) -> None:
    """Segment scans: writes <case>_seg.nii.gz on the scan's exact grid, volumes and overlays.

    Under torchrun the scans are shared among the processes; rank 0 writes
    summary.json and review.html.
    """
    _start_compute(precision)
    from medseg.distributed import joined
    from medseg.infer.batch import PredictOptions, predict_many

    options = PredictOptions(model=model, task=task, device=device, fast=fast, tta=tta, probabilities=probabilities,
                             overlays=overlays, precision=precision)
    with joined(device, os.environ) as world:
        failures = predict_many(inputs, out, options, references=reference or [], world=world)
    if failures:
        raise typer.Exit(1)


@app.command()
def evaluate(
    pred: Path = typer.Option(..., "--pred", "-p", help="Predicted mask file or folder."),
    ref: Path = typer.Option(..., "--ref", "-r", help="Reference mask file or folder, or a dataset folder "
                             "(dataset.json): then organs a case did not contour are skipped for it."),
    task: Optional[str] = typer.Option(None, "--task", "-t", help="Task name or file, for organ names and tolerances."),
    labels: Optional[Path] = typer.Option(None, "--labels", help="labels.json mapping ids to organ names."),
    out: Path = typer.Option(Path("evaluation"), "--out", "-o", help="Output folder for metrics.csv, summary.json, plots."),
) -> None:
    """Per-organ Dice, IoU, surface distances and volumes of predictions against references."""
    from medseg.evaluate.run import run_evaluation
    from medseg.evaluate.report import format_table

    summary = run_evaluation(pred, ref, out, task=task, labels=labels, warn=_echo)
    typer.echo(format_table(summary))
    typer.echo(f"wrote metrics.csv, summary.json and dice_boxplot.png to {out}")


@app.command()
def overlay(
    image: Path = typer.Argument(..., help="Scan (file or DICOM folder)."),
    mask: Path = typer.Argument(..., help="Label map on the scan's grid."),
    ref: Optional[Path] = typer.Option(None, "--ref", help="Reference label map to draw beside the mask."),
    task: str = typer.Option("prostate", "--task", "-t", help="Task name or file, for organ names and colours."),
    out: Path = typer.Option(Path("overlays"), "--out", "-o", help="Output folder for the PNGs."),
) -> None:
    """Draw axial, coronal and sagittal overlay montages (and a thumbnail) of a mask on its scan."""
    from medseg.config import load_task
    from medseg.review.overlays import write_overlays

    for path in write_overlays(image, mask, load_task(task), out, reference=ref):
        typer.echo(str(path))


def main(argv: list[str] | None = None) -> int:
    """Entry point: user errors become one line on stderr and a non-zero exit, never a traceback."""
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv
    try:
        app(args=argv, prog_name="medseg")  # exits itself on success and on usage errors
    except SystemExit as done:
        code = done.code
        return code if isinstance(code, int) else (0 if code is None else 1)
    except KeyboardInterrupt:
        _echo("interrupted")
        return 130
    except (InputError, OSError) as error:
        if debug:
            raise
        message = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        _echo(f"error: {message}")
        return 2 if isinstance(error, InputError) else 1
    except Exception as error:  # a bug: say so in one line, keep the traceback behind --debug
        if debug:
            raise
        _echo(f"error: internal error ({type(error).__name__}: {str(error).strip()[:300]}); rerun with --debug for details")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
