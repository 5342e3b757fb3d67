"""Random PEFT LoRA adapters for a real-size shape (benches/families_shapes.py), and the same
adapters as llama.cpp GGUF LoRAs by llama.cpp's own converter: the mixed-adapter measure of
benches/real_size.sh.

    python benches/shape_adapters.py SHAPE OUT_DIR N RANK LLAMA_CPP_DIR

Writes OUT_DIR/peft/synthetic-{i}-r{RANK}/ (adapter_config.json, adapter_model.safetensors: LoRA
on all seven projections, alpha = 2 * rank, f32) and OUT_DIR/gguf/synthetic-{i}-r{RANK}.gguf
(f32, `convert_lora_to_gguf.py --base` a config-only directory).
"""
import json
import os
import subprocess
import sys

import torch
from safetensors.torch import save_file

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from families_shapes import SHAPES  # noqa: E402

shape_name, out, n, rank, llama_cpp = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), sys.argv[5]
shape = dict(SHAPES[shape_name])
model_type = shape.pop("model_type")
arch = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM"}[model_type]
cfg_dir = os.path.join(out, "config")
os.makedirs(cfg_dir, exist_ok=True)
json.dump({"architectures": [arch], "model_type": model_type, "max_position_embeddings": 8192, "rms_norm_eps": 1e-5,
           "hidden_act": "silu", "torch_dtype": "bfloat16", **shape}, open(os.path.join(cfg_dir, "config.json"), "w"))
h, inter = shape["hidden_size"], shape["intermediate_size"]
head_dim = shape.get("head_dim", h // shape["num_attention_heads"])
q, kv = shape["num_attention_heads"] * head_dim, shape["num_key_value_heads"] * head_dim
dims = {"self_attn.q_proj": (h, q), "self_attn.k_proj": (h, kv), "self_attn.v_proj": (h, kv),
        "self_attn.o_proj": (q, h), "mlp.gate_proj": (h, inter), "mlp.up_proj": (h, inter),
        "mlp.down_proj": (inter, h)}
for i in range(n):
    name = f"synthetic-{i}-r{rank}"
    d = os.path.join(out, "peft", name)
    os.makedirs(d, exist_ok=True)
    g = torch.Generator().manual_seed(1000 + i)
    tensors = {}
    for layer in range(shape["num_hidden_layers"]):
        for mod, (fan_in, fan_out) in dims.items():
            p = f"base_model.model.model.layers.{layer}.{mod}"
            tensors[f"{p}.lora_A.weight"] = torch.randn(rank, fan_in, generator=g) / fan_in ** 0.5
            tensors[f"{p}.lora_B.weight"] = torch.randn(fan_out, rank, generator=g) * 0.01
    save_file(tensors, os.path.join(d, "adapter_model.safetensors"))
    json.dump({"peft_type": "LORA", "r": rank, "lora_alpha": 2 * rank, "lora_dropout": 0.0, "bias": "none",
               "task_type": "CAUSAL_LM", "base_model_name_or_path": cfg_dir,
               "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]},
              open(os.path.join(d, "adapter_config.json"), "w"))
    gguf_dir = os.path.join(out, "gguf")
    os.makedirs(gguf_dir, exist_ok=True)
    subprocess.run([sys.executable, "convert_lora_to_gguf.py", "--base", os.path.abspath(cfg_dir), "--outtype", "f32",
                    "--outfile", os.path.abspath(os.path.join(gguf_dir, name + ".gguf")), os.path.abspath(d)],
                   cwd=llama_cpp, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    print(name)
