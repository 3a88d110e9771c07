#!/usr/bin/env bash
# One call on a lent GPU machine: build (or reuse a carried build), run a tier of
# GPU tests, and (tier bench) the benchmark. Logs go to $OUT (or ./gpu-logs).
#
#   bash benchmarks/gpu_run.sh smoke       # <= 2 min: the quick GPU tests (2 GPUs)
#   bash benchmarks/gpu_run.sh full        # every GPU test (4 GPUs for all of them)
#   bash benchmarks/gpu_run.sh bench       # the benchmark only: one process group per configuration,
#                                          # $OUT/bench-<config>.json each, merged into $OUT/results.json
#                                          # with the Markdown table in $OUT/results.md
#   BENCH_CONFIGS="decode qwen-2048" BENCH_ARGS="--ranks 2" bash benchmarks/gpu_run.sh bench
#   bash benchmarks/gpu_run.sh breakdown   # per-kernel times and the tuner's table at the four benchmark
#                                          # shapes (benchmarks/breakdown.py, all GPUs), $OUT/breakdown.txt
#   BREAKDOWN_LIBS="build/libhybrid_ep_infer.so variants/a.so" BREAKDOWN_ARGS="--no-tune --tuning 2,4,1,0,13,4" \
#     bash benchmarks/gpu_run.sh breakdown # the same for several builds of the library (A/B)
#   BREAKDOWN_SHAPES="prefill decode" ...  # a subset of the shapes: prefill mixtral qwen decode
#   bash benchmarks/gpu_run.sh ceiling     # what SMs and copy engines write to all other GPUs at once, and
#                                          # the cost of one exchange step (write + release + acquire)
#                                          # (benchmarks/nvlink_ceiling.cu, all GPUs), $OUT/ceiling.txt
#   bash benchmarks/gpu_run.sh --one-gpu phase-clock   # where one low-latency dispatch and one combine spend
#                                          # their time, phase by phase on the GPU's clock (benchmarks/phase_clock.py;
#                                          # a profiling build, built into build-clock/ unless carried, or
#                                          # PHASE_CLOCK_LIB=<another profiling build>), per W of
#                                          # WORLD_SIZES (default 2,4,8); PHASE_CLOCK_ARGS="--tokens 1 128 --fp8";
#                                          # $OUT/phase-clock.txt and $OUT/phase-clock-w<W>.json
#   bash benchmarks/gpu_run.sh smoke slow  # several tiers in one call, stopping at the first failure
#                                          # (slow: only the tests that smoke leaves out)
#   TESTS=tests/test_cuda_combine.py bash benchmarks/gpu_run.sh smoke   # a subset of files
#   HYBRID_EP_INFER_LIBRARY=$PWD/variants/x.so bash benchmarks/gpu_run.sh smoke   # another build
#                                          # (benchmarks/build_variant.sh builds a git ref into variants/)
#
# One GPU for every multi-rank test: --one-gpu (first argument) runs the tiers that follow
# with W ranks sharing GPU 0 under CUDA MPS (started here, stopped on exit, also on failure
# or timeout): the test tiers at W = 2,3,4,8 (smoke) and 2,4,8 (slow, full); bench with
# --ranks W. This measures launch and protocol cost, not NVLink bandwidth.
#   bash benchmarks/gpu_run.sh --one-gpu smoke          # <= 3 min
#   bash benchmarks/gpu_run.sh --one-gpu full           # every GPU test file at W = 2, 4, 8
#   WORLD_SIZES=8 TESTS=tests/test_cuda_reliability.py bash benchmarks/gpu_run.sh --one-gpu slow
#   BENCH_RANKS="2 4 8" bash benchmarks/gpu_run.sh --one-gpu bench   # the decode table per W
#   TIER_TIMEOUT=540 ...                   # seconds each test tier may take (default 570)
#   KEEP_GOING=1 ...                       # run every test of a tier past a failure (default: stop at the first)
#
# More than 8 files under $OUT are packed into $OUT/logs.tgz at the end (results.md,
# results.json and machine.txt stay beside it).
#
# The compiled library has no Python ABI, so one built on a CPU machine
# (cmake -B build && cmake --build build) can be carried as build/libhybrid_ep_infer.so.
set -uo pipefail
one_gpu=0
if [ "${1:-}" = "--one-gpu" ]; then
  one_gpu=1
  shift
fi
tiers=("${@:-smoke}")
cd "$(dirname "$0")/.."
OUT=${OUT:-$PWD/gpu-logs}
mkdir -p "$OUT"
# NVLink multicast stays off on shared hosts (KINDS.md).
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}

{
  date -u
  nvidia-smi --query-gpu=index,name,driver_version,memory.total --format=csv
  nvidia-smi topo -m
  python3 -c 'import torch; print("torch", torch.__version__, "cuda", torch.version.cuda, "gpus", torch.cuda.device_count())'
} 2>&1 | tee "$OUT/machine.txt"

