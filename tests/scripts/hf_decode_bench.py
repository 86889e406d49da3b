#!/usr/bin/env python3
"""Reference decode-speed benchmark: Hugging Face transformers' Qwen3MoeForCausalLM on CPU.

Loads a flat Qwen3-MoE checkpoint directory (config.json with model_type
"qwen3_moe" plus *.safetensors, optionally sharded with
model.safetensors.index.json; no tokenizer needed -- prompt token ids are
generated deterministically from --seed), runs the prompt once (prefill,
use_cache=True), then runs greedy decode one token at a time by calling the
model's forward directly with past_key_values (no `generate`), so the timed
part is pure KV-cached decode. The first --warmup decode steps are untimed;
the next --tokens steps are timed with time.perf_counter.

Usage:
    python3 tests/scripts/hf_decode_bench.py --model DIR [--dtype bf16|f32]
        [--threads N] [--batch B] [--prompt-len P] [--tokens N]
        [--warmup W] [--seed S] [--attn sdpa|eager]

Output: progress on stderr; exactly one JSON line on stdout:
    {"decode_tok_s": batch*tokens/seconds, "batch": B, "dtype": "bf16",
     "threads": N, "tokens": N, "seconds": ..., "torch": "...",
     "transformers": "...", "attn": "sdpa", "prompt_len": P,
     "prefill_seconds": ..., "step_ms_median": ..., "step_ms_min": ...,
     "decode_tok_s_median": batch/median_step_seconds}
decode_tok_s is the headline figure; the per-step median/min are there because
on a shared 2-core machine other load can swing the mean several-fold.

Exit codes:
    0  success
    1  any other failure, including bad arguments (message on stderr)
    2  checkpoint is not a flat qwen3_moe checkpoint (e.g. a nested Qwen3-Omni one)
    3  torch / transformers not importable ("unavailable" for the caller)

Needs: pip install torch transformers==4.57.3 (CPU is enough).
"""

import argparse
import json
import os
import statistics
import sys
import time

# Measured on a 2-core AVX512/AMX CPU with torch 2.15 / transformers 4.57.3
# (Qwen3-30B-A3B dimensions, short context): "sdpa" and "eager" decode at the
# same speed within noise -- attention is a tiny share of a MoE decode step
# here -- so transformers' own default, "sdpa", is used.
DEFAULT_ATTN = "sdpa"


class _Parser(argparse.ArgumentParser):
    """Usage errors exit 1 (argparse's 2 is reserved for 'not a qwen3_moe checkpoint')."""

    def error(self, message):
        self.print_usage(sys.stderr)
        self.exit(1, f"{self.prog}: error: {message}\n")


def log(msg):
    print(f"[hf_decode_bench] {msg}", file=sys.stderr, flush=True)


