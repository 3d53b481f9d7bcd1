#!/usr/bin/env bash
# The test command: the Rust workspace tests, then the Python bindings built
# into a private virtual environment (target/pyenv) with maturin and tested
# with pytest against the `tq` binary of the same tree.
# Needs: cargo, python3 (>= 3.9) with venv, and the PyPI index for
# maturin/numpy/pytest (installed once into target/pyenv).
set -euo pipefail
cd "$(dirname "$0")/.."

cargo test --workspace --release

PY="${PYTHON:-python3}"
VENV=target/pyenv
if [ ! -x "$VENV/bin/python" ]; then
  "$PY" -m venv "$VENV"
fi
"$VENV/bin/python" -m pip install --quiet --disable-pip-version-check "maturin>=1.7,<2" numpy pytest
rm -rf target/wheels
( cd crates/tq-py && CARGO_TARGET_DIR=../../target/py "../../$VENV/bin/maturin" build --release --out ../../target/wheels )
"$VENV/bin/python" -m pip install --quiet --disable-pip-version-check --force-reinstall --no-deps target/wheels/turboquant-*.whl
TQ_BIN="$PWD/target/release/tq" "$VENV/bin/python" -m pytest -q crates/tq-py/tests
