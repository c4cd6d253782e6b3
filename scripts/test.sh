#!/usr/bin/env bash
# The test command. On a fresh machine it sets up what it needs: the wasm
# toolchain for plugins (announced, never silent), every plugin built in one
# cargo invocation, then the whole suite.
set -euo pipefail
cd "$(dirname "$0")/.."

has_rustup_wasm_target() {
  local libdir
  libdir=$(rustc --print target-libdir --target wasm32-unknown-unknown 2>/dev/null) || return 1
  compgen -G "$libdir/libcore-*" >/dev/null
}

has_offline_fallback() {
  [ -x /usr/bin/rustc ] && [ -x /usr/bin/cargo ] && command -v wasm-ld >/dev/null &&
    [ -d /usr/lib/rustlib/src/rust/library/std ]
}

if ! has_rustup_wasm_target && ! has_offline_fallback; then
  echo "scripts/test.sh: no wasm32-unknown-unknown toolchain; installing the offline one:" >&2
  echo "  apt-get install -y rustc-web cargo-web rust-web-src lld" >&2
  sudo=""
  [ "$(id -u)" -ne 0 ] && sudo="sudo"
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq rustc-web cargo-web rust-web-src lld
fi

# Tests install official Python clients and the moto S3 emulator from PyPI
# into throwaway virtualenvs.
if ! python3 -c 'import ensurepip, venv' >/dev/null 2>&1; then
  echo "scripts/test.sh: python3 cannot make virtualenvs; installing python3-venv" >&2
  sudo=""
  [ "$(id -u)" -ne 0 ] && sudo="sudo"
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq python3-venv
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
