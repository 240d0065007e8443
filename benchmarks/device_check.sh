#!/usr/bin/env bash
# The GPU check of issue 16, for a machine with one NVIDIA GPU, jax 0.11 and flax preinstalled and
# no package registry (the `device` machines). At most about 8 minutes:
#   1. a parity subset of the tests on the GPU (mixed-precision loss parity, PyTorch-import logits
#      against the plain-torch twins), at most 2 minutes;
#   2. the step table of benchmarks/bench_steps.py for the CIFAR pairs (ResNet-34 -> ResNet-18,
#      WRN-40-2 -> WRN-16-2, batch 256) x dafl, deepinversion, mb_dfkd, pre_dfkd, fast, nayer x
#      float32 and bfloat16: compile, step time, images/s, TFLOP/s and the fraction of the GPU's
#      peak; new rows stop after 4 minutes;
#   3. benchmarks/bench_generators.py at CIFAR size (32x32x3, batch 256): PRE-DFKD's generator and
#      VAE parts with numerics.upsample_conv direct and subpixel, at most 1 minute.
# Everything goes to stdout and to $OUT/device_check.md ($OUT defaults to /tmp/device_check).
#
# Prepare once where pip reaches PyPI (the pure-Python packages the device image lacks):
#   bash benchmarks/device_check.sh --fetch-wheels        # -> .whl/ (add /.whl/ to .git/info/exclude)
# Then, through the device tool: command `bash benchmarks/device_check.sh`, carry [".whl"].
# A CPU smoke run of the same script: DEVICE_CHECK_PAIRS=wrn40_2_wrn16_2 DEVICE_CHECK_BATCH=16 \
#   DEVICE_CHECK_METHODS=dafl DEVICE_CHECK_TESTS=tests/test_precision.py bash benchmarks/device_check.sh
set -uo pipefail
cd "$(dirname "$0")/.."
if [ "${1:-}" = "--fetch-wheels" ]; then
  exec python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 \
    --implementation py --platform any -d .whl "ml-collections==1.1.0"
fi
OUT=${OUT:-/tmp/device_check}
mkdir -p "$OUT"
REPORT="$OUT/device_check.md"
PY=${PYTHON:-python3}
if ls .whl/*.whl >/dev/null 2>&1; then
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/dfkd_site .whl/*.whl || exit 1
  export PYTHONPATH="/tmp/dfkd_site:$PWD"
else
  export PYTHONPATH="$PWD"
fi
export PYTHONUNBUFFERED=1 TF_CPP_MIN_LOG_LEVEL=3
export JAX_COMPILATION_CACHE_DIR=${JAX_COMPILATION_CACHE_DIR:-/tmp/dfkd_jax_cache}
{
  echo "# dfkd_jax device check ($(date -u +%F) $(git rev-parse --short HEAD 2>/dev/null))"
  $PY -c "import jax, flax; print('jax', jax.__version__, 'flax', flax.__version__, jax.devices())"
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null
  echo
  echo "## 1. parity subset"
  timeout 120 $PY -m pytest -q -p no:cacheprovider ${DEVICE_CHECK_TESTS:-tests/test_precision.py \
    tests/io/test_torch_import.py} 2>&1 | tail -15
  echo
  echo "## 2. steps"
  timeout 300 $PY benchmarks/bench_steps.py \
    --pairs "${DEVICE_CHECK_PAIRS:-r34_r18,wrn40_2_wrn16_2}" \
    --methods "${DEVICE_CHECK_METHODS:-dafl,deepinversion,mb_dfkd,pre_dfkd,fast,nayer}" \
    --dtype float32,bfloat16 --batch "${DEVICE_CHECK_BATCH:-256}" --ngf 0 --repeats 5 --max_minutes 4 2>&1 \
    | grep -v "^WARNING\|^W[0-9]"
  echo
  echo "## 3. generator parts, direct vs subpixel upsampling convs"
  timeout 60 $PY benchmarks/bench_generators.py --image 32x32x3 --modes subpixel,direct --repeats 3 2>&1 \
    | grep -v "^WARNING\|^W[0-9]"
} 2>&1 | tee "$REPORT"
