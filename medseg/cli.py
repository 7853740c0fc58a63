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


BACKEND_HELP = ("auto, torch or openvino: what runs the network. auto: on the CPU, where OpenVINO is installed, the "
                "faster of the two on a batch of windows (timed once per machine, kept with the model), else torch.")


PREDICT_PRECISION_HELP = ("auto, bf16, fp32 or int8. auto: bf16 autocast where the CPU (AVX512-BF16/AMX) or GPU runs "
                          "bf16 natively; other CPUs: int8 where it passed its check, else fp32. int8: the model's "
                          "int8 OpenVINO network, only once `medseg quantize` has checked it and it passed.")


def _start_compute(precision: str, int8: bool = False) -> None:
    """Check --precision before any work (int8: `medseg predict` only), and let glibc keep freed memory."""
    from medseg.runtime import PRECISIONS, keep_freed_memory

    allowed = (*PRECISIONS, "int8") if int8 else PRECISIONS
    if precision not in allowed:
        raise InputError(f"--precision '{precision}' is not one of {', '.join(allowed)}")
    keep_freed_memory()


@app.command("sample-data")
def sample_data(
    task: str = typer.Option("prostate", "--task", "-t", help="Task whose phantom to generate: prostate (3D pelvic "
                             "CT) or cells (2D fluorescence microscopy, with nucleus instances in instancesTr/Ts)."),
    out: Path = typer.Option(..., "--out", "-o", help="Folder for the dataset (MSD layout), or a new folder for "
                             "the DICOM patients."),
    cases: int = typer.Option(16, "--cases", "-n", min=1, help="Training cases (DICOM: patients)."),
    test_cases: Optional[int] = typer.Option(None, "--test-cases", min=0, help="Test cases (imagesTs/labelsTs); "
                                             "default 4. NIfTI only."),
    seed: int = typer.Option(0, "--seed", help="Random seed; the bundled set uses the default."),
    format_: str = typer.Option("nifti", "--format", help="nifti: an MSD dataset. dicom: a clinic-style export, one "
                               "folder per patient with a CT series and an RTSTRUCT (for import-dicom-rt)."),
) -> None:
    """Generate synthetic data with labels: CT phantoms (the bundled sample data is made this way) or cells."""
    if format_ == "dicom":
        from medseg.data.phantom.clinic import write_clinic_folder

        if test_cases is not None:
            raise InputError("--test-cases applies to --format nifti; a DICOM export has --cases patients")
        root = write_clinic_folder(out, task=task, n_cases=cases, seed=seed)
        typer.echo(f"wrote {cases} patients (CT series + RTSTRUCT each) to {root}")
        return
    if format_ != "nifti":
        raise InputError(f"--format '{format_}' is not one of nifti, dicom")
    from medseg.data.phantom import write_sample_dataset

    test_cases = 4 if test_cases is None else test_cases
    root = write_sample_dataset(out, task=task, n_train=cases, n_test=test_cases, seed=seed)
    typer.echo(f"wrote {cases} training and {test_cases} test cases to {root}")


