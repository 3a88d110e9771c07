#!/usr/bin/env bash
# Builds the multi-node engine here (no GPU needed) and stages what a lent GPU machine
# needs to run it, under build/ (ignored by git; carry "build/libhybrid_ep_infer.so",
# "build/libhybrid_ep_infer_mn.so" and "build/nvshmem" with the device tool, ~60 MB):
#   build/nvshmem/           NVSHMEM 3.8 from the nvidia-nvshmem-cu13 wheel (headers and
#                            libraries for the build; at run time only lib/libnvshmem_host.so.3
#                            and lib/nvshmem_bootstrap_uid.so.3 are read)
#   build/libhybrid_ep_infer{,_mn}.so
# gpu_run.sh then sets NVSHMEM_HOME=build/nvshmem. The carry limit is 64 MiB, so the
# staged copy keeps only the two run-time libraries once the build is done.
set -euo pipefail
cd "$(dirname "$0")/.."
version=${NVSHMEM_VERSION:-3.8.0}
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
python3 -m pip download -q --no-deps "nvidia-nvshmem-cu13==$version" -d "$work"
(cd "$work" && python3 -m zipfile -e ./*.whl unpacked)
home=$work/unpacked/nvidia/nvshmem
CC=/usr/bin/gcc CXX=/usr/bin/g++ CUDAHOSTCXX=/usr/bin/g++ NVSHMEM_HOME=$home \
  cmake -S . -B build -G Ninja -DCMAKE_BUILD_TYPE=Release -DHEP_MULTINODE=ON -DNVSHMEM_HOME="$home" >/dev/null
cmake --build build
rm -rf build/nvshmem && mkdir -p build/nvshmem/lib
cp "$home/lib/libnvshmem_host.so.3" "$home/lib/nvshmem_bootstrap_uid.so.3" build/nvshmem/lib/
du -ch build/libhybrid_ep_infer.so build/libhybrid_ep_infer_mn.so build/nvshmem/lib/* | tail -1
