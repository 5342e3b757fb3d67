#!/usr/bin/env bash
# Checks deploy/ with real components (run by .ci/run after the tests):
#   1. every kustomize directory renders (`kubectl kustomize`) and every object validates: core
#      kinds with kubernetes-validate (strict), the custom resources against deploy/schemas with
#      unknown fields forbidden, the picker's configuration too; the pieces fit together;
#   2. the Dockerfile against the repository (no Docker daemon runs here);
#   3. `promtool check rules` and `promtool check config`;
#   4. `serve` (the tiny model, its adapters, the Deployment's own arguments and keys file) and a
#      real Prometheus (Debian's, scrape interval 1 s, the project's scrape config pointed at the
#      server) with mixed traffic; then every PromQL expression of the dashboard and of the
#      recording rules through Prometheus' HTTP API must return data, and the picker's series
#      must be stored as it reads them.
#   5. the official `openai` client's `RateLimitError` against a server with a rate-limited key
#      (deploy/openai_client_check.py).
# Installs what is missing: Debian's `prometheus` package (apt), PyPI's check-jsonschema,
# kubernetes-validate, PyYAML and openai in a venv (~/.cache/loraplex-deploy/venv). Fails, saying why,
# when one cannot be installed. Stops what it started, by PID.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT="$PWD"
say() { echo "== $*"; }
die() { echo "deploy/check.sh: $*" >&2; exit 1; }

# --- tools --------------------------------------------------------------------------------
command -v kubectl >/dev/null || die "kubectl is not installed (it renders the kustomize directories)"
works() { "$1" --version >/dev/null 2>&1; }
if ! works prometheus || ! works promtool; then
  say "installing Debian's prometheus package"
  command -v apt-get >/dev/null || die "Prometheus is not installed and there is no apt-get to install it"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq >/tmp/loraplex-apt.log 2>&1 || die "apt-get update failed (see /tmp/loraplex-apt.log): cannot install Prometheus"
  apt-get install -y -qq --no-install-recommends prometheus >>/tmp/loraplex-apt.log 2>&1 \
    || die "apt-get install prometheus failed (see /tmp/loraplex-apt.log): cannot install Prometheus"
  # The package may start its own service; ours runs on its own port with its own config.
  works prometheus && works promtool || die "the prometheus package installed no working prometheus/promtool"
fi
VENV="${LORAPLEX_DEPLOY_VENV:-$HOME/.cache/loraplex-deploy/venv}"
if ! "$VENV/bin/python" -c "import yaml, kubernetes_validate, openai" 2>/dev/null || [ ! -x "$VENV/bin/check-jsonschema" ]; then
  say "installing check-jsonschema, kubernetes-validate, PyYAML, openai into $VENV"
  python3 -m venv "$VENV" || die "cannot create a Python venv at $VENV"
  "$VENV/bin/pip" install -q check-jsonschema kubernetes-validate pyyaml openai \
    || die "pip could not install check-jsonschema, kubernetes-validate, PyYAML and openai"
fi
export PATH="$VENV/bin:$PATH"
PY="$VENV/bin/python"

# --- static checks ---------------------------------------------------------------------------
say "manifests"
"$PY" deploy/check.py manifests
say "Dockerfile"
"$PY" deploy/check.py dockerfile
say "promtool"
promtool check rules deploy/prometheus/rules.yml
TMP="$(mktemp -d)"
PIDS=()
cleanup() {
  for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
  for p in "${PIDS[@]}"; do wait "$p" 2>/dev/null || true; done
  rm -rf "$TMP"
}
trap cleanup EXIT
# The scrape config in the form the real Prometheus below runs with: as shipped, its Kubernetes
# pod discovery (and the relabelling of discovered labels) replaced by the local server. Debian
# builds Prometheus without Kubernetes discovery, so `kubernetes_sd_configs` itself is not
# checked by promtool here.
free_port() { "$PY" -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }
SERVE_PORT="$(free_port)"
PROM_PORT="$(free_port)"
"$PY" deploy/check.py local-config "$TMP/prometheus.yml" "$SERVE_PORT" "$ROOT/deploy/prometheus/rules.yml"
promtool check config "$TMP/prometheus.yml"

