"""
Train BigVAE's router (router.py) on a finished, frozen text VAE (train_vae.py's checkpoint),
then measure how far guided generation steers toward a latent and what it costs in fluency.

    python pretrain_lm.py --model tiny-bpe --block-size 48 --max-iters 3000 --out-dir out-lm-bpe   # an LM (6 min)
    python train_vae.py --model out-lm-bpe/base --lr 1e-3 --context 24 --z-memory 8 --max-iters 4000 \
        --out-dir out-vae-lm
    python train_router.py --vae out-vae-lm                    # the router, CPU: 6 min on one core
    python train_router.py --vae out-vae-lm --resume out-router --eval-only
    python train_router.py --vae out-vae-gpt2 --lr 1e-4 --out-dir out-router-gpt2   # a pretrained base (GPU)
    python sample.py --resume out-vae-lm --router out-router --guide "Return the" --target "Close the file."

The data are train_vae.py's windows with the prefix always kept: the prefix is the context,
the span the next text, z ~ q(z | span). The base LM to guide against is the VAE's base with
no adapter, so the VAE's base must be a frozen pretrained --model (e.g. tiny pretrained by
pretrain_lm.py, out-lm/base): tiny itself is random, trained with the VAE or frozen.
Evaluation, on held-out (context, next span) pairs: teacher-forced accuracy of the real next
span given context and its z* (router) vs context alone (base) and vs another pair's z; and
the steering sweep (at the end and with --eval-only): one span generated per pair at each
--scales value (0 = the base alone), its encoding's cosine similarity to z*, and the base
LM's NLL per token of what was generated (fluency), each a mean with its 95% interval.
The last line printed is one JSON object of the run's metrics.
"""

import json
import math
import os
import time

import torch
import torch.nn.functional as F

import peft_layout
import textdata
from checkpoint import TRAIN_KEYS, adopt_config, load_optimizer, open_run, save_checkpoint
from common import TINY_MODELS, at_least_2, batch_seed, config_from, make_parser, nonneg_float, parse, run_cli
from offload import MemoryConfig
from router import load_router
from trainer import TrainConfig, add_common_args, finish, make_optimizer, setup, train
from vae_eval import token_log_probs


def parse_args(argv=None):
    parser = make_parser(__doc__)
    parser.add_argument("--vae", metavar="DIR", required=True, help="the --out-dir of the train_vae.py run to "
                        "steer with (its base must be frozen)")
    add_common_args(parser, has_model=False, out_dir="out-router", max_iters=2000, eval_interval=500, batch_size=16,
                    lr=1e-3, warmup_iters=50)
    textdata.add_data_args(parser)
    g = parser.add_argument_group("steering sweep (router.py)")
    g.add_argument("--scales", type=nonneg_float, nargs="+", default=[0.0, 1.0, 1.25, 2.0, 4.0],
                   help="guidance scales to generate at; 0 is the base alone (BigVAE: 1.25; default: %(default)s)")
    g.add_argument("--temperature", type=nonneg_float, default=0.7, help="sampling temperature of the sweep "
                   "(0: greedy; default: %(default)s)")
    g.add_argument("--sweep-pairs", type=at_least_2, default=64, help="held-out (context, span) pairs in the "
                   "sweep, at least 2 for its intervals (default: %(default)s)")
    return parse(parser, argv)


def mean_interval(values):
    """Mean and half-width of its 95% interval (normal approximation): (mean, half)."""
    v = torch.tensor(values, dtype=torch.float64)
    return v.mean().item(), 1.96 * v.std().item() / math.sqrt(len(v))  # --sweep-pairs: at least 2 values


@torch.no_grad()
def evaluate(router, val_batches):
    """Teacher-forced: the real next span given context and z* (router), context alone (base LM),
    context and another pair's z (router, shuffled)."""
    sums, num_tokens = {}, 0
    for batch in val_batches:
        target, context = batch["target_ids"], batch["prefix_ids"]
        mu, _ = router.vae.encode(target)
        for name, logits in (("router", router(mu, target, context)), ("base", router.vae.base_logits(target, context)),
                             ("shuffled", router(mu.roll(1, 0), target, context))):
            sums[f"val_ce_{name}"] = sums.get(f"val_ce_{name}", 0.0) - token_log_probs(logits, target).sum().item()
            sums[f"val_acc_{name}"] = sums.get(f"val_acc_{name}", 0.0) + (logits.argmax(-1) == target).sum().item()
        num_tokens += target.numel()
    return {k: v / num_tokens for k, v in sums.items()}


