#!/usr/bin/env bash
# Rank 0 of benchmarks/breakdown.py under Nsight Compute, ranks 1..N-1 without it.
# (ncu --target-processes all over every rank deadlocked: it serializes their kernels,
# and a kernel waiting for a peer then never finishes.) ncu holds the profiled kernel
# back while the peers run on, and kernel replay restores this rank's memory before each
# pass: a multi-pass metric set completes only if the peers' rows and flags were already
# there when ncu saved it (else a pass waits for a flag the restore erased, until the
# EPBuffer timeout). So the counters describe a kernel that did not wait for its peers,
# and its duration under ncu is not its normal time (benchmarks/NOTES.md #8).
#
#   benchmarks/ncu_rank0.sh "<ncu options>" [breakdown.py options]
#   benchmarks/ncu_rank0.sh "-k regex:transfer --launch-skip 5 --launch-count 1 --metrics gpu__time_duration.sum" --ranks 4 --no-tune
set -uo pipefail
cd "$(dirname "$0")/.."
ncu_args=$1
shift
ranks=$(python3 -c 'import torch; print(torch.cuda.device_count())')
for ((i = 1; i <= $#; i++)); do [ "${!i}" = --ranks ] && { j=$((i + 1)); ranks=${!j}; }; done
port=$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
pids=()
for ((r = 1; r < ranks; r++)); do
  python3 benchmarks/breakdown.py "$@" --rank "$r" --port "$port" >/dev/null 2>&1 &
  pids+=($!)
done
# shellcheck disable=SC2086
ncu --clock-control none $ncu_args python3 benchmarks/breakdown.py "$@" --rank 0 --port "$port"
status=$?
wait "${pids[@]}"
exit $status
