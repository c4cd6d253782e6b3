#!/usr/bin/env bash
# The test command. On a fresh machine it sets up what it needs: the wasm
# toolchain for plugins (announced, never silent), every plugin built in one
# cargo invocation, then the whole suite.
set -euo pipefail
cd "$(dirname "$0")/.."

source scripts/lib.sh
ensure_wasm_toolchain
ensure_postgres

# Tests install official Python clients and the moto S3 emulator from PyPI
# into throwaway virtualenvs.
if ! python3 -c 'import ensurepip, venv' >/dev/null 2>&1; then
  echo "scripts/test.sh: python3 cannot make virtualenvs; installing python3-venv" >&2
  apt_install python3-venv
fi

# Build the tests first: it builds the `sluice` binary with the same features
# the tests use, so nothing is compiled twice.
if cargo nextest --version >/dev/null 2>&1; then
  run_tests() { cargo nextest run --workspace "$@"; }
else
  run_tests() { cargo test --workspace --lib --bins --tests "$@"; }
fi
run_tests --no-run

plugins=(plugins/*/ tests/plugins/*/)
./target/debug/sluice plugin build "${plugins[@]}" --out-dir target/plugins

run_tests --no-fail-fast
cargo test --workspace --doc