# --one-gpu: every rank on GPU 0 under CUDA MPS (without it the ranks' processes time-slice
# the GPU, about 100 times slower). A daemon left by an earlier call that was killed is
# restarted, so this call starts from a fresh server.
stop_mps() {  # (a process name holds 15 characters: the daemon shows as "nvidia-cuda-mps")
  if pgrep -f nvidia-cuda-mps >/dev/null 2>&1; then
    echo quit | timeout 30 nvidia-cuda-mps-control >/dev/null 2>&1 || pkill -9 -f nvidia-cuda-mps
    for _ in 1 2 3 4 5 6 7 8 9 10; do pgrep -f nvidia-cuda-mps >/dev/null 2>&1 || break; sleep 1; done
  fi
}
if [ "$one_gpu" -eq 1 ]; then
  export CUDA_VISIBLE_DEVICES=${CUDA_VISIBLE_DEVICES:-0} HYBRID_EP_INFER_TEST_SHARE_GPU=1
  stop_mps
  nvidia-cuda-mps-control -d || { echo "could not start the CUDA MPS daemon"; exit 1; }
  trap stop_mps EXIT
  trap 'exit 130' INT TERM
  echo "one GPU: ranks share GPU $CUDA_VISIBLE_DEVICES under CUDA MPS" | tee -a "$OUT/machine.txt"
fi

if [ ! -f build/libhybrid_ep_infer.so ]; then
  echo "== building (system compiler; the /opt/gcc preset links libstdc++ statically)"
  CC=/usr/bin/gcc CXX=/usr/bin/g++ CUDAHOSTCXX=/usr/bin/g++ \
    cmake -S . -B build -G Ninja -DCMAKE_BUILD_TYPE=Release >"$OUT/build.log" 2>&1 &&
    cmake --build build >>"$OUT/build.log" 2>&1 || { tail -40 "$OUT/build.log"; exit 1; }
fi
# The multi-node engine's NVSHMEM: a carried copy of its host library and bootstrap plugin
# (build/nvshmem/lib, see the README's "Multi-node engine"), else the machine's own.
[ -z "${NVSHMEM_HOME:-}" ] && [ -d build/nvshmem/lib ] && export NVSHMEM_HOME=$PWD/build/nvshmem
# Another build (an A/B variant) if the caller names one.
export HYBRID_EP_INFER_LIBRARY=${HYBRID_EP_INFER_LIBRARY:-$PWD/build/libhybrid_ep_infer.so} HYBRID_EP_INFER_EXPECT_LIBRARY=1
echo "library: $HYBRID_EP_INFER_LIBRARY" | tee -a "$OUT/machine.txt"

# breakdown.py's options for the prefill-7168, mixtral-4096 and qwen-2048 shapes of
# hybrid_ep_infer/bench/configs.py, and 128 tokens per rank at H=7168 (decode's n=128; its
# buffer there holds 256)
breakdown_shape() {
  case "$1" in
    prefill) echo "" ;;
    mixtral) echo "--hidden 4096 --local-experts 2 --top-k 2" ;;
    qwen) echo "--hidden 2048 --local-experts 32 --top-k 8" ;;
    decode) echo "--tokens 128" ;;
    *) echo "unknown breakdown shape $1 (prefill, mixtral, qwen, decode)" >&2; return 1 ;;
  esac
}

run_breakdown() {
  local status=0 name shape lib
  for lib in ${BREAKDOWN_LIBS:-$HYBRID_EP_INFER_LIBRARY}; do
    for name in ${BREAKDOWN_SHAPES:-prefill mixtral qwen decode}; do
      shape=$(breakdown_shape "$name") || return 1
      echo "== breakdown: $lib $name"
      # shellcheck disable=SC2086
      HYBRID_EP_INFER_LIBRARY=$(realpath "$lib") timeout 120 python3 benchmarks/breakdown.py $shape ${BREAKDOWN_ARGS:-} 2>&1 |
        grep -v -e UserWarning -e "return func" -e _warn_once
      [ "${PIPESTATUS[0]}" -eq 0 ] || status=1
    done
  done
  return $status
}

run_ceiling() {
  # (rebuilt when the source is newer: a carried build/ may hold an older binary)
  if [ ! -x build/nvlink_ceiling ] || [ benchmarks/nvlink_ceiling.cu -nt build/nvlink_ceiling ]; then
    nvcc -std=c++17 -O3 -gencode=arch=compute_90a,code=sm_90a -Icsrc -Icsrc/include benchmarks/nvlink_ceiling.cu \
      -o build/nvlink_ceiling || return 1
  fi
  timeout "${CEILING_TIMEOUT:-300}" build/nvlink_ceiling ${CEILING_ARGS:-}
}