@app.command("import-dicom-rt")
def import_dicom_rt(
    src: Path = typer.Argument(..., help="Folder of patients: CT series and RTSTRUCTs, any nesting and file names."),
    out: Path = typer.Argument(..., help="New dataset folder (MSD layout); must not exist or be empty."),
    task: str = typer.Option("prostate", "--task", "-t", help="Task name or file whose organs the structures fill."),
    mapping: Optional[Path] = typer.Option(None, "--mapping", help="YAML/JSON {structure name: organ name, or null "
                                           "to ignore}; wins over the name rules."),
) -> None:
    """Turn a clinic's DICOM-RT export into a training dataset, and report what matched.

    Structures are matched to the task's organs by TG-263 name, organ name
    and common spellings (case, spaces, Lt/Left/_L); a structure that matches
    nothing is reported, never guessed. Where two organs overlap, the smaller
    keeps the shared voxels. A case that cannot be imported is reported and
    skipped (exit 1); import_report.json in OUT lists every case.
    """
    from medseg.config import load_task
    from medseg.dicom.importer import REPORT_NAME
    from medseg.dicom.importer import import_dicom_rt as run_import
    from medseg.dicom.names import load_mapping

    loaded = load_task(task)
    names = load_mapping(mapping, loaded.labels) if mapping is not None else None
    report = run_import(src, out, loaded, names, progress=typer.echo)  # one line per case, skipped ones too
    typer.echo(f"imported {len(report['cases'])} case(s) into {out}, {len(report['failed'])} failed; "
               f"report: {out / REPORT_NAME}")
    if report["failed"]:
        raise typer.Exit(1)


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
    fold: str = typer.Option("0", "--fold", help="Which fold to hold out for validation (0..folds-1), or 'all': "
                             "train every fold in turn into --out/fold_<k>, predict each one's held-out cases, "
                             "write cv_summary.json/.csv and postprocessing.json (a folder `predict -m` ensembles)."),
    resume: bool = typer.Option(False, "--resume", help="Continue the run in --out from last.pt."),
    compile: bool = typer.Option(False, "--compile", help="torch.compile the network."),
    nproc: int = typer.Option(1, "--nproc", min=1, help="Train with this many processes on this machine, one "
                              "per GPU (starts torchrun). Under torchrun, leave it out."),
    precision: str = typer.Option("auto", "--precision", help=PRECISION_HELP),
    init_weights: Optional[Path] = typer.Option(None, "--init-weights", help="Start from another model: a run "
                                                "folder or checkpoint file; tensors matching by name and shape are "
                                                "loaded, the rest reported in init_weights.json. Not re-applied "
                                                "on --resume."),
    freeze_encoder_epochs: int = typer.Option(0, "--freeze-encoder-epochs", min=0, help="With --init-weights: "
                                              "keep the encoder frozen for the first N epochs."),
    calibrate: bool = typer.Option(True, "--calibrate/--no-calibrate", help="At the end, predict the validation "
                                   "cases and write confidence.json: per-organ thresholds for the confidence flag "
                                   "(see `medseg calibrate`); inside --max-minutes."),
) -> None:
    """Train a U-Net (3D, or 2D for a 2D task) on a dataset (default: the bundled sample data, on the CPU).

    Under torchrun (or with --nproc) the processes train one model together
    with DistributedDataParallel; rank 0 writes the run folder.
    """
    _start_compute(precision)
    from medseg.distributed import joined
    from medseg.train import TrainOptions, fit

    every_fold = fold.strip().lower() == "all"
    options = TrainOptions(task=task, data=data, out=out, epochs=epochs, max_minutes=max_minutes, device=device,
                           seed=seed, folds=folds, fold=0 if every_fold else _fold_number(fold, folds),
                           resume=resume, compile=compile, precision=precision,
                           init_weights=init_weights, freeze_encoder_epochs=freeze_encoder_epochs, calibrate=calibrate)
    if every_fold:
        raise typer.Exit(_train_every_fold(options, nproc))
    if nproc > 1:
        from medseg.distributed import launch_training

        raise typer.Exit(launch_training(nproc, options))
    with joined(device, os.environ) as world:
        run_dir = fit(options, world)
    if world.is_main:
        typer.echo(f"model folder: {run_dir}")


def _fold_number(text: str, folds: int) -> int:
    if not text.strip().isdigit():
        raise InputError(f"--fold '{text}' must be a fold number (0..{folds - 1}) or 'all'")
    return int(text)


def _train_every_fold(options: TrainOptions, nproc: int) -> int:
    """`--fold all`: every fold in turn in this process, then the cross-validation summary."""
    from medseg.distributed import torchrun_ranks
    from medseg.train.crossval import fit_folds

    if nproc > 1 or torchrun_ranks(os.environ) is not None:
        raise InputError("--fold all trains the folds one after another in one process; for one fold per GPU, "
                         "start `medseg train --fold K --out CV/fold_K` for each K side by side (e.g. with "
                         "CUDA_VISIBLE_DEVICES=K), then `medseg train --fold all --out CV` to summarise")
    summary = fit_folds(options, echo=typer.echo)
    typer.echo(f"cross-validation folder: {summary}")
    return 0


