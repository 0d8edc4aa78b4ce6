#!/usr/bin/env bash
# Every accelerator measurement in one time-boxed run (at most 8 minutes on an H100, install included):
# gpt2_small dense and packed, llama_1b, LoRA against full fine-tuning on llama_1b, a profile of the
# gpt2_small step, a DPO step (full and LoRA) against an SFT step, and lmtrain serve. Writes
# device_check.json, device_check.md (a table for BENCHMARKS.md) and device_check.log into $OUT, or --out DIR.
#
#   tools/device_check.sh                           # on the GPU machine: pip install -e .[gpu], then measure
#   tools/device_check.sh --skip-install --out DIR  # with the packages as they are
#   tools/device_check.sh --dry-run --out DIR       # CPU, tiny shapes, no install (or DEVICE_CHECK_DRY_RUN=1)
#   tools/device_check.sh --help                    # every option (tools/device_check.py)
#
# PYTHON picks the interpreter (default: python3, the one that holds CUDA JAX on the device machine).
# Exit status: 0 when every measurement that exists ran, 1 when one failed or timed out, 2 on a usage error.
set -euo pipefail

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
python="${PYTHON:-python3}"
if ! command -v "$python" >/dev/null 2>&1; then
  echo "device_check: error: no '$python' on PATH; set PYTHON to the interpreter to use." >&2
  exit 2
fi
cd "$repo"
export PYTHONPATH="$repo${PYTHONPATH:+:$PYTHONPATH}"
exec "$python" "$repo/tools/device_check.py" --python "$(command -v "$python")" "$@"
