"""OpenVINO against torch for `medseg predict` on the CPU, side by side in one run (issue 21).

Variants, each built as `medseg predict` builds it (`medseg.infer.predictor.load_model`):
- `plain_monai`: the unprepared network in fp32; per window in batches of 4, end to end through MONAI's
  `sliding_window_inference` with its defaults (sw_batch_size 1), as a plain MONAI script runs it;
- `torch_fp32`, `torch_bf16`: medseg's torch path (`runtime.prepare_network`; bf16 autocast and
  channels-last where the CPU has bf16 units). `torch_fp32` was the default on a CPU without bf16 when
  issue 21 set its goals (their baseline), `torch_bf16` where it has them; `--precision auto` now takes
  `openvino_int8` on a CPU without bf16 where the model's check passed;
- `openvino_f32`, `openvino_bf16`: `--backend openvino` (bf16 only where the CPU has bf16 units);
- `openvino_int8` (`--int8`): `--precision int8`, for each model whose `medseg quantize` check passed
  (`<model>/openvino/int8.json`; a model without one, or refused, is listed under `int8` with the reason).

Parts:
- `window`: seconds per window, forward passes of batches of `sw_batch_size` windows, per model; max
  |logit - torch fp32| on the same batch; which kernels OpenVINO compiled (`openvino_kernels`). With
  `--isa avx2` (or `--avx2`) the same again in a subprocess with `ONEDNN_MAX_CPU_ISA=AVX2
  ATEN_CPU_CAPABILITY=avx2` (fp32 and int8 only), standing for a CPU without AVX-512 and bf16: torch's
  convolutions and OpenVINO's (oneDNN: `brgconv_avx2`, int8 `jit_avx2_I8`) then run AVX2 kernels, but
  OpenVINO's own kernels (instance norm `MVN`, `FakeQuantize`, eltwise) stay AVX-512: OpenVINO has no
  setting that holds its plugin to AVX2, so its AVX2 figures are an upper bound. `e2e` too, where asked
  (`held_to_avx2` in the results; before 2026-12-03 the window part alone, `window_avx2`).
- `e2e`: `Predictor.predict` from the file to the mask on the scan's grid (read, preprocess, inference,
  way back, largest piece; output files are the same work for every variant and are left out) on the
  first sample test scan of the prostate model's task and on an adult-sized 512 x 512 x `--slices`
  synthetic CT (`bench_predict.make_scan`, scale 1.45); with `--headneck-data`, also the headneck model on
  the first of `--headneck-cases` (`e2e_headneck`).
- `agreement`: labels of every variant against torch fp32 on trained models (prostate: the sample test
  cases; headneck: `--headneck-cases` of `--headneck-data`, default `--cases` of the model's validation cases),
  and per-organ Dice against the references on the organs each case contoured. Criteria (issue 21):
  agreement >= 0.999 for every case and each organ's mean |dDice| <= 0.005 (`pass_per_organ_mean`, the int8
  check's gate); `pass_every_case` asks |dDice| <= 0.005 of every case and organ, which bf16 misses too.
- `conversion`: OpenVINO's first conversion (empty cache) and a cached load, per model.

Timing: `--threads` (default 1) for torch and OpenVINO alike; variants interleaved, the minimum of
`--repeats` (>= 3) after a warm-up. Other jobs shared this machine's two cores: trust ratios more than
absolute times. Prints JSON and writes benchmarks/results/backends.json (`--out`).

    python benchmarks/bench_backends.py --prostate-model RUN [--headneck-model RUN] [--parts window e2e ...]
        [--int8] [--isa avx2]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from medseg.errors import InputError
from medseg.infer.backends import openvino_network, openvino_version
from medseg.infer.predictor import Predictor, load_model
from medseg.model.folder import load_checkpoint, read_run_config
from medseg.model.networks import build_network
from medseg.runtime import autocast, cpu_flags, cpu_has_native_bf16, cpu_name, keep_freed_memory

RESULTS = Path(__file__).resolve().parent / "results" / "backends.json"
PARTS = ("window", "e2e", "agreement", "conversion")
CPU = torch.device("cpu")


def variants(bf16: bool, plain: bool = True) -> list[tuple[str, str, str]]:
    """(name, backend, precision) of every variant this CPU runs; 'plain' is the unprepared torch network."""
    found = [("plain_monai", "plain", "fp32")] if plain else []
    found += [("torch_fp32", "torch", "fp32"), ("openvino_f32", "openvino", "fp32")]
    if bf16:
        found += [("torch_bf16", "torch", "bf16"), ("openvino_bf16", "openvino", "bf16")]
    return found


def plain_network(folder: Path) -> torch.nn.Module:
    """The folder's network as a plain MONAI script has it: fp32, InstanceNorm, NCDHW, eval mode."""
    network = build_network(read_run_config(folder).network)
    network.load_state_dict(load_checkpoint(folder / "best.pt")["model"])
    return network.eval()


