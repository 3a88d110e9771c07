#!/usr/bin/env bash
# Builds the library of another git commit or branch into variants/<name>.so, for A/B
# timing on a lent GPU machine in one call (benchmarks/gpu_run.sh, BREAKDOWN_LIBS or
# HYBRID_EP_INFER_LIBRARY). Runs here, on the CPU machine: the library has no Python ABI.
# variants/ is git-ignored: name it in the device call's carry (with build/) to take it along.
#
#   bash benchmarks/build_variant.sh main                      # -> variants/main.so
#   bash benchmarks/build_variant.sh wip/scan-one-pass scan    # -> variants/scan.so
set -euo pipefail
ref=${1:?usage: build_variant.sh <git ref> [name]}
name=${2:-$(basename "$ref")}
cd "$(dirname "$0")/.."
commit=$(git rev-parse --verify "$ref^{commit}")
work=$(mktemp -d)
trap 'git worktree remove --force "$work/src" >/dev/null 2>&1; rm -rf "$work"' EXIT
git worktree add -q --detach "$work/src" "$commit"
cmake -S "$work/src" -B "$work/build" -G Ninja -DCMAKE_BUILD_TYPE=Release >"$work/cmake.log" 2>&1 ||
  { tail -20 "$work/cmake.log"; exit 1; }
cmake --build "$work/build" >>"$work/cmake.log" 2>&1 || { tail -40 "$work/cmake.log"; exit 1; }
mkdir -p variants
cp "$work/build/libhybrid_ep_infer.so" "variants/$name.so"
echo "variants/$name.so: $ref ($(git log -1 --format='%h %s' "$commit" | cut -c1-80))"
