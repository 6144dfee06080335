#!/usr/bin/env bash
# The one-command GPU validation run (docs/scale.md). On the GPU machine, in the repository root:
#   bash scripts/gpu_check.sh --stage gpukit/1     # one call per kit folder but the last, back to back
#   bash scripts/gpu_check.sh                      # the last call: carries the last gpukit/N, runs every part
# Extra arguments go to scripts/gpu_check.py (--budget S, --only a,b, --out DIR). Report: $OUT (or
# gpu_check_report/) report.md, report.json, logs.txt, bench_kernels.json. Exit code 1 when a part failed.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
STAGE=${WCT_GPU_STAGE:-/tmp/wct-gpukit}
if [ "${1:-}" = "--stage" ]; then
  [ -d "${2:-}" ] || { echo "error: --stage needs a kit folder (gpukit/N), got '${2:-}'" >&2; exit 2; }
  mkdir -p "$STAGE" && cp -r "$2"/. "$STAGE"/ && du -sh "$STAGE" && exit 0
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
exec "$PY" scripts/gpu_check.py "$@"
