"""
Does a pretrained LM make a better world-model transformer than IRIS's own? The README's
comparison table, from one command: train_wm.py once per row, on the same data, then the
LM rows again for IRIS's training time. It runs the train_wm.py and pretrain_lm.py of its own
repository from any directory; output paths are relative to the current directory.

    python experiments/compare_wm.py            # CartPole (2 seeds), Pong (1 seed): ~2 h; out-compare/tables.md
    python experiments/compare_wm.py --envs CartPole-v1 --seeds 1337   # one env, one seed: ~30 min
    python experiments/compare_wm.py --envs CartPole-v1 --seeds 1 --lm-dir tiny --max-iters 20 \
        --collect-steps 3000          # a check of the pipeline (an untrained tiny LM): ~2 min
    python experiments/compare_wm.py --envs CartPole-v1 --seeds 1337 1 2 --lm-dir smollm2 \
        --lm-layers 2 --out-dir out-compare-smollm2   # SmolLM2's first 2 layers: a directory of its own
    python experiments/compare_wm.py --envs ALE/Pong-v5 --lm-dir smollm2 --lm-layers 2 \
        --rows pretrained random scratch --out-dir out-compare-smollm2 --table out-compare-smollm2/pong.md
    python experiments/compare_wm.py ... -- --batch-size 16   # flags after -- go to every train_wm.py run

The times are the README's run on a 2-core CPU, each run on one thread: ~2 min pretraining the
tiny LM, 26-41 min per CartPole seed and 61 min for Pong (11 runs each); the check took 101 s.

Rows (every train_wm.py flag not named here is the same in every row):
    IRIS                    IRIS's transformer (train_wm.py's default size), from scratch
    LM pretrained ...       the tiny LM pretrained on text (`pretrain_lm.py` into out-lm, run
                            or finished first), frozen, + a LoRA adapter; with each
                            embedding choice: IRIS's tables, the LM's own rows frozen or trained
    LM random, frozen       the same architecture with random weights, frozen, + LoRA
    LM from scratch         the same architecture, random weights, every weight trained
    copy                    "nothing changes": the last real observation, repeated
`--lm-dir smollm2` puts a real pretrained LM in the LM rows offline (SmolLM2-135M, lm.py), and
`--lm-layers N` its first N layers (all 30 take ~9 s an update on a 2-core CPU); `--rows` picks
the LM rows. Runs are found by row name in --out-dir: give each LM its own. With network or cached weights, `--lm-dir gpt2` puts GPT-2 there.

Same data: every row collects with the same --seed, and Pong's frame tokenizer is trained
once (by the IRIS row) and reused (--tokenizer-from). The vocabularies are sized so that
the LM-table rows fit tiny's 257 rows: CartPole 4 x 32 bins, Pong FSQ 6 x 6 x 6 = 216.
Same updates: --max-iters steps for every row. Same wall time: each LM row again, with
its --max-iters set so that its optimisation time (evaluation excluded, from its measured
tokens/s) equals IRIS's. Seeds: each seed collects its own data and initialises every row
anew; the table gives the mean over seeds and, after +-, their standard deviation. Each
run's log (its last line: the run's JSON) goes to OUT_DIR/<env>/seed<S>/<row>.log; a run
whose log ends in its JSON and starts with the very same command is not run again, so an
interrupted comparison continues where it stopped; a run of another command in the same folder
is refused, never deleted (give each comparison its own --out-dir). Every run is its own process with this
one's environment, on one CPU thread unless OMP_NUM_THREADS says otherwise. The last line
printed is one JSON object with every run's metrics.
"""

import json
import os
import shutil
import statistics
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PRETRAIN_ITERS = 1500  # the tiny LM's pretraining steps when compare_wm makes out-lm/base itself
sys.path.insert(0, REPO)  # the repository's own small helpers (common.py, checkpoint.py), from any directory

from common import UserError, device_name, make_parser, positive_int, run_cli, seed_int  # noqa: E402

ENVS = {  # env: (flags that size its data and vocabulary the same for every row, default seeds)
    "CartPole-v1": (["--num-bins", "32"], [1337, 1]),
    "ALE/Pong-v5": (["--fsq-levels", "6", "6", "6", "--collect-steps", "10000", "--tokenizer-iters", "1000",
                     "--segment-steps", "10", "--num-imagine", "64"], [1337]),
}


