"""
Does a pretrained LM make a better world-model transformer than IRIS's own? The README's
comparison table, from one command: train_wm.py once per row, on the same data, then the
LM rows again for IRIS's training time.

    python compare_wm.py                          # CartPole and Pong on the CPU: about 90 minutes
    python compare_wm.py --envs CartPole-v1       # one env
    python compare_wm.py --max-iters 20 --collect-steps 3000 --envs CartPole-v1   # a quick look

Rows (every train_wm.py flag not named here is the same in every row):
    IRIS                    IRIS's transformer (train_wm.py's default size), from scratch
    LM pretrained ...       the tiny LM pretrained on text (`train_vae.py --objective lm`, run
                            first if --lm-dir has none), frozen, + a LoRA adapter; with each
                            embedding choice: IRIS's tables, the LM's own rows frozen or trained
    LM random, frozen       the same architecture with random weights, frozen, + LoRA
    LM from scratch         the same architecture, random weights, every weight trained
    copy                    "nothing changes": the last real observation, repeated
Offline there are no GPT-2 weights; with them, `--lm-dir gpt2` puts GPT-2 in the LM rows.

Same data: every row collects with the same --seed, and Pong's frame tokenizer is trained
once (by the IRIS row) and reused (--tokenizer-from). The vocabularies are sized so that
the LM-table rows fit tiny's 257 rows: CartPole 4 x 32 bins, Pong FSQ 6 x 6 x 6 = 216.
Same updates: --max-iters steps for every row. Same wall time: each LM row again, with
its --max-iters set so that its optimisation time (evaluation excluded, from its measured
tokens/s) equals IRIS's. Each run's log and JSON go to OUT_DIR/<env>/<row>.{log,json};
the last line printed is one JSON object with every run's metrics.
"""

import argparse
import json
import os
import subprocess
import sys
import time

ENVS = {  # env: flags that size its data and vocabulary the same for every row
    "CartPole-v1": ["--num-bins", "32"],
    "ALE/Pong-v5": ["--fsq-levels", "6", "6", "6", "--collect-steps", "10000", "--tokenizer-iters", "1000",
                    "--segment-steps", "10", "--num-imagine", "64"],
}


def rows(lm_dir):
    lm = ["--backbone", "lm", "--model", lm_dir]
    return {
        "IRIS": ["--backbone", "iris"],
        "LM pretrained, IRIS tables": lm,
        "LM pretrained, LM table frozen": lm + ["--embeddings", "lm-frozen"],
        "LM pretrained, LM table trained": lm + ["--embeddings", "lm-trained"],
        "LM random, frozen": lm + ["--lm-init", "random"],
        "LM from scratch": lm + ["--lm-init", "random", "--train-base"],
    }


def train_wm(flags, out_dir, log_path):
    """One train_wm.py run in its own process; its final JSON line."""
    with open(log_path, "w") as log:
        done = subprocess.run([sys.executable, "train_wm.py", *flags, "--out-dir", out_dir], stdout=log,
                              stderr=subprocess.STDOUT)
    with open(log_path) as log:
        last = log.read().strip().splitlines()[-1]
    if done.returncode != 0:
        sys.exit(f"error: train_wm.py {' '.join(flags)} failed ({last}); see {log_path}")
    return json.loads(last)


def table(env, results):
    """A markdown table of one env's runs."""
    def row(name, m, updates):
        cells = [f"{m['val_obs_acc']:.3f}", f"{m['val_reward_acc']:.3f}", f"{m['val_end_acc']:.3f}",
                 *(f"{m[f'imag_err_h{h}']:.3f}" for h in (1, 5, 20)), f"{m['train_tokens_per_s']:.0f}",
                 f"{m['imagined_steps_per_s']:.0f}"]
        return f"| {name} | {updates} | " + " | ".join(cells) + " |"

    lines = [f"{env}:", "", "| row | updates | obs acc | reward acc | end acc | imag err h1 | h5 | h20 "
             "| train tok/s | imagined steps/s |", "|---" * 10 + "|"]
    for name, m in results.items():
        lines.append(row(name, m, m["steps"]))
    copy = results["IRIS"]
    lines.append("| copy | - | - | - | - | " + " | ".join(f"{copy[f'copy_err_h{h}']:.3f}" for h in (1, 5, 20))
                 + " | - | - |")
    return "\n".join(lines)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--envs", nargs="+", default=list(ENVS), choices=list(ENVS), help="(default: both)")
    parser.add_argument("--max-iters", type=int, default=600, help="updates per row (default: %(default)s)")
    parser.add_argument("--collect-steps", type=int, default=None, help="override each env's data size")
    parser.add_argument("--lm-dir", default="out-lm/base", help="the pretrained LM: a directory (made by "
                        "train_vae.py --objective lm when missing) or a Hugging Face id (default: %(default)s)")
    parser.add_argument("--out-dir", default="out-compare", help="(default: %(default)s)")
    parser.add_argument("--device", default="auto", help="passed to every run (default: %(default)s)")
    args = parser.parse_args()
    t_start = time.time()
    if args.lm_dir == "out-lm/base" and not os.path.isdir(args.lm_dir):
        print("pretraining the tiny LM on text: train_vae.py --objective lm --max-iters 1500", flush=True)
        subprocess.run([sys.executable, "train_vae.py", "--objective", "lm", "--max-iters", "1500", "--out-dir",
                        "out-lm", "--device", args.device], check=True, stdout=subprocess.DEVNULL)
    everything = {}
    for env in args.envs:
        env_dir = os.path.join(args.out_dir, env.replace("/", "_"))
        os.makedirs(env_dir, exist_ok=True)
        common = ["--env", env, *ENVS[env], "--max-iters", str(args.max_iters), "--eval-interval",
                  str(args.max_iters), "--device", args.device]
        if args.collect_steps:
            common += ["--collect-steps", str(args.collect_steps)]
        results = {}
        for name, flags in rows(args.lm_dir).items():
            tokenizer = [] if name == "IRIS" else ["--tokenizer-from", os.path.join(env_dir, "IRIS")]
            slug = os.path.join(env_dir, name.replace(", ", "_").replace(" ", "-"))
            results[name] = train_wm(common + flags + tokenizer, slug, slug + ".log")
            print(f"{env} | {name} | {json.dumps(results[name])}", flush=True)
        iris = results["IRIS"]
        for name, flags in rows(args.lm_dir).items():  # the same optimisation time as IRIS
            if name == "IRIS":
                continue
            iters = max(1, round(args.max_iters * results[name]["train_tokens_per_s"] / iris["train_tokens_per_s"]))
            slug = os.path.join(env_dir, "time_" + name.replace(", ", "_").replace(" ", "-"))
            timed = common + flags + ["--tokenizer-from", os.path.join(env_dir, "IRIS"), "--max-iters", str(iters),
                                      "--eval-interval", str(iters)]
            results[f"{name} (IRIS's time)"] = train_wm(timed, slug, slug + ".log")
        print(table(env, results), flush=True)
        everything[env] = results
    print(json.dumps({"wall_seconds": round(time.time() - t_start), "results": everything}))


if __name__ == "__main__":
    main()
