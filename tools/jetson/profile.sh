#!/usr/bin/env bash
# Profile a .stn artifact on an NVIDIA Jetson with every engine installed, clocks locked, board state recorded.
#
#   tools/jetson/profile.sh model.stn [OUT_DIR]
#
# Environment: BUDGETS (default 100%,50%,25%,10%), BATCHES (1,8), SECONDS_EACH (timed seconds per budget and batch, 2),
# LOCK_CLOCKS (1: run jetson_clocks for the profile and restore the clocks after; 0: leave them),
# PER_LAYER (1: also write per-layer latency tables for Runtime.load(latency_limit_ms=..., profile=...)).
# Needs sudo (without a password prompt) only to lock clocks and to read every tegrastats rail;
# everything else runs as the user. See tools/jetson/README.md.
set -uo pipefail

artifact=${1:?usage: tools/jetson/profile.sh model.stn [OUT_DIR]}
out=${2:-stn-profile-$(hostname)-$(date +%Y%m%d-%H%M%S)}
budgets=${BUDGETS:-100%,50%,25%,10%}
batches=${BATCHES:-1,8}
seconds=${SECONDS_EACH:-2}
mkdir -p "$out"

cleanup() {
  [ -n "${tegrastats_pid:-}" ] && kill "$tegrastats_pid" 2>/dev/null
  [ -f "$out/clocks.before" ] && sudo -n jetson_clocks --restore "$out/clocks.before" 2>/dev/null
}
trap cleanup EXIT

# the board: release, power mode, clocks
if [ -f /etc/nv_tegra_release ]; then cp /etc/nv_tegra_release "$out/nv_tegra_release.txt"
else echo "note: no /etc/nv_tegra_release: not a Jetson? profiling anyway" >&2; fi
command -v nvpmodel >/dev/null && nvpmodel -q > "$out/nvpmodel.txt" 2>&1
if [ "${LOCK_CLOCKS:-1}" = 1 ] && command -v jetson_clocks >/dev/null; then
  if sudo -n jetson_clocks --store "$out/clocks.before" 2>/dev/null && sudo -n jetson_clocks 2>/dev/null; then
    sudo -n jetson_clocks --show > "$out/jetson_clocks.txt" 2>&1
  else
    rm -f "$out/clocks.before"
    echo "note: could not lock clocks (needs sudo jetson_clocks); latency will follow DVFS" >&2
  fi
fi
# tegrastats for the whole run: clocks, temperatures, power rails every 500 ms
if command -v tegrastats >/dev/null; then
  tegrastats --interval 500 > "$out/tegrastats.log" 2>&1 &
  tegrastats_pid=$!
fi

# every engine usable here, on the CPU and on the GPU
engines=$(python3 - <<'PY'
from stn_edge.device.backends import available_backends
for device in ("cpu", "cuda"):
    for name in available_backends(device):
        print(f"{name}:{device}")
PY
)
[ -z "$engines" ] && { echo "error: no stn-edge backend is usable (pip install stn-edge[onnxruntime])" >&2; exit 5; }
per_layer=()
[ "${PER_LAYER:-1}" = 1 ] && per_layer=(--per-layer)

status=0
for engine in $engines; do
  backend=${engine%%:*}; device=${engine##*:}
  dir="$out/$backend-$device"
  echo "== $backend on $device" >&2
  if stn-edge profile "$artifact" --backend "$backend" --device "$device" --budgets "$budgets" --batch "$batches" \
       --seconds "$seconds" "${per_layer[@]}" -o "$dir" > "$dir.txt"; then
    cat "$dir.txt"
  else
    status=$?
    echo "error: $backend on $device failed (exit $status); see above" >&2
  fi
done
echo "results in $out/ (one folder per engine: profile.json, profile.png, layer_latency-*.json)" >&2
exit $status
