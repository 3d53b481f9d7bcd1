#!/usr/bin/env bash
# Everything `tq bench cuda` needs on the GPU machine, in one call:
#   checks (encode bytes, attention vs the f64 CPU reference on random and real
#   SmolLM2 data), PyTorch SDPA bf16 baseline, then our kernels, same card.
# Usage (device): scripts/cuda_device.sh TQ_BINARY DUMP_DIR OUT_DIR [--quick]
set -uo pipefail
TQ=$1; DUMP=$2; OUT=$3; QUICK=${4:-}
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.mem --format=csv | tee "$OUT/card.txt"
# libnvrtc: the CUDA toolkit's, else the one PyTorch's wheels carry
for d in /usr/local/cuda/lib64 /usr/local/cuda/targets/x86_64-linux/lib $(python3 -c 'import nvidia, os; print(os.path.dirname(nvidia.__path__[0]))' 2>/dev/null)/nvidia/cu13/lib; do
  [ -d "$d" ] && export LD_LIBRARY_PATH="$d:${LD_LIBRARY_PATH:-}"
done
"$TQ" bench cuda --check --real "$DUMP" > "$OUT/check.json" || { echo "CHECKS FAILED"; cat "$OUT/check.json"; exit 1; }
PYTHONUNBUFFERED=1 python3 scripts/sdpa_bench.py $QUICK --out "$OUT/sdpa.jsonl" > /dev/null || exit 1
"$TQ" bench cuda --sdpa "$OUT/sdpa.jsonl" $QUICK --out "$OUT/cuda.jsonl" > /dev/null || exit 1
# several query tokens per sequence (B = 8, T = 32K), TurboQuant caches
PYTHONUNBUFFERED=1 python3 scripts/sdpa_bench.py --batches 8 --contexts 32768 --q-tokens 2,4,8 --out "$OUT/sdpa-multi.jsonl" > /dev/null || exit 1
"$TQ" bench cuda --sdpa "$OUT/sdpa-multi.jsonl" --batches 8 --contexts 32768 --q-tokens 2,4,8 --kv tq-mse-4,tq-mse-3,tq-mse-2,k4v3 --no-simt \
  --out "$OUT/cuda-multi.jsonl" > /dev/null || exit 1
echo OK