@app.command()
def predict(
    inputs: List[Path] = typer.Argument(..., help="Image files, DICOM folders, or a folder of images."),
    out: Path = typer.Option(Path("predictions"), "--out", "-o", help="Output folder."),
    model: Optional[Path] = typer.Option(None, "--model", "-m", help="Run folder from `medseg train`, or a cross-validation "
                                         "folder (`--fold all`): its folds' probabilities are averaged; default: the newest of either for --task."),
    task: str = typer.Option("prostate", "--task", "-t", help="Task used to find the newest model under runs/<task>/ "
                             "(a run folder, or a cross-validation folder whose every fold is trained)."),
    device: str = typer.Option("auto", "--device", help="auto, cpu, cuda or cuda:N."),
    fast: bool = typer.Option(False, "--fast", help="Lower window overlap: faster, slightly less smooth."),
    tta: Optional[bool] = typer.Option(None, "--tta/--no-tta", help="Test-time flips along the axes the task trains "
                                       "flips along (paired organs swapped); default: the task's inference.tta."),
    probabilities: bool = typer.Option(False, "--probabilities", help="Also write per-organ probability maps."),
    reference: Optional[List[Path]] = typer.Option(None, "--reference", "-r", help="Reference label map(s) or folder: also write metrics."),
    overlays: bool = typer.Option(True, "--overlays/--no-overlays", help="Write overlay PNGs for review."),
    precision: str = typer.Option("auto", "--precision", help=PREDICT_PRECISION_HELP),
    backend: str = typer.Option("auto", "--backend", help=BACKEND_HELP),
    series: Optional[str] = typer.Option(None, "--series", help="Series Instance UID to read from DICOM folders "
                                         "that hold several series (the error lists them)."),
    dicom_seg: bool = typer.Option(False, "--dicom-seg", help="DICOM CT series inputs: also write <case>_seg.dcm, a "
                                   "DICOM-SEG referring to the series (needs the dicom extra)."),
    rtstruct: bool = typer.Option(False, "--rtstruct", help="DICOM CT series inputs: also write <case>_rtstruct.dcm, "
                                  "an RTSTRUCT with TG-263 names for planning systems (needs the dicom extra)."),
    uncertainty: bool = typer.Option(False, "--uncertainty", help="Also write <case>_uncertainty.nii.gz (normalised "
                                     "predictive entropy; with folds or --tta also <case>_disagreement.nii.gz) and "
                                     "per-organ confidence; the review page gets an uncertainty layer."),
) -> None:
    """Segment scans: writes <case>_seg.nii.gz on the scan's exact grid, volumes and overlays.

    Under torchrun the scans are shared among the processes; rank 0 writes
    summary.json and review.html.
    """
    _start_compute(precision, int8=True)
    from medseg.distributed import joined
    from medseg.infer.batch import PredictOptions, predict_many

    options = PredictOptions(model=model, task=task, device=device, fast=fast, tta=tta, probabilities=probabilities,
                             overlays=overlays, precision=precision, series=series, dicom_seg=dicom_seg,
                             rtstruct=rtstruct, uncertainty=uncertainty, backend=backend)
    with joined(device, os.environ) as world:
        failures = predict_many(inputs, out, options, references=reference or [], world=world)
    if failures:
        raise typer.Exit(1)


@app.command()
def calibrate(
    model: Path = typer.Argument(..., help="Run folder, or cross-validation folder (`--fold all`)."),
    data: Optional[Path] = typer.Option(None, "--data", "-d", help="Dataset holding the validation cases; default: "
                                        "the one the model was trained on (config.json)."),
    tta: Optional[bool] = typer.Option(None, "--tta/--no-tta", help="Flips as you will predict; default: the task's."),
    device: str = typer.Option("auto", "--device", help="auto, cpu, cuda or cuda:N."),
    precision: str = typer.Option("auto", "--precision", help=PRECISION_HELP),
) -> None:
    """Choose per-organ confidence thresholds for the QA flags on the model's validation cases.

    Predicts the cases the model validated on and did not train on (a CV
    folder: its out-of-fold predictions, made where missing), scores Dice on
    the organs each case contoured and writes confidence.json; `medseg
    predict` then flags an organ below its threshold, and estimates its Dice
    where 10+ cases fit a line from expected Dice; `medseg train` ends so.
    """
    _start_compute(precision)
    from medseg.infer.calibration import calibrate_model, format_calibration
    from medseg.infer.ensemble import is_cv_folder

    if is_cv_folder(model):
        from medseg.train.crossval import calibrate_folds

        if tta:
            raise InputError("--tta: a cross-validation folder is calibrated on its out-of-fold predictions, "
                             "made with the flips its task's inference.tta asks for")
        result = calibrate_folds(model, device, precision, data, echo=_echo)
    else:
        result = calibrate_model(model, data, device, precision, tta, echo=_echo)
    typer.echo("\n".join(format_calibration(result)))
    typer.echo(f"wrote {model / 'confidence.json'}")


