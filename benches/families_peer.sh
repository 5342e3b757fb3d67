#!/usr/bin/env bash
# Decode tokens/s per family at its smallest real shape (random weights, Q8_0 GGUF made by
# llama.cpp's converter): ours vs llama.cpp's server on the same file, one stream, alternating
# (A B A B) in one run. One JSON line per measure, then one per family with the ratio.
#   benches/families_peer.sh [FAMILY...]     (default: qwen2 qwen3 llama gemma3 gemma2 phi3)
# Needs: target/release/serve, llama.cpp (../shared/bench/llamacpp.sh build) and a Python with
# torch, transformers, safetensors (PY, default python3) for the converter.
# ROUNDS (2), RUNS per measure (2), MAX_TOKENS per run (33), CTX (the longer context, 512).
set -euo pipefail
cd "$(dirname "$0")/.."
SHARED="${SHARED:-../shared/bench}"
PY="${PY:-python3}"
ROUNDS="${ROUNDS:-2}"; RUNS="${RUNS:-2}"; MAX_TOKENS="${MAX_TOKENS:-33}"; CTX="${CTX:-512}"
WORK="${WORK:-/tmp/loraplex-families-bench}"
BIN="$(bash "$SHARED/llamacpp.sh" build)"
LLAMA_CPP="$(dirname "$(dirname "$BIN")")"
FAMILIES=("${@:-qwen2 qwen3 llama gemma3 gemma2 phi3}")
read -r -a FAMILIES <<< "${FAMILIES[*]}"
mkdir -p "$WORK"
PID=""
stop() { [ -n "$PID" ] && kill "$PID" 2>/dev/null && wait "$PID" 2>/dev/null || true; PID=""; }
trap stop EXIT
wait_up() { for _ in $(seq 1500); do curl -sf "$1/health" >/dev/null && return; sleep 0.2; done; exit 1; }
for fam in "${FAMILIES[@]}"; do
  gguf="$WORK/$fam.q8_0.gguf"
  if [ ! -f "$gguf" ]; then
    "$PY" benches/families_shapes.py "$fam" "$WORK/$fam" >&2
    "$PY" tests/fixtures/families/make_gguf.py "$LLAMA_CPP" --dir "$WORK/$fam" "$gguf" q8_0 >/dev/null 2>&1
    rm -rf "${WORK:?}/$fam"
  fi
  vocab=$("$PY" -c "import json,sys; print(json.load(open('tests/fixtures/families/$([ "$fam" = llama ] && echo mistral || echo "$fam")/tokenizer.json'))['model']['vocab'].__len__())")
  for _ in $(seq "$ROUNDS"); do
    stop; target/release/serve --port 8080 --model "$gguf" 2>/dev/null & PID=$!; wait_up http://127.0.0.1:8080
    python3 benches/engine_peer.py http://127.0.0.1:8080 decode --runs "$RUNS" --tokens "$CTX" \
      --max-tokens "$MAX_TOKENS" --vocab "$vocab" | sed "s/^{/{\"family\": \"$fam\", /"
    stop; (cd "$BIN" && LD_LIBRARY_PATH=. exec ./llama-server -m "$gguf" -np 1 -c 4096 -t 2 --port 8091) >/dev/null 2>&1 & PID=$!
    wait_up http://127.0.0.1:8091
    python3 benches/engine_peer.py http://127.0.0.1:8091 decode --runs "$RUNS" --tokens "$CTX" \
      --max-tokens "$MAX_TOKENS" --vocab "$vocab" --flavor llamacpp | sed "s/^{/{\"family\": \"$fam\", /"
  done
  stop
done
