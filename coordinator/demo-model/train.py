#!/usr/bin/env python3
"""Train omnishard's demo model: a small Qwen3-Omni-architecture MoE (4 layers, 8 experts, top-2,
interleaved mRoPE) that memorises corpus.txt (our own words) and one ChatML exchange, with a
byte-level BPE tokenizer trained on the same text that includes the ChatML special tokens.

Greedy continuation of any prompt taken from the corpus reproduces the corpus. The script also
writes the reference's greedy outputs (transformers 4.57.3, f32, from the saved weights) to
tests/fixtures/golden/demo.json, so the tests can check the cluster against the reference.

Run from the repository root (CPU, a few minutes):
    python3 -m venv .venv && .venv/bin/pip install -r tests/fixtures/requirements.txt
    .venv/bin/python coordinator/demo-model/train.py
"""

import json
import os
import random
import shutil
import sys

import torch
import transformers
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CHAT = [
    ("Who keeps the ledger?", "The lighthouse keeper of Omnishard Island keeps the ledger."),
    ("What is the first lesson?", "Many small experts, a careful router, and a ledger that tells the truth."),
]
# Prompts whose greedy continuations the tests check (text, number of tokens to generate).
PROMPTS = [("The lighthouse keeper of Omnishard Island", 60), ("When a storm broke the cable", 40)]


def chatml(user, assistant=None):
    text = f"<|im_start|>user\n{user}<|im_end|>\n<|im_start|>assistant\n"
    return text + (f"{assistant}<|im_end|>\n" if assistant is not None else "")


