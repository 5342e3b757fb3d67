#!/usr/bin/env bash
# The engine's figures in one run, alternating (A B A B) so machine drift hits both sides:
#   prefill of a 3,000-token prompt: ours vs llama.cpp's server (same GGUF, 2 threads);
#   8 streams' inter-token gaps while a 2,000-token prompt arrives: chunked (default) vs
#     --max-batched-tokens 0;
#   time to first token of 16 requests sharing a 500-token system prompt under one adapter:
#     prefix cache on (default) vs --no-prefix-cache.
#   single-stream decode tokens/s at context 64 and 2,048: ours (default KV, which is int8 for
#     this GGUF, and f32) vs llama.cpp.
# Needs: target/release/serve, llama.cpp (../shared/bench/llamacpp.sh build), python3.
#   benches/engine_peer.sh [ROUNDS]   -> JSON lines on stdout
set -euo pipefail
cd "$(dirname "$0")/.."
ROUNDS="${1:-2}"
BENCH="$(dirname "$0")/engine_peer.py"
SHARED="${SHARED:-../shared/bench}"
BIN="$(bash "$SHARED/llamacpp.sh" build)"
GGUF="$(bash "$SHARED/llamacpp.sh" gguf)"
ADAPTERS="${ADAPTERS:-/tmp/loraplex-engine-bench-adapters}"
[ -d "$ADAPTERS/synthetic-0-r16" ] ||
  cargo bench --bench load -- --write-adapters "$ADAPTERS" --adapters 1 --rank 16 >/dev/null
PID=""
stop() { [ -n "$PID" ] && kill "$PID" 2>/dev/null && wait "$PID" 2>/dev/null || true; PID=""; }
trap stop EXIT
wait_up() { for _ in $(seq 600); do curl -sf "$1/health" >/dev/null && return; sleep 0.2; done; exit 1; }
ours() { stop; target/release/serve --port 8080 --adapters "$ADAPTERS" "$@" 2>/dev/null & PID=$!; wait_up http://127.0.0.1:8080; }
llama() {
  stop
  (cd "$BIN" && LD_LIBRARY_PATH=. exec ./llama-server -m "$GGUF" -np 9 -c 36864 -t 2 --port 8091) >/dev/null 2>&1 &
  PID=$!; wait_up http://127.0.0.1:8091
}
# ONLY=decode (or prefill, itl, ttft) runs one measure.
on() { [ -z "${ONLY:-}" ] || [ "$ONLY" = "$1" ]; }
for _ in $(seq "$ROUNDS"); do
  if on prefill; then
    ours;  python3 "$BENCH" http://127.0.0.1:8080 prefill --runs 2
    llama; python3 "$BENCH" http://127.0.0.1:8091 prefill --runs 2 --flavor llamacpp
  fi
  if on decode; then
    ours;  python3 "$BENCH" http://127.0.0.1:8080 decode --runs 3 | sed 's/"flavor": "ours"/"flavor": "ours, default (auto = int8) KV"/'
    llama; python3 "$BENCH" http://127.0.0.1:8091 decode --runs 3 --flavor llamacpp
    ours --kv-cache-dtype f32
           python3 "$BENCH" http://127.0.0.1:8080 decode --runs 3 | sed 's/"flavor": "ours"/"flavor": "ours, f32 KV"/'
  fi
  if on itl; then
    ours;  python3 "$BENCH" http://127.0.0.1:8080 itl | sed 's/"flavor": "ours"/"flavor": "ours, chunked 256"/'
    ours --max-batched-tokens 0
           python3 "$BENCH" http://127.0.0.1:8080 itl | sed 's/"flavor": "ours"/"flavor": "ours, unchunked"/'
  fi
  if on ttft; then
    ours;  python3 "$BENCH" http://127.0.0.1:8080 ttft --model synthetic-0-r16 | sed 's/"flavor": "ours"/"flavor": "ours, prefix cache on"/'
    ours --no-prefix-cache
           python3 "$BENCH" http://127.0.0.1:8080 ttft --model synthetic-0-r16 | sed 's/"flavor": "ours"/"flavor": "ours, prefix cache off"/'
  fi
done
