#!/usr/bin/env bash
# Property-based tests of the HTTP API from its own OpenAPI document:
# schemathesis (pinned, from PyPI, in a throwaway virtualenv cached under
# target/) sends generated requests to every documented operation of a live
# `sluice serve` on a temporary SQLite store, and fails on any 5xx answer or
# any answer that does not match the document's schema.
#
# Uses the `sluice` binary that `cargo build` (or scripts/test.sh) left in
# target/debug; set SLUICE_BIN to use another. SCHEMATHESIS_MAX_EXAMPLES
# (default 50: about a minute on two idle cores) bounds the cases per
# operation.
set -euo pipefail
cd "$(dirname "$0")/.."

# Raise on purpose, and run this script when you do.
SCHEMATHESIS=schemathesis==4.32.5
SLUICE_BIN=${SLUICE_BIN:-target/debug/sluice}
MAX_EXAMPLES=${SCHEMATHESIS_MAX_EXAMPLES:-50}

if [ ! -x "$SLUICE_BIN" ]; then
  echo "$0: no sluice binary at $SLUICE_BIN; run cargo build first" >&2
  exit 1
fi
if ! python3 -c 'import ensurepip, venv' >/dev/null 2>&1; then
  echo "$0: python3 cannot make virtualenvs; installing python3-venv" >&2
  source scripts/lib.sh
  apt_install python3-venv
fi

venv=$PWD/target/schemathesis-venv
if ! "$venv/bin/schemathesis" --version 2>/dev/null | grep -q "${SCHEMATHESIS#*==}"; then
  rm -rf "$venv"
  python3 -m venv "$venv"
  "$venv/bin/pip" install --quiet --disable-pip-version-check "$SCHEMATHESIS"
fi

work=$(mktemp -d)
server_pid=
cleanup() {
  if [ -n "$server_pid" ]; then
    kill "$server_pid" 2>/dev/null || true
    wait "$server_pid" 2>/dev/null || true
  fi
  rm -rf "$work"
}
trap cleanup EXIT

# A free loopback port: bind to 0 and give it back.
port=$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
base="http://127.0.0.1:$port"

# An organisation with its admin key (the one the requests carry), a
# project in it, and a spare key for the revoke route to aim at.
json_field() { python3 -c "import json, sys; print(json.load(sys.stdin)['$1'])"; }
org=$("$SLUICE_BIN" org create --data-dir "$work/data" --name schemathesis)
organisation_id=$(json_field organisation_id <<<"$org")
api_key=$(json_field api_key <<<"$org")
project=$("$SLUICE_BIN" project create --data-dir "$work/data" --name schemathesis \
  --organisation "$organisation_id")
project_id=$(json_field project_id <<<"$project")
capture_token=$(json_field capture_token <<<"$project")
spare=$("$SLUICE_BIN" key create --data-dir "$work/data" --organisation "$organisation_id" \
  --name spare --scope read)
spare_key_id=$(json_field id <<<"$spare")

# The API's rate per key is lifted: the fuzzer sends one key's requests as
# fast as it can, and 429s would stand between it and the handlers.
RUST_LOG=${RUST_LOG:-warn} "$SLUICE_BIN" serve --data-dir "$work/data" --listen "127.0.0.1:$port" \
  --api-requests-per-second 1000000 \
  >"$work/server.log" 2>&1 &
server_pid=$!
for _ in $(seq 1 100); do
  if curl -fsS "$base/_ready" >/dev/null 2>&1; then break; fi
  if ! kill -0 "$server_pid" 2>/dev/null; then
    echo "$0: sluice serve exited:" >&2
    cat "$work/server.log" >&2
    exit 1
  fi
  sleep 0.2
done

# Path and token parameters name the real project and a real destination
# (the webhook plugin, built by scripts/test.sh), so requests reach the
# handlers rather than stopping at 403 or 404; everything else is generated.
cat >"$work/schemathesis.toml" <<'TOML'
[parameters]
"path.project_id" = "${SLUICE_PROJECT_ID}"
"path.organisation_id" = "${SLUICE_ORGANISATION_ID}"
"path.key_id" = "${SLUICE_SPARE_KEY_ID}"
"query.api_key" = "${SLUICE_CAPTURE_TOKEN}"
TOML
if [ -f target/plugins/webhook.wasm ]; then
  auth="Authorization: Bearer $api_key"
  sha=$(curl -fsS -H "$auth" --data-binary @target/plugins/webhook.wasm \
    "$base/api/projects/$project_id/plugins" | json_field sha256)
  config_id=$(curl -fsS -H "$auth" -H 'content-type: application/json' \
    -d "{\"plugin_sha256\": \"$sha\", \"config\": {\"url\": \"https://hooks.example.com/sluice\"}}" \
    "$base/api/projects/$project_id/plugin-configs" | json_field id)
  echo "\"path.config_id\" = \"$config_id\"" >>"$work/schemathesis.toml"
else
  echo "$0: no target/plugins/webhook.wasm; the routes of one plugin config get only 404s" >&2
fi

# Run in the temporary folder, where schemathesis leaves its cache.
status=0
cd "$work"
SLUICE_PROJECT_ID=$project_id SLUICE_CAPTURE_TOKEN=$capture_token \
  SLUICE_ORGANISATION_ID=$organisation_id SLUICE_SPARE_KEY_ID=$spare_key_id \
  "$venv/bin/schemathesis" --config-file "$work/schemathesis.toml" run "$base/api/openapi.json" \
  --header "Authorization: Bearer $api_key" \
  --checks not_a_server_error,response_schema_conformance \
  --phases examples,coverage,fuzzing \
  --max-examples "$MAX_EXAMPLES" \
  --seed 1 \
  --generation-database none \
  --workers 2 \
  --request-timeout 30 \
  --no-color || status=$?

if [ "$status" -ne 0 ]; then
  echo "$0: schemathesis found failures (exit $status); the server's log:" >&2
  tail -n 50 "$work/server.log" >&2
fi
exit "$status"
