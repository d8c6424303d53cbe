#!/usr/bin/env bash
# Nsight Compute counters of the scan and SSD kernels against jax-linear-attention's, one fwd+bwd
# call each (benchmarks/profile_kernels.py), at the first benchmark shape of each op.
#
#   benchmarks/ncu_profile.sh OUT_DIR [all|scan|ssd|NAME,NAME...] [source]
#
# Writes OUT_DIR/<name>.csv (ncu --csv --page details: one row a kernel x metric) and <name>.err.
# "source" adds a full-set profile of the scan's v4 backward kernel with per-SASS-instruction warp
# stall samples (<name>_sass.csv). Needs ncu on the PATH (Firecracker machines; --clock-control
# none, as the device notes ask) and, for the jla rows, jax-linear-attention importable.
set -u
out=${1:?usage: ncu_profile.sh OUT_DIR [scan|ssd|all] [source]}
which=${2:-all}
source_page=${3:-}
mkdir -p "$out"
NCU=${NCU:-ncu}
# ncu saves and restores the device memory a kernel may write for each replay pass; with XLA's
# default pool (75% of the GPU preallocated) it failed to profile kernels (2026-12-04, H200).
export XLA_PYTHON_CLIENT_PREALLOCATE=false
# KERNELS: an ncu kernel-name regex (e.g. "selective_scan|mosaic"); default every kernel.
filter=()
[[ -n ${KERNELS:-} ]] && filter=(-k "regex:$KERNELS")
py=benchmarks/profile_kernels.py
sections=(--section SpeedOfLight --section LaunchStats --section Occupancy --section WarpStateStats
          --section SchedulerStats --section ComputeWorkloadAnalysis --section MemoryWorkloadAnalysis
          --section InstructionStats)
SCAN=8x2048x1536x16
SSD=8x2048x24x64x128

run() {
  local name=$1; shift
  local t=$SECONDS
  timeout "${NCU_TIMEOUT:-150}" "$NCU" --clock-control none --profile-from-start off "${filter[@]}" "${sections[@]}" \
    --csv --page details python3 "$py" "$@" > "$out/$name.csv" 2> "$out/$name.err"
  echo "ncu $name: rc=$? $((SECONDS - t))s $(grep -c . "$out/$name.csv") lines"
}

# which: "all", "scan", "ssd" or a comma-separated list of the names below.
want() { [[ $which == all || ,$which, == *,$1,* || $1 == ${which}_* ]]; }
want scan_v4 && run scan_v4 --op scan --shape $SCAN
want scan_v5 && run scan_v5 --op scan --shape $SCAN --config '{"fwd": "v5", "bwd": "v5", "chunk": 8}'
want scan_jla && run scan_jla --op jla_scan --shape $SCAN
want ssd_default && run ssd_default --op ssd --shape $SSD
want ssd_w4_dsbf16 && run ssd_w4_dsbf16 --op ssd --shape $SSD \
  --config '{"num_warps_chunk": 4, "ds_dtype": "bfloat16"}'
want ssd_jla && run ssd_jla --op jla_ssd --shape $SSD
if [[ $source_page == source ]]; then
  t=$SECONDS
  timeout "${NCU_TIMEOUT:-150}" "$NCU" --clock-control none --profile-from-start off --set full \
    --import-source no -k regex:selective_scan_bwd -o "$out/scan_v4_bwd" -f \
    python3 "$py" --op scan --shape $SCAN > "$out/scan_v4_bwd.err" 2>&1
  echo "ncu scan_v4_bwd full: rc=$? $((SECONDS - t))s"
  "$NCU" -i "$out/scan_v4_bwd.ncu-rep" --page source --csv --print-source sass \
    > "$out/scan_v4_bwd_sass.csv" 2>> "$out/scan_v4_bwd.err"
  echo "sass page: rc=$? $(grep -c . "$out/scan_v4_bwd_sass.csv") lines"
  "$NCU" -i "$out/scan_v4_bwd.ncu-rep" --page details --csv > "$out/scan_v4_bwd_full.csv" \
    2>> "$out/scan_v4_bwd.err"
  rm -f "$out/scan_v4_bwd.ncu-rep"
fi
