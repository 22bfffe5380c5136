"""
The training loop that the training scripts (train_vae.py, pretrain_lm.py, train_router.py,
train_wm.py, train_agent.py) share, and what goes with it: the common flags, device and
torchrun setup, atomic checkpoints, the progress line.

Each script hands `train()` a model with `compute_loss(batch, step) -> {name: tensor}`
("loss" is the one to minimise; every term is logged), an optimizer, `get_batch(index)`
and `evaluate()`. The loop follows nanoGPT's: warm-up then cosine learning rate (by default;
train_agent.py's phases keep it constant), gradient accumulation, clipping, bf16 autocast
on CUDA only. Distributed runs (torchrun) wrap the
model in PyTorch's DistributedDataParallel, which all-reduces the gradients in buckets while
the backward pass still runs (gloo on CPU, nccl on CUDA).

A run holds its --out-dir (common.lock_out_dir) from before its checks to its end. SIGINT and
SIGTERM end it with one line naming the last intact checkpoint and the command that resumes it
(common.run_cli); SIGTERM, how clusters preempt a job, first saves the steps finished since the
last checkpoint. Neither cuts an optimizer step or a checkpoint in two: they wait for its end.

Exact resume: micro-batch i is a pure function of (seed, i), and the random state (noise,
dropout) is reseeded from (seed, i) before it, so a run resumed from a checkpoint at step k
computes exactly the numbers an uninterrupted run computes from step k on; and N processes
with micro-batch B compute what one process computes with --grad-accum N (the same micro-batches).
"""

import contextlib
import glob
import hashlib
import json
import math
import os
import signal
import time
import warnings
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.nn.parallel import DistributedDataParallel

from common import (Interrupted, UserError, add_machine_args, batch_seed, lock_out_dir, nonneg_float, nonneg_int,
                    note_checkpoint, positive_float, positive_int, release_out_dir, signals_held, standing,
                    write_failure)


def add_common_args(parser, has_model=True, unit="optimizer steps", **defaults):
    """The flags every training script has, with the same names and meanings (has_model False:
    no --model, for a script whose base comes from another checkpoint; unit: what --max-iters
    and --eval-interval count; lr_text: --lr's default in words, where the script sets it later)."""
    d = dict(model="tiny", out_dir="out", max_iters=1000, eval_interval=250, batch_size=16, lr=3e-4,
             warmup_iters=50, grad_accum=1, grad_clip=1.0, weight_decay=0.0, log_interval=10)
    d.update(defaults)
    g = parser.add_argument_group("the run (trainer.py; every training script has these)")
    if has_model:
        g.add_argument("--model", default=d["model"], help="base LM: tiny | tiny-bpe | gpt2 | gpt2-medium | "
                       "gpt2-large | gpt2-xl | mistral | smollm2 | a Hugging Face causal-LM id | a directory saved "
                       f"with save_pretrained | a .gguf file (default: {d['model'] or 'tiny, with --backbone lm'})")
    g.add_argument("--out-dir", default=None, help="where checkpoints go (default: the --resume directory "
                   f"when resuming, else {d['out_dir']})")
    g.add_argument("--max-iters", type=positive_int, default=d["max_iters"], help=f"{unit} (default: %(default)s)")
    g.add_argument("--eval-interval", type=positive_int, default=d["eval_interval"],
                   help=f"evaluate and checkpoint every this many {unit.split()[-1]}, and at the end (default: "
                   "%(default)s)")
    g.add_argument("--batch-size", type=positive_int, default=d["batch_size"], help="sequences per micro-batch per "
                   "process (default: %(default)s)")
    g.add_argument("--lr", type=positive_float, default=d["lr"], help="peak learning rate (default: "
                   f"{d.get('lr_text', '%(default)s')})")
    g.add_argument("--warmup-iters", type=nonneg_int, default=d["warmup_iters"],
                   help="linear lr warm-up steps; cosine decay to lr/10 after (default: %(default)s)")
    g.add_argument("--grad-accum", type=positive_int, default=d["grad_accum"],
                   help="micro-batches per optimizer step (default: %(default)s)")
    g.add_argument("--grad-clip", type=nonneg_float, default=d["grad_clip"], help="clip the gradient norm to this; "
                   "0 turns clipping off (default: %(default)s)")
    g.add_argument("--weight-decay", type=nonneg_float, default=d["weight_decay"], help="AdamW weight decay on "
                   "the weights of linear layers (make_optimizer; default: %(default)s)")
    add_machine_args(g)
    g.add_argument("--seed", type=nonneg_int, default=1337, help="seed for initialisation, data order and noise "
                   "(default: %(default)s)")
    g.add_argument("--log-interval", type=positive_int, default=d["log_interval"], help="print a progress line every "
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


def pick_device(name):
    """--device: auto is cuda when there is a GPU, else cpu."""
    device = name if name != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"--device {device} asked for, but this machine has no CUDA GPU; use --device cpu")
    if device == "mps" and not torch.backends.mps.is_available():
        raise UserError("--device mps asked for, but this machine has no Apple GPU (MPS); use --device cpu")
    return device