@torch.no_grad()
def sweep(router, batch, scales, temperature, seed):
    """One span per pair at each scale: cosine of its encoding to z*, the base's NLL per token of it."""
    target, context = batch["target_ids"], batch["prefix_ids"]
    z_star, _ = router.vae.encode(target)
    results, cosines = {}, {}
    for scale in scales:
        torch.manual_seed(seed)  # the same noise at every scale: the scales differ by guidance alone
        generated = router.generate(context, z_star, 1, target.shape[1], scale, temperature)
        mu, _ = router.vae.encode(generated)
        cosines[scale] = F.cosine_similarity(mu.float(), z_star.float(), dim=-1).tolist()
        nll = (-token_log_probs(router.vae.base_logits(generated, context), generated).mean(-1)).tolist()
        for name, values in (("cosine", cosines[scale]), ("base_nll", nll)):
            results[f"sweep_{name}_s{scale:g}"], results[f"sweep_{name}_s{scale:g}_ci95"] = mean_interval(values)
        if scale != scales[0]:  # paired, against the first scale
            gap = [a - b for a, b in zip(cosines[scale], cosines[scales[0]])]
            results[f"sweep_cosine_gap_s{scale:g}"], results[f"sweep_cosine_gap_s{scale:g}_ci95"] = mean_interval(gap)
    results["sweep_pairs"] = target.shape[0]
    return results


def main(argv=None):
    args = parse_args(argv)
    run = setup(args.device, args.seed)
    state = open_run("router", args.out_dir, args.resume, args.eval_only, args.max_iters)
    if state is not None:
        adopt_config(vars(args), args.explicit, state["config"], TRAIN_KEYS, args.resume, overridable=True)
    # a --data file is read (and a bad one refused) before the base loads; the default corpus, known good, after
    docs = None if args.data is None else textdata.read_documents(args.data)
    router, vae_state, vae_print = load_router(args.vae, run.device, state, args.resume, "--vae",
                                               MemoryConfig(dtype=args.dtype), args.batch_size, run.is_main)
    base_name, context_len = vae_state["config"]["model"], router.vae.cfg.prefix_slots  # the VAE's --model, --context
    tokenizer, span = router.vae.tokenizer, 2 * context_len
    docs = textdata.stdlib_docstrings() if docs is None else docs
    train_stream, val_stream = textdata.split_streams(docs, tokenizer, span,
                                                      "the default corpus" if args.data is None else args.data,
                                                      "a --vae trained with a smaller --context")
    starts = textdata.spread_starts(val_stream, span, args.eval_batches, args.batch_size)
    val_batches = [textdata.to_device(textdata.vae_batch(val_stream, s, context_len, True), run.device) for s in starts]
    sweep_batch = textdata.to_device(textdata.vae_batch(val_stream, textdata.spread_starts(
        val_stream, span, 1, args.sweep_pairs)[0], context_len, True), run.device)

    def evaluate_all():
        router.eval()
        return {**evaluate(router, val_batches), **sweep(router, sweep_batch, args.scales, args.temperature, args.seed)}

    if args.eval_only:
        print(json.dumps({**evaluate_all(), "step": state["step"]}))
        return
    params = router.trained_parameters()
    optimizer = make_optimizer(router, args.lr, args.weight_decay)
    if state is not None:
        load_optimizer(optimizer, state["optimizer"])

    def get_batch(index):
        g = torch.Generator().manual_seed(batch_seed(args.seed, index))
        starts = textdata.random_starts(train_stream, span, args.batch_size, g)
        return textdata.to_device(textdata.vae_batch(train_stream, starts, context_len, True), run.device)

    def save(step):
        config = {**{k: getattr(args, k) for k in TRAIN_KEYS}, "vae": args.vae, "vae_fingerprint": vae_print}
        if base_name not in TINY_MODELS:  # as train_vae.py: the router adapter in peft's layout too, first
            peft_layout.save_peft(router.vae.base, os.path.join(args.out_dir, "peft"), ["router"], base_name)
        save_checkpoint(args.out_dir, {"kind": "router", "config": config, "step": step, "model": router.state(),
                                       "optimizer": optimizer.state_dict()})

    t_start = time.time()
    if run.is_main:
        print(f"router on {base_name}: {sum(p.numel() for p in params):,} trainable parameters, "
              f"{len(train_stream):,} training / {len(val_stream):,} held-out tokens")
    metrics = train(router, optimizer, get_batch, lambda: {**evaluate(router, val_batches),
                    "minutes": round((time.time() - t_start) / 60, 2)}, config_from(TrainConfig, vars(args)), run,
                    0 if state is None else state["step"], save)
    if run.is_main:  # as train_vae.py: the other processes have nothing left to do
        metrics.update(evaluate_all())
    finish(run, metrics)


if __name__ == "__main__":
    run_cli(main)
