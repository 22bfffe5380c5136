"""
Train a text VAE (vae.py) on a base LM, evaluate it on held-out text, and use it.

    python train_vae.py                               # tiny model, offline corpus, CPU: ~20 minutes
    python train_vae.py --model gpt2                  # GPT-2 small, frozen, + two LoRA adapters (GPU)
    python train_vae.py --model gpt2 --data my.txt    # your own UTF-8 text file
    python train_vae.py --eval-only --resume out-vae [--data FILE]
    python train_vae.py --resume out-vae --reconstruct "Return the sum of a and b."
    python train_vae.py --resume out-vae --interpolate "Return a list." "Close the file."
    python train_vae.py --resume out-vae --sample 4
    torchrun --nproc_per_node=2 train_vae.py          # data parallel (gloo on CPU, nccl on CUDA)

The faithful recipe (a frozen *pretrained* base) offline, where no weights can be downloaded:
    python train_vae.py --objective lm --out-dir out-lm    # pretrain tiny as a plain LM
    python train_vae.py --model out-lm/base --out-dir out-vae-frozen

Data: --data FILE (one document per line, or paragraphs separated by blank lines), or by
default the docstrings of this Python's standard library, read from its installed source
files at run time (nothing downloaded, no text shipped). Every 10th document is held out.
Windows of 2 x --context tokens: the first half is `prefix_ids`, the second the span that is
encoded and reconstructed (`input_ids` = `target_ids`); as BigVAE, the prefix is dropped for
half the samples (here per batch, so a batch without it is also shorter and cheaper), and
during the autoencoder phase (--ae-iters) for all: with the prefix in view a small decoder
learns to predict from it and ignores z (README, "What it took").
For `tiny` the base trains too (it has nothing pretrained to protect; --freeze-base stops
it); any other base is frozen and only the adapters and the VAE head train and are saved.
The last line printed is one JSON object of the run's metrics.
"""

import argparse
import ast
import json
import os
import re
import shutil
import sysconfig
import time

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

import lm
import lora
import offload
from trainer import (UserError, add_common_args, check_out_dir, load_checkpoint, make_parser, run_cli,
                     save_checkpoint, setup, train)
from vae import KL_SCHEDULES, POSTERIORS, VAE, VAEConfig, kl_per_dim


def parse_args(argv=None):
    parser = make_parser(__doc__)
    # defaults: the tiny model's 20-minute CPU run (README, "Results")
    add_common_args(parser, model="tiny", out_dir="out-vae", max_iters=10000, eval_interval=1250, batch_size=16,
                    lr=1e-3, warmup_iters=100)
    g = parser.add_argument_group("data")
    g.add_argument("--data", default=None, help="UTF-8 text file, one document per line or paragraphs "
                   "(default: the standard library's docstrings)")
    g.add_argument("--context", type=int, default=64, help="tokens in the encoded span, and in the prefix "
                   "before it (default: %(default)s)")
    g.add_argument("--prefix-drop", type=float, default=0.5, help="share of batches without the prefix "
                   "(BigVAE: half; default: %(default)s)")
    g.add_argument("--eval-batches", type=int, default=8, help="held-out batches per evaluation (default: "
                   "%(default)s)")
    g = parser.add_argument_group("model")
    g.add_argument("--objective", default="vae", choices=["vae", "lm"], help="vae, or lm: train the base as a "
                   "plain next-token LM and save it to OUT_DIR/base for --model (default: %(default)s)")
    g.add_argument("--latent-size", type=int, default=768, help="size of z (default: %(default)s)")
    g.add_argument("--posterior", default="bigvae", choices=POSTERIORS, help="bigvae: N(mu, I); diagonal: "
                   "N(mu, diag(exp(logvar))) (default: %(default)s)")
    g.add_argument("--z-memory", action=argparse.BooleanOptionalAction, default=True, help="also give z to "
                   "every layer as one key/value (Optimus); --no-z-memory is BigVAE's soft token alone (default: on)")
    g.add_argument("--lora-r", type=int, default=32, help="LoRA rank of both adapters (default: %(default)s)")
    g.add_argument("--lora-alpha", type=float, default=8.0, help="LoRA alpha; scale = alpha / r (default: "
                   "%(default)s)")
    g.add_argument("--freeze-base", action="store_true", help="keep tiny's base frozen too (pretrained bases "
                   "always are)")
    offload.add_memory_args(parser)
    g = parser.add_argument_group("noise and KL schedule (vae.py)")
    g.add_argument("--ae-iters", type=int, default=None, help="first steps as a plain autoencoder: z = mu, no "
                   "KL (default: half of --max-iters)")
    g.add_argument("--noise-ramp-iters", type=int, default=None, help="then grow the sampling noise from 0 to "
                   "full over this many steps (default: the rest of the run)")
    g.add_argument("--kl-schedule", default="cosine", choices=KL_SCHEDULES, help="cosine: BigVAE's sin^2 "
                   "warm-up; cyclical: Optimus/AdaVAE cycles; constant (default: %(default)s)")
    g.add_argument("--kl-max", type=float, default=0.01, help="KL weight reached (default: %(default)s)")
    g.add_argument("--kl-iters", type=int, default=None, help="warm-up length (cosine) or cycle length "
                   "(cyclical), after --ae-iters (default: the rest of the run)")
    g.add_argument("--free-bits", type=float, default=0.0, help="KL floor per latent dimension in nats "
                   "(default: off)")
    g.add_argument("--edge-weights", action="store_true", help="BigVAE's loss weights 0.05 / 0.15 on the first "
                   "/ last 8 target tokens")
    g = parser.add_argument_group("use a checkpoint (with --resume DIR)")
    g.add_argument("--reconstruct", metavar="TEXT", nargs="+", help="encode and decode these texts")
    g.add_argument("--interpolate", metavar="TEXT", nargs=2, help="decode points between two texts' z")
    g.add_argument("--interp-mode", default="slerp", choices=["slerp", "lerp"], help="path for --interpolate "
                   "(default: %(default)s)")
    g.add_argument("--interp-steps", type=int, default=5, help="points for --interpolate (default: %(default)s)")
    g.add_argument("--sample", metavar="N", type=int, help="decode N texts from prior samples of z")
    g.add_argument("--temperature", type=float, default=0.0, help="0: greedy; else Gumbel-max sampling at this "
                   "temperature (default: %(default)s)")
    args = parser.parse_args(argv)
    if args.ae_iters is None:
        args.ae_iters = args.max_iters // 2
    rest = max(1, args.max_iters - args.ae_iters)
    if args.noise_ramp_iters is None:
        args.noise_ramp_iters = rest
    if args.kl_iters is None:
        args.kl_iters = rest
    return args


