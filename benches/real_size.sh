#!/usr/bin/env bash
# Speed at real model sizes (issue 25): random-weight models of real shapes (benches/
# families_shapes.py: llama = Llama-3.2-1B, llama3b = Llama-3.2-3B), converted to GGUF F16 by the
# vendored llama.cpp's convert_hf_to_gguf.py and quantized by its llama-quantize; ours vs
# llama.cpp's server on the same file, 2 threads each, alternating (A B A B) in one run:
#   decode1  single-stream decode tokens/s after a 64-token prompt (engine_peer.py decode)
#   decode8  8 streams at once, 48-token answers to 32-token prompts (engine_peer.py concurrent)
#   prefill  seconds to answer a 2,000-token prompt with one token (engine_peer.py prefill)
#   rss      the server's peak resident set (VmHWM) after the runs, MB
#   load     seconds from launch to the first answered request
#   mixed    (ADAPTERS=N) N distinct random rank-16 LoRA adapters on all projections, 8 streams
#            each asking for one in turn (benches/shape_adapters.py: the same adapters as PEFT
#            directories for us and as llama.cpp GGUF LoRAs, `--lora … --lora-init-without-apply`)
# One JSON line per measure and server, then per shape × type the ratios (ours / llama.cpp; for
# prefill, rss and load the peer's over ours, so > 1 is better for us throughout).
#   benches/real_size.sh [SHAPE...]    TYPES="q4_k_m q8_0 q4_0" ROUNDS=2 PY=python3 ADAPTERS=8
#   (ONLY_MIXED=1 with ADAPTERS: the mixed-adapter measure only; ONLY_LOAD=1: load alone, the
#   file read from the page cache each time: it is read once beforehand)
# Needs: target/release/serve, ../shared/bench/llamacpp.sh build, a Python with torch,
# transformers and safetensors (PY) for the model and the converter. Takes tens of minutes.
set -euo pipefail
cd "$(dirname "$0")/.."
SHARED="${SHARED:-../shared/bench}"
PY="${PY:-python3}"
ROUNDS="${ROUNDS:-2}"
TYPES="${TYPES:-q4_k_m q8_0 q4_0}"
WORK="${WORK:-/tmp/loraplex-real-size}"
# Extra llama-server flags. On an Intel Xeon with AMX (family 6, model 143/167) the vendored
# llama.cpp's repacked CPU path dies of a general protection fault at the first prompt batch;
# LLAMA_ARGS=--no-repack runs it there (its decode with repacking is then llama-bench's figure).
LLAMA_ARGS="${LLAMA_ARGS:-}"
BIN="$(bash "$SHARED/llamacpp.sh" build)"
LLAMA_CPP="$(dirname "$(dirname "$BIN")")"
SHAPES=("${@:-llama}")
read -r -a SHAPES <<< "${SHAPES[*]}"
mkdir -p "$WORK"
PID=""
stop() { [ -n "$PID" ] && kill "$PID" 2>/dev/null && wait "$PID" 2>/dev/null || true; PID=""; }
trap stop EXIT
wait_up() { for _ in $(seq 3000); do curl -sf "$1/health" >/dev/null && return; sleep 0.1; done; exit 1; }
VOCAB=500  # prompt ids within the fixture tokenizer's vocabulary (the model's is larger)
first_answer() {  # seconds from $2 (epoch s) until $1 answers a one-token request
  until curl -sf "$1/v1/completions" -H 'Content-Type: application/json' \
      -d '{"prompt": [1, 2, 3], "max_tokens": 1}' >/dev/null 2>&1; do sleep 0.05; done
  python3 -c "import time,sys; print(round(time.time() - float(sys.argv[1]), 2))" "$2"
}
measure() {  # $1 flavor, $2 url; prints JSON lines
  local flavor="$1" url="$2" extra=()
  [ "$flavor" = llamacpp ] && extra=(--flavor llamacpp)
  python3 benches/engine_peer.py "$url" decode --runs 2 --tokens 64 --max-tokens 33 --vocab "$VOCAB" "${extra[@]}"
  python3 benches/engine_peer.py "$url" concurrent --streams 8 --runs 2 --tokens 32 --max-tokens 48 --vocab "$VOCAB" "${extra[@]}"
  python3 benches/engine_peer.py "$url" prefill --runs 2 --tokens 2000 --vocab "$VOCAB" "${extra[@]}"
  echo "{\"test\": \"rss\", \"mb\": $(awk '/VmHWM/ {print $2 / 1024}' "/proc/$PID/status"), \"flavor\": \"$flavor\"}"
}
for shape in "${SHAPES[@]}"; do
  f16="$WORK/$shape.f16.gguf"
  if [ ! -f "$f16" ]; then
    "$PY" benches/families_shapes.py "$shape" "$WORK/$shape" >&2
    "$PY" tests/fixtures/families/make_gguf.py "$LLAMA_CPP" --dir "$WORK/$shape" "$f16" f16 >/dev/null 2>&1
    rm -rf "${WORK:?}/$shape"
  fi
  for ty in $TYPES; do
    gguf="$WORK/$shape.$ty.gguf"
    [ -f "$gguf" ] || (cd "$BIN" && LD_LIBRARY_PATH=. ./llama-quantize "$f16" "$gguf" "${ty^^}" >/dev/null 2>&1)
    tag="\"shape\": \"$shape\", \"type\": \"$ty\", \"bytes\": $(stat -c %s "$gguf"), "
    if [ -n "${ADAPTERS:-}" ]; then
      ad="$WORK/$shape-adapters"
      [ -f "$ad/gguf/synthetic-$((ADAPTERS - 1))-r16.gguf" ] ||
        "$PY" benches/shape_adapters.py "$shape" "$ad" "$ADAPTERS" 16 "$LLAMA_CPP" >&2
      names=$(seq -s, -f "synthetic-%g-r16" 0 $((ADAPTERS - 1)))
      loras=(); for n in ${names//,/ }; do loras+=(--lora "$ad/gguf/$n.gguf"); done
      mixed() {
        python3 benches/engine_peer.py "$2" concurrent --streams 8 --runs 2 --tokens 32 --max-tokens 48 \
          --vocab "$VOCAB" --adapters "$names" --flavor "$1" | sed "s/^{/{$tag/"
      }
      for _ in $(seq "$ROUNDS"); do
        stop; target/release/serve --port 8080 --model "$gguf" --adapters "$ad/peft" 2>/dev/null & PID=$!
        wait_up http://127.0.0.1:8080; mixed ours http://127.0.0.1:8080
        stop
        # shellcheck disable=SC2086
        (cd "$BIN" && LD_LIBRARY_PATH=. exec ./llama-server -m "$gguf" "${loras[@]}" --lora-init-without-apply \
          -np 8 -c 20480 -t 2 --port 8091 $LLAMA_ARGS) >/dev/null 2>&1 & PID=$!
        wait_up http://127.0.0.1:8091; mixed llamacpp http://127.0.0.1:8091
      done
      stop
      [ "${ONLY_MIXED:-}" = 1 ] && continue
    fi
    cat "$gguf" >/dev/null
    for _ in $(seq "$ROUNDS"); do
      stop; t0=$(date +%s.%N)
      target/release/serve --port 8080 --model "$gguf" 2>/dev/null & PID=$!
      wait_up http://127.0.0.1:8080
      echo "{${tag}\"test\": \"load\", \"s\": $(first_answer http://127.0.0.1:8080 "$t0"), \"flavor\": \"ours\"}"
      [ "${ONLY_LOAD:-}" = 1 ] || measure ours http://127.0.0.1:8080 | sed "s/^{/{$tag/"
      stop; t0=$(date +%s.%N)
      # shellcheck disable=SC2086
      (cd "$BIN" && LD_LIBRARY_PATH=. exec ./llama-server -m "$gguf" -np 8 -c 20480 -t 2 --port 8091 $LLAMA_ARGS) >/dev/null 2>&1 & PID=$!
      wait_up http://127.0.0.1:8091
      echo "{${tag}\"test\": \"load\", \"s\": $(first_answer http://127.0.0.1:8091 "$t0"), \"flavor\": \"llamacpp\"}"
      [ "${ONLY_LOAD:-}" = 1 ] || measure llamacpp http://127.0.0.1:8091 | sed "s/^{/{$tag/"
    done
    stop
  done
done | tee "$WORK/results.jsonl"
python3 - "$WORK/results.jsonl" <<'PY'
import collections, json, statistics, sys
rows = [json.loads(l) for l in open(sys.argv[1]) if l.startswith("{")]
val = collections.defaultdict(list)
for r in rows:
    t = r["test"]
    v = {"decode": lambda: r["tokens_per_s"]["64"], "concurrent": lambda: r["tokens_per_s"],
         "mixed": lambda: r["tokens_per_s"],
         "prefill": lambda: r["mean_s"] if "mean_s" in r else statistics.mean(r["runs_s"]),
         "rss": lambda: r["mb"], "load": lambda: r["s"]}[t]()
    val[(r["shape"], r["type"], t, r["flavor"])].append(v)
for shape, ty in sorted({(k[0], k[1]) for k in val}):
    out = {"shape": shape, "type": ty}
    for t, higher_better in [("decode", 1), ("concurrent", 1), ("mixed", 1), ("prefill", 0), ("rss", 0),
                             ("load", 0)]:
        o, l = val.get((shape, ty, t, "ours")), val.get((shape, ty, t, "llamacpp"))
        if o and l:
            o, l = statistics.median(o), statistics.median(l)
            out[t] = {"ours": round(o, 2), "llamacpp": round(l, 2),
                      "ratio": round(o / l if higher_better else l / o, 3)}
    print(json.dumps(out))
PY
