"""
The agent's learning curve: held-out real return (greedy policy) against real env steps, from
train_agent.py checkpoints (their `history`), one line per group of runs: the mean over the
group's seeds, and a band over the 95% interval of that mean (Student's t). The last line printed
is one JSON object: for each group, each evaluation's mean, interval and per-seed returns, and each
seed's real steps to the env's reward threshold (CartPole-v1: 475) and to --target; and for each
group after the first that shares at least two seeds with it, its return minus the first group's,
seed by seed over the shared seeds (`paired`: a paired comparison, in which one seed's luck counts
once), with the mean difference's interval. Two groups differ where that interval leaves out 0.

    python experiments/agent_curve.py --runs iris out-agent-s1 out-agent-s2 out-agent-s3 \\
        --runs lm out-agent-lm-s1 out-agent-lm-s2 --out assets/agent_cartpole.png
    python experiments/agent_curve.py --runs iris out-agent --target 195   # one run
"""

import json
import math
import os
import sys

import gymnasium as gym

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # this repository's modules

from agent import first_reaching  # noqa: E402
from checkpoint import load_checkpoint  # noqa: E402
from common import UserError, make_parser, number, run_cli  # noqa: E402
from experiments.plot import draw  # noqa: E402

# Student's t at 97.5% by degrees of freedom 1 to 30
T_975 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145, 2.131,
         2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042)


def t_975(df):
    """Student's t 97.5% quantile: the table, then its Cornish-Fisher series about the normal's 1.96
    (within 0.001 past 30 degrees of freedom)."""
    if df <= len(T_975):
        return T_975[df - 1]
    z = 1.959964
    return z + (z**3 + z) / (4 * df) + (5 * z**5 + 16 * z**3 + 3 * z) / (96 * df**2)


def parse_args(argv=None):
    parser = make_parser(__doc__)
    parser.add_argument("--runs", nargs="+", action="append", required=True, metavar=("LABEL", "DIR"),
                        help="a line: its label, then the --out-dir of each seed's train_agent.py run")
    parser.add_argument("--out", default="agent_curve.png", help="where the picture goes (default: %(default)s)")
    parser.add_argument("--target", type=number(float, lambda v: not math.isnan(v), "a number"), default=None,
                        help="also report the real steps to this return (e.g. 195, CartPole-v0's threshold)")
    args = parser.parse_args(argv)
    if any(len(group) < 2 for group in args.runs):
        parser.error("each --runs needs a label and at least one run directory")
    return args


def interval(values):
    """Mean and the half-width of its 95% interval (0 for one value)."""
    n = len(values)
    mean = sum(values) / n
    if n == 1:
        return mean, 0.0
    sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))
    return mean, t_975(n - 1) * sd / math.sqrt(n)


def summarise(label, dirs, target):
    if len({os.path.realpath(d) for d in dirs}) < len(dirs):
        raise UserError(f"a run of {label!r} is given twice: each seed's run once")
    runs = [load_checkpoint(d, "agent") for d in dirs]
    if len({r["config"]["env"] for r in runs}) > 1 or len({r["config"]["seed"] for r in runs}) < len(runs):
        raise UserError(f"the runs of {label!r} are not one env's distinct seeds: give runs of one --env, each "
                        "with its own --seed")
    steps = [[h["env_steps"] for h in r["history"]] for r in runs]
    num_points = min(len(s) for s in steps)  # the shortest run's evaluations
    if num_points == 0:
        raise UserError(f"{dirs[[len(s) for s in steps].index(0)]} has no evaluation yet; resume it first")
    if any(s[:num_points] != steps[0][:num_points] for s in steps):
        raise UserError(f"the runs of {label!r} were evaluated at different real env steps; give runs made with the "
                        "same --collect-steps and --eval-interval")
    points = []
    for i in range(num_points):
        returns = [r["history"][i]["eval_return"] for r in runs]
        mean, half = interval(returns)
        points.append({"env_steps": runs[0]["history"][i]["env_steps"], "mean": mean, "ci95": half,
                       "returns": returns})
    env = runs[0]["config"]["env"]
    threshold = None if env.startswith("ALE/") else gym.spec(env).reward_threshold  # Atari ids need ale-py
    return {"label": label, "env": env, "seeds": [r["config"]["seed"] for r in runs],
            "points": points, "reward_threshold": threshold,
            "steps_to_threshold": [first_reaching(r["history"], threshold) for r in runs],
            "steps_to_target": [first_reaching(r["history"], target) for r in runs]}


def paired(reference, group):
    """group's returns minus reference's at each evaluation both made, over the seeds both ran: the
    mean difference and its 95% interval; None when they share fewer than two seeds (no interval)."""
    def by_seed(g):
        return {seed: [p["returns"][i] for p in g["points"]] for i, seed in enumerate(g["seeds"])}

    ours, theirs = by_seed(group), by_seed(reference)
    seeds = sorted(set(ours) & set(theirs))
    if len(seeds) < 2:
        return None
    points = []
    for i, (mine, base) in enumerate(zip(group["points"], reference["points"])):  # the shorter's evaluations
        if mine["env_steps"] != base["env_steps"]:
            raise UserError(f"{group['label']!r} and {reference['label']!r} were evaluated at different real env "
                            "steps; give runs made with the same --collect-steps and --eval-interval")
        differences = [ours[seed][i] - theirs[seed][i] for seed in seeds]
        mean, half = interval(differences)
        points.append({"env_steps": mine["env_steps"], "mean": mean, "ci95": half, "differences": differences})
    return {"label": group["label"], "minus": reference["label"], "seeds": seeds, "points": points}


def draw_groups(groups, path):
    series = [{"label": f"{g['label']} ({len(g['seeds'])} seeds)",
               "points": [(p["env_steps"], p["mean"], p["ci95"]) for p in g["points"]]} for g in groups]
    draw(series, path, "real env steps", f"{groups[0]['env']}: held-out return, mean and 95% interval over seeds")


def main(argv=None):
    args = parse_args(argv)
    groups = [summarise(group[0], group[1:], args.target) for group in args.runs]
    if len({g["env"] for g in groups}) > 1:
        raise UserError("the groups are runs of different envs; one picture is one env's")
    comparisons = [c for c in (paired(groups[0], g) for g in groups[1:]) if c is not None]
    draw_groups(groups, args.out)
    print(json.dumps({"picture": args.out, "groups": groups, "paired": comparisons}))


if __name__ == "__main__":
    run_cli(main)