def parse_args(argv):
    p = _Parser(
        description="Benchmark HF transformers Qwen3MoeForCausalLM greedy decode speed (tok/s) on CPU."
    )
    p.add_argument("--model", required=True, help="flat qwen3_moe checkpoint directory")
    p.add_argument("--dtype", choices=["bf16", "f32"], default="bf16")
    p.add_argument("--threads", type=int, default=2, help="torch.set_num_threads (default 2)")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--prompt-len", type=int, default=16)
    p.add_argument("--tokens", type=int, default=32, help="timed decode steps")
    p.add_argument("--warmup", type=int, default=2, help="untimed decode steps before timing")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--attn", choices=["sdpa", "eager"], default=DEFAULT_ATTN,
                   help=f"attention implementation (default {DEFAULT_ATTN}, the faster on CPU)")
    a = p.parse_args(argv)
    for name in ("threads", "batch", "prompt_len", "tokens"):
        if getattr(a, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1")
    if a.warmup < 0:
        p.error("--warmup must be >= 0")
    return a


def main(argv=None):
    args = parse_args(argv)

    try:
        import torch
        import transformers
        from transformers import Qwen3MoeForCausalLM
    except Exception as e:  # ImportError, or a broken install raising something else
        print(f"hf_decode_bench: torch/transformers unavailable: {type(e).__name__}: {e}", file=sys.stderr)
        return 3

    cfg_path = os.path.join(args.model, "config.json")
    try:
        with open(cfg_path) as f:
            cfg = json.load(f)
    except Exception as e:
        print(f"hf_decode_bench: cannot read {cfg_path}: {e}", file=sys.stderr)
        return 1
    model_type = cfg.get("model_type")
    if model_type != "qwen3_moe":
        print(
            f"hf_decode_bench: {cfg_path} has model_type={model_type!r}; only flat 'qwen3_moe' "
            "checkpoints are supported (nested Qwen3-Omni etc. are not)",
            file=sys.stderr,
        )
        return 2

    try:
        torch.set_num_threads(args.threads)
        dtype = {"bf16": torch.bfloat16, "f32": torch.float32}[args.dtype]

        # transformers >= 4.56 renamed from_pretrained's `torch_dtype` to `dtype`
        # (the old name still works but warns).
        tv = tuple(int(x) for x in transformers.__version__.split(".")[:2] if x.isdigit())
        dtype_kw = "dtype" if tv >= (4, 56) else "torch_dtype"

        log(f"torch {torch.__version__}, transformers {transformers.__version__}, "
            f"threads {torch.get_num_threads()}, dtype {args.dtype}, attn {args.attn}")
        t0 = time.perf_counter()
        model = Qwen3MoeForCausalLM.from_pretrained(
            args.model, attn_implementation=args.attn, low_cpu_mem_usage=True, **{dtype_kw: dtype}
        )
        model.eval()
        vocab = model.config.vocab_size
        log(f"loaded {args.model} in {time.perf_counter() - t0:.1f}s: "
            f"{model.config.num_hidden_layers} layers, hidden {model.config.hidden_size}, "
            f"{model.config.num_experts} experts top-{model.config.num_experts_per_tok}, vocab {vocab}")

        gen = torch.Generator().manual_seed(args.seed)
        prompt = torch.randint(0, vocab, (args.batch, args.prompt_len), generator=gen, dtype=torch.long)

        with torch.inference_mode():
            t0 = time.perf_counter()
            out = model(input_ids=prompt, use_cache=True, logits_to_keep=1)
            prefill_s = time.perf_counter() - t0
            past = out.past_key_values
            next_ids = out.logits[:, -1, :].argmax(dim=-1, keepdim=True)
            log(f"prefill batch {args.batch} x {args.prompt_len} tokens: {prefill_s:.3f}s")

            total = args.warmup + args.tokens
            timed_s = 0.0
            step_s = []
            for step in range(total):
                t0 = time.perf_counter()
                out = model(input_ids=next_ids, past_key_values=past, use_cache=True)
                past = out.past_key_values
                next_ids = out.logits[:, -1, :].argmax(dim=-1, keepdim=True)
                dt = time.perf_counter() - t0
                if step >= args.warmup:
                    timed_s += dt
                    step_s.append(dt)
                done = step + 1
                if done == args.warmup or done == total or done % 8 == 0:
                    log(f"decode step {done}/{total} ({'warmup' if step < args.warmup else 'timed'}) "
                        f"last {dt * 1000:.1f} ms")

        tok_s = args.batch * args.tokens / timed_s
        med_s = statistics.median(step_s)
        log(f"decode: {args.batch * args.tokens} tokens in {timed_s:.3f}s = {tok_s:.2f} tok/s "
            f"(median step {med_s * 1000:.1f} ms, min {min(step_s) * 1000:.1f} ms)")
        print(json.dumps({
            "decode_tok_s": tok_s,
            "batch": args.batch,
            "dtype": args.dtype,
            "threads": args.threads,
            "tokens": args.tokens,
            "seconds": timed_s,
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "attn": args.attn,
            "prompt_len": args.prompt_len,
            "prefill_seconds": prefill_s,
            # per-step figures: less sensitive to other load on the machine
            "step_ms_median": med_s * 1000,
            "step_ms_min": min(step_s) * 1000,
            "decode_tok_s_median": args.batch / med_s,
        }), flush=True)
        return 0
    except Exception as e:
        print(f"hf_decode_bench: failed: {type(e).__name__}: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
