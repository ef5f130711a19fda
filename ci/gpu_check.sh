#!/usr/bin/env bash
# What the lent GPU machine runs, from the repository root with dist/ carried:
#   bash ci/gpu_check.sh tests [PATHS]  the test suite with GPU tests (Triton kernels compiled), then
#                                   compute-sanitizer memcheck over the Triton kernels
#   bash ci/gpu_check.sh tune OP    rocmoe tune for OP, table written under $OUT/configs/
#   bash ci/gpu_check.sh bench ARGS rocmoe bench ARGS, JSON/markdown/plot under $OUT
# The wheel is installed with --no-deps into the machine's python (torch is there)
# and everything runs from a scratch folder, so the source tree cannot shadow it.
set -uo pipefail
export PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/rocmoe-out}
mkdir -p "$OUT"
python3 -m pip install -q --no-deps --force-reinstall dist/rocmoe-*.whl 2>&1 | grep -v -i warning
work=$(mktemp -d)
cp -r tests "$work/"
cd "$work"
what=${1:-tests}
shift || true
case "$what" in
  tests)
    nvidia-smi --query-gpu=name,driver_version,clocks.sm,temperature.gpu --format=csv,noheader
    rocmoe info | tee "$OUT/info.txt"
    python3 -m pytest "${@:-tests}" -p no:cacheprovider -q -m "gpu or not (rocm or xpu or slow)" \
      --ignore=tests/test_packaging.py --ignore=tests/test_readme.py 2>&1 | tee "$OUT/pytest.txt" | tail -25
    echo "== compute-sanitizer memcheck over the Triton kernels"
    compute-sanitizer --tool memcheck --error-exitcode 9 python3 -m pytest tests/test_triton_gemma4_routing.py \
      tests/test_triton_sparse_topk.py tests/test_triton_sparse_mla_decode.py tests/test_triton_mxfp4_moe.py \
      -p no:cacheprovider -q -x \
      -k "1000 and 128 or every_launch_config or strided or adversarial or configs or remote_experts or passes_and" \
      2>&1 \
      | tee "$OUT/sanitizer.txt" | tail -6
    echo "sanitizer exit: ${PIPESTATUS[0]}"
    ;;
  tune)
    op=$1; shift
    arch=$(python3 -c "import rocmoe; print(rocmoe.Device.current().arch)")
    rocmoe tune --op "$op" --out "$OUT/configs/$op/$arch.json" "$@" 2>&1 | tail -5
    cat "$OUT/configs/$op/$arch.json"
    ;;
  bench)
    rocmoe bench "$@" --json "$OUT/bench.json" --markdown "$OUT/bench.md" --plot "$OUT/bench.png" 2>&1 \
      | tee "$OUT/bench.txt" | tail -60
    ;;
esac
