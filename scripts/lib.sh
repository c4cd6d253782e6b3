# Shared by the scripts in this folder: sourced, not run.

as_root() {
  if [ "$(id -u)" -ne 0 ]; then sudo "$@"; else "$@"; fi
}

apt_install() {
  as_root apt-get update -qq
  DEBIAN_FRONTEND=noninteractive as_root apt-get install -y -qq "$@"
}

has_rustup_wasm_target() {
  local libdir
  libdir=$(rustc --print target-libdir --target wasm32-unknown-unknown 2>/dev/null) || return 1
  compgen -G "$libdir/libcore-*" >/dev/null
}

has_offline_fallback() {
  [ -x /usr/bin/rustc ] && [ -x /usr/bin/cargo ] && command -v wasm-ld >/dev/null &&
    [ -d /usr/lib/rustlib/src/rust/library/std ]
}

# The wasm toolchain for plugins: the rustup target where it is installed,
# else Debian's offline one (announced, never silent).
ensure_wasm_toolchain() {
  if ! has_rustup_wasm_target && ! has_offline_fallback; then
    echo "$0: no wasm32-unknown-unknown toolchain; installing the offline one:" >&2
    echo "  apt-get install -y rustc-web cargo-web rust-web-src lld" >&2
    apt_install rustc-web cargo-web rust-web-src lld
  fi
}

# PostgreSQL for the PostgreSQL tests and benchmarks, started if it is
# installed and not running.
ensure_postgres() {
  if command -v pg_ctlcluster >/dev/null && ! pg_isready -h 127.0.0.1 -p 5432 -q 2>/dev/null; then
    pg_ctlcluster --skip-systemctl-redirect "$(ls /etc/postgresql)" main start
  fi
}