def load(folder: Path, backend: str, precision: str):
    """A `ModelBundle` for the variant ('plain': the torch bundle with the unprepared network)."""
    bundle = load_model(folder, "cpu", precision=precision, backend="torch" if backend == "plain" else backend)
    if backend == "plain":
        bundle.network = plain_network(folder)
    return bundle


def interleaved(runs: dict, repeats: int) -> dict[str, list[float]]:
    """Seconds of every run, one round of all runs at a time, after a warm-up round."""
    for run in runs.values():
        run()
    times = {name: [] for name in runs}
    for _ in range(repeats):
        for name, run in runs.items():
            start = time.perf_counter()
            run()
            times[name].append(time.perf_counter() - start)
    return times


# ------------------------------------------------------------------------------------ per window


def bench_window(folder: Path, bf16: bool, repeats: int, extra: dict | None = None) -> dict:
    """Seconds per window of each variant's forward pass on one batch of `sw_batch_size` windows.

    Args:
        extra: more variants, name -> `ModelBundle` (the int8 networks).
    """
    bundles = {name: load(folder, backend, precision) for name, backend, precision in variants(bf16)}
    bundles.update(extra or {})
    first = next(iter(bundles.values()))
    batch_size = first.task.inference.sw_batch_size
    batch = torch.randn(batch_size, first.plan.in_channels, *first.plan.patch_size,
                        generator=torch.Generator().manual_seed(0))

    def forward(bundle):
        with torch.inference_mode(), autocast(CPU, bundle.precision):
            return bundle.network(batch).float()  # as `stitching` calls it

    times = interleaved({name: (lambda b=bundle: forward(b)) for name, bundle in bundles.items()}, repeats)
    reference = forward(bundles["torch_fp32"])
    best = {name: min(t) / batch_size for name, t in times.items()}
    return {
        "network": f"{first.plan.name} {list(first.plan.filters)}", "window": list(first.plan.patch_size),
        "batch": batch_size, "seconds_per_window_min": {n: round(t, 4) for n, t in best.items()},
        "all_seconds_per_batch": {n: [round(s, 3) for s in t] for n, t in times.items()},
        "max_abs_logit_difference_vs_torch_fp32": {n: round(float((forward(b) - reference).abs().max()), 5)
                                                   for n, b in bundles.items()},
        "logit_range_torch_fp32": round(float(reference.abs().max()), 2),
        "speedup": speedups(best),
        "openvino_kernels": {n: b.network.kernels() for n, b in bundles.items() if b.backend == "openvino"},
    }


def speedups(best: dict[str, float]) -> dict[str, float]:
    """The ratios that answer the issue: OpenVINO against medseg's torch at the same precision, and
    everything against today's default (`torch_bf16` where the CPU has bf16, else `torch_fp32`)."""
    default = "torch_bf16" if "torch_bf16" in best else "torch_fp32"
    ratios = {"openvino_f32_over_torch_fp32": best["torch_fp32"] / best["openvino_f32"]}
    if "openvino_int8" in best:
        ratios["openvino_int8_over_openvino_f32"] = best["openvino_f32"] / best["openvino_int8"]
    if "openvino_bf16" in best:
        ratios["openvino_bf16_over_torch_bf16"] = best["torch_bf16"] / best["openvino_bf16"]
    ratios.update({f"{name}_over_default_{default}": best[default] / t for name, t in best.items() if name != default})
    return {k: round(v, 3) for k, v in ratios.items()}


ISA_ENV = {"avx2": {"ONEDNN_MAX_CPU_ISA": "AVX2", "ATEN_CPU_CAPABILITY": "avx2"}}  # --isa: as on an AVX2-only CPU