@app.command()
def quantize(
    model: Path = typer.Argument(..., help="Run folder, or cross-validation folder (each fold in turn)."),
    data: Optional[Path] = typer.Option(None, "--data", "-d", help="Dataset holding the model's training and "
                                        "validation cases; default: the one it was trained on (config.json)."),
    cases: Optional[int] = typer.Option(None, "--cases", "-n", min=1, help="Check on the first N validation cases "
                                        "(default: all); the calibration takes windows of 8 training cases."),
) -> None:
    """Quantise to int8 for OpenVINO (NNCF) and check it: `predict --precision int8` takes it only if every
    validation case and organ keeps Dice within 0.005 of f32 and >= 99.9% of labels (int8.json; else exit 1)."""
    _start_compute("fp32")
    from medseg.infer.ensemble import model_folders
    from medseg.infer.quantize import format_record, quantize_model, record_path

    records = {folder: quantize_model(folder, data, cases, echo=_echo) for folder in model_folders(model)}
    for folder, record in records.items():
        typer.echo("\n".join([*format_record(record), f"wrote {record_path(folder)}"]))
    raise typer.Exit(0 if all(record["passed"] for record in records.values()) else 1)


@app.command()
def evaluate(
    pred: Path = typer.Option(..., "--pred", "-p", help="Predicted mask file or folder."),
    ref: Path = typer.Option(..., "--ref", "-r", help="Reference mask file or folder, or a dataset folder "
                             "(dataset.json): then organs a case did not contour are skipped for it."),
    task: Optional[str] = typer.Option(None, "--task", "-t", help="Task name or file, for organ names and tolerances."),
    labels: Optional[Path] = typer.Option(None, "--labels", help="labels.json mapping ids to organ names."),
    out: Path = typer.Option(Path("evaluation"), "--out", "-o", help="Output folder for metrics.csv, summary.json, plots."),
    instances: Optional[Path] = typer.Option(None, "--instances", help="Folder of reference instance maps by case name "
                                             "(a task with `instances`); default: instancesTs/ beside labelsTs/."),
) -> None:
    """Per-organ Dice, IoU, surface distances and volumes of predictions against references, and Dice and
    areas slice by slice along the head-foot axis (slices.csv, a profile plot per case, the worst slices; not
    for 2D images, which are one slice). For a task with `instances` (cells: nucleus), also instance F1 at IoU > 0.5, PQ and AJI per case."""
    from medseg.evaluate.instance_cases import format_instances
    from medseg.evaluate.report import format_table
    from medseg.evaluate.run import run_evaluation
    from medseg.evaluate.slices import format_worst

    summary = run_evaluation(pred, ref, out, task=task, labels=labels, warn=_echo, instances=instances)
    typer.echo(format_table(summary))
    if text := format_instances(summary):
        typer.echo(text)
    typer.echo(format_worst({o: s["worst_slices"] for o, s in summary.items() if "worst_slices" in s}))
    flat = (summary.get("all") or {}).get("slices") or {}  # 2D images: no slice report (medseg.evaluate.slices)
    if flat:
        typer.echo(f"no slice report for {len(flat['skipped_cases'])} 2D image(s): one slice each")
    files = "metrics.csv, summary.json, dice_boxplot.png, slices.csv and profiles/"
    if flat and not flat["slice_report_written"]:
        files = "metrics.csv, summary.json and dice_boxplot.png"
    typer.echo(f"wrote {files} to {out}")


@app.command()
def overlay(
    image: Path = typer.Argument(..., help="Scan (file or DICOM folder)."),
    mask: Path = typer.Argument(..., help="Label map on the scan's grid."),
    ref: Optional[Path] = typer.Option(None, "--ref", help="Reference label map to draw beside the mask."),
    task: str = typer.Option("prostate", "--task", "-t", help="Task name or file, for organ names and colours."),
    out: Path = typer.Option(Path("overlays"), "--out", "-o", help="Output folder for the PNGs."),
    series: Optional[str] = typer.Option(None, "--series", help="Series Instance UID, when the DICOM folder holds "
                                         "several series."),
) -> None:
    """Draw axial, coronal and sagittal overlay montages (and a thumbnail) of a mask on its scan; for a 2D task,
    one overlay picture and a thumbnail."""
    from medseg.config import load_task
    from medseg.io import case_name, read_image
    from medseg.review.overlays import write_overlays

    scan = read_image(image, series_uid=series) if series else image
    for path in write_overlays(scan, mask, load_task(task), out, reference=ref, case=case_name(image)):
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