def setup(args):
    """Seed, pick the device, join the torchrun process group; resolve --out-dir."""
    rank, world_size = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    device = pick_device(args.device)
    if world_size > 1:
        if device.startswith("cuda"):  # one GPU per process
            device = f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}"
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if device.startswith("cuda") else "gloo")
    if args.out_dir is None:
        args.out_dir = args.default_out_dir if args.resume is None else args.resume
    torch.manual_seed(args.seed)  # the same on every rank, so every rank starts from the same weights
    torch.backends.cuda.matmul.allow_tf32 = True
    return Run(torch.device(device), rank, world_size)


def check_out_dir(args):
    """Hold --out-dir for this run (common.lock_out_dir: a second run into it is refused, an
    unwritable one found now, not at the first checkpoint after minutes of training); then refuse
    to overwrite another run's checkpoint, and remove the temporary files a killed run left."""
    is_main = int(os.environ.get("RANK", 0)) == 0  # torchrun: the main process alone writes
    if is_main:
        lock_out_dir(args.out_dir)
    path = os.path.join(args.out_dir, "ckpt.pt")
    if os.path.exists(path) and os.path.abspath(args.out_dir) != os.path.abspath(args.resume or ""):
        raise UserError(f"{path} already exists; pass --resume {args.out_dir} to continue it, "
                        "or choose another --out-dir")
    if is_main:  # no other run writes here, so these are a killed one's
        for tmp in glob.glob(os.path.join(glob.escape(args.out_dir), "*.pt.tmp")):
            os.remove(tmp)


def open_run(args, kind):
    """Before any slow work: refuse --eval-only without --resume, then hold --out-dir and refuse
    another run's checkpoint in it (check_out_dir); then the checkpoint to continue (None: a fresh run)."""
    if args.eval_only and args.resume is None:
        raise UserError("--eval-only evaluates a checkpoint: pass --resume DIR too")
    if not args.eval_only:
        check_out_dir(args)
    state = load_checkpoint(args.resume, kind, "--resume") if args.resume is not None else None
    if state is not None:
        adopt_config(args, state, TRAIN_KEYS, args.resume, overridable=True)
        if not args.eval_only and state["step"] >= args.max_iters:
            raise UserError(f"the checkpoint in {args.resume} is at step {state['step']} already; give --max-iters "
                            "above it to continue, or --eval-only to evaluate it")
    return state


# -----------------------------------------------------------------------------
# checkpoints
#
# A checkpoint is a dict of tensors and plain types: {"kind", "config", "step", ...}. `kind`
# names the script that wrote it, so a checkpoint given to the wrong script is one clear line.

KINDS = {"vae": "train_vae.py (a text VAE)", "lm": "pretrain_lm.py (a plain LM)",
         "router": "train_router.py (a router)", "wm": "train_wm.py (a world model)",
         "agent": "train_agent.py (an agent and its world model)"}


