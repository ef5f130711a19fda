#!/usr/bin/env bash
# What the lent GPU machine runs, from the repository root with dist/ carried:
#   bash ci/gpu_check.sh tests [PATHS]  the test suite with GPU tests (Triton kernels compiled), then
#                                   compute-sanitizer memcheck over the Triton kernels
#   bash ci/gpu_check.sh tune OP    rocmoe tune for OP, table written under $OUT/configs/
#   bash ci/gpu_check.sh retune OP [TUNE ARGS]  rocmoe tune for OP into $OUT/configs/, then in the same
#                                   call rocmoe bench of OP with that table (triton, torch) and with the
#                                   installed one (triton), and ci/bench_compare.py of the two
#   bash ci/gpu_check.sh bench ARGS rocmoe bench ARGS, JSON/markdown/plot under $OUT
#   bash ci/gpu_check.sh pingpong   the warp-specialised MLA kernel (config PINGPONG): a small case, its GPU
#                                   tests (a hang in either ends the call), it and the wgmma kernel
#                                   checked and timed at the 64+-head SPEC shapes, then memcheck
#   bash ci/gpu_check.sh partials   the split MLA decode's 16-bit partial outputs (HALF_PARTIALS) against fp32:
#                                   the GPU tests of both, each one's small-batch breakdown (alternating), and
#                                   rocmoe bench at T = 1 and 8 with each, compared
#   bash ci/gpu_check.sh versus WHEEL OP [BENCH ARGS]  rocmoe bench of OP's triton backend with WHEEL (built on
#                                   the CPU machine from an earlier commit and carried, e.g. under scratch/;
#                                   installed aside, never over dist/'s) and with dist/'s, alternating twice,
#                                   then ci/bench_compare.py of each round
#   bash ci/gpu_check.sh firstcall DIR  first-call latency per op in fresh processes, with an empty
#                                   Triton cache and with a copy of DIR (made by rocmoe precompile)
# The wheel is installed with --no-deps into the machine's python (torch is there)
# and everything runs from a scratch folder, so the source tree cannot shadow it.
set -uo pipefail
export PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/rocmoe-out}
mkdir -p "$OUT"
python3 -m pip install -q --no-deps --force-reinstall dist/rocmoe-*.whl 2>&1 | grep -v -i warning
repo=$(pwd)
work=$(mktemp -d)
cp -r tests "$work/"
cd "$work" || exit 1
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
      -k "1000 and 128 or every_launch_config or strided or adversarial or configs or remote_experts or passes_and \
        or other_partial or only_the_chunks" \
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
  retune)
    op=$1; shift
    arch=$(python3 -c "import rocmoe; print(rocmoe.Device.current().arch)")
    rocmoe tune --op "$op" --out "$OUT/configs/$op/$arch.json" "$@" 2>&1 | grep -v "━" | tail -3
    ROCMOE_CONFIG_DIR=$OUT/configs rocmoe bench --op "$op" --backend triton,torch --json "$OUT/bench_new.json" \
      2>&1 | grep -v -i warn > "$OUT/bench_new.txt"
    rocmoe bench --op "$op" --backend triton --json "$OUT/bench_previous.json" 2>&1 | grep -v -i warn \
      > "$OUT/bench_previous.txt"
    python3 "$repo/ci/bench_compare.py" "$OUT/bench_previous.json" "$OUT/bench_new.json" | tee "$OUT/compare.md"
    ;;
  pingpong)
    # The warp-specialised MLA kernel (config PINGPONG): one small case first, so that a hang
    # costs 90 s and ends the call; its GPU tests (a hang is cut at 150 s and ends the call);
    # it and the wgmma kernel at the same split, alternating, at the 64+-head SPEC shapes; memcheck.
    nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
    wgmma=64,64,8,2,0,0,1,1,0
    pingpong=64,64,8,2,0,0,1,1,1
    timeout 90 python3 "$repo/ci/mla_sweep.py" --model dsv32 --heads 64 --tokens 2 --only --config $pingpong 2>&1 \
      | grep -v -i warn | tee "$OUT/pingpong_smoke.txt"
    [ "${PIPESTATUS[0]}" = 124 ] && echo "smoke run hung" && exit 124
    timeout 150 python3 -m pytest tests/test_gpu.py -q -p no:cacheprovider -m gpu -k "wgmma_kernel and pingpong" 2>&1 \
      | tail -15 \
      | tee "$OUT/pingpong_tests.txt"
    status=${PIPESTATUS[0]}
    echo "tests exit: $status" | tee -a "$OUT/pingpong_tests.txt"
    [ "$status" = 124 ] && exit 124
    for model in "dsv32 --heads 128" "dsv4-pro --heads 128" "dsv4-flash --heads 64"; do
      # shellcheck disable=SC2086 # the model and its heads are two arguments
      timeout 150 python3 "$repo/ci/mla_sweep.py" --model $model --tokens 8 64 512 --only \
        --config $wgmma $pingpong $wgmma $pingpong 2>&1 | grep -v -i warn
    done | tee "$OUT/pingpong_times.txt"
    timeout 200 compute-sanitizer --tool memcheck --error-exitcode 9 python3 -m pytest tests/test_gpu.py -q \
      -p no:cacheprovider -m gpu -k "wgmma_kernel and pingpong and 128" 2>&1 | tail -6 \
      | tee "$OUT/pingpong_sanitizer.txt"
    echo "sanitizer exit: ${PIPESTATUS[0]}"
    ;;
  partials)
    nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
    timeout 150 python3 -m pytest tests/test_gpu.py -q -p no:cacheprovider -m gpu \
      -k "test_triton_mla_at_spec_shapes or other_partial_dtype" 2>&1 | tail -4 | tee "$OUT/partials_tests.txt"
    timeout 150 python3 "$repo/ci/mla_small_t.py" --no-sweep --partials fp32 half fp32 half --tokens 1 2 8 2>&1 \
      | grep -v -i warn | tee "$OUT/partials_small_t.txt"
    # The same benchmark cases with each choice, set in the process before the bench runs.
    for half in False True; do
      timeout 90 python3 -c "import sys
