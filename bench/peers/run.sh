#!/usr/bin/env bash
# Peer search benchmark: makes its own virtual environment (target/peers-venv),
# installs turbovec, rabitqlib and faiss-cpu from PyPI beside the turboquant
# wheel built from this checkout, and runs bench/peers/peers.py on GloVe-50 and
# the SmolLM2 token embeddings (MiniLM-Austen too when `tq data fetch minilm`
# has cached it), on one thread and on all threads, each thread count in one
# process with the libraries interleaved. Prints a markdown table (table.py);
# the JSON lines go to $OUT (default target/peers.jsonl).
#
#   bench/peers/run.sh [--reps N] [--ivf] [--only NAME...]
set -euo pipefail
cd "$(dirname "$0")/../.."
VENV=target/peers-venv
OUT=${OUT:-target/peers.jsonl}
CACHE=${TQ_CACHE:-$HOME/.cache/turboquant}
if [ ! -x "$VENV/bin/python" ]; then
    python3 -m venv "$VENV"
fi
"$VENV/bin/python" -m pip install --quiet --disable-pip-version-check "maturin>=1.7,<2" numpy "turbovec==1.1.2" "rabitqlib==0.7.1" "faiss-cpu==1.15.1"
( cd crates/tq-py && CARGO_TARGET_DIR=../../target/py "../../$VENV/bin/maturin" build --release --quiet --out ../../target/peers-wheels )
"$VENV/bin/python" -m pip install --quiet --disable-pip-version-check --force-reinstall --no-deps "$(ls -t target/peers-wheels/turboquant-*.whl | head -1)"
for d in glove50 smollm-embed minilm; do
    [ -f "$CACHE/$d.npy" ] || { [ "$d" = glove50 ] && cargo run --release -q -p tq-cli -- data fetch glove50; } || true
done
echo "CPU: $(grep -m1 'model name' /proc/cpuinfo | sed 's/.*: //') (family $(grep -m1 'cpu family' /proc/cpuinfo | sed 's/.*: //'), model $(grep -m1 '^model[[:space:]]*:' /proc/cpuinfo | sed 's/.*: //'))"
echo "cores: $(nproc); SIMD: $(grep -o -w -E 'avx2|avx512bw|avx512vbmi|avx512_vnni' /proc/cpuinfo | sort -u | tr '\n' ' ')"
: > "$OUT"
for d in glove50 minilm smollm-embed; do
    [ -f "$CACHE/$d.npy" ] || continue
    for t in 1 "$(nproc)"; do
        RAYON_NUM_THREADS=$t OMP_NUM_THREADS=$t "$VENV/bin/python" bench/peers/peers.py --data "$CACHE/$d.npy" "$@" | tee -a "$OUT"
    done
done
"$VENV/bin/python" bench/peers/table.py < "$OUT"
