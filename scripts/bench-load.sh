#!/usr/bin/env bash
# The load tool, every setting the benchmarks quote, in one run: capture to
# stored flat out, then at half that rate and at that rate, on SQLite and
# on PostgreSQL; then 5 projects with 20 plugin configs; then an offered
# rate above what the server stores, to show capture pushing back. Builds
# what it needs.
#
#   scripts/bench-load.sh              # everything (about 20 minutes)
#   scripts/bench-load.sh sqlite       # only SQLite; or: postgres
#   scripts/bench-load.sh attack       # a project beside an attacker, both backends
#   scripts/bench-load.sh attack-sqlite   # or attack-postgres
#   scripts/bench-load.sh hostile      # 9 projects beside 14 hostile plugin configs, both backends
#
# SLUICE_LOAD_POSTGRES names the PostgreSQL server (default: the local one);
# each run creates a database of its own there and drops it afterwards.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/lib.sh
ensure_wasm_toolchain
ensure_postgres

export SLUICE_LOAD_POSTGRES_URL="${SLUICE_LOAD_POSTGRES:-postgres://postgres@127.0.0.1:5432/test}"
unset SLUICE_LOAD_POSTGRES

# Building the bench builds the `sluice` binary it starts, with the same
# features; building the binary on its own would compile much of it twice.
cargo bench -p sluice --bench load --no-run
hostile=(memory-bomb spin-forever deep-recursion huge-output log-flood wasi-file-read http-probe)
./target/release/sluice plugin build plugins/*/ tests/plugins/slow-link/ tests/plugins/splitter/ \
  "${hostile[@]/#/tests/plugins/}" --out-dir target/plugins

load() { cargo bench -q -p sluice --bench load 2>/dev/null; }

run_backend() {
  local backend=$1
  if [ "$backend" = postgres ]; then export SLUICE_LOAD_POSTGRES=$SLUICE_LOAD_POSTGRES_URL; fi
  echo "== $backend: flat out"
  local out rate
  out=$(load)
  echo "$out"
  rate=$(echo "$out" | sed -n 's/^capture -> stored: *\([0-9]*\) events\/s.*/\1/p')
  echo "== $backend: offered at half the stored rate ($((rate / 2)) events/s)"
  SLUICE_LOAD_RATE=$((rate / 2)) SLUICE_LOAD_SECONDS=20 load
  # At the flat-out stored rate the queue should hold steady, not grow.
  echo "== $backend: offered at the stored rate ($rate events/s) for 40 s"
  SLUICE_LOAD_RATE=$rate SLUICE_LOAD_SECONDS=40 load
  echo "== $backend: 5 projects, 20 plugin configs, flat out"
  SLUICE_LOAD_PROJECTS=5 SLUICE_LOAD_CHAIN=4 load
  # Offered at twice what it stores, the queue fills by about the stored
  # rate each second; capture refuses once it holds 30 s of work.
  echo "== $backend: offered at twice the stored rate ($((rate * 2)) events/s) for 40 s"
  SLUICE_LOAD_RATE=$((rate * 2)) SLUICE_LOAD_SECONDS=40 load
  unset SLUICE_LOAD_POSTGRES
}

# One project offered a fixed rate alone, then beside each attack; then
# flat out alone and beside a flood. Only the measured project's events
# count (see SLUICE_LOAD_ATTACK in server/benches/load.rs).
run_attacks() {
  local backend=$1 rate=${SLUICE_LOAD_ATTACK_RATE:-3000}
  if [ "$backend" = postgres ]; then export SLUICE_LOAD_POSTGRES=$SLUICE_LOAD_POSTGRES_URL; fi
  echo "== $backend: one project offered $rate events/s for 20 s, alone"
  SLUICE_LOAD_RATE=$rate SLUICE_LOAD_SECONDS=20 load
  for mode in flood slow multiply; do
    echo "== $backend: the same, beside an attacker ($mode)"
    SLUICE_LOAD_ATTACK=$mode SLUICE_LOAD_RATE=$rate SLUICE_LOAD_SECONDS=20 load
  done
  echo "== $backend: one project flat out, alone"
  SLUICE_LOAD_EVENTS=60000 load
  echo "== $backend: one project flat out, beside an attacker (flood)"
  SLUICE_LOAD_ATTACK=flood SLUICE_LOAD_EVENTS=60000 load
  unset SLUICE_LOAD_POSTGRES
}

# Nine projects of four configs each, flat out, alone and then beside a
# project running 14 hostile plugins on 200 events/s: 50 configs. Only the
# nine's events count.
run_hostile() {
  local backend=$1
  if [ "$backend" = postgres ]; then export SLUICE_LOAD_POSTGRES=$SLUICE_LOAD_POSTGRES_URL; fi
  echo "== $backend: 9 projects x 4 configs, flat out, alone"
  SLUICE_LOAD_PROJECTS=9 SLUICE_LOAD_CHAIN=4 SLUICE_LOAD_EVENTS=90000 load
  echo "== $backend: the same, beside 14 hostile plugin configs"
  SLUICE_LOAD_PROJECTS=9 SLUICE_LOAD_CHAIN=4 SLUICE_LOAD_EVENTS=90000 SLUICE_LOAD_ATTACK=hostile load
  unset SLUICE_LOAD_POSTGRES
}

case "${1:-all}" in
  attack) run_attacks sqlite; run_attacks postgres ;;
  attack-sqlite) run_attacks sqlite ;;
  attack-postgres) run_attacks postgres ;;
  hostile) run_hostile sqlite; run_hostile postgres ;;
  sqlite) run_backend sqlite ;;
  postgres) run_backend postgres ;;
  all) run_backend sqlite; run_backend postgres ;;
  *) echo "usage: scripts/bench-load.sh [sqlite|postgres|all|attack|attack-sqlite|attack-postgres|hostile]" >&2; exit 2 ;;
esac