ROWS = {  # --rows key: (the table's row name, its flags beyond --backbone lm --model LM)
    "pretrained": ("LM pretrained, IRIS tables", []),
    "table-frozen": ("LM pretrained, LM table frozen", ["--embeddings", "lm-frozen"]),
    "table-trained": ("LM pretrained, LM table trained", ["--embeddings", "lm-trained"]),
    "random": ("LM random, frozen", ["--lm-init", "random"]),
    "scratch": ("LM from scratch", ["--lm-init", "random", "--train-base"]),
}


def rows(args):
    """{row name: train_wm.py flags}: IRIS's (always: the tokenizer and the time come from it), then --rows."""
    lm = ["--backbone", "lm", "--model", args.lm_dir]
    if args.lm_layers is not None:
        lm += ["--lm-layers", str(args.lm_layers)]
    return {"IRIS": ["--backbone", "iris"], **{ROWS[key][0]: lm + ROWS[key][1] for key in args.rows}}


def log_lines(log_path):
    """The lines of a run's log (the first is its command), or [] when there is none."""
    if not os.path.isfile(log_path):
        return []
    with open(log_path) as log:
        return log.read().strip().splitlines()


def finished(lines, command):
    """The JSON that ends a run's log lines when it is a finished run of this very command, else None."""
    if len(lines) > 1 and lines[0] == command and lines[-1].startswith("{"):
        return json.loads(lines[-1])
    return None


def run_script(name, flags, **kwargs):
    """python REPO/<name> flags..., in its own process with this one's environment and, unless
    OMP_NUM_THREADS is set, one CPU thread."""
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    return subprocess.run([sys.executable, os.path.join(REPO, name), *flags], env=env, **kwargs)


def train_wm(flags, out_dir, log_path):
    """One train_wm.py run (or the same one, finished before); its final JSON.
    The log's first line is the command."""
    command = "# train_wm.py " + " ".join(flags + ["--out-dir", out_dir])
    lines = log_lines(log_path)
    result = finished(lines, command)
    if result is not None:
        return result
    logged = (lines or [None])[0]
    if (logged is not None or os.path.exists(out_dir)) and logged != command:  # never delete another run
        raise UserError(f"{out_dir} holds a run of another command ({logged or 'no log'}); give compare_wm "
                        "another --out-dir, or remove that run yourself")
    shutil.rmtree(out_dir, ignore_errors=True)  # an interrupted run of this very command starts over
    with open(log_path, "w") as log:
        print(command, file=log, flush=True)
        done = run_script("train_wm.py", flags + ["--out-dir", out_dir], stdout=log, stderr=subprocess.STDOUT)
    with open(log_path) as log:
        last = log.read().strip().splitlines()[-1]
    if done.returncode != 0:
        raise UserError(f"train_wm.py {' '.join(flags)} failed ({last}); see {log_path}")
    return json.loads(last)


def table(env, runs):
    """A markdown table of one env's runs, {seed: {row: metrics}}: mean +- std over seeds. The
    imagination error at the horizons train_wm.py reports: 1, 5 and its --horizon (20)."""
    def cell(values, digits=3):
        mean = statistics.mean(values)
        spread = f" +- {statistics.stdev(values):.{digits}f}" if len(values) > 1 else ""
        return f"{mean:.{digits}f}{spread}"

    seeds = list(runs)
    copy = [runs[seed]["IRIS"] for seed in seeds]
    horizons = sorted(int(k.removeprefix("imag_err_h")) for k in copy[0] if k.startswith("imag_err_h"))
    metrics = ["val_obs_acc", "val_reward_acc", "val_end_acc"] + [f"imag_err_h{h}" for h in horizons]
    lines = [f"{env}, seeds {', '.join(map(str, seeds))}:", "",
             "| row | updates | obs acc | reward acc | end acc | imag err " + " | ".join(f"h{h}" for h in horizons)
             + " | train tok/s | imagined steps/s |", "|---" * (7 + len(horizons)) + "|"]
    for name in runs[seeds[0]]:
        ms = [runs[seed][name] for seed in seeds]
        cells = [cell([m["steps"] for m in ms], 0)] + [cell([m[k] for m in ms], 4 if "err" in k else 3)
                                                       for k in metrics]
        cells += [f"{statistics.mean(m[k] for m in ms):.0f}" for k in ("train_tokens_per_s", "imagined_steps_per_s")]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    lines.append("| copy | - | - | - | - | " + " | ".join(cell([m[f"copy_err_h{h}"] for m in copy], 4)
                                                      for h in horizons) + " | - | - |")
    return "\n".join(lines)