# -----------------------------------------------------------------------------
# data


def stdlib_docstrings():
    """Paragraphs of the docstrings in this Python's standard library sources (~1.4 MB of English)."""
    root, skip = sysconfig.get_paths()["stdlib"], {"test", "tests", "idlelib", "site-packages", "__pycache__"}
    paragraphs = []
    for folder, subfolders, files in os.walk(root):
        subfolders[:] = sorted(d for d in subfolders if d not in skip)
        for name in sorted(f for f in files if f.endswith(".py")):
            try:
                with open(os.path.join(folder, name), encoding="utf-8") as f:
                    tree = ast.parse(f.read())
            except (SyntaxError, UnicodeDecodeError, ValueError):
                continue
            for node in ast.walk(tree):
                if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                    for p in re.split(r"\n\s*\n", ast.get_docstring(node) or ""):
                        p = " ".join(p.split())
                        if len(p) >= 40 and not p.startswith(">>>"):
                            paragraphs.append(p)
    return list(dict.fromkeys(paragraphs))  # drop repeats, keep the order


def read_documents(path):
    """A text file's documents: paragraphs when it has blank lines, else lines."""
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except OSError as e:
        raise UserError(f"cannot read --data {path} ({e.strerror}); give a UTF-8 text file") from e
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise UserError(f"--data {path} is not UTF-8 (bad byte at offset {e.start}); convert it first, "
                        f"e.g. iconv -f latin1 -t utf-8 {path}") from e
    parts = re.split(r"\n\s*\n", text) if re.search(r"\n\s*\n", text.strip()) else text.splitlines()
    docs = [d.strip() for d in parts if d.strip()]
    if not docs:
        raise UserError(f"--data {path} holds no text; give a UTF-8 file with one document per line or "
                        "paragraphs")
    return docs


def split_streams(docs, tokenizer, window, name):
    """Every 10th document held out; each side one token stream with end-of-text between documents."""
    streams = []
    for held_out in (False, True):
        ids = []
        for i, doc in enumerate(docs):
            if (i % 10 == 9) == held_out:
                ids += tokenizer.encode(doc) + [tokenizer.eos_id]
        if len(ids) < window:
            raise UserError(f"{name} is too small: its {'held-out' if held_out else 'training'} part has "
                            f"{len(ids)} tokens, fewer than one window of {window}; give more text in at least "
                            "10 documents (every 10th is held out)")
        streams.append(torch.tensor(ids, dtype=torch.long))
    return streams


def make_batch(stream, starts, context, with_prefix, objective):
    """Windows at `starts` as a batch: the prefix half (when kept) and the span half."""
    windows = torch.stack([stream[s:s + 2 * context] for s in starts.tolist()])  # (B, 2 * context)
    if objective == "lm":
        return {"ids": windows, "num_tokens": windows.numel()}
    span = windows[:, context:]
    batch = {"input_ids": span, "target_ids": span, "num_tokens": span.numel() * (3 if with_prefix else 2)}
    if with_prefix:
        batch["prefix_ids"] = windows[:, :context]
    return batch