run_phase_clock() {
  local lib=${PHASE_CLOCK_LIB:-build-clock/libhybrid_ep_infer.so} status=0 w  # PHASE_CLOCK_LIB: another profiling build
  if [ ! -f "$lib" ]; then
    [ -z "${PHASE_CLOCK_LIB:-}" ] || { echo "PHASE_CLOCK_LIB=$lib: no such file"; return 1; }
    cmake -S . -B build-clock -G Ninja -DHEP_PHASE_CLOCK=ON -DHEP_MULTINODE=OFF >/dev/null && cmake --build build-clock ||
      return 1
  fi
  for w in ${WORLD_SIZES//,/ }; do
    # shellcheck disable=SC2086
    HYBRID_EP_INFER_LIBRARY=$(realpath "$lib") timeout "${PHASE_CLOCK_TIMEOUT:-240}" python3 benchmarks/phase_clock.py \
      --ranks "$w" --json "$OUT/phase-clock-w$w.json" ${PHASE_CLOCK_ARGS:-} 2>&1 | grep -v -e UserWarning -e "return func"
    [ "${PIPESTATUS[0]}" -eq 0 ] || status=1
  done
  return $status
}

run_bench() {
  local configs=${BENCH_CONFIGS:-decode qwen-2048 mixtral-4096 prefill-7168} files=() status=0 ranks name
  [ "$one_gpu" -eq 1 ] && configs=${BENCH_CONFIGS:-decode}
  for ranks in ${BENCH_RANKS:-default}; do
    for config in $configs; do
      name=$config
      rank_args=()
      if [ "$ranks" != default ]; then
        name=$config-w$ranks
        rank_args=(--ranks "$ranks")
      fi
      echo "== benchmark: $name"
      # shellcheck disable=SC2086
      timeout "${BENCH_TIMEOUT:-400}" python3 -m hybrid_ep_infer.bench --config "$config" "${rank_args[@]}" \
        --json "$OUT/bench-$name.json" ${BENCH_ARGS:-} 2>&1 | grep -v -e UserWarning -e "return func" |
        tee "$OUT/bench-$name.log"
      [ "${PIPESTATUS[0]}" -eq 0 ] && files+=("$OUT/bench-$name.json") || status=1
    done
  done
  [ ${#files[@]} -gt 0 ] && python3 benchmarks/results_table.py --merge-into "$OUT/results.json" "${files[@]}" >"$OUT/results.md"
  return $status
}

status=0
for tier in "${tiers[@]}"; do
  sizes=2,4,8
  case "$tier" in
    smoke) markers="gpu and not slow"; sizes=2,3,4,8 ;;
    slow) markers="gpu and slow" ;;
    full) markers="gpu" ;;
    bench) run_bench; status=$?; [ "$status" -eq 0 ] || break; continue ;;
    ceiling) run_ceiling 2>&1 | tee "$OUT/ceiling.txt"; status=${PIPESTATUS[0]}; [ "$status" -eq 0 ] || break; continue ;;
    phase-clock) WORLD_SIZES=${WORLD_SIZES:-2,4,8} run_phase_clock 2>&1 | tee "$OUT/phase-clock.txt"
                 status=${PIPESTATUS[0]}; [ "$status" -eq 0 ] || break; continue ;;
    breakdown) run_breakdown 2>&1 | tee "$OUT/breakdown.txt"; status=${PIPESTATUS[0]}; [ "$status" -eq 0 ] || break; continue ;;
    *) echo "unknown tier $tier (smoke, slow, full, bench, breakdown, ceiling, phase-clock)"; exit 2 ;;
  esac
  if [ "$one_gpu" -eq 1 ]; then
    export HYBRID_EP_INFER_TEST_WORLD_SIZES=${WORLD_SIZES:-$sizes}
    echo "== $tier on one GPU: W = $HYBRID_EP_INFER_TEST_WORLD_SIZES"
  fi
  echo "== $tier: pytest -m '$markers'"
  # shellcheck disable=SC2086
  timeout -k 10 "${TIER_TIMEOUT:-570}" python3 -m pytest ${TESTS:-tests} -m "$markers" -q -rs -s -x ${KEEP_GOING:+--maxfail=1000} \
    --durations=15 --junitxml="$OUT/pytest-$tier.xml" 2>&1 | tee "$OUT/pytest-$tier.log"
  status=${PIPESTATUS[0]}
  [ "$status" -eq 0 ] || break
done

# The device tool brings back at most 8 files: past that, pack the logs into one archive
# and keep only the summaries beside it.
if [ "$(find "$OUT" -maxdepth 1 -type f | wc -l)" -gt 8 ]; then
  (cd "$OUT" && tar czf logs.tgz --exclude=logs.tgz ./* &&
    find . -maxdepth 1 -type f ! -name logs.tgz ! -name results.md ! -name results.json ! -name machine.txt -delete)
  echo "logs packed into $OUT/logs.tgz"
fi
exit "$status"