def isa_subprocess(args: argparse.Namespace) -> dict:
    """The window and e2e parts asked for, again in a subprocess with oneDNN and ATen held to `args.isa` (fp32
    and int8 only)."""
    env = ISA_ENV[args.isa]
    parts = [part for part in ("window", "e2e") if part in args.parts]
    command = [sys.executable, __file__, "--parts", *parts, "--no-bf16", "--no-write", "--repeats", str(args.repeats),
               "--threads", str(args.threads), "--slices", str(args.slices), "--prostate-model", str(args.prostate_model)]
    if args.headneck_model:
        command += ["--headneck-model", str(args.headneck_model)]
    if args.headneck_data:
        command += ["--headneck-data", str(args.headneck_data), *(["--headneck-cases", *args.headneck_cases]
                                                                  if args.headneck_cases else [])]
    if args.int8:
        command += ["--int8"]
    done = subprocess.run(command, env=dict(os.environ, **env), capture_output=True, text=True, check=True)
    result = json.loads(done.stdout)
    return {"env": " ".join(f"{k}={v}" for k, v in env.items()),
            **{key: result[key] for key in (*parts, "e2e_headneck", "int8") if key in result}}


# ------------------------------------------------------------------------------------ end to end


class PlainMonai(Predictor):
    """`Predictor` with MONAI's `sliding_window_inference` at its defaults in place of medseg's windows."""

    def logits(self, image: torch.Tensor) -> torch.Tensor:
        from monai.inferers import sliding_window_inference

        with torch.no_grad():  # not inference_mode: `predict` goes on to change the logits in place
            return sliding_window_inference(image[None], self.bundle.plan.patch_size, 1, self.bundle.network,
                                            overlap=self.overlap, mode="gaussian")[0]


def bench_e2e(folder: Path, scans: dict[str, Path], bf16: bool, repeats: int, extra: dict | None = None) -> dict:
    """Seconds of `Predictor.predict` per scan and variant (min of `repeats`), and its stages."""
    predictors = {name: (PlainMonai if backend == "plain" else Predictor)(load(folder, backend, precision))
                  for name, backend, precision in variants(bf16)}
    predictors.update({name: Predictor(bundle) for name, bundle in (extra or {}).items()})
    result = {}
    for scan_name, scan in scans.items():
        last = {}
        times = interleaved({name: predicting(p, scan, last, name) for name, p in predictors.items()}, repeats)
        best = {name: min(t) for name, t in times.items()}
        reference = last["torch_fp32"].labels
        result[scan_name] = {
            "scan_shape": list(reference.shape), "seconds_min": {n: round(t, 2) for n, t in best.items()},
            "all_seconds": {n: [round(s, 2) for s in t] for n, t in times.items()},
            "stages_of_last_run": {n: {k: round(v, 2) for k, v in seg.seconds.items()} for n, seg in last.items()},
            "label_agreement_vs_torch_fp32": {n: float(np.mean(seg.labels == reference)) for n, seg in last.items()},
            "speedup": speedups(best),
        }
    return result


def predicting(predictor: Predictor, scan: Path, into: dict, name: str):
    """A run for `interleaved` that keeps its segmentation in `into[name]`."""

    def run():
        into[name] = predictor.predict(scan)

    return run


