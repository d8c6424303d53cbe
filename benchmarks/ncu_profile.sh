#!/usr/bin/env bash
# Nsight Compute counters of the scan and SSD kernels against jax-linear-attention's, one fwd+bwd
# call each (benchmarks/profile_kernels.py), at the first benchmark shape of each op.
#
#   benchmarks/ncu_profile.sh OUT_DIR [all|scan|ssd|NAME,NAME...] [source]
#
# Writes OUT_DIR/<name>.csv (ncu --csv --page details: one row a kernel x metric) and <name>.err.
# "source" adds full-set profiles of the scan's v4 kernels (see full() below). Needs ncu on
# the PATH (Firecracker machines; --clock-control none, as the device notes ask) and, for the jla
# rows, jax-linear-attention importable. "" as NAME list with "source" runs only the full sets.
set -u
out=${1:?usage: ncu_profile.sh OUT_DIR [all|scan|ssd|NAME,NAME...] [source]}
which=${2-all}
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
want scan_jla && run scan_jla --op jla_scan --shape $SCAN
want ssd_default && run ssd_default --op ssd --shape $SSD
want ssd_jla && run ssd_jla --op jla_ssd --shape $SSD
# "source": the full set (per-SASS-instruction warp-stall samples included) for the scan's default
# v4 kernels (v5 is gone: tag kernel-lab-history), at the same shape: <name>_sass.csv (ncu --page source) and
# <name>_full.csv (--page details).
full() {
  local name=$1 config=$2
  local t=$SECONDS
  timeout "${NCU_TIMEOUT:-150}" "$NCU" --clock-control none --profile-from-start off --set full \
    --import-source no -k "regex:${FULL_KERNELS:-selective_scan_(fwd|bwd)}" -o "$out/$name" -f \
    python3 "$py" --op scan --shape $SCAN --config "$config" > "$out/$name.err" 2>&1
  echo "ncu $name full: rc=$? $((SECONDS - t))s"
  "$NCU" -i "$out/$name.ncu-rep" --page source --csv --print-source sass \
    > "$out/${name}_sass.csv" 2>> "$out/$name.err"
  echo "  sass page: rc=$? $(grep -c . "$out/${name}_sass.csv") lines"
  "$NCU" -i "$out/$name.ncu-rep" --page details --csv > "$out/${name}_full.csv" 2>> "$out/$name.err"
  rm -f "$out/$name.ncu-rep"
}
if [[ $source_page == source ]]; then
  full scan_v4_src '{}'
fi
