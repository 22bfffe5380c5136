"""
Small things every file shares, kept free of torch and transformers so that a library
file can import them without the training loop, and a script's --help answers at once:
the one-line error for bad input, the one line an interrupted run ends with, the --out-dir
lock, flag checks, the one seed formula, writing a folder whole.

    from common import UserError, make_parser, parse, positive_int, run_cli
    parser = make_parser(__doc__)
    parser.add_argument("--batch-size", type=positive_int, default=16)
    args = parse(parser, argv)        # args.explicit: the flags given on the command line
    run_cli(main)                      # a UserError becomes `error: ...` and exit code 2
"""

import argparse
import contextlib
import dataclasses
import errno
import fcntl
import math
import os
import re
import shlex
import shutil
import signal
import sys

# the models lm.py builds from a config, with random weights (tiny reads UTF-8 bytes, tiny-bpe GPT-2's
# first lm.TINY_BPE_TOKENS tokens): nothing pretrained, so scripts give them their own CPU defaults
TINY_MODELS = ("tiny", "tiny-bpe")


class UserError(Exception):
    """Bad input (a flag, a file, a checkpoint): reported as one line, exit code 2."""


class Interrupted(BaseException):
    """SIGINT or SIGTERM came (run_cli's handler raises it). A BaseException, as KeyboardInterrupt,
    so that no `except Exception` stops it."""

    def __init__(self, signum):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


SIGNALS = (signal.SIGINT, signal.SIGTERM)


def run_cli(main):
    """Run a script's main(), and end it with one line on stderr, never a traceback: a UserError
    as `error: ...` and exit code 2; SIGINT and SIGTERM as where the run stands and how to resume
    it (interrupted_line), exit code 130 and 143. The --out-dir lock goes with the run."""
    previous = [signal.signal(s, _interrupt) for s in SIGNALS]
    try:
        main()
    except UserError as e:
        _exit(2, f"error: {e}")
    except Interrupted as e:
        _exit(128 + e.signum, interrupted_line(e.signum))
    finally:
        release_out_dir()
        for s, handler in zip(SIGNALS, previous):
            signal.signal(s, handler)


def _exit(code, line):
    for s in SIGNALS:  # a second Ctrl-C must not cut the last line short
        signal.signal(s, signal.SIG_IGN)
    print(line, file=sys.stderr)
    sys.exit(code)


# ----------------------------------------------------------------------------- signals

_holding, _held = 0, []  # the depth of signals_held blocks, and the signals that came during them


def _interrupt(signum, frame):
    if _holding:
        _held.append(signum)
    else:
        raise Interrupted(signum)


@contextlib.contextmanager
def signals_held():
    """Hold SIGINT and SIGTERM back until the block ends (a checkpoint being written, an optimizer
    step), then raise the first that came; if the block fails, its own error goes on instead."""
    global _holding
    _holding += 1
    try:
        yield
    except BaseException:
        _held.clear()  # the block's error ends the run
        raise
    finally:
        _holding -= 1
    if _holding == 0 and _held:
        signum = _held[0]
        _held.clear()
        raise Interrupted(signum)


# ----------------------------------------------------------------------------- the --out-dir of a run

# where this run stands, for the line it ends with if interrupted: its locked --out-dir, the step its
# training loop has finished (None: not in one), the step of the last intact checkpoint in the out-dir
# (None: none there); trainer.py keeps it up to date
standing = {"out_dir": None, "step": None, "saved_step": None}
_lock = None  # the --out-dir this process holds: (its lock file's descriptor, the dir, the dirs it created)


def lock_out_dir(path):
    """Hold path/lock (flock) until the run ends, so that no two runs write one --out-dir; the file
    names the holder's PID for the refusal. The OS lets go of it when the process ends, however it
    ends, so a killed run blocks nothing. Creates path (release_out_dir removes it again if the run
    leaves nothing in it): an unwritable --out-dir is found now, not at the first checkpoint."""
    global _lock
    if _lock is not None and os.path.abspath(_lock[1]) == os.path.abspath(path):
        return  # a second run in this process (tests), after one that ended without releasing it
    release_out_dir()
    new_dirs = missing_dirs(path)
    lock_path = os.path.join(path, "lock")
    while True:
        try:
            os.makedirs(path, exist_ok=True)
            fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:
            raise UserError(f"cannot write to --out-dir {path} ({e.strerror or e}); choose a writable "
                            "directory") from e
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 16).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise UserError(f"another run (PID {holder}) is writing to --out-dir {path}; wait for it to end, "
                            "or choose another --out-dir") from None
        with contextlib.suppress(FileNotFoundError):
            if os.path.samestat(os.fstat(fd), os.stat(lock_path)):
                break
        os.close(fd)  # its holder removed it as it ended, after we opened it: lock the new one
    os.ftruncate(fd, 0)
    os.write(fd, f"{os.getpid()}\n".encode())
    _lock = (fd, path, new_dirs)
    standing.update(out_dir=path, step=None, saved_step=None)