def adult_scan(folder: Path, slices: int) -> Path:
    """A 512 x 512 x `slices` planning-CT-sized scan with an adult-sized pelvis (bench_predict's phantom)."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from bench_predict import make_scan

    return make_scan(folder / f"adult_512x512x{slices}.nii.gz", slices, scale=1.45)


# ------------------------------------------------------------------------------------ agreement


def test_cases(folder: Path, count: int, data: Path | None = None, names: list[str] | None = None) -> list:
    """Cases with references: the sample test cases, else `names` (or `count` validation cases) of `data`."""
    from medseg.config import sample_data_dir
    from medseg.data.datasets import load_dataset

    config = read_run_config(folder)
    if data is None and config.task.sample_data and config.data == str(sample_data_dir(config.task.sample_data)):
        return load_dataset(config.data, "test")
    wanted = names or config.split.get("validation", [])[:count]
    found = {case.name: case for case in load_dataset(data or config.data, "train") if case.name in wanted}
    if missing := sorted(set(wanted) - set(found)):
        raise InputError(f"{data or config.data}: no case {', '.join(missing)}")
    return [found[name] for name in wanted]


def bench_agreement(folder: Path, bf16: bool, cases: list, extra: dict | None = None) -> dict:
    """Every variant's labels against torch fp32's, and each contoured organ's change of Dice, per case."""
    from medseg.infer.quantize import organ_dice
    from medseg.io import read_label

    predictors = {name: Predictor(load(folder, backend, precision)) for name, backend, precision in variants(bf16, False)}
    predictors.update({name: Predictor(bundle) for name, bundle in (extra or {}).items()})
    all_organs, rows = predictors["torch_fp32"].task.label_names, {}
    for case in cases:  # an organ a case did not contour has an empty reference there, not a true one
        reference = read_label(case.label)[0]
        organs = {i: n for i, n in all_organs.items() if case.contoured is None or n in case.contoured}
        labels = {name: predictor.predict(list(case.images)).labels for name, predictor in predictors.items()}
        base = labels.pop("torch_fp32")
        dice32 = organ_dice(reference, base, organs)  # None: the organ is in neither
        rows[case.name] = {"dice_torch_fp32": dice32}
        for name, other in labels.items():
            change = {k: d - dice32[k] for k, d in organ_dice(reference, other, organs).items()
                      if d is not None and dice32[k] is not None}
            rows[case.name][name] = {"agreement": float(np.mean(other == base)), "dice_change": change}
    summary = {}
    for name in (n for n in predictors if n != "torch_fp32"):
        worst = min(r[name]["agreement"] for r in rows.values())
        changes = [abs(v) for r in rows.values() for v in r[name]["dice_change"].values()]
        by_organ = {}
        for r in rows.values():
            for organ, change in r[name]["dice_change"].items():
                by_organ.setdefault(organ, []).append(change)
        means = {organ: float(np.mean(values)) for organ, values in by_organ.items()}
        summary[name] = {"worst_agreement": worst, "worst_abs_dice_change": max(changes, default=0.0),
                         "mean_dice_change_per_organ": means,
                         "pass_per_organ_mean": worst >= 0.999 and max(map(abs, means.values()), default=0.0) <= 0.005,
                         "pass_every_case": worst >= 0.999 and max(changes, default=0.0) <= 0.005}
    return {"cases": len(cases), "summary": summary, "per_case": rows}


def bench_conversion(folder: Path) -> dict:
    """Seconds for OpenVINO's first conversion (empty cache) and for a load from the cache."""
    plan = read_run_config(folder).network
    window = (plan.in_channels, *plan.patch_size)
    with tempfile.TemporaryDirectory() as cache:
        first = openvino_network(plain_network(folder), folder / "best.pt", window, "fp32", cache_roots=[Path(cache)])
        again = openvino_network(plain_network(folder), folder / "best.pt", window, "fp32", cache_roots=[Path(cache)])
    return {"convert_and_compile_s": round(first.seconds, 2), "cached_read_and_compile_s": round(again.seconds, 2),
            "converted": [first.converted, again.converted]}


# ------------------------------------------------------------------------------------ int8


def int8_variant(folder: Path) -> tuple[dict, dict]:
    """`openvino_int8` where the model's `medseg quantize` check passed: (name -> `ModelBundle`, its check's
    figures); ({}, {"skipped": why}) where it has none, or it was refused, or its weights changed since."""
    from medseg.infer.int8 import record_path

    try:
        bundle = load_model(folder, "cpu", precision="int8", backend="openvino")
    except InputError as error:
        return {}, {"skipped": str(error)}
    record = json.loads(record_path(folder).read_text())
    return {"openvino_int8": bundle}, {
        "record": str(record_path(folder)), "nncf": record["nncf"], "quantisation": record["quantisation"],
        "check_cases": record["check"]["cases"], "worst_agreement_vs_openvino_f32": record["agreement"]["worst"],
        "worst_abs_dice_change_vs_openvino_f32": max((o["abs_dice_change"] for o in record["organs"].values()),
                                                     default=None)}


# ------------------------------------------------------------------------------------ main


