"""
The training loop that train_vae.py and train_wm.py share, and what goes with it: the
common flags, device and torchrun setup, atomic checkpoints, the progress line.

Both scripts hand `train()` a model with `compute_loss(batch, step) -> {name: tensor}`
("loss" is the one to minimise; every term is logged), an optimizer, `get_batch(index)`
and `evaluate()`. The loop follows nanoGPT's: warm-up then cosine learning rate, gradient
accumulation, clipping, bf16 autocast on CUDA only. Distributed runs (torchrun) average
gradients across processes with one all-reduce per parameter: DDP's arithmetic, written
out so it can be read, and enough for the small trainable part of a frozen LM.

Exact resume: a batch is a pure function of (seed, index) and the random state is reseeded
from the step before each update, so a run resumed from a checkpoint at step k computes
exactly the numbers an uninterrupted run computes from step k on.
"""

import argparse
import contextlib
import math
import os
import sys
import time
from dataclasses import dataclass

import torch
import torch.distributed as dist


class UserError(Exception):
    """Bad input (a flag, a file, a checkpoint): reported as one line, exit code 2."""


def run_cli(main):
    """Run a script's main(); a UserError becomes `error: ...` on stderr and exit code 2."""
    try:
        main()
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


def add_common_args(parser, **defaults):
    """The flags both training scripts have, with the same names and meanings."""
    d = dict(model="tiny", out_dir="out", max_iters=1000, eval_interval=250, batch_size=16, lr=3e-4,
             warmup_iters=50, grad_accum=1, grad_clip=1.0, weight_decay=0.0, log_interval=10)
    d.update(defaults)
    g = parser.add_argument_group("shared by train_vae.py and train_wm.py")
    g.add_argument("--model", default=d["model"], help="base LM: tiny | gpt2 | gpt2-medium | gpt2-large | "
                   "gpt2-xl | mistral | a Hugging Face causal-LM id | a directory saved with save_pretrained "
                   "(default: %(default)s)")
    g.add_argument("--out-dir", default=None, help="where checkpoints go (default: the --resume directory "
                   f"when resuming, else {d['out_dir']})")
    g.add_argument("--max-iters", type=int, default=d["max_iters"], help="optimizer steps (default: %(default)s)")
    g.add_argument("--eval-interval", type=int, default=d["eval_interval"],
                   help="evaluate and checkpoint every this many steps, and at the end (default: %(default)s)")
    g.add_argument("--batch-size", type=int, default=d["batch_size"], help="sequences per micro-batch per "
                   "process (default: %(default)s)")
    g.add_argument("--lr", type=float, default=d["lr"], help="peak learning rate (default: %(default)s)")
    g.add_argument("--warmup-iters", type=int, default=d["warmup_iters"],
                   help="linear lr warm-up steps; cosine decay to lr/10 after (default: %(default)s)")
    g.add_argument("--grad-accum", type=int, default=d["grad_accum"],
                   help="micro-batches per optimizer step (default: %(default)s)")
    g.add_argument("--grad-clip", type=float, default=d["grad_clip"], help="clip the gradient norm to this; "
                   "0 turns clipping off (default: %(default)s)")
    g.add_argument("--weight-decay", type=float, default=d["weight_decay"], help="AdamW weight decay on "
                   "matrices (default: %(default)s)")
    g.add_argument("--device", default="auto", help="auto (cuda when available), cpu, cuda, cuda:1, ... "
                   "(default: %(default)s)")
    g.add_argument("--dtype", default="auto", help="base model weights: auto (bf16 on CUDA, fp32 on CPU), "
                   "float32, bfloat16, float16 (default: %(default)s)")
    g.add_argument("--seed", type=int, default=1337, help="seed for initialisation, data order and noise "
                   "(default: %(default)s)")
    g.add_argument("--log-interval", type=int, default=d["log_interval"], help="print a progress line every "
                   "this many steps (default: %(default)s)")
    g.add_argument("--resume", metavar="DIR", default=None, help="continue (or, with --eval-only, evaluate) "
                   "the checkpoint in DIR")
    g.add_argument("--eval-only", action="store_true", help="evaluate the --resume checkpoint, print the "
                   "metrics as JSON and exit")
    parser.set_defaults(default_out_dir=d["out_dir"])
    return parser


# -----------------------------------------------------------------------------
# device and processes


@dataclass
class Run:
    device: torch.device
    rank: int = 0  # this process among world_size (torchrun)
    world_size: int = 1

    @property
    def is_main(self):
        return self.rank == 0

    def autocast(self):
        """bf16 autocast on CUDA; on CPU a no-op (bf16 is slower than fp32 on most CPUs)."""
        if self.device.type == "cuda" and torch.cuda.is_bf16_supported():
            return torch.autocast("cuda", dtype=torch.bfloat16)
        return contextlib.nullcontext()


def setup(args):
    """Seed, pick the device, join the torchrun process group; resolve --out-dir."""
    rank, world_size = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    device = args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"--device {device} asked for, but this machine has no CUDA GPU; use --device cpu")
    if world_size > 1:
        if device == "cuda":
            device = f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}"
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if device.startswith("cuda") else "gloo")
    if args.out_dir is None:
        args.out_dir = args.resume or args.default_out_dir
    torch.manual_seed(args.seed)  # the same on every rank, so every rank starts from the same weights
    torch.backends.cuda.matmul.allow_tf32 = True
    return Run(torch.device(device), rank, world_size)


def check_out_dir(args):
    """Refuse to overwrite another run's checkpoint."""
    path = os.path.join(args.out_dir, "ckpt.pt")
    if os.path.exists(path) and os.path.abspath(args.out_dir) != os.path.abspath(args.resume or ""):
        raise UserError(f"{path} already exists; pass --resume {args.out_dir} to continue it, "
                        "or choose another --out-dir")


