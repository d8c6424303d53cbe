#!/usr/bin/env bash
# Kernel durations of one selective-scan fwd+bwd call under Nsight Compute, for two source trees in
# one device run (A/B of a kernel change without a benchmark's timing noise between runs):
#
#   benchmarks/ncu_ab.sh OLD_TREE NEW_TREE OUT_DIR SHAPE [SHAPE...]
#
# Each tree is a checkout (e.g. `git archive <commit> | tar -x -C DIR`); each shape is profiled twice
# per tree with only gpu__time_duration collected, so the replay is one pass a kernel.
# `CONFIG='{"segments": 4}'` passes a Config to both. Summarise with benchmarks/ncu_ab.py OUT_DIR.
set -u
old=${1:?usage: ncu_ab.sh OLD_TREE NEW_TREE OUT_DIR SHAPE...}
new=${2:?}; out=${3:?}; shift 3
mkdir -p "$out"; out=$(cd "$out" && pwd)
# ncu saves and restores the memory a kernel may write for each replay; with XLA's default pool it
# failed to profile (2026-12-04, H200).
export XLA_PYTHON_CLIENT_PREALLOCATE=false
for tree_name in old new; do
  tree=$([[ $tree_name == old ]] && echo "$old" || echo "$new")
  for shape in "$@"; do
    for rep in 1 2; do
      (cd "$tree" && PYTHONPATH="${EXTRA_PYTHONPATH:+$EXTRA_PYTHONPATH:}$PWD" timeout "${NCU_TIMEOUT:-120}" \
        ${NCU:-ncu} --clock-control none --profile-from-start off --metrics gpu__time_duration.sum \
        --csv --page details python3 benchmarks/profile_kernels.py --op scan --shape "$shape" \
        ${CONFIG:+--config "$CONFIG"} > "$out/${tree_name}_${shape}_$rep.csv" 2> "$out/${tree_name}_${shape}_$rep.err")
      echo "$tree_name $shape $rep rc=$?"
    done
  done
done