def compare(env, seed, args):
    """Every row on one env and seed: {row: metrics}."""
    env_dir = os.path.join(args.out_dir, env.replace("/", "_"), f"seed{seed}")
    os.makedirs(env_dir, exist_ok=True)
    common = ["--env", env, *ENVS[env][0], "--seed", str(seed), "--max-iters", str(args.max_iters),
              "--eval-interval", str(args.max_iters), "--device", args.device]
    if args.collect_steps is not None:
        common += ["--collect-steps", str(args.collect_steps)]
    common += args.train_wm_flags
    tokenizer = ["--tokenizer-from", os.path.join(env_dir, "IRIS")]
    results = {}

    def path(name):  # "LM random, frozen" -> OUT_DIR/<env>/seed<S>/LM-random_frozen
        return os.path.join(env_dir, name.replace(", ", "_").replace(" ", "-"))

    for name, flags in rows(args).items():
        slug = path(name)
        results[name] = train_wm(common + flags + (tokenizer if name != "IRIS" else []), slug, slug + ".log")
        print(f"{env} | seed {seed} | {name} | {json.dumps(results[name])}", flush=True)
    iris = results["IRIS"]
    for name, flags in rows(args).items():  # the same optimisation time as IRIS
        if name == "IRIS":
            continue
        iters = max(1, round(iris["steps"] * results[name]["train_tokens_per_s"] / iris["train_tokens_per_s"]))
        slug = path("time " + name)
        timed = common + flags + tokenizer + ["--max-iters", str(iters), "--eval-interval", str(iters)]
        results[f"{name} (IRIS's time)"] = train_wm(timed, slug, slug + ".log")
    return results


