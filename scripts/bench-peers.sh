#!/usr/bin/env bash
# The side-by-side benchmark: the same three transformations (PII scrub,
# rename, URL/UTM parse) on the same 1.1 KB posthog-js-like event, each on
# one core, as the serde_json floor, native Rust, Sluice's sandboxed chain,
# Node's vm module and isolated-vm. Prints events/s and the ratios.
# Builds the plugins and installs the Node packages it needs.
#
#   scripts/bench-peers.sh            # SLUICE_PEERS_SECONDS (default 5) per measurement
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/lib.sh
ensure_wasm_toolchain

command -v node >/dev/null || apt_install nodejs npm
# Building the bench builds the `sluice` binary too, with the same features.
cargo bench -p sluice --bench peers --no-run
./target/release/sluice plugin build plugins/pii-scrubber plugins/property-renamer plugins/url-parser \
  --out-dir target/plugins
# isolated-vm compiles a native module with node-gyp (python3, make, g++).
command -v g++ >/dev/null && command -v make >/dev/null || apt_install g++ make python3
(
  cd server/benches/peers
  npm install --no-audit --no-fund --loglevel=error
  node -e "require('isolated-vm')" 2>/dev/null || npm rebuild isolated-vm --foreground-scripts
)

# One core each, the same core, one after another.
pin() { if command -v taskset >/dev/null; then taskset -c 0 "$@"; else "$@"; fi; }
results=$(mktemp)
trap 'rm -f "$results"' EXIT
pin cargo bench -q -p sluice --bench peers 2>/dev/null | grep '^{' | tee -a "$results"
pin node server/benches/peers/vm.js | tee -a "$results"
pin node server/benches/peers/isolated-vm.js | tee -a "$results"

node - "$results" <<'JS'
const lines = require('fs').readFileSync(process.argv[2], 'utf8').trim().split('\n').map(JSON.parse);
const rate = (prefix) => lines.find((l) => l.name.startsWith(prefix)).events_per_second;
const sluice = rate('Sluice');
console.log('\n| chain | events/s | Sluice ÷ this |');
console.log('|---|---:|---:|');
for (const { name, events_per_second } of lines.filter((l) => !l.name.startsWith('(detail)'))) {
  console.log(`| ${name} | ${events_per_second.toLocaleString('en-US')} | ${(sluice / events_per_second).toFixed(2)} |`);
}
console.log('\nWhere the sandboxed chain goes (each plugin alone, parse and serialise included):');
const floor = rate('floor');
for (const { name, events_per_second } of lines.filter((l) => l.name.startsWith('(detail)'))) {
  const micros = 1e6 / events_per_second - 1e6 / floor;
  console.log(`  ${name.replace('(detail) Sluice: ', '')}: ${(1e6 / events_per_second).toFixed(1)} µs an event, ${micros.toFixed(1)} µs over the floor`);
}
const targets = [
  ['native Rust', 0.5], ['node vm', 2.5], ['isolated-vm, isolate per plugin, per event', 4],
];
console.log('');
for (const [peer, wanted] of targets) {
  const ratio = sluice / rate(peer);
  console.log(`Sluice ÷ ${peer}: ${ratio.toFixed(2)} (target ≥ ${wanted}: ${ratio >= wanted ? 'holds' : 'does not hold'})`);
}
JS