# -----------------------------------------------------------------------------
# checkpoints


def save_checkpoint(out_dir, state):
    """Write out_dir/ckpt.pt atomically: a crash mid-write leaves the old checkpoint intact."""
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, "ckpt.pt")
    torch.save(state, path + ".tmp")
    os.replace(path + ".tmp", path)


def load_checkpoint(ckpt_dir, config, must_match):
    """Load ckpt_dir/ckpt.pt (tensors and plain types only) and check it fits this run's config."""
    path = os.path.join(ckpt_dir, "ckpt.pt")
    if not os.path.isfile(path):
        raise UserError(f"no checkpoint at {path}; pass the --out-dir of an earlier run to --resume")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise UserError(f"cannot read {path} ({type(e).__name__}); it is damaged or not a checkpoint") from e
    for key in must_match:
        theirs, ours = state["config"].get(key), config.get(key)
        if theirs != ours:
            flag = "--" + key.replace("_", "-")
            raise UserError(f"checkpoint {path} has {key}={theirs!r} but this run has {key}={ours!r}; "
                            f"pass {flag} {theirs} or resume another checkpoint")
    return state


# -----------------------------------------------------------------------------
# the loop


def lr_at(step, args):
    """Linear warm-up to --lr, then cosine decay to --lr/10 at --max-iters (as nanoGPT)."""
    if step < args.warmup_iters:
        return args.lr * (step + 1) / args.warmup_iters
    progress = min(1.0, (step - args.warmup_iters) / max(1, args.max_iters - args.warmup_iters))
    return args.lr * (0.1 + 0.45 * (1.0 + math.cos(math.pi * progress)))


def format_terms(terms):
    return " ".join(f"{k} {v:.4f}" for k, v in terms.items())


def format_seconds(s):
    return f"{int(s // 3600)}h{int(s % 3600 // 60):02d}m" if s >= 3600 else f"{int(s // 60)}m{int(s % 60):02d}s"


def train(model, optimizer, get_batch, evaluate, args, run, start_step=0, save=None):
    """Optimise from start_step to args.max_iters; returns the last evaluation's metrics.

    get_batch(index) -> batch (a dict; "num_tokens" in it feeds the tokens/s figure);
    model.compute_loss(batch, step) -> {"loss": ..., other named terms};
    evaluate() -> {name: float}, run under no_grad on the main process;
    save(step) -> None, called on the main process after each evaluation.
    A param group may carry "lr_scale" to train at a multiple of the scheduled lr.
    """
    params = [p for group in optimizer.param_groups for p in group["params"]]
    metrics, sums, num_logged, num_tokens = {}, {}, 0, 0
    total_tokens, eval_seconds = 0, 0.0
    t_start = t_log = time.time()
    model.train()
    for step in range(start_step, args.max_iters):
        torch.manual_seed(args.seed * 1_000_003 + step)  # noise and dropout: a function of the step
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, args) * group.get("lr_scale", 1.0)
        for micro in range(args.grad_accum):
            batch = get_batch((step * args.grad_accum + micro) * run.world_size + run.rank)
            with run.autocast():
                terms = model.compute_loss(batch, step)
            (terms["loss"] / args.grad_accum).backward()
            for k, v in terms.items():
                sums[k] = sums.get(k, 0.0) + v.item() / args.grad_accum
            num_tokens += batch.get("num_tokens", 0)
            total_tokens += batch.get("num_tokens", 0)
        if run.world_size > 1:  # DDP by hand: every process applies the mean gradient
            for p in params:
                if p.grad is not None:
                    dist.all_reduce(p.grad, op=dist.ReduceOp.AVG)
        if args.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(params, args.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        num_logged += 1

        done = step + 1
        if run.is_main and (done % args.log_interval == 0 or done == args.max_iters):
            now = time.time()
            avg = {k: v / num_logged for k, v in sums.items()}
            eta = (now - t_start) / (done - start_step) * (args.max_iters - done)
            line = f"step {done}/{args.max_iters} | {format_terms(avg)} | lr {lr_at(step, args):.2e}"
            line += f" | {num_tokens * run.world_size / (now - t_log):.0f} tok/s" if num_tokens else ""
            line += f" | {(now - t_log) / num_logged:.2f} s/step | eta {format_seconds(eta)}"
            if run.device.type == "cuda":
                line += f" | peak {torch.cuda.max_memory_allocated(run.device) / 2**30:.2f} GiB"
            print(line, flush=True)
            metrics.update({f"train_{k}": v for k, v in avg.items()})
            sums, num_logged, num_tokens, t_log = {}, 0, 0, now

        if done % args.eval_interval == 0 or done == args.max_iters:
            t_eval = time.time()
            if run.is_main:
                model.eval()
                with torch.no_grad():
                    metrics.update(evaluate())
                model.train()
                print(f"eval at step {done} | " + format_terms(
                    {k: v for k, v in metrics.items() if isinstance(v, float) and not k.startswith("train_")}),
                    flush=True)
                if save is not None:
                    save(done)
            if run.world_size > 1:
                dist.barrier()
            t_log += time.time() - t_eval  # the next speed figure leaves evaluation out
            eval_seconds += time.time() - t_eval
    metrics["train_seconds"] = round(time.time() - t_start, 1)  # evaluation included
    metrics["steps"] = args.max_iters
    if total_tokens:  # optimisation alone, all steps of this run
        metrics["train_tokens_per_s"] = round(total_tokens * run.world_size / (time.time() - t_start - eval_seconds), 1)
    return metrics


def make_parser(description):
    """An argparse parser whose --help shows the module docstring's commands verbatim."""
    return argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
