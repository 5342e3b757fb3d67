#!/usr/bin/env bash
# Training speed against PEFT, one run, alternating (A B A B): LoRA r8 on all seven projections,
# batch 4, STEPS steps (80), the default model in float32, chat examples (the json-extract rows as
# chat messages, ~60-90 tokens each); both trainers see the same micro-batches in the same order.
# Needs: python3 with torch, transformers, gguf>=0.10 and peft==0.21.2 (PYTHON=...), target/release/serve.
#   benches/train_peer.sh [ROUNDS] [STEPS]    -> JSON lines on stdout
# MODEL=FILE.gguf trains another GGUF instead of the default model (both trainers in float32;
# the same token ids, from the default model's tokenizer and chat template: with the random
# weights of benches/real_size.sh's shapes only the timings mean anything), e.g.
#   MODEL=/tmp/loraplex-real-size/llama.f16.gguf benches/train_peer.sh 1 5   # Llama-3.2-1B's shape
set -euo pipefail
cd "$(dirname "$0")/.."
ROUNDS="${1:-1}"
STEPS="${2:-80}"
PYTHON="${PYTHON:-$HOME/.cache/loraplex-peers/venv/bin/python}"
LR=2e-4
WORK="${WORK:-/tmp/loraplex-train-bench}"
mkdir -p "$WORK"
python3 - "$WORK/chat.jsonl" <<'PY'
import json, sys
with open(sys.argv[1], "w") as out:
    for line in open("adapters/json-extract-data/train.jsonl"):
        r = json.loads(line)
        out.write(json.dumps({"messages": [
            {"role": "user", "content": r["instruction"] + "\n" + r["input"]},
            {"role": "assistant", "content": r["output"]}]}) + "\n")
PY
cargo build --release --bin serve --example train_peer_batches >/dev/null 2>&1
target/release/examples/train_peer_batches "$WORK/chat.jsonl" "$STEPS" 4 42 > "$WORK/batches.jsonl"
ours() {
  rm -rf "$WORK/out"
  local t0=$(date +%s.%N)
  target/release/serve train ${MODEL:+--model "$MODEL"} --data "$WORK/chat.jsonl" --output "$WORK/out" --rank 8 --alpha 16 \
    --dropout 0.05 --batch-size 4 --max-steps "$STEPS" --lr "$LR" --seed 42 --save-steps 0 "$@" >/dev/null 2>&1
  local t1=$(date +%s.%N)
  python3 - "$WORK/out/metrics.jsonl" "$WORK/batches.jsonl" "$t0" "$t1" "$*" <<'PY'
import json, sys
m = [json.loads(l) for l in open(sys.argv[1]) if '"loss"' in l]
b = [json.loads(l) for l in open(sys.argv[2])]
toks = [sum(len(e["ids"]) for e in x["examples"]) for x in b]
targets = sum(sum(l is not None for l in e["labels"]) for x in b for e in x["examples"])
secs = sum(t / r["tokens_per_second"] for t, r in zip(toks, m))
print(json.dumps({"flavor": ("ours " + sys.argv[5]).strip(), "steps": len(m), "seconds": secs,
                  "process_seconds": float(sys.argv[4]) - float(sys.argv[3]),
                  "tokens_per_s": sum(toks) / secs, "target_tokens_per_s": targets / secs,
                  "losses": [r["loss"] for r in m]}))
PY
}
for _ in $(seq "$ROUNDS"); do
  ours
  GGUF="${MODEL:-}" "$PYTHON" benches/train_peer.py "$WORK/batches.jsonl" "$LR" 2 2>/dev/null
done