def to_device(batch, device):
    return {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}


# -----------------------------------------------------------------------------
# models


class LanguageModel(nn.Module):
    """--objective lm: the base alone as a next-token model (no z, no adapters)."""

    def __init__(self, base):
        super().__init__()
        self.base = base

    def compute_loss(self, batch, step):
        ids = batch["ids"]
        logits = self.base(ids, use_cache=False).logits[:, :-1]  # (B, L - 1, V)
        return {"loss": F.cross_entropy(logits.float().flatten(0, 1), ids[:, 1:].flatten())}


def build(args, run):
    should_train_base = args.objective == "lm" or (args.model == "tiny" and not args.freeze_base)
    base, tokenizer = offload.load_base(args, run.device, should_train_base)
    if args.objective == "lm":
        return LanguageModel(base), tokenizer
    cfg = VAEConfig(latent_size=args.latent_size, posterior=args.posterior, z_memory=args.z_memory,
                    lora_r=args.lora_r, lora_alpha=args.lora_alpha, ae_iters=args.ae_iters,
                    noise_ramp_iters=args.noise_ramp_iters, kl_schedule=args.kl_schedule, kl_max=args.kl_max,
                    kl_iters=args.kl_iters, free_bits=args.free_bits, edge_weights=args.edge_weights,
                    prefix_slots=args.context)
    vae = VAE(base, cfg, tokenizer)
    if not should_train_base:
        lora.mark_only_lora_trainable(base)
    if offload.place_base(base, args, run.device, args.batch_size * 3 * args.context, run.is_main):
        vae.head.to(run.device)  # the base is placed already
    else:
        vae.to(run.device)
    return vae, tokenizer


def saved_state(model, args):
    """What a checkpoint keeps: adapters + head for a pretrained base; everything for tiny or --objective lm."""
    state = model.state_dict()
    if args.model == "tiny" or args.objective == "lm":
        return state
    return lora.without_frozen_base(state, "base.")


# -----------------------------------------------------------------------------
# evaluation


@torch.no_grad()
def evaluate(model, val_batches, args, should_print=True):
    """Held-out metrics: teacher-forced CE and token accuracy with z = mu and with z of another
    example (does z carry the text?), greedy exact match, KL, active units, latent RMS."""
    if args.objective == "lm":
        sums = torch.zeros(2)
        for batch in val_batches:
            ids = batch["ids"]
            logits = model.base(ids, use_cache=False).logits[:, :-1].float()
            sums += torch.tensor([F.cross_entropy(logits.flatten(0, 1), ids[:, 1:].flatten()).item(),
                                  (logits.argmax(-1) == ids[:, 1:]).float().mean().item()])
        return {"val_ce": sums[0].item() / len(val_batches), "val_acc": sums[1].item() / len(val_batches)}
    sums, num_tokens, mus, kls, power, exact, shown = {}, 0, [], [], [], [], []
    for i, batch in enumerate(val_batches):
        target, prefix = batch["target_ids"], batch.get("prefix_ids")
        mu, logvar = model.encode(batch["input_ids"])
        mu, logvar = mu.float(), None if logvar is None else logvar.float()
        mus.append(mu)
        kls.append(kl_per_dim(mu, logvar).sum(-1))
        power.append((mu.pow(2) + (1.0 if logvar is None else logvar.exp())).mean())  # E[z^2] of samples
        for name, z in (("", mu), ("_shuffled", mu.roll(1, 0))):
            logits = model(z, target, prefix).float()
            ce = F.cross_entropy(logits.flatten(0, 1), target.flatten(), reduction="sum")
            sums["ce" + name] = sums.get("ce" + name, 0.0) + ce.item()
            sums["acc" + name] = sums.get("acc" + name, 0.0) + (logits.argmax(-1) == target).sum().item()
        num_tokens += target.numel()
        if i < 2:  # greedy decoding on a batch with and one without the prefix
            greedy = model.generate(mu, target.shape[1], prefix)
            exact += (greedy == target).all(1).tolist()
            shown += list(zip(model.detokenize(target[:2]), model.detokenize(greedy[:2])))[: 3 - len(shown)]
    model.head.latent_rms.fill_(torch.stack(power).mean().sqrt().item())
    metrics = {f"val_{k}": v / num_tokens for k, v in sums.items()}
    metrics.update(val_exact=sum(exact) / len(exact), val_kl=torch.cat(kls).mean().item(),
                   val_active_units=int((torch.cat(mus).var(0) > 0.01).sum().item()),
                   val_latent_rms=model.head.latent_rms.item())
    if should_print:
        for original, reconstruction in shown:
            print(f"  original: {original!r}\n  greedy:   {reconstruction!r}")
    return metrics