def machine(threads: int) -> dict:
    import monai

    return {"cpu": cpu_name(), "cpu_flags": cpu_flags(), "cpu_native_bf16": cpu_has_native_bf16(),
            "cores": os.cpu_count(), "threads": threads, "torch": torch.__version__, "monai": monai.__version__,
            "openvino": openvino_version(), "loadavg_at_start": [round(x, 2) for x in os.getloadavg()],
            "note": "2-core machine shared with other jobs during the run: absolute times are noisy; the "
                    "variants were interleaved and the minimum taken, so compare ratios"}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prostate-model", type=Path, required=True, help="run folder of `medseg train --task prostate`")
    parser.add_argument("--headneck-model", type=Path, help="run folder of a headneck model (window, agreement)")
    parser.add_argument("--parts", nargs="+", choices=PARTS, default=list(PARTS))
    parser.add_argument("--repeats", type=int, default=3, help="timed rounds (>= 3), after a warm-up")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--slices", type=int, default=150, help="slices of the adult-sized 512 x 512 CT")
    parser.add_argument("--cases", type=int, default=4, help="headneck validation cases for the agreement")
    parser.add_argument("--headneck-data", type=Path, help="dataset of the headneck agreement's cases")
    parser.add_argument("--headneck-cases", nargs="+", help="their names (default: the model's validation cases)")
    parser.add_argument("--isa", choices=sorted(ISA_ENV), help="also the window and e2e parts in a subprocess with "
                        "oneDNN and ATen held to this instruction set (OpenVINO's own kernels are not)")
    parser.add_argument("--avx2", dest="isa", action="store_const", const="avx2", help="the same as --isa avx2")
    parser.add_argument("--int8", action="store_true", help="also openvino_int8 of each model whose int8.json passed "
                        "(`medseg quantize`)")
    parser.add_argument("--no-bf16", action="store_true", help="fp32 variants only (as on a CPU without bf16)")
    parser.add_argument("--no-write", action="store_true", help="print only")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    if args.repeats < 3:
        parser.error("--repeats must be at least 3")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if openvino_version() is None:
        print('error: OpenVINO is not installed (pip install "medseg[openvino]")', file=sys.stderr)
        return 2
    keep_freed_memory()  # as `medseg predict` does
    torch.set_num_threads(args.threads)  # OpenVINO takes torch's thread count (backends.openvino_network)
    bf16 = cpu_has_native_bf16() and not args.no_bf16
    models = {"prostate": args.prostate_model, **({"headneck": args.headneck_model} if args.headneck_model else {})}
    result = {"command": "python benchmarks/bench_backends.py " + " ".join(sys.argv[1:]), "machine": machine(args.threads),
              "repeats": args.repeats}
    log = lambda part: print(f"{part} ({time.strftime('%H:%M:%S')})", file=sys.stderr, flush=True)
    extra = {name: {} for name in models}  # more variants of each model: its checked int8 network
    if args.int8:
        log("int8")
        found = {name: int8_variant(folder) for name, folder in models.items()}
        extra, result["int8"] = {n: f[0] for n, f in found.items()}, {n: f[1] for n, f in found.items()}
    if "conversion" in args.parts:
        log("conversion")
        result["conversion"] = {name: bench_conversion(folder) for name, folder in models.items()}
    if "window" in args.parts:
        log("window")
        result["window"] = {name: bench_window(folder, bf16, args.repeats, extra[name]) for name, folder in models.items()}
    if "e2e" in args.parts:
        log("e2e")
        with tempfile.TemporaryDirectory() as tmp:
            sample = list(test_cases(args.prostate_model, 1)[0].images)
            scans = {"sample_test_scan": sample, f"adult_512x512x{args.slices}": adult_scan(Path(tmp), args.slices)}
            result["e2e"] = bench_e2e(args.prostate_model, scans, bf16, args.repeats, extra["prostate"])
        if args.headneck_model and args.headneck_data:  # the real-data model on one scan it never saw
            case = test_cases(args.headneck_model, 1, args.headneck_data, args.headneck_cases[:1] if args.headneck_cases else None)[0]
            result["e2e_headneck"] = bench_e2e(args.headneck_model, {case.name: list(case.images)}, bf16, args.repeats,
                                               extra["headneck"])
    if args.isa and {"window", "e2e"} & set(args.parts):
        log(f"window and e2e, held to {args.isa}")
        result[f"held_to_{args.isa}"] = isa_subprocess(args)
    if "agreement" in args.parts:
        log("agreement")
        chosen = {"headneck": (args.headneck_data, args.headneck_cases)}
        result["agreement"] = {name: bench_agreement(folder, bf16, test_cases(folder, args.cases, *chosen.get(name, ())),
                                                     extra[name])
                               for name, folder in models.items()}
    result["machine"]["loadavg_at_end"] = [round(x, 2) for x in os.getloadavg()]
    text = json.dumps(result, indent=2)
    print(text)
    if not args.no_write:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