def save_checkpoint(out_dir, state):
    """Write out_dir/ckpt.pt atomically, with the sha256 of its contents: a crash, a signal or a full
    disk mid-write leaves the old checkpoint intact and no temporary file behind (SIGKILL leaves
    one, which the next run in out_dir removes: check_out_dir)."""
    path = os.path.join(out_dir, "ckpt.pt")
    tmp = os.path.join(out_dir, f"ckpt.{os.getpid()}.pt.tmp")  # one per process
    try:
        with signals_held():
            os.makedirs(out_dir, exist_ok=True)
            with open(tmp, "wb") as f:
                torch.save({**state, "sha256": digest(state)}, f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
            note_checkpoint(out_dir, state.get("step"))
    except BaseException as e:  # a signal held back comes here too, after the checkpoint is whole
        if os.path.exists(tmp):
            os.remove(tmp)
        if isinstance(e, (OSError, RuntimeError)):  # torch's zip writer reports a failed write as a RuntimeError
            raise UserError(f"cannot save {path} ({write_failure(e, out_dir)}); the previous checkpoint is "
                            "unchanged: free some space or choose another --out-dir") from e
        raise


def digest(state):
    """The sha256 of a checkpoint's contents, in order: each key, each tensor's dtype, shape and
    bytes, each plain value's repr. A flipped bit anywhere in them changes it."""
    h = hashlib.sha256()

    def add(value):
        if isinstance(value, torch.Tensor):
            t = value.detach().cpu().contiguous()
            h.update(f"{t.dtype}{tuple(t.shape)}".encode())
            h.update(t.reshape(-1).view(torch.uint8).numpy())  # (numel * element size,) bytes
        elif isinstance(value, dict):
            for k, v in value.items():
                h.update(repr(k).encode())
                add(v)
        elif isinstance(value, (list, tuple)):
            for v in value:
                add(v)
        else:
            h.update(repr(value).encode())

    add({k: v for k, v in state.items() if k != "sha256"})
    return h.hexdigest()


def load_checkpoint(ckpt_dir, kind, flag=None):
    """Load ckpt_dir/ckpt.pt (tensors and plain types only), check its sha256 and that `kind`'s script
    wrote it; flag: the flag that named ckpt_dir, for the errors. A checkpoint from before checkpoints
    had a sha256 loads unchecked."""
    path = os.path.join(ckpt_dir, "ckpt.pt")
    script, to_flag = KINDS[kind].split()[0], "" if flag is None else f" to {flag}"
    if not os.path.isfile(path):
        raise UserError(f"no checkpoint at {path}; pass the --out-dir of an earlier {script} run{to_flag}")
    try:
        with warnings.catch_warnings():  # torch warns, in three lines, before it refuses a plain pickle
            warnings.simplefilter("ignore")
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise UserError(f"cannot read {path} ({type(e).__name__}); it is damaged or not a checkpoint") from e
    stored = state.pop("sha256", None) if isinstance(state, dict) else None
    if stored is not None and stored != digest(state):
        raise UserError(f"{path} is damaged: its contents do not match the sha256 saved with them; resume from "
                        "a copy of it, or start again")
    if not isinstance(state, dict) or not isinstance(state.get("config"), dict) or state.get("kind") not in KINDS:
        raise UserError(f"{path} is a torch file but not a checkpoint of this project; pass the --out-dir of "
                        f"a {script} run{to_flag}")
    if state["kind"] != kind:
        raise UserError(f"{path} was written by {KINDS[state['kind']]}, not by {script}; give it to "
                        f"{KINDS[state['kind']].split()[0]}, or pass the --out-dir of a {script} run{to_flag}")
    note_checkpoint(ckpt_dir, state.get("step"))
    return state


def adopt_config(args, state, keys, path, overridable=False):
    """A resumed run takes these settings from its checkpoint's config unless a flag was given
    (args.explicit, from common.parse). A given flag that differs is an error, every conflict
    listed at once; with overridable (the optimisation settings, TRAIN_KEYS) it wins instead."""
    saved = state["config"]
    conflicts = [k for k in keys if k in args.explicit and k in saved and saved[k] != getattr(args, k)]
    if conflicts and not overridable:
        given = ", ".join(f"--{k.replace('_', '-')} {getattr(args, k)!r} (saved: {saved.get(k)!r})" for k in conflicts)
        raise UserError(f"the checkpoint in {path} was trained with other settings: {given}; drop these flags "
                        "to take the saved values")
    for k in keys:
        if k in saved and k not in args.explicit:
            setattr(args, k, saved[k])


# the optimisation settings a checkpoint records: a resumed run continues with them unless a flag changes one
TRAIN_KEYS = ("seed", "lr", "warmup_iters", "batch_size", "grad_accum", "grad_clip", "weight_decay")


def train_config(args):
    return {k: getattr(args, k) for k in TRAIN_KEYS}


def make_optimizer(model, lr, weight_decay, betas=(0.9, 0.99)):
    """AdamW over the trainable parameters, with one rule for weight decay (IRIS's and minGPT's):
    the weights of linear layers decay (nn.Linear, GPT-2's Conv1D, LoRA's A and B); embedding
    tables, norms and biases do not."""
    decayed = {id(m.weight) for m in model.modules()
               if isinstance(m, nn.Linear) or type(m).__name__ == "Conv1D"}
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": [p for p in params if id(p) in decayed], "weight_decay": weight_decay},
              {"params": [p for p in params if id(p) not in decayed], "weight_decay": 0.0}]
    return torch.optim.AdamW([g for g in groups if g["params"]], lr=lr, betas=betas)


