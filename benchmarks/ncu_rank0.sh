#!/usr/bin/env bash
# Rank 0 of benchmarks/breakdown.py under Nsight Compute, ranks 1..N-1 without it.
# (ncu --target-processes all over every rank deadlocked: it serializes their kernels,
# and a kernel waiting for a peer then never finishes.) ncu holds the profiled kernel
# back while the peers run on, and kernel replay restores this rank's memory before each
# pass: a multi-pass metric set completes only if the peers' rows and flags were already
# there when ncu saved it (else a pass waits for a flag the restore erased, until the
# EPBuffer timeout). So the counters describe a kernel that did not wait for its peers,
# and its duration under ncu is not its normal time.
# Kernels that write to peers (publish, the transfer's senders, combine) repeat those writes
# in every replay pass: the peers then see routing counters and flags run ahead, and the
# run can hang until the EPBuffer timeout (seen when profiling publish). For them prefer
# single-pass metrics (e.g. --metrics gpu__time_duration.sum,sm__cycles_active.avg) or
# --replay-mode application.
# The other ranks are killed when this script exits (also on a timeout's SIGTERM), so a
# later command in the same device call starts on idle GPUs.
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
pids=()  # the processes to stop if this script ends early: the other ranks, then ncu
stop_all() { [ ${#pids[@]} -eq 0 ] || kill "${pids[@]}" 2>/dev/null; }
trap stop_all EXIT
trap 'stop_all; exit 143' TERM INT
for ((r = 1; r < ranks; r++)); do
  python3 benchmarks/breakdown.py "$@" --rank "$r" --port "$port" >/dev/null 2>&1 &
  pids+=($!)
done
# In the background, so that a SIGTERM reaches the trap above while ncu runs.
# shellcheck disable=SC2086
ncu --clock-control none $ncu_args python3 benchmarks/breakdown.py "$@" --rank 0 --port "$port" &
ncu_pid=$!
pids+=("$ncu_pid")
wait "$ncu_pid"
status=$?
wait "${pids[@]}"
pids=()
exit $status