def main():
    if transformers.__version__ != "4.57.3":
        sys.exit(f"need transformers==4.57.3, have {transformers.__version__}")
    from transformers import Qwen3OmniMoeForConditionalGeneration
    from transformers.models.qwen3_omni_moe.configuration_qwen3_omni_moe import Qwen3OmniMoeConfig

    torch.manual_seed(0)
    random.seed(0)
    torch.set_num_threads(2)
    corpus = open(os.path.join(HERE, "corpus.txt")).read().strip()

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=480, special_tokens=SPECIALS, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator([corpus] + [chatml(u, a) for u, a in CHAT], trainer)
    vocab = (tok.get_vocab_size() + 63) // 64 * 64
    eos = [tok.token_to_id("<|im_end|>"), tok.token_to_id("<|endoftext|>")]

    text = dict(
        vocab_size=vocab, hidden_size=128, intermediate_size=256, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=2, head_dim=32, max_position_embeddings=512, rms_norm_eps=1e-6, rope_theta=1e6,
        rope_scaling={"rope_type": "default", "mrope_section": [6, 5, 5], "mrope_interleaved": True},
        num_experts=8, num_experts_per_tok=2, moe_intermediate_size=128, norm_topk_prob=True,
        tie_word_embeddings=False, router_aux_loss_coef=0.01,
    )
    audio = dict(num_mel_bins=16, encoder_layers=1, encoder_attention_heads=2, encoder_ffn_dim=16, d_model=16,
                 output_dim=128, n_window=4, n_window_infer=8, conv_chunksize=8, downsample_hidden_size=8,
                 max_source_positions=64)
    vision = dict(depth=1, hidden_size=16, intermediate_size=16, num_heads=2, patch_size=4, spatial_merge_size=2,
                  temporal_patch_size=2, out_hidden_size=128, num_position_embeddings=16, deepstack_visual_indexes=[0])
    cfg = Qwen3OmniMoeConfig(thinker_config=dict(text_config=text, audio_config=audio, vision_config=vision),
                             enable_audio_output=False)
    model = Qwen3OmniMoeForConditionalGeneration(cfg)
    model.config._attn_implementation = "eager"
    thinker = model.thinker
    thinker.config.text_config._attn_implementation = "eager"
    # transformers 4.57.3 reads this attribute for the load-balancing loss but never sets it.
    thinker.router_aux_loss_coef = text["router_aux_loss_coef"]
    params = list(thinker.model.parameters()) + list(thinker.lm_head.parameters())
    opt = torch.optim.AdamW(params, lr=3e-3, weight_decay=0.0)

    corpus_ids = tok.encode(corpus).ids + [tok.token_to_id("<|endoftext|>")]
    chats = [tok.encode(chatml(u, a)).ids for u, a in CHAT]
    print(f"vocab {vocab}, corpus {len(corpus_ids)} tokens")

    def batch(n):
        """Random crops of the corpus (so prompts from anywhere work), plus the chat samples."""
        length = random.randint(24, min(160, len(corpus_ids)))
        seqs = []
        for _ in range(n):
            start = random.randint(0, len(corpus_ids) - length)
            seqs.append(corpus_ids[start:start + length])
        return [torch.tensor(seqs)] + [torch.tensor([c]) for c in chats]

    steps = 700
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=3e-3, total_steps=steps, pct_start=0.1)
    thinker.train()
    for step in range(steps):
        total = 0.0
        opt.zero_grad()
        for ids in batch(8):
            pos = torch.arange(ids.shape[1]).expand(3, ids.shape[0], -1)
            out = thinker(input_ids=ids, attention_mask=torch.ones_like(ids), position_ids=pos, labels=ids,
                          output_router_logits=True)
            out.loss.backward()
            total += out.loss.item()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        if step % 50 == 0 or step == steps - 1:
            print(f"step {step}: loss {total:.4f}", flush=True)

    shutil.rmtree(os.path.join(HERE, "config.json"), ignore_errors=True)
    for f in os.listdir(HERE):
        if f.endswith(".safetensors") or f in ("model.safetensors.index.json", "config.json",
                                                "generation_config.json", "tokenizer.json"):
            os.remove(os.path.join(HERE, f))
    model.to(torch.bfloat16)
    model.save_pretrained(HERE, safe_serialization=True, max_shard_size="2MB")
    tok.save(os.path.join(HERE, "tokenizer.json"))
    with open(os.path.join(HERE, "generation_config.json"), "w") as f:
        json.dump({"eos_token_id": eos, "pad_token_id": eos[1]}, f, indent=2)

    # The reference's greedy outputs from the weights as saved (bf16), computed in f32.
    ref = Qwen3OmniMoeForConditionalGeneration.from_pretrained(HERE, dtype=torch.float32,
                                                               attn_implementation="eager").eval()

    def greedy(ids, n):
        seq = list(ids)
        with torch.no_grad():
            for _ in range(n):
                inp = torch.tensor([seq])
                h = ref.thinker.model(input_ids=inp, attention_mask=torch.ones_like(inp)).last_hidden_state
                nxt = int(ref.thinker.lm_head(h)[0, -1].argmax())
                seq.append(nxt)
                if nxt in eos:
                    break
        return seq[len(ids):]

    golden = {"prompts": []}
    for prompt, n in PROMPTS:
        ids = tok.encode(prompt).ids
        out = greedy(ids, n)
        text_out = tok.decode(out)
        golden["prompts"].append({"prompt": prompt, "prompt_ids": ids, "greedy_ids": out, "greedy_text": text_out})
        print(f"{prompt!r} -> {text_out!r}")
        assert corpus.startswith(prompt + text_out) or (prompt + text_out) in corpus, "not memorised"
    for user, answer in CHAT:
        ids = tok.encode(chatml(user)).ids
        out = greedy(ids, 40)
        text_out = tok.decode(out)
        golden["prompts"].append({"chat": user, "prompt_ids": ids, "greedy_ids": out, "greedy_text": text_out})
        print(f"chat {user!r} -> {text_out!r}")
        assert text_out.strip() == answer, "chat answer not memorised"
    with open(os.path.join(ROOT, "tests", "fixtures", "golden", "demo.json"), "w") as f:
        json.dump(golden, f, indent=1)


if __name__ == "__main__":
    main()
