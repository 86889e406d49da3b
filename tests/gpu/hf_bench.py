"""The peer of tests/gpu/bench.sh: Hugging Face transformers (the device machine's, v5) running
Qwen3-MoE at the Qwen3-30B-A3B / Qwen3-Omni thinker text shape with random bf16 weights on the
GPU, with its fastest experts backend (grouped_mm). Prints batch-1 and batch-32 greedy decode
tokens/s (after a 16-token prompt) and 512-token prefill tokens/s, the last line as JSON."""

import argparse
import json
import time

import torch
import transformers
from transformers import DynamicCache, Qwen3MoeConfig, Qwen3MoeForCausalLM

p = argparse.ArgumentParser()
p.add_argument("--layers", type=int, default=48)
p.add_argument("--quick", action="store_true")
args = p.parse_args()

cfg = Qwen3MoeConfig(
    vocab_size=151936, hidden_size=2048, intermediate_size=6144, moe_intermediate_size=768,
    num_hidden_layers=args.layers, num_attention_heads=32, num_key_value_heads=4, head_dim=128,
    num_experts=128, num_experts_per_tok=8, norm_topk_prob=True, decoder_sparse_step=1,
    max_position_embeddings=32768, rope_theta=1e6, rms_norm_eps=1e-6, tie_word_embeddings=False,
)
torch.manual_seed(0)
torch.set_default_dtype(torch.bfloat16)
with torch.device("cuda"):
    model = Qwen3MoeForCausalLM(cfg)
model.eval()
experts = "default"
if hasattr(model, "set_experts_implementation"):
    model.set_experts_implementation("grouped_mm")
    experts = "grouped_mm"


@torch.inference_mode()
def decode(batch, warm, steps):
    ids = torch.randint(0, cfg.vocab_size, (batch, 16), device="cuda")
    cache = DynamicCache(config=cfg)
    out = model(input_ids=ids, past_key_values=cache, use_cache=True, logits_to_keep=1)
    nxt = out.logits[:, -1].argmax(-1, keepdim=True)
    for i in range(warm + steps):
        if i == warm:
            torch.cuda.synchronize()
            t = time.perf_counter()
        out = model(input_ids=nxt, past_key_values=out.past_key_values, use_cache=True, logits_to_keep=1)
        nxt = out.logits[:, -1].argmax(-1, keepdim=True)
    torch.cuda.synchronize()
    return batch * steps / (time.perf_counter() - t)


@torch.inference_mode()
def prefill(n, rounds):
    ids = torch.randint(0, cfg.vocab_size, (1, n), device="cuda")
    best = float("inf")
    for _ in range(rounds):
        torch.cuda.synchronize()
        t = time.perf_counter()
        model(input_ids=ids, use_cache=False, logits_to_keep=1)
        torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t)
    return n / best


b1 = decode(1, 4, 8 if args.quick else 32)
b32 = decode(32, 2, 3 if args.quick else 12)
pf = prefill(512, 2 if args.quick else 4)
print(f"transformers {transformers.__version__} ({experts}): b1 {b1:.1f} tok/s, b32 {b32:.1f} tok/s, prefill 512 {pf:.0f} tok/s")
print(json.dumps({
    "transformers": transformers.__version__, "experts": experts, "layers": args.layers,
    "gpu": torch.cuda.get_device_name(0),
    "decode_tok_s_b1": b1, "decode_tok_s_b32": b32, "prefill_tok_s_512": pf,
}))