from rocmoe.backends.triton import sparse_mla_decode
from rocmoe.cli import main
sparse_mla_decode.HALF_PARTIALS = $half
sys.exit(main(sys.argv[1:]))" bench --op sparse_mla_decode --backend triton --size 1 --size 8 \
        --json "$OUT/partials_half_$half.json" 2>&1 | grep -v -i warn > "$OUT/partials_bench_half_$half.txt"
    done
    python3 "$repo/ci/bench_compare.py" "$OUT/partials_half_False.json" "$OUT/partials_half_True.json" \
      | tee "$OUT/partials_compare.md"
    ;;
  versus)
    earlier=$repo/${1:?usage: gpu_check.sh versus WHEEL OP [BENCH ARGS]}; op=${2:?usage: gpu_check.sh versus WHEEL OP}
    shift 2
    aside=$(mktemp -d)
    python3 -m pip install -q --no-deps --target "$aside" "$earlier" 2>&1 | grep -v -i warning
    PYTHONPATH=$aside python3 -c "import rocmoe; print('earlier:', rocmoe.__version__, rocmoe.__file__)"
    python3 -c "import rocmoe; print('this:', rocmoe.__version__, rocmoe.__file__)"
    for round in 1 2; do
      PYTHONPATH=$aside python3 -m rocmoe bench --op "$op" --backend triton "$@" --json "$OUT/versus_earlier_$round.json" \
        2>&1 | grep -v -i warn > "$OUT/versus_earlier_$round.txt"
      rocmoe bench --op "$op" --backend triton "$@" --json "$OUT/versus_this_$round.json" 2>&1 | grep -v -i warn \
        > "$OUT/versus_this_$round.txt"
    done
    for round in 1 2; do
      python3 "$repo/ci/bench_compare.py" "$OUT/versus_earlier_$round.json" "$OUT/versus_this_$round.json"
    done | tee "$OUT/versus_compare.md"
    ;;
  firstcall)
    cache=$repo/${1:?usage: gpu_check.sh firstcall PRECOMPILED_CACHE_DIR}
    python3 -c "import sys, triton, torch; print(sys.version.split()[0], 'triton', triton.__version__, 'torch', torch.__version__)"
    sha256sum "$(python3 -c 'import triton, os; print(os.path.join(os.path.dirname(triton.__file__), "_C", "libtriton.so"))')"
    # Two rounds, alternating, each in fresh processes with their own copy of the cache.
    for round in 1 2; do
      cold=$(mktemp -d); warm=$(mktemp -d); cp -r "$cache/." "$warm/"
      TRITON_CACHE_DIR=$cold python3 "$repo/ci/first_call.py" --label "empty-$round" --json "$OUT/first_call_empty_$round.json"
      TRITON_CACHE_DIR=$warm python3 "$repo/ci/first_call.py" --label "precomp-$round" \
        --json "$OUT/first_call_precompiled_$round.json" ${FIRST_CALL_PROFILE:+--profile}
      # What the GPU process compiled that precompile did not: kept for a diff of the TTIR.
      comm -13 <(find "$cache" -mindepth 1 -maxdepth 1 -printf '%f\n' | sort) \
        <(find "$warm" -mindepth 1 -maxdepth 1 -printf '%f\n' | sort) \
        | tar -czf "$OUT/missed_$round.tgz" -C "$warm" -T - || true
    done 2>&1 | grep -v -i warn | tee "$OUT/first_call.txt"
    ;;
  bench)
    rocmoe bench "$@" --json "$OUT/bench.json" --markdown "$OUT/bench.md" --plot "$OUT/bench.png" 2>&1 \
      | tee "$OUT/bench.txt" | tail -60
    ;;
esac
