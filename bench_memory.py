"""
The memory of BigVAE's recipe on Mistral-7B: one training step of a Mistral-shaped VAE (random
weights, BigVAE's adapters and head) in each memory mode of offload.py, its peak GPU memory and
time against offload.estimate_memory's estimate, printed as one JSON line (bench.py measures speed).

    python bench_memory.py mistral-memory --batch-size 4 --block-size 128 --steps 3
                                        # GPU: bf16, 8-bit, 8-bit + checkpointing, 8-bit + offload, bf16 + offload
    python bench_memory.py mistral-memory --batch-size 4 --block-size 128 --steps 3 --scaled-down --device cpu
                                        # the same code on a small Mistral config, on a CPU
    python bench_memory.py mistral-estimate --batch-size 4 --block-size 128
                                        # the estimate alone for the 7B VAE (meta device, any machine)
"""

import contextlib
import gc
import json
import statistics
import sys
import time

import torch

import lm
import lora
import offload
from common import make_parser, parse, positive_int, run_cli
from trainer import pick_device
from vae import VAE, VAEConfig

# Mistral-7B-v0.1's config.json, and a small stand-in with its architecture for CPUs.
MISTRAL_7B = dict(vocab_size=32000, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                  num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=32768,
                  rms_norm_eps=1e-5, rope_theta=10000.0, sliding_window=4096)
MISTRAL_SCALED_DOWN = dict(MISTRAL_7B, vocab_size=1000, hidden_size=256, intermediate_size=896,
                           num_hidden_layers=4, num_attention_heads=8, num_key_value_heads=2)
# name: (8-bit weights, per-layer activation checkpointing (offload.py), offload)
MEMORY_MODES = {"bf16": (False, False, False), "8bit": (True, False, False), "8bit+checkpoint": (True, True, False),
                "8bit+offload": (True, False, True), "bf16+offload": (False, False, True)}


def quantize_8bit(model):
    """Replace the decoder layers' nn.Linear with bitsandbytes 8-bit layers, quantizing the
    weights in place (what from_pretrained(..., load_in_8bit) does while loading)."""
    import bitsandbytes as bnb

    for layer in offload.decoder_layers(model):
        for name, module in list(layer.named_modules()):
            if isinstance(module, torch.nn.Linear):
                CB, SCB, _ = bnb.functional.int8_vectorwise_quant(module.weight.data.to(torch.float16))
                q = bnb.nn.Linear8bitLt(module.in_features, module.out_features, bias=module.bias is not None,
                                        has_fp16_weights=False, device=module.weight.device)
                q.weight = bnb.nn.Int8Params(CB, requires_grad=False, has_fp16_weights=False, CB=CB, SCB=SCB)
                parent, _, child = name.rpartition(".")
                setattr(layer.get_submodule(parent), child, q)


def mistral_vae(kw, dtype, device, should_quantize=False):
    """A VAE with BigVAE's adapters (r 32, alpha 8, all 7 projections) and head over a Mistral-shaped
    base of config kw, random weights built straight on device (no download, no CPU init; the meta
    device: no memory at all, which is what offload.estimate_memory reads); only the adapters and
    the head train. should_quantize: 8-bit decoder layers (before the adapters wrap them)."""
    transformers = lm.import_transformers()
    with torch.device(device):
        base = transformers.AutoModelForCausalLM.from_config(transformers.MistralConfig(**kw), dtype=dtype)
    if should_quantize:
        quantize_8bit(base)
    with torch.device(device):
        vae = VAE(base, VAEConfig())
    lora.mark_only_lora_trainable(base)
    return vae


def vae_step_measurement(kw, mode, device, steps, batch_size, block_size):
    """A random Mistral-shaped VAE in `mode`: seconds per training step and peak memory."""
    is_8bit, should_checkpoint, should_offload = MEMORY_MODES[mode]
    cuda = device.type == "cuda"
    torch.manual_seed(0)
    vae = mistral_vae(kw, torch.bfloat16 if cuda else torch.float32, device, is_8bit)
    base = vae.base
    tokens = batch_size * block_size * 2  # the encoder reads the span, the decoder writes it
    estimate = offload.estimate_memory(base, tokens, should_checkpoint, should_offload,
                                       offload.activation_bytes(device), offload.outside(vae, base))
    if should_offload:
        offload.offload_layers(base, device)
    if should_checkpoint:
        offload.checkpoint_layers(base)
    vae.train()
    optimizer = torch.optim.AdamW([p for p in vae.parameters() if p.requires_grad], lr=1e-4, betas=(0.9, 0.99))
    ids = torch.randint(0, kw["vocab_size"], (batch_size, block_size), device=device)
    batch = {"input_ids": ids, "target_ids": ids}
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if cuda else contextlib.nullcontext()

    def step():
        with autocast:
            loss = vae.compute_loss(batch, step=10**6)["loss"]  # full noise and KL weight
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if cuda:
            torch.cuda.synchronize()

    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    step()  # warm-up (allocates the optimizer state)
    times = []
    for _ in range(steps):  # step() waits for the GPU's work to end
        t = time.perf_counter()
        step()
        times.append(time.perf_counter() - t)
    seconds = statistics.median(times)
    gib = 2**30
    return {"s_per_step": round(seconds, 3),
            "peak_gib": round(torch.cuda.max_memory_allocated() / gib, 2) if cuda else None,
            "estimate_gib": round(estimate["total"] / gib, 2)}


