#!/usr/bin/env bash
# The test command: format and lint checks (rustfmt, clippy with warnings
# denied), the Rust workspace tests, the Python bindings built into a private
# virtual environment (target/pyenv) with maturin and tested with pytest
# against the `tq` binary of the same tree, then a short bounded fuzz run of
# every file parser (scripts/fuzz.sh; the long run is documented in fuzz/README.md).
# Needs: cargo, python3 (>= 3.9) with venv, and the PyPI index for
# maturin/numpy/pytest/ray/torch/transformers (installed once into target/pyenv).
set -euo pipefail
cd "$(dirname "$0")/.."

PY="${PYTHON:-python3}"
VENV=target/pyenv
if [ ! -x "$VENV/bin/python" ]; then
  "$PY" -m venv "$VENV"
fi

# NVRTC (NVIDIA's runtime compiler, a PyPI wheel) lets tq-cuda's build check
# compile every CUDA kernel configuration; no GPU or driver is needed for that.
NVRTC=target/nvrtc
if [ ! -e "$NVRTC/nvidia/cu13/lib/libnvrtc.so.13" ]; then
  rm -rf "$NVRTC" && mkdir -p "$NVRTC"
  "$VENV/bin/python" -m pip download --quiet --disable-pip-version-check --no-deps --only-binary=:all: \
    --python-version 3.12 --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 \
    --platform manylinux_2_12_x86_64 -d "$NVRTC" "nvidia-cuda-nvrtc==13.0.88"
  "$VENV/bin/python" -c "import zipfile, glob; zipfile.ZipFile(glob.glob('$NVRTC/*.whl')[0]).extractall('$NVRTC')"
fi
export LD_LIBRARY_PATH="$PWD/$NVRTC/nvidia/cu13/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"

cargo fmt --all -- --check
(cd crates/tq-py && cargo fmt -- --check)
(cd fuzz && cargo fmt -- --check)
cargo clippy --workspace --all-targets --release -- -D warnings
cargo test --workspace --release
# Ray (with Ray Data) for turboquant.ray's tests: a local multi-process cluster on 127.0.0.1;
# torch, transformers, gguf and accelerate for turboquant.hf's tests (SmolLM2 read by
# transformers from the GGUF file the Rust runtime uses; CPU only)
"$VENV/bin/python" -m pip install --quiet --disable-pip-version-check --no-cache-dir "maturin>=1.7,<2" numpy pytest "ray[data]==2.60.0" \
  "torch==2.11.0" "transformers==5.17.0" "gguf==0.19.0" "accelerate==1.15.0"
rm -rf target/wheels
( cd crates/tq-py && CARGO_TARGET_DIR=../../target/py "../../$VENV/bin/maturin" build --release --out ../../target/wheels )
"$VENV/bin/python" -m pip install --quiet --disable-pip-version-check --force-reinstall --no-deps target/wheels/turboquant-*.whl
TQ_HF_TESTS=1 TQ_BIN="$PWD/target/release/tq" "$VENV/bin/python" -m pytest -q crates/tq-py/tests
# a bounded fuzz run: every target for ${TQ_FUZZ_SECONDS:-20} s from the committed corpus
scripts/fuzz.sh "${TQ_FUZZ_SECONDS:-20}"
