#!/usr/bin/env bash
# llama.cpp beside `tq kv eval` on the same model and text: llama.cpp's
# perplexity with its f16, q8_0 and q4_0 KV caches (-ctk/-ctv, flash attention
# on, as quantized V caches need), KLD of the quantized caches against its f16
# run, and its token count of the text; then our f32 cache and precisions on
# the same settings (`tq kv sweep`), so both sit in one log from one machine.
# llama.cpp is built (CPU only, into target/llamacpp) from the vendored
# sources of the pinned PyPI sdist of llama-cpp-python; cmake comes from PyPI
# when the system has none. Not part of the test suite.
#
# Usage: scripts/llamacpp_compare.sh [MODEL [TEXT]]
#   MODEL: smollm2 | qwen2.5-1.5b (default) | PATH.gguf; TEXT: austen (default) | shakespeare | FILE
#   env: CHARS (200000), CTX (512), CHUNKS (8), OURS (precisions for tq; empty to skip),
#        THREADS (nproc)
set -euo pipefail
cd "$(dirname "$0")/.."
MODEL=${1:-qwen2.5-1.5b}
TEXT=${2:-austen}
CHARS=${CHARS:-200000}
CTX=${CTX:-512}
CHUNKS=${CHUNKS:-8}
OURS=${OURS-f32,q8_0-rot,q4_0-rot,tq-mse-4,k4v3,tq-mse-3}
THREADS=${THREADS:-$(nproc)}
VERSION=0.3.36
W=target/llamacpp
TQ=target/release/tq
mkdir -p "$W"
[ -x "$TQ" ] || cargo build --release -p tq-cli

# the model file and the text, from tq's data cache
case "$MODEL" in
  *.gguf) GGUF=$MODEL ;;
  *) GGUF=$("$TQ" data fetch "$MODEL" 2>&1 | tail -n 1 | sed "s/^$MODEL: //") ;;
esac
[ -f "$GGUF" ] || { echo "no model file for $MODEL: $GGUF" >&2; exit 1; }
case "$TEXT" in
  austen|shakespeare) "$TQ" data fetch "$TEXT" >/dev/null 2>&1
    SRC=$("$TQ" data list --json | python3 -c "import json,sys; print(next(r['path'] for r in json.load(sys.stdin) if r['name'] == '$TEXT'))") ;;
  *) SRC=$TEXT ;;
esac
TXT=$W/text-$(basename "$TEXT")-$CHARS.txt
# the first CHARS characters (Unicode scalar values, as tq counts them)
python3 -c "import sys; open(sys.argv[3], 'w', encoding='utf-8').write(open(sys.argv[1], encoding='utf-8').read()[:int(sys.argv[2])])" "$SRC" "$CHARS" "$TXT"

# llama.cpp from the llama-cpp-python sdist
BIN=$W/build/bin
if [ ! -x "$BIN/llama-perplexity" ] || [ ! -x "$BIN/llama-tokenize" ]; then
  SDIST=$W/llama_cpp_python-$VERSION.tar.gz
  if [ ! -f "$SDIST" ]; then
    python3 -m pip download --no-deps --no-binary llama-cpp-python --disable-pip-version-check -d "$W" "llama-cpp-python==$VERSION"
  fi
  tar xzf "$SDIST" -C "$W"
  CMAKE=$(command -v cmake || true)
  if [ -z "$CMAKE" ]; then
    python3 -m venv "$W/venv"
    "$W/venv/bin/pip" install --disable-pip-version-check -q cmake
    CMAKE=$W/venv/bin/cmake
  fi
  "$CMAKE" -S "$W/llama_cpp_python-$VERSION/vendor/llama.cpp" -B "$W/build" -DCMAKE_BUILD_TYPE=Release \
    -DLLAMA_CURL=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_SERVER=OFF -DGGML_CUDA=OFF
  "$CMAKE" --build "$W/build" --target llama-perplexity llama-tokenize -j "$THREADS"
fi

echo "== llama.cpp (llama-cpp-python $VERSION sdist) on $MODEL, $TEXT, first $CHARS chars, ctx $CTX, $CHUNKS chunks, $THREADS threads"
TOKENS=$("$BIN/llama-tokenize" -m "$GGUF" -f "$TXT" --ids --log-disable 2>/dev/null | python3 -c "import sys, ast; print(len(ast.literal_eval(sys.stdin.read().strip())))")
echo "llama.cpp tokens: $TOKENS"
BASE=$W/kld-base-$(basename "$GGUF" .gguf)-$(basename "$TEXT")-$CHARS-$CTX-$CHUNKS.bin
for ct in f16 q8_0 q4_0; do
  LOG=$W/ppl-$ct.log
  if [ "$ct" = f16 ]; then
    KLD=(--kl-divergence-base "$BASE")
  else
    KLD=(--kl-divergence-base "$BASE" --kl-divergence)
  fi
  "$BIN/llama-perplexity" -m "$GGUF" -f "$TXT" -c "$CTX" --chunks "$CHUNKS" -b "$CTX" -t "$THREADS" -fa on -ctk "$ct" -ctv "$ct" "${KLD[@]}" >"$LOG" 2>&1 ||
    { tail -n 20 "$LOG" >&2; exit 1; }
  PPL=$(grep -Eo "(Final estimate: PPL = |Mean PPL\(Q\) *: *)[0-9.]+" "$LOG" | tail -n 1 | grep -Eo "[0-9.]+$")
  KL=$(grep -Eo "Mean +KLD: +[0-9.]+" "$LOG" | grep -Eo "[0-9.]+$" || true)
  echo "llama.cpp cache $ct: ppl $PPL${KL:+ KLD $KL} (log: $LOG)"
done

if [ -n "$OURS" ]; then
  echo "== tq kv --model $MODEL sweep --text $TEXT --chars $CHARS --ctx $CTX --chunks $CHUNKS --kv $OURS"
  "$TQ" kv --model "$MODEL" sweep --text "$TEXT" --chars "$CHARS" --ctx "$CTX" --chunks "$CHUNKS" --kv "$OURS" --out "$W/sweep" --json |
    python3 -c "
import json, sys
for l in sys.stdin:
    r = json.loads(l)
    print(f\"tq {r['kv']:>10}: {r['bits_per_value']:.3f} bits/value, ppl {r['ppl']:.4f} ({100 * (r['ppl'] / r['ppl_f32'] - 1):+.2f}%), KLD {r['kld']:.5f}, top-1 {r['top1_agree']:.3f}, tokens {r['tokens']}\")"
fi
