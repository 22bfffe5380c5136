"""
The training loop that the training scripts (train_vae.py, pretrain_lm.py, train_router.py,
train_wm.py, train_agent.py) share, and what goes with it: the flags every script has and the
TrainConfig they make, device and torchrun setup, the optimizer, the progress line.
(Checkpoints: checkpoint.py.)

Each script hands `train()` a model with `compute_loss(batch, step) -> {name: tensor}`
("loss" is the one to minimise; every term is logged), an optimizer, `get_batch(index)`
and `evaluate()`. The loop follows nanoGPT's: warm-up then cosine learning rate (by default;
train_agent.py's phases keep it constant), gradient accumulation, clipping, bf16 autocast
on CUDA only. Distributed runs (torchrun) wrap the
model in PyTorch's DistributedDataParallel, which all-reduces the gradients in buckets while
the backward pass still runs (gloo on CPU, nccl on CUDA).

A run holds its --out-dir (checkpoint.check_out_dir) from before its checks to its end. SIGINT and
SIGTERM end it with one line naming the last intact checkpoint and the command that resumes it
(common.run_cli); SIGTERM, how clusters preempt a job, first saves the steps finished since the
last checkpoint. Neither cuts an optimizer step or a checkpoint in two: they wait for its end.

Exact resume: micro-batch i is a pure function of (seed, i), and the random state (noise,
dropout) is reseeded from (seed, i) before it, so a run resumed from a checkpoint at step k
computes exactly the numbers an uninterrupted run computes from step k on; and N processes
with micro-batch B compute what one process computes with --grad-accum N (the same micro-batches).
"""

import contextlib
import json
import math
import os
import signal
import time
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.nn.parallel import DistributedDataParallel

import lora
from common import (Interrupted, UserError, add_machine_args, batch_seed, nonneg_float, nonneg_int, positive_float,
                    positive_int, release_out_dir, seed_int, signals_held, standing)


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
                   help="linear lr warm-up steps; cosine decay to lr/10 after (train_agent.py: the world model's lr stays "
                   "constant after, a frame tokenizer's decays) (default: %(default)s)")
    g.add_argument("--grad-accum", type=positive_int, default=d["grad_accum"],
                   help="micro-batches per optimizer step (default: %(default)s)")
    g.add_argument("--grad-clip", type=nonneg_float, default=d["grad_clip"], help="clip the gradient norm to this; "
                   "0 turns clipping off (default: %(default)s)")
    g.add_argument("--weight-decay", type=nonneg_float, default=d["weight_decay"], help="AdamW weight decay on "
                   "the weights of linear layers (make_optimizer; default: %(default)s)")
    add_machine_args(g)
    g.add_argument("--seed", type=seed_int, default=1337, help="seed for initialisation, data order and noise "
                   "(default: %(default)s)")
    g.add_argument("--log-interval", type=positive_int, default=d["log_interval"], help="print a progress line every "
                   "this many steps (default: %(default)s)")
    g.add_argument("--resume", metavar="DIR", default=None, help="continue (or, with --eval-only, evaluate) "
                   "the checkpoint in DIR")
    g.add_argument("--eval-only", action="store_true", help="evaluate the --resume checkpoint, print the "
                   "metrics as JSON and exit")
    parser.set_defaults(default_out_dir=d["out_dir"])  # common.parse resolves --out-dir with it
    return parser


@dataclass
class TrainConfig:
    """What the loop reads: add_common_args's flags, made once by each script
    (common.config_from(TrainConfig, vars(args))); phases change it with dataclasses.replace."""
    out_dir: str = "out"  # where checkpoints go (for the error that names the last one)
    max_iters: int = 1000  # train up to this step
    eval_interval: int = 250  # evaluate (and save) every this many steps, and at the end
    log_interval: int = 10  # a progress line every this many steps
    batch_size: int = 16  # sequences per micro-batch per process
    grad_accum: int = 1  # micro-batches per optimizer step
    lr: float = 3e-4  # peak learning rate
    warmup_iters: int = 50  # linear warm-up steps, then cosine decay to lr / 10 (lr_at)
    grad_clip: float = 1.0  # clip the gradient norm to this; 0: off
    weight_decay: float = 0.0  # AdamW's, on the weights of linear layers (make_optimizer)
    seed: int = 1337  # micro-batch i and its noise come from (seed, i)
    dtype: str = "auto"  # the base's dtype flag, for the hint when the loss is not finite


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
    if device.startswith("cuda:") and int(device[5:]) >= torch.cuda.device_count():
        raise UserError(f"--device {device} asked for, but this machine has {torch.cuda.device_count()} CUDA GPU(s), "
                        "numbered from cuda:0")
    if device == "mps" and not torch.backends.mps.is_available():
        raise UserError("--device mps asked for, but this machine has no Apple GPU (MPS); use --device cpu")
    return device