def missing_dirs(path):
    """path and those of its parents that do not exist yet, deepest first."""
    dirs, path = [], os.path.abspath(path)
    while not os.path.lexists(path):
        dirs.append(path)
        path = os.path.dirname(path)
    return dirs


def release_out_dir():
    """Let go of the --out-dir lock, if this process holds one: remove the lock file (while still
    holding it: a run that opened it meanwhile sees it gone and locks a new one), then the dirs
    lock_out_dir created, if the run left nothing in them."""
    global _lock
    if _lock is None:
        return
    (fd, path, new_dirs), _lock = _lock, None
    with contextlib.suppress(FileNotFoundError):  # removed by hand meanwhile
        os.remove(os.path.join(path, "lock"))
    for d in new_dirs:
        if not os.path.isdir(d) or os.listdir(d):
            break
        os.rmdir(d)
    os.close(fd)


def note_checkpoint(ckpt_dir, step):
    """ckpt_dir/ckpt.pt, at `step`, is intact (just written or checked): the last one, if ckpt_dir is
    this run's --out-dir."""
    if standing["out_dir"] is not None and os.path.abspath(ckpt_dir) == os.path.abspath(standing["out_dir"]):
        standing["saved_step"] = step


def interrupted_line(signum):
    """The line an interrupted run ends with: where it stands, and the command that continues it."""
    out_dir, step, saved_step = standing["out_dir"], standing["step"], standing["saved_step"]
    what = f"interrupted by {signal.Signals(signum).name}" + ("" if step is None else f" at step {step}")
    if out_dir is None:
        return f"{what}; nothing was saved"
    if saved_step is None:
        return f"{what}, before its first checkpoint: nothing is saved in {out_dir}"
    return (f"{what}: the last intact checkpoint is {os.path.join(out_dir, 'ckpt.pt')} (step {saved_step}); "
            f"resume with: {resume_command(out_dir)}")


def resume_command(out_dir):
    """This process's command line with --resume out_dir in place of any --resume: the flags that
    the checkpoint does not record (--data, --max-iters, ...) stay as they were given."""
    argv = sys.argv[1:]
    kept = [a for i, a in enumerate(argv) if a != "--resume" and not a.startswith("--resume=")
            and (i == 0 or argv[i - 1] != "--resume")]
    return "python " + shlex.join([sys.argv[0], *kept, "--resume", out_dir])


class Parser(argparse.ArgumentParser):
    """argparse, with a bad flag reported as one line (not usage + error) and exit code 2."""

    def error(self, message):
        print(f"error: {message} (see {self.prog} --help)", file=sys.stderr)
        sys.exit(2)


def make_parser(description):
    """A parser whose --help shows the module docstring's commands verbatim."""
    return Parser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)


def flag_name(dest):
    """The command-line flag of an argparse dest: lambda_ -> --lambda, eval_only -> --eval-only."""
    return "--" + dest.rstrip("_").replace("_", "-")


def parse(parser, argv=None):
    """parser.parse_args(argv), plus `args.explicit`: the dests of the flags actually given,
    so a resumed run can take the rest from its checkpoint's config; and --out-dir's default,
    the --resume directory when resuming."""
    args = parser.parse_args(argv)
    probe = Parser(add_help=False)
    for action in parser._actions:
        if action.option_strings and action.dest != "help":
            probe._add_action(_suppressed(action))
    args.explicit = set(vars(probe.parse_known_args(argv)[0]))
    if getattr(args, "default_out_dir", None) is not None and args.out_dir is None:  # trainer.add_common_args
        args.out_dir = args.default_out_dir if args.resume is None else args.resume
    return args


def config_from(config_class, flags):
    """A config dataclass from the parsed flags of the same names: config_from(TrainConfig, vars(args))."""
    return config_class(**{f.name: flags[f.name] for f in dataclasses.fields(config_class)})


