"""A random-weight model of a family's smallest real shape, saved as a Hugging Face directory
(bf16) with the families fixture's tokenizer: honest timings without downloading weights.

    python benches/families_shapes.py FAMILY OUT_DIR

Shapes (from the models' own config.json): llama = Llama-3.2-1B, llama3b = Llama-3.2-3B,
qwen2 = Qwen2.5-0.5B,
qwen3 = Qwen3-0.6B, gemma2 = Gemma-2-2B, gemma3 = Gemma-3-1B, phi3 = Phi-3-mini-4k,
mistral = Mistral-7B-v0.3.
"""
import os
import shutil
import sys

import torch
from transformers import AutoConfig, AutoModelForCausalLM

SHAPES = {
    "llama": dict(model_type="llama", hidden_size=2048, num_hidden_layers=16, num_attention_heads=32,
                  num_key_value_heads=8, intermediate_size=8192, vocab_size=128256, tie_word_embeddings=True,
                  rope_theta=500000.0, head_dim=64),
    "llama3b": dict(model_type="llama", hidden_size=3072, num_hidden_layers=28, num_attention_heads=24,
                    num_key_value_heads=8, intermediate_size=8192, vocab_size=128256, tie_word_embeddings=True,
                    rope_theta=500000.0, head_dim=128),
    "qwen2": dict(model_type="qwen2", hidden_size=896, num_hidden_layers=24, num_attention_heads=14,
                  num_key_value_heads=2, intermediate_size=4864, vocab_size=151936, tie_word_embeddings=True,
                  rope_theta=1000000.0),
    "qwen3": dict(model_type="qwen3", hidden_size=1024, num_hidden_layers=28, num_attention_heads=16,
                  num_key_value_heads=8, head_dim=128, intermediate_size=3072, vocab_size=151936,
                  tie_word_embeddings=True, rope_theta=1000000.0),
    "gemma2": dict(model_type="gemma2", hidden_size=2304, num_hidden_layers=26, num_attention_heads=8,
                   num_key_value_heads=4, head_dim=256, intermediate_size=9216, vocab_size=256000,
                   query_pre_attn_scalar=256, sliding_window=4096, attn_logit_softcapping=50.0,
                   final_logit_softcapping=30.0),
    "gemma3": dict(model_type="gemma3_text", hidden_size=1152, num_hidden_layers=26, num_attention_heads=4,
                   num_key_value_heads=1, head_dim=256, intermediate_size=6912, vocab_size=262144,
                   query_pre_attn_scalar=256, sliding_window=512, rope_theta=1000000.0,
                   rope_local_base_freq=10000.0),
    "phi3": dict(model_type="phi3", hidden_size=3072, num_hidden_layers=32, num_attention_heads=32,
                 num_key_value_heads=32, intermediate_size=8192, vocab_size=32064, sliding_window=2047,
                 max_position_embeddings=4096, original_max_position_embeddings=4096),
    "mistral": dict(model_type="mistral", hidden_size=4096, num_hidden_layers=32, num_attention_heads=32,
                    num_key_value_heads=8, intermediate_size=14336, vocab_size=32768, rope_theta=1000000.0,
                    sliding_window=None),
}
FIXTURE = {"llama": "mistral", "llama3b": "mistral"}  # the tokenizer files (all families' fixtures share one)


def main():
    family, out = sys.argv[1], sys.argv[2]
    shape = dict(SHAPES[family])
    model_type = shape.pop("model_type")
    cfg = AutoConfig.for_model(model_type, **shape)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() >= 2:
                p.normal_(0.0, 0.02)
    model.save_pretrained(out)
    src = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests", "fixtures", "families",
                       FIXTURE.get(family, family))
    for f in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copyfile(os.path.join(src, f), os.path.join(out, f))
    print(out, sum(p.numel() for p in model.parameters()))


if __name__ == "__main__":
    main()