def pretrain_tiny_lm(device):
    """out-lm/base, for --lm-dir's default: the tiny LM pretrained on text for PRETRAIN_ITERS steps, made by
    pretrain_lm.py when out-lm is missing, and resumed when its pretraining was cut short (base/ is rewritten at
    every save, so the folder alone may be half-trained; its checkpoint's step says). Anything else there (another
    pretraining, a base/ with no checkpoint beside it) is refused: give it with --lm-dir to use it as it is."""
    from checkpoint import load_checkpoint  # not at the top: it imports torch, which --help need not wait for

    use_it = "give --lm-dir out-lm/base to use it as it is, or move out-lm away to pretrain anew"
    has_checkpoint = os.path.isfile(os.path.join("out-lm", "ckpt.pt"))
    if not has_checkpoint and os.path.isdir("out-lm/base"):
        raise UserError(f"out-lm/base has no out-lm/ckpt.pt beside it (a pretraining cut short at its first save, "
                        f"or a base of your own): {use_it}")
    step = None
    if has_checkpoint:
        state = load_checkpoint("out-lm", "lm")
        if state["config"]["model"] != "tiny" or state["config"].get("synthetic") is not None:
            raise UserError(f"out-lm holds another pretraining (--model {state['config']['model']}, --synthetic "
                            f"{state['config'].get('synthetic')}) than the tiny LM on text: {use_it}")
        step = state["step"]
        if step >= PRETRAIN_ITERS:
            return
    where = ["--out-dir", "out-lm"] if step is None else ["--resume", "out-lm"]
    print(f"pretraining the tiny LM on text: pretrain_lm.py --max-iters {PRETRAIN_ITERS} {' '.join(where)}",
          flush=True)
    done = run_script("pretrain_lm.py", ["--max-iters", str(PRETRAIN_ITERS), "--device", device, *where],
                      stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    if done.returncode != 0:
        raise UserError(f"pretrain_lm.py failed ({(done.stderr.strip().splitlines() or ['no output'])[-1]})")


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    own, train_wm_flags = (argv[:argv.index("--")], argv[argv.index("--") + 1:]) if "--" in argv else (argv, [])
    parser = make_parser(__doc__)
    parser.add_argument("--envs", nargs="+", default=list(ENVS), choices=list(ENVS), help="the environments to "
                        "compare (default: both)")
    parser.add_argument("--seeds", type=seed_int, nargs="+", default=None, help="seeds to run every row with "
                        "(default: CartPole 1337 1, Pong 1337)")
    parser.add_argument("--max-iters", type=positive_int, default=600, help="updates per row (default: %(default)s)")
    parser.add_argument("--collect-steps", type=positive_int, default=None, help="override each env's data size")
    parser.add_argument("--lm-dir", default=None, help="the pretrained LM: a directory saved with save_pretrained, or "
                        "a name (smollm2, a Hugging Face id) (default: out-lm/base, which pretrain_lm.py makes, or "
                        "finishes, first)")
    parser.add_argument("--rows", nargs="+", default=list(ROWS), choices=list(ROWS), help="the LM rows to run; "
                        "IRIS's always runs (default: all)")
    parser.add_argument("--lm-layers", type=positive_int, default=None, help="the LM rows keep the LM's first N "
                        "layers (train_wm.py --lm-layers; default: all)")
    parser.add_argument("--out-dir", default="out-compare", help="where every run's own folder and log go, and "
                        "tables.md (default: %(default)s)")
    parser.add_argument("--device", type=device_name, default="auto", help="passed to every run (default: "
                        "%(default)s)")
    parser.add_argument("--table", default=None, help="write the tables (markdown) to this file (default: "
                        "OUT_DIR/tables.md)")
    args = parser.parse_args(own)
    # the flags that make the rows and their seeds: passed after --, they would override them unseen
    owned = ("--env", "--seed", "--max-iters", "--device", "--out-dir", "--resume", "--backbone", "--model",
             "--tokenizer-from", "--lm-init", "--train-base", "--embeddings", "--lm-layers")
    # argparse takes a flag's unambiguous start for it (--max-it): any start of an owned flag counts
    taken = [flag for flag in train_wm_flags if flag.startswith("--")
             and any(name.startswith(flag.split("=")[0]) for name in owned)]
    if taken:
        parser.error(f"{', '.join(taken)} after --: compare_wm sets these itself (--envs, --seeds, --max-iters, "
                     "--device, --out-dir, --lm-dir, --lm-layers, --rows); give them before --")
    folder = None if args.table is None else os.path.dirname(os.path.abspath(args.table))
    if folder == os.path.abspath(args.out_dir):  # made below, as the runs' own folder is
        folder = os.path.dirname(folder)
    if folder is not None and (os.path.isdir(args.table) or not os.access(folder, os.W_OK)):  # found now, not hours on
        parser.error(f"--table {args.table}: cannot write it; give a file in an existing folder you can write to, "
                     "or in --out-dir")
    try:  # a folder compare_wm cannot write to is found now, not after the first row
        os.makedirs(args.out_dir, exist_ok=True)
    except OSError as e:
        parser.error(f"--out-dir {args.out_dir}: cannot make it ({e.strerror}); give a folder you can write to")
    if not os.access(args.out_dir, os.W_OK):
        parser.error(f"--out-dir {args.out_dir}: cannot write to it; give a folder you can write to")
    args.train_wm_flags = train_wm_flags
    t_start = time.time()
    if args.lm_dir is None:
        pretrain_tiny_lm(args.device)
        args.lm_dir = "out-lm/base"
    everything, tables = {}, []
    for env in args.envs:
        runs = {seed: compare(env, seed, args) for seed in (ENVS[env][1] if args.seeds is None else args.seeds)}
        tables.append(table(env, runs))
        print(tables[-1], flush=True)
        everything[env] = runs
    with open(os.path.join(args.out_dir, "tables.md") if args.table is None else args.table, "w") as f:
        f.write("\n\n".join(tables) + "\n")
    print(json.dumps({"wall_seconds": round(time.time() - t_start), "results": everything}))


if __name__ == "__main__":
    run_cli(main)
