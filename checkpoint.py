"""
Checkpoints, and what a run does with them before it trains: hold its --out-dir, read the
checkpoint it continues, take that checkpoint's settings. Every training script uses these.

A checkpoint is OUT_DIR/ckpt.pt, a dict of tensors and plain types: {"kind", "config", "step",
...} and a sha256 of the rest. `kind` names the script that wrote it, so a checkpoint given to the
wrong script is one clear line; `config` holds the flags that made the run, so a resumed run takes
them (adopt_config). Written atomically (temp file + rename), read with weights_only=True: loading
never unpickles arbitrary objects.
"""

import glob
import hashlib
import os
import warnings

import torch

from common import UserError, flag_name, lock_out_dir, note_checkpoint, signals_held, write_failure

# the scripts that write checkpoints, by kind
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


# the optimisation settings a checkpoint records, and the base's --dtype: a resumed run continues with them
# unless a flag changes one (a resume typed without --dtype keeps the --dtype the run was given)
TRAIN_KEYS = ("seed", "lr", "warmup_iters", "batch_size", "grad_accum", "grad_clip", "weight_decay", "dtype")


def adopt_config(flags, explicit, saved, keys, path, overridable=False):
    """A resumed run takes these settings (keys) from its checkpoint's config `saved` into `flags`
    (the parsed flags as a dict, vars(args)) unless the flag was given (`explicit`, from
    common.parse). A given flag that differs is an error, every conflict listed at once; with
    overridable (the optimisation settings, TRAIN_KEYS, and what a run only reads) it wins instead."""
    conflicts = [k for k in keys if k in explicit and k in saved and saved[k] != flags[k]]
    if conflicts and not overridable:
        given = ", ".join(f"{flag_name(k)} {flags[k]!r} (saved: {saved[k]!r})" for k in conflicts)
        raise UserError(f"the checkpoint in {path} was trained with other settings: {given}; drop these flags "
                        "to take the saved values")
    for k in keys:
        if k in saved and k not in explicit:
            flags[k] = saved[k]


def check_out_dir(out_dir, resume):
    """Hold out_dir for this run (common.lock_out_dir: a second run into it is refused, an
    unwritable one found now, not at the first checkpoint after minutes of training); then refuse
    to overwrite another run's checkpoint (one not being resumed), and remove the temporary files a
    killed run left."""
    is_main = int(os.environ.get("RANK", 0)) == 0  # torchrun: the main process alone writes
    if is_main:
        lock_out_dir(out_dir)
    path = os.path.join(out_dir, "ckpt.pt")
    is_resumed_here = resume is not None and os.path.abspath(out_dir) == os.path.abspath(resume)
    if os.path.exists(path) and not is_resumed_here:
        raise UserError(f"{path} already exists; pass --resume {out_dir} to continue it, or choose another --out-dir")
    if is_main:  # no other run writes here, so these are a killed one's
        for tmp in glob.glob(os.path.join(glob.escape(out_dir), "*.pt.tmp")):
            os.remove(tmp)


def open_run(kind, out_dir, resume, eval_only, max_iters):
    """Before any slow work: refuse --eval-only without --resume, then hold out_dir and refuse
    another run's checkpoint in it (check_out_dir); then the checkpoint to continue (None: a fresh
    run), refused when it has reached max_iters already."""
    if eval_only and resume is None:
        raise UserError("--eval-only evaluates a checkpoint: pass --resume DIR too")
    if not eval_only:
        check_out_dir(out_dir, resume)
    if resume is None:
        return None
    state = load_checkpoint(resume, kind, "--resume")
    if not eval_only and state["step"] >= max_iters:
        raise UserError(f"the checkpoint in {resume} is at step {state['step']} already; give --max-iters above it "
                        "to continue, or --eval-only to evaluate it")
    return state


def load_optimizer(optimizer, state_dict):
    """Restore a checkpoint's optimizer state (moments, steps), keeping the weight decay and lr scales
    the optimizer was made with: this run's --weight-decay and --head-lr-scale, which may differ on
    resume. Parameters grouped otherwise than when saved (a scale given or dropped) are refused."""
    made = [{k: group[k] for k in ("weight_decay", "lr_scale") if k in group} for group in optimizer.param_groups]
    sizes = ([len(group["params"]) for group in optimizer.param_groups],
             [len(group["params"]) for group in state_dict["param_groups"]])
    if sizes[0] != sizes[1]:
        raise UserError(f"the checkpoint's optimizer groups its parameters as {sizes[1]}, this run as {sizes[0]}: "
                        "a learning-rate scale (train_vae's --head-lr-scale) was turned on or off (resume without "
                        "it), or the checkpoint trained a tied embedding table before such tables stopped decaying "
                        "(start anew)")
    optimizer.load_state_dict(state_dict)
    for group, kept in zip(optimizer.param_groups, made):
        group.pop("lr_scale", None)
        group.update(kept)
