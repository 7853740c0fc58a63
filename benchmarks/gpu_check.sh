#!/usr/bin/env bash
# The GPU paths, checked in one go on a machine with an NVIDIA GPU (CI has none):
#   1. the test suite with CUDA visible: the CLI tests that leave --device at auto train and predict on it;
#   2. `medseg train --task prostate --device cuda` for a minute (bf16 autocast);
#   3. `medseg predict` of the sample test scans on CUDA (bf16) and on the CPU (fp32), labels compared;
#   4. benchmarks/bench_predict.py e2e and stitching on CUDA.
# Logs and results go to $OUT (default /tmp/medseg_gpu_check). Run from the repository root:
#   bash benchmarks/gpu_check.sh           # ~5 min on an H100
#   bash benchmarks/gpu_check.sh quick     # ~2.5 min: no test suite, 30 s of training
# Where the packages are missing and travel as wheels in .whl/ (SimpleITK as .whl/sitk.tar.xz), they are
# installed to /tmp/site first.
set -uo pipefail
QUICK=$([ "${1:-}" = quick ] && echo 1 || echo 0)
OUT=${OUT:-/tmp/medseg_gpu_check}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 MPLBACKEND=Agg
if [ -d .whl ]; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl \
        && tar xJf .whl/sitk.tar.xz -C /tmp/site || exit 1
    export PYTHONPATH=/tmp/site:$PWD
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import torch, monai, torchio, SimpleITK as s; print('torch', torch.__version__, 'monai', monai.__version__,
'torchio', torchio.__version__, 'SimpleITK', s.Version_VersionString(), torch.cuda.get_device_name())" || exit 1

if [ "$QUICK" = 0 ]; then
    echo "== 1. tests, CUDA visible"
    start=$SECONDS
    timeout 240 python3 -m pytest -q -p no:cacheprovider tests 2>&1 | tee "$OUT/pytest.log" | tail -25
    echo "tests: $((SECONDS - start)) s"
fi

echo "== 2. train on CUDA"
start=$SECONDS
timeout 150 python3 -m medseg train --task prostate --device cuda --max-minutes $([ "$QUICK" = 1 ] && echo 0.5 || echo 1) \
    --out /tmp/gpu_run \
    > "$OUT/train.log" 2>&1
echo "train rc=$? in $((SECONDS - start)) s"; tail -8 "$OUT/train.log"
cp /tmp/gpu_run/metrics.csv "$OUT/" 2>/dev/null

echo "== 3. predict on CUDA and on the CPU"
for device in cuda cpu; do
    precision=$([ $device = cpu ] && echo fp32 || echo auto)
    start=$SECONDS
    timeout 120 python3 -m medseg predict sample_data/prostate/imagesTs -m /tmp/gpu_run -o /tmp/gpu_pred_$device \
        --device $device --precision $precision > "$OUT/predict_$device.log" 2>&1
    echo "predict $device ($precision) rc=$? in $((SECONDS - start)) s"; tail -3 "$OUT/predict_$device.log"
done
python3 - <<'EOF'
from pathlib import Path
import numpy as np
from medseg.io import read_label
for gpu in sorted(Path("/tmp/gpu_pred_cuda").glob("*_seg.nii.gz")):
    a, ga = read_label(gpu)
    b, gb = read_label(Path("/tmp/gpu_pred_cpu") / gpu.name)
    print(gpu.name, "same grid", ga.matches(gb), "labels agree on", f"{(a == b).mean():.6f}", "of voxels;",
          "organ voxels cuda/cpu", int((a > 0).sum()), int((b > 0).sum()))
EOF

echo "== 4. predict benchmark on CUDA"
start=$SECONDS
timeout 200 python3 benchmarks/bench_predict.py e2e stitching --device cuda --model /tmp/gpu_run --repeats 2 \
    > "$OUT/bench_predict.log" 2>&1
echo "bench rc=$? in $((SECONDS - start)) s"
cp benchmarks/results/predict.json "$OUT/predict.json"
python3 - "$OUT/predict.json" <<'EOF'
import json, sys
r = json.load(open(sys.argv[1]))
e, s = r.get("e2e_cuda", {}), r.get("stitching_cuda", {})
print("e2e_cuda stages", e.get("stages_s"), "total", e.get("total_s"), "bare", e.get("bare_forward_s"),
      "ratio", e.get("total_over_bare_forward"))
print("stitching_cuda", s.get("seconds_median"), s.get("max_abs_logit_difference_vs_monai_default"))
EOF