# --- a live server and a real Prometheus ------------------------------------------------------
SERVE="${SERVE_BIN:-target/release/serve}"
[ -x "$SERVE" ] || cargo build --release --bin serve
"$PY" deploy/check.py serve-args "$TMP/args" "$TMP/keys.toml"
mapfile -t ARGS <"$TMP/args"
say "serve ${ARGS[*]} (tiny model, port $SERVE_PORT)"
LORAPLEX_HOME="$TMP/home" "$SERVE" --model tests/fixtures/tiny-llama --adapters tests/fixtures/tiny-llama/adapters \
  --host 127.0.0.1 --port "$SERVE_PORT" "${ARGS[@]}" >"$TMP/serve.log" 2>&1 &
PIDS+=($!)
for _ in $(seq 300); do curl -sf "http://127.0.0.1:$SERVE_PORT/health" >/dev/null && break; sleep 0.2; done
curl -sf "http://127.0.0.1:$SERVE_PORT/health" >/dev/null || { cat "$TMP/serve.log"; die "serve did not come up"; }
# The picker scrapes without a key.
curl -sf "http://127.0.0.1:$SERVE_PORT/metrics" >/dev/null || die "/metrics is not readable without a key (--open-metrics)"
say "prometheus $(prometheus --version 2>&1 | head -1 | cut -d' ' -f3) on port $PROM_PORT"
prometheus --config.file="$TMP/prometheus.yml" --storage.tsdb.path="$TMP/tsdb" \
  --web.listen-address="127.0.0.1:$PROM_PORT" >"$TMP/prometheus.log" 2>&1 &
PIDS+=($!)
for _ in $(seq 150); do curl -sf "http://127.0.0.1:$PROM_PORT/-/ready" >/dev/null && break; sleep 0.2; done
curl -sf "http://127.0.0.1:$PROM_PORT/-/ready" >/dev/null || { tail -20 "$TMP/prometheus.log"; die "Prometheus did not come up"; }
say "traffic"
"$PY" deploy/check.py traffic "http://127.0.0.1:$SERVE_PORT" "$TMP/keys.toml" 25
sleep 3
up="$(curl -sf "http://127.0.0.1:$PROM_PORT/api/v1/query?query=up" | "$PY" -c 'import json,sys; r=json.load(sys.stdin)["data"]["result"]; print(r[0]["value"][1] if r else "none")')"
[ "$up" = "1" ] || { tail -20 "$TMP/prometheus.log"; die "Prometheus does not scrape serve (up=$up)"; }
say "queries"
"$PY" deploy/check.py queries "http://127.0.0.1:$PROM_PORT"

# --- rate limits as the openai client sees them ------------------------------------------------
say "openai client against a rate-limited key"
LIMITED_PORT="$(free_port)"
printf '[keys."sk-limited"]\ntenant = "limited"\nrequests_per_minute = 2\n' >"$TMP/limited.toml"
LORAPLEX_HOME="$TMP/home" "$SERVE" --model tests/fixtures/tiny-llama --host 127.0.0.1 --port "$LIMITED_PORT" \
  --api-keys "$TMP/limited.toml" --state-dir "$TMP/limited-state" >"$TMP/limited.log" 2>&1 &
PIDS+=($!)
for _ in $(seq 300); do curl -sf "http://127.0.0.1:$LIMITED_PORT/health" >/dev/null && break; sleep 0.2; done
"$PY" deploy/openai_client_check.py "http://127.0.0.1:$LIMITED_PORT" || { tail -20 "$TMP/limited.log"; die "the openai client check failed"; }
echo "deploy/check.sh: all checks passed"