def load_optimizer(optimizer, state_dict):
    """Restore a checkpoint's optimizer state (moments, steps), keeping the weight decay the
    optimizer was made with: this run's --weight-decay, which may differ on resume."""
    decays = [group["weight_decay"] for group in optimizer.param_groups]
    optimizer.load_state_dict(state_dict)
    for group, weight_decay in zip(optimizer.param_groups, decays):
        group["weight_decay"] = weight_decay


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


class LossOf(nn.Module):
    """model.compute_loss as a forward pass, which is what DistributedDataParallel wraps."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, batch, step):
        return self.model.compute_loss(batch, step)


def stop(what, args, run, has_updated=True):
    """A diverged run ends before anything is saved, with what can cause it: float16 (it overflows,
    on a CPU most of all), the learning rate only once the optimizer has updated the weights."""
    if args.dtype == "float16":
        hint = f"float16 overflows{' on a CPU' if run.device.type == 'cpu' else ''}: use --dtype float32 or bfloat16"
    elif not has_updated:
        hint = "it came before any update, so not from --lr: check the data and the model's flags"
    else:
        hint = f"lower --lr (now {args.lr:g}) or keep --grad-clip on"
    raise UserError(f"{what}; stopped before saving (the last checkpoint in {args.out_dir}, if any, is unchanged): "
                    f"{hint}")


def train(model, optimizer, get_batch, evaluate, args, run, start_step=0, save=None, schedule=lr_at):
    """Optimise from start_step to args.max_iters; returns the last evaluation's metrics.

    get_batch(index) -> batch (a dict; "num_tokens" in it feeds the tokens/s figure);
    model.compute_loss(batch, step) -> {"loss": ..., other named terms};
    evaluate() -> {name: float}, run under no_grad on the main process (None: no evaluation);
    save(step) -> None, called on the main process after each evaluation, and on SIGTERM when a step
    finished since the last save (a cluster preempting the job: resuming loses nothing).
    schedule(step, args) -> lr (default: warm-up then cosine); a param group may carry
    "lr_scale" to train at a multiple of it.
    A loss or gradient that is not finite stops the run (UserError) before anything is saved.
    """
    params = [p for group in optimizer.param_groups for p in group["params"]]
    loss_of = LossOf(model)
    if run.world_size > 1:  # every process applies the mean gradient, all-reduced during backward
        loss_of = DistributedDataParallel(loss_of)
    metrics, sums, num_logged, num_tokens = {}, {}, 0, 0
    total_tokens, eval_seconds = 0, 0.0
    t_start = t_log = time.time()
    done = saved = start_step  # the steps finished, and the step last saved
    model.train()
    try:
        for step in range(start_step, args.max_iters):
            for group in optimizer.param_groups:
                group["lr"] = schedule(step, args) * group.get("lr_scale", 1.0)
            for micro in range(args.grad_accum):
                index = (step * args.grad_accum + micro) * run.world_size + run.rank
                torch.manual_seed(batch_seed(args.seed, index))  # noise and dropout: a function of the micro-batch
                batch = get_batch(index)
                should_sync = run.world_size == 1 or micro == args.grad_accum - 1  # all-reduce once per step
                with contextlib.nullcontext() if should_sync else loss_of.no_sync():
                    with run.autocast():
                        terms = loss_of(batch, step)
                    (terms["loss"] / args.grad_accum).backward()
                for k, v in terms.items():
                    sums[k] = sums.get(k, 0.0) + v.item() / args.grad_accum
                num_tokens += batch.get("num_tokens", 0)
                total_tokens += batch.get("num_tokens", 0)
            # after the all-reduce, so that every process sees a non-finite gradient and stops together
            norm = torch.nn.utils.clip_grad_norm_(params, args.grad_clip if args.grad_clip > 0 else math.inf)
            if not (math.isfinite(sums["loss"]) and torch.isfinite(norm)):
                bad = ", ".join(k for k, v in sums.items() if not math.isfinite(v)) or "the gradient alone"
                stop(f"the loss is {sums['loss']:.4g} and the gradient norm {norm.item():.4g} at step {step + 1} "
                     f"(not finite: {bad})", args, run, has_updated=bool(optimizer.state))
            with signals_held():  # a step is taken whole or not at all
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                done = step + 1
            num_logged += 1
            if save is not None:  # the loop whose checkpoints these are: an interrupted run names its step
                standing["step"] = done

            if run.is_main and (done % args.log_interval == 0 or done == args.max_iters):
                now = time.time()
                avg = {k: v / num_logged for k, v in sums.items()}
                eta = (now - t_start) / (done - start_step) * (args.max_iters - done)
                line = f"step {done}/{args.max_iters} | {format_terms(avg)} | lr {schedule(step, args):.2e}"
                line += f" | {num_tokens * run.world_size / (now - t_log):.0f} tok/s" if num_tokens else ""
                line += f" | {(now - t_log) / num_logged:.2f} s/step | eta {format_seconds(eta)}"
                if run.device.type == "cuda":
                    line += f" | peak {torch.cuda.max_memory_allocated(run.device) / 2**30:.2f} GiB"
                print(line, flush=True)
                metrics.update({f"train_{k}": v for k, v in avg.items()})
                sums, num_logged, num_tokens, t_log = {}, 0, 0, now

            if evaluate is not None and (done % args.eval_interval == 0 or done == args.max_iters):
                t_eval = time.time()
                if run.is_main:
                    model.eval()
                    with torch.no_grad():
                        metrics.update(evaluate())
                    model.train()
                    bad = [k for k, v in metrics.items() if isinstance(v, float) and not math.isfinite(v)]
                    if bad:
                        stop(f"{', '.join(bad)} not finite at step {done}", args, run)
                    print(f"eval at step {done} | " + format_terms(
                        {k: v for k, v in metrics.items() if isinstance(v, float) and not k.startswith("train_")}),
                        flush=True)
                    if save is not None:
                        with signals_held():
                            save(done)
                            saved = done
                if run.world_size > 1:
                    dist.barrier()
                t_log += time.time() - t_eval  # the next speed figure leaves evaluation out
                eval_seconds += time.time() - t_eval
    except Interrupted as e:
        if e.signum == signal.SIGTERM and save is not None and run.is_main and done > saved:
            with signals_held():
                save(done)
        raise
    metrics["train_seconds"] = round(time.time() - t_start, 1)  # evaluation included
    metrics["steps"] = args.max_iters
    if total_tokens:  # optimisation alone, all steps of this run
        metrics["train_tokens_per_s"] = round(total_tokens * run.world_size / (time.time() - t_start - eval_seconds), 1)
    return metrics


def finish(run, metrics):
    """The end of a training script: leave the process group and --out-dir; the main process prints
    the metrics as the run's last line, one JSON object."""
    if dist.is_initialized():
        dist.destroy_process_group()
    release_out_dir()
    if run.is_main:
        print(json.dumps(metrics))