def setup(device_name, seed):
    """Seed, pick the device (--device), join the torchrun process group."""
    rank, world_size = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    device = pick_device(device_name)
    if world_size > 1:
        if device.startswith("cuda"):  # one GPU per process
            device = f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}"
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if device.startswith("cuda") else "gloo")
    torch.manual_seed(seed)  # the same on every rank, so every rank starts from the same weights
    torch.backends.cuda.matmul.allow_tf32 = True
    return Run(torch.device(device), rank, world_size)


def make_optimizer(model, lr, weight_decay, betas=(0.9, 0.99), lr_scales=()):
    """AdamW over the trainable parameters, with one rule for weight decay (IRIS's and minGPT's):
    the weights of linear layers decay (nn.Linear, GPT-2's Conv1D, LoRA's A and B); embedding
    tables, norms and biases do not. lr_scales: (module, scale) pairs whose parameters train at
    scale x the lr (their groups carry "lr_scale", which train() reads)."""
    decayed = {id(m.weight) for m in model.modules() if isinstance(m, nn.Linear) or lora.is_conv1d(m)}
    decayed -= {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}  # a table tied to a Linear
    #                                                         (GPT-2's wte is its lm_head's weight) stays a table
    scale_of = {id(p): scale for module, scale in lr_scales for p in module.parameters()}
    groups = {}  # (no decay, scale) -> params; without scales, the two groups of old in their order
    for p in (p for p in model.parameters() if p.requires_grad):
        groups.setdefault((id(p) not in decayed, scale_of.get(id(p), 1.0)), []).append(p)
    return torch.optim.AdamW([{"params": params, "weight_decay": 0.0 if no_decay else weight_decay,
                               **({"lr_scale": scale} if scale != 1.0 else {})}
                              for (no_decay, scale), params in sorted(groups.items())],
                             lr=lr, betas=betas)


# -----------------------------------------------------------------------------
# the loop


def lr_at(step, config):
    """Linear warm-up to lr, then cosine decay to lr / 10 at max_iters (as nanoGPT)."""
    if step < config.warmup_iters:
        return config.lr * (step + 1) / config.warmup_iters
    progress = min(1.0, (step - config.warmup_iters) / max(1, config.max_iters - config.warmup_iters))
    return config.lr * (0.1 + 0.45 * (1.0 + math.cos(math.pi * progress)))


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


def stop(what, config, run, has_updated=True, flags=("--lr", "--grad-clip")):
    """A diverged run ends before anything is saved, with what can cause it: float16 (it overflows,
    on a CPU most of all), the learning rate only once the optimizer has updated the weights; flags:
    the flags that set this phase's lr and gradient clipping."""
    if config.dtype == "float16":
        hint = f"float16 overflows{' on a CPU' if run.device.type == 'cpu' else ''}: use --dtype float32 or bfloat16"
    elif not has_updated:
        hint = f"it came before any update, so not from {flags[0]}: check the data and the model's flags"
    else:
        hint = f"lower {flags[0]} (now {config.lr:g}) or keep {flags[1]} on"
    raise UserError(f"{what}; stopped before saving (the last checkpoint in {config.out_dir}, if any, is unchanged): "
                    f"{hint}")


