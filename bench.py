"""
Benchmarks, measured side by side in one run and printed as one JSON line each (like
nanoGPT's bench.py). Speed never goes in the tests; it goes here.

    python bench.py lora                # our LoRA vs peft's: training step; merged vs base forward
    python bench.py lora --steps 3      # a quicker, noisier look

Times are medians over steps that alternate between the contenders, so a machine that
slows down or speeds up mid-run affects both alike.
"""

import argparse
import json
import statistics
import time

import torch
from transformers import GPT2Config, GPT2LMHeadModel

import lora


def timed(fn):
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def alternate(contenders, steps, warmup=1):
    """Median seconds per call of each fn in {name: fn}, calling them in turn."""
    for fn in contenders.values():
        for _ in range(warmup):
            fn()
    times = {name: [] for name in contenders}
    for _ in range(steps):
        for name, fn in contenders.items():
            times[name].append(timed(fn))
    return {name: statistics.median(ts) for name, ts in times.items()}


def gpt2_small(seed=0):
    torch.manual_seed(seed)
    return GPT2LMHeadModel(GPT2Config()).eval()  # GPT-2 small's shape (124M), random weights


def training_step(model, ids):
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)

    def step():
        model(ids, labels=ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def bench_lora(args):
    import peft

    r, alpha, targets = 8, 16, lora.DEFAULT_TARGETS["gpt2"]
    ids = torch.randint(0, 50257, (args.batch_size, args.block_size))
    ours = gpt2_small()
    lora.add_adapter(ours, "default", r=r, alpha=alpha)
    lora.mark_only_lora_trainable(ours)
    lora.set_adapter(ours, "default")
    theirs = peft.get_peft_model(gpt2_small(), peft.LoraConfig(r=r, lora_alpha=alpha, target_modules=targets,
                                                                fan_in_fan_out=True))
    train = alternate({"ours": training_step(ours, ids), "peft": training_step(theirs, ids)}, args.steps)

    base = gpt2_small()
    lora.merge(ours)

    def forward(model):
        def fn():
            with torch.no_grad():
                model(ids)
        return fn

    infer = alternate({"merged": forward(ours), "base": forward(base), "peft_unmerged": forward(theirs)},
                      args.steps)
    return {
        "bench": "lora", "model": "gpt2-small shape (random init)", "batch": [args.batch_size, args.block_size],
        "rank": r, "targets": targets, "threads": torch.get_num_threads(),
        "train_step_s_ours": round(train["ours"], 4), "train_step_s_peft": round(train["peft"], 4),
        "train_step_ratio_ours_over_peft": round(train["ours"] / train["peft"], 3),
        "forward_s_merged": round(infer["merged"], 4), "forward_s_base": round(infer["base"], 4),
        "forward_ratio_merged_over_base": round(infer["merged"] / infer["base"], 3),
        "forward_ratio_peft_unmerged_over_base": round(infer["peft_unmerged"] / infer["base"], 3),
    }


BENCHMARKS = {"lora": bench_lora}

if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("name", choices=sorted(BENCHMARKS), help="which benchmark to run")
    parser.add_argument("--steps", type=int, default=8, help="timed calls per contender (default: %(default)s)")
    parser.add_argument("--batch-size", type=int, default=8, help="sequences per batch (default: %(default)s)")
    parser.add_argument("--block-size", type=int, default=64, help="tokens per sequence (default: %(default)s)")
    args = parser.parse_args()
    print(json.dumps(BENCHMARKS[args.name](args)))
