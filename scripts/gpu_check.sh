#!/usr/bin/env bash
# GPU check in one command on a lent NVIDIA machine (docs/GPU_CHECK.md): installs CuPy and TensorRT from the
# package registry into the project's virtualenv, then runs benchmarks/gpu_check.py (CuPy preprocessing parity,
# GPU NMS against the CPU path, TensorRT FP16 and INT8 plans with calibration, the nvidia-gpu target served) and
# prints the GPU vs CPU timing table. Everything together stays under 8 minutes (TOTAL_S); results in $OUT.
#
#   scripts/gpu_check.sh                 # the whole check
#   scripts/gpu_check.sh --dry-run       # print what it would install and run, change nothing
#   PIP_FIND_LINKS=/wheels PIP_NO_INDEX=1 scripts/gpu_check.sh   # offline, from wheels fetched beforehand
#
# Environment: PYTHON (default .venv/bin/python), OUT (build/gpu_check), TOTAL_S (470), CUPY_PACKAGE,
# TENSORRT_PACKAGE. TensorRT stays on 10.x: builder/optimize/tensorrt_variants.py calibrates INT8 with
# IInt8EntropyCalibrator2 (implicit quantization), deprecated in TensorRT 10.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-.venv/bin/python}
OUT=${OUT:-build/gpu_check}
TOTAL_S=${TOTAL_S:-470}
CUPY_PACKAGE=${CUPY_PACKAGE:-cupy-cuda12x==14.2.0}
TENSORRT_PACKAGE=${TENSORRT_PACKAGE:-tensorrt-cu12==10.16.1.11}
INSTALL=("$PYTHON" -m pip install --quiet "$CUPY_PACKAGE" "$TENSORRT_PACKAGE")
CHECK=("$PYTHON" benchmarks/gpu_check.py --out "$OUT")

if [[ "${1:-}" == "--dry-run" ]]; then
    shift
    echo "install: ${INSTALL[*]}"
    echo "run:     ${CHECK[*]} $*"
    echo "budget:  ${TOTAL_S} s in all"
    exit 0
fi

started=$(date +%s)
if ! nvidia-smi -L; then
    echo "gpu_check: no NVIDIA GPU here (nvidia-smi failed); nothing to check" >&2
    exit 2
fi
echo "gpu_check: installing ${CUPY_PACKAGE} ${TENSORRT_PACKAGE}" >&2
timeout $((TOTAL_S / 2)) "${INSTALL[@]}"
left=$((TOTAL_S - ($(date +%s) - started)))
echo "gpu_check: running the check (${left} s left of ${TOTAL_S})" >&2
timeout "$left" "${CHECK[@]}" --budget-s $((left * 3 / 4)) "$@"