def _suppressed(action):
    """A copy of an argparse action whose default is SUPPRESS (absent unless given)."""
    copy = argparse.Action.__new__(type(action))
    copy.__dict__.update(action.__dict__, default=argparse.SUPPRESS, required=False)
    return copy


# ----------------------------------------------------------------------------- flag checks (argparse `type=`)

def number(kind, is_valid, what):
    """An argparse `type=` for numbers of `kind` (int or float) that pass is_valid; `what` says
    the range in the error. NaN fails every comparison, so it is refused too, and so is infinity
    (a --free-bits or --lr of inf only makes the loss not finite)."""
    def check(text):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a{'n integer' if kind is int else ' number'}")
        if not is_valid(value):
            raise argparse.ArgumentTypeError(f"{text} is out of range: it must be {what}")
        if math.isinf(value):
            raise argparse.ArgumentTypeError(f"{text} is out of range: it must be finite")
        return value

    check.__name__ = what  # argparse names the type in its messages
    return check


positive_int = number(int, lambda v: v >= 1, "an integer >= 1")
nonneg_int = number(int, lambda v: v >= 0, "an integer >= 0")
positive_float = number(float, lambda v: v > 0, "a number > 0")
nonneg_float = number(float, lambda v: v >= 0, "a number >= 0")
fraction = number(float, lambda v: 0 <= v <= 1, "a number from 0 to 1")
at_least_2 = number(int, lambda v: v >= 2, "an integer >= 2")
seed_int = number(int, lambda v: 0 <= v < 2**32, "an integer from 0 to 2**32 - 1")  # numpy's and gymnasium's range


def device_name(text):
    """--device: auto, cpu, mps, cuda or cuda:N."""
    if not re.fullmatch(r"auto|cpu|mps|cuda(:\d+)?", text):
        raise argparse.ArgumentTypeError(f"{text!r} is not a device: give auto, cpu, mps, cuda or cuda:N")
    return text


def add_machine_args(group):
    """--device and --dtype, the same in every script that loads a model."""
    group.add_argument("--device", type=device_name, default="auto", help="auto (cuda when available), cpu, mps, "
                       "cuda, cuda:1, ... (default: %(default)s)")
    group.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"], help="base "
                       "model weights: auto (bf16 on CUDA, fp32 on CPU; fp32 for a base that trains) (default: "
                       "%(default)s)")


# ----------------------------------------------------------------------------- seeds

def batch_seed(seed, index):
    """The seed of micro-batch `index` (its data and its noise): a pure function of (--seed, index),
    so a resumed run, or the ranks of a distributed one, draw exactly what one straight run draws.
    Kept below 2**64, torch's limit: train_agent.py derives a seed of seeds (stream_seed) from it."""
    return (seed * 1_000_003 + index) % 2**64


# ----------------------------------------------------------------------------- writing folders whole

def write_failure(e, out_dir):
    """The cause of a failed write, in words (torch hides ENOSPC behind 'unexpected pos ...')."""
    causes = [e, e.__cause__, e.__context__]
    for c in causes:
        if isinstance(c, OSError) and c.errno is not None:
            return os.strerror(c.errno)
    try:
        if shutil.disk_usage(out_dir).free < 1 << 20:
            return os.strerror(errno.ENOSPC)
    except OSError:
        pass
    return str(e).splitlines()[0][:120]


def replace_folder(final, write):
    """Write the folder `final` whole: write(path) fills a temporary folder beside it, which then
    takes its place; a failed write (a full disk) leaves the previous folder as it was and no
    temporary one, and is reported as one line."""
    tmp, old = final + ".tmp", final + ".old"
    if not os.path.isdir(final) and os.path.isdir(old):  # killed between the two renames below: old is whole
        os.rename(old, final)
    for leftover in (tmp, old):  # from a run killed mid-save
        shutil.rmtree(leftover, ignore_errors=True)
    try:
        write(tmp)
    except Exception as e:  # OSError, or safetensors' own error for a full disk
        shutil.rmtree(tmp, ignore_errors=True)
        raise UserError(f"cannot save {final} ({write_failure(e, os.path.dirname(final) or '.')}); the previous "
                        "one is unchanged: free some space or choose another --out-dir") from e
    if os.path.isdir(final):
        os.rename(final, old)
    os.rename(tmp, final)
    shutil.rmtree(old, ignore_errors=True)