def bench_mistral_memory(args):
    device = args.device
    kw = MISTRAL_SCALED_DOWN if args.scaled_down else MISTRAL_7B
    # the first mode, bf16 (fp32 on a CPU), needs the most: refused here if it cannot fit, before it is built
    biggest = mistral_vae(kw, torch.bfloat16 if device.type == "cuda" else torch.float32, "meta")
    offload.check_memory(biggest.base, device, args.batch_size * args.block_size * 2,
                         f"--batch-size (now {args.batch_size}), or add --scaled-down",
                         others=offload.outside(biggest, biggest.base))
    results = {}
    for mode in MEMORY_MODES:
        results[mode] = vae_step_measurement(kw, mode, device, args.steps, args.batch_size, args.block_size)
        print(mode, results[mode], file=sys.stderr, flush=True)
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return {"bench": "mistral-memory", "config": "scaled-down" if args.scaled_down else "Mistral-7B-v0.1",
            "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
            "weights_dtype": "bfloat16" if device.type == "cuda" else "float32", "lora": "r 32 on q,k,v,o,gate,up,down",
            "batch": [args.batch_size, args.block_size], **results,
            "offload_slowdown_8bit": round(results["8bit+offload"]["s_per_step"] / results["8bit"]["s_per_step"], 2),
            "offload_slowdown_bf16": round(results["bf16+offload"]["s_per_step"] / results["bf16"]["s_per_step"], 2)}


def bench_mistral_estimate(args):
    """offload.estimate_memory for a Mistral-7B VAE in bf16 (on the meta device: any machine)."""
    vae = mistral_vae(MISTRAL_7B, torch.bfloat16, "meta")
    tokens = args.batch_size * args.block_size * 2
    out = {"bench": "mistral-estimate", "batch": [args.batch_size, args.block_size]}
    for mode, should_checkpoint, should_offload in (("bf16", False, False), ("bf16+checkpoint", True, False),
                                                    ("bf16+offload", False, True)):
        e = offload.estimate_memory(vae.base, tokens, should_checkpoint, should_offload,
                                    others=offload.outside(vae, vae.base))
        out[mode] = {"weights_gib": round(e["weights"] / 2**30, 2), "optimizer_gib": round(e["optimizer"] / 2**30, 2),
                     "activations_mib_per_token": round(e["activations"] / tokens / 2**20, 3),
                     "total_gib": round(e["total"] / 2**30, 2)}
    return out


BENCHMARKS = {"mistral-estimate": bench_mistral_estimate, "mistral-memory": bench_mistral_memory}


def parse_args(argv=None):
    parser = make_parser(__doc__)
    parser.add_argument("name", choices=sorted(BENCHMARKS), help="mistral-memory: measure each mode; "
                        "mistral-estimate: the estimate alone")
    parser.add_argument("--steps", type=positive_int, default=3, help="timed training steps per mode (default: "
                        "%(default)s)")
    parser.add_argument("--batch-size", type=positive_int, default=4, help="sequences per batch (default: "
                        "%(default)s)")
    parser.add_argument("--block-size", type=positive_int, default=128, help="tokens per sequence (default: "
                        "%(default)s)")
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"], help="mistral-memory: auto "
                        "(cuda when available), cpu or cuda (default: %(default)s)")
    parser.add_argument("--scaled-down", action="store_true", help="mistral-memory: a small Mistral config, "
                        "to run the same code on a CPU")
    return parse(parser, argv)


def main(argv=None):
    args = parse_args(argv)
    args.device = torch.device(pick_device(args.device))  # --device cuda without a GPU: one line
    print(json.dumps(BENCHMARKS[args.name](args)))


if __name__ == "__main__":
    run_cli(main)