def train(model, optimizer, get_batch, evaluate, config, run, start_step=0, save=None, schedule=lr_at,
          flags=("--lr", "--grad-clip")):
    """Optimise from start_step to config.max_iters (a TrainConfig); returns the last evaluation's metrics.

    get_batch(index) -> batch (a dict; "num_tokens" in it feeds the tokens/s figure);
    model.compute_loss(batch, step) -> {"loss": ..., other named terms};
    evaluate() -> {name: float}, run under no_grad on the main process (None: no evaluation);
    save(step) -> None, called on the main process after each evaluation, and on SIGTERM when a step
    finished since the last save (a cluster preempting the job: resuming loses nothing).
    schedule(step, config) -> lr (default: warm-up then cosine); a param group may carry
    "lr_scale" to train at a multiple of it.
    A loss or gradient that is not finite stops the run (UserError) before anything is saved; the message
    names `flags`, those that set config.lr and config.grad_clip (a phase with its own: e.g. --ac-lr).
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
        for step in range(start_step, config.max_iters):
            for group in optimizer.param_groups:
                group["lr"] = schedule(step, config) * group.get("lr_scale", 1.0)
            terms_now = {}  # this step's terms, over its micro-batches
            for micro in range(config.grad_accum):
                index = (step * config.grad_accum + micro) * run.world_size + run.rank
                torch.manual_seed(batch_seed(config.seed, index))  # noise and dropout: a function of the micro-batch
                batch = get_batch(index)
                should_sync = run.world_size == 1 or micro == config.grad_accum - 1  # all-reduce once per step
                with contextlib.nullcontext() if should_sync else loss_of.no_sync():
                    with run.autocast():
                        terms = loss_of(batch, step)
                    (terms["loss"] / config.grad_accum).backward()
                for k, v in terms.items():
                    terms_now[k] = terms_now.get(k, 0.0) + v.item() / config.grad_accum
                num_tokens += batch.get("num_tokens", 0)
                total_tokens += batch.get("num_tokens", 0)
            # after the all-reduce, so that every process sees a non-finite gradient and stops together
            norm = torch.nn.utils.clip_grad_norm_(params, config.grad_clip if config.grad_clip > 0 else math.inf)
            if not (math.isfinite(terms_now["loss"]) and torch.isfinite(norm)):
                bad = ", ".join(k for k, v in terms_now.items() if not math.isfinite(v)) or "the gradient alone"
                stop(f"the loss is {terms_now['loss']:.4g} and the gradient norm {norm.item():.4g} at step {step + 1} "
                     f"(not finite: {bad})", config, run, has_updated=bool(optimizer.state), flags=flags)
            for k, v in terms_now.items():
                sums[k] = sums.get(k, 0.0) + v
            with signals_held():  # a step is taken whole or not at all
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                done = step + 1
                if save is not None:  # the loop whose checkpoints these are: an interrupted run names its step
                    standing["step"] = done
            num_logged += 1

            if run.is_main and (done % config.log_interval == 0 or done == config.max_iters):
                now = time.time()
                avg = {k: v / num_logged for k, v in sums.items()}
                eta = (now - t_start) / (done - start_step) * (config.max_iters - done)
                line = f"step {done}/{config.max_iters} | {format_terms(avg)} | lr {schedule(step, config):.2e}"
                line += f" | {num_tokens * run.world_size / (now - t_log):.0f} tok/s" if num_tokens else ""
                line += f" | {(now - t_log) / num_logged:.2f} s/step | eta {format_seconds(eta)}"
                if run.device.type == "cuda":
                    line += f" | peak {torch.cuda.max_memory_allocated(run.device) / 2**30:.2f} GiB"
                print(line, flush=True)
                metrics.update({f"train_{k}": v for k, v in avg.items()})
                sums, num_logged, num_tokens, t_log = {}, 0, 0, now

            if evaluate is not None and (done % config.eval_interval == 0 or done == config.max_iters):
                t_eval = time.time()
                if run.is_main:
                    model.eval()
                    with torch.no_grad():
                        metrics.update(evaluate())
                    model.train()
                    bad = [k for k, v in metrics.items() if isinstance(v, float) and not math.isfinite(v)]
                    if bad:
                        stop(f"{', '.join(bad)} not finite at step {done}", config, run, flags=flags)
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
    metrics["steps"] = config.max_iters
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