# -----------------------------------------------------------------------------
# main


def main(argv=None):
    args = parse_args(argv)
    run = setup(args)
    modes = [m for m in ("reconstruct", "interpolate", "sample") if getattr(args, m)]
    if (modes or args.eval_only) and not args.resume:
        raise UserError(f"--{(modes or ['eval-only'])[0].replace('_', '-')} needs a trained model: "
                        "pass --resume DIR")
    if modes and args.objective == "lm":
        raise UserError(f"--{modes[0]} needs a VAE; an --objective lm run is used as --model DIR/base")
    if not (modes or args.eval_only):
        check_out_dir(args)
    docs = read_documents(args.data) if args.data else stdlib_docstrings()
    config = {k: getattr(args, k) for k in ("model", "objective", "latent_size", "posterior", "z_memory", "lora_r",
                                          "lora_alpha", "freeze_base", "context")}
    state = load_checkpoint(args.resume, config, must_match=list(config)) if args.resume else None
    model, tokenizer = build(args, run)
    train_stream, val_stream = split_streams(docs, tokenizer, 2 * args.context, args.data or "the default corpus")
    if state is not None:
        if set(state["model"]) != set(saved_state(model, args)):
            raise UserError(f"the checkpoint in {args.resume} does not fit this model (other weights saved); "
                            "resume it with the flags it was trained with")
        model.load_state_dict(state["model"], strict=False)  # strict=False: a pretrained base is not saved

    if modes:
        model.eval()
        if args.reconstruct:
            result = {"reconstructions": model.reconstruct(args.reconstruct, args.temperature)}
        elif args.interpolate:
            result = {"interpolation": model.interpolate(*args.interpolate, args.interp_steps, args.interp_mode)}
        else:
            result = {"samples": model.sample_prior(args.sample, args.context, args.temperature)}
        for texts in result.values():
            for t in texts:
                print(t)
        print(json.dumps(result))
        return

    # fixed held-out windows, evenly spread; half the batches keep the prefix
    n, span = args.eval_batches * args.batch_size, 2 * args.context
    starts = torch.linspace(0, len(val_stream) - span, n).long().view(args.eval_batches, args.batch_size)
    val_batches = [to_device(make_batch(val_stream, s, args.context, i % 2 == 0, args.objective), run.device)
                   for i, s in enumerate(starts)]
    if args.eval_only:
        model.eval()
        print(json.dumps({**evaluate(model, val_batches, args), "step": state["step"]}))
        return
    t_start = time.time()

    def evaluate_now():
        minutes = round((time.time() - t_start) / 60, 2)
        return {**evaluate(model, val_batches, args, run.is_main), "minutes": minutes}

    params = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in params if p.dim() >= 2]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": args.weight_decay},
                                   {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}],
                                  lr=args.lr, betas=(0.9, 0.99))
    if state is not None:
        optimizer.load_state_dict(state["optimizer"])

    def get_batch(index):
        g = torch.Generator().manual_seed(args.seed * 1_000_003 + index)
        starts = torch.randint(0, len(train_stream) - span + 1, (args.batch_size,), generator=g)
        step = index // (args.grad_accum * run.world_size)
        # the autoencoder phase never sees a prefix
        with_prefix = step >= args.ae_iters and torch.rand((), generator=g).item() >= args.prefix_drop
        return to_device(make_batch(train_stream, starts, args.context, with_prefix, args.objective), run.device)

    def save(step):
        save_checkpoint(args.out_dir, {"config": config, "step": step, "model": saved_state(model, args),
                                       "optimizer": optimizer.state_dict()})
        if args.objective == "lm":  # the directory --model loads; replaced whole, never half-written
            final, tmp = os.path.join(args.out_dir, "base"), os.path.join(args.out_dir, "base.tmp")
            lm.save_base(model.base, tokenizer, tmp)
            if os.path.isdir(final):
                os.rename(final, final + ".old")
            os.rename(tmp, final)
            shutil.rmtree(final + ".old", ignore_errors=True)

    num_params = sum(p.numel() for p in params)
    if run.is_main:
        print(f"{args.model} ({args.objective}): {num_params:,} trainable parameters, "
              f"{len(train_stream):,} training / {len(val_stream):,} held-out tokens, {run.world_size} process(es)")
    metrics = train(model, optimizer, get_batch, evaluate_now, args, run,
                    start_step=state["step"] if state else 0, save=save)
    if dist.is_initialized():
        dist.destroy_process_group()
    if run.is_main:
        print(json.dumps(metrics))


if __name__ == "__main__":
    run_cli(main)
