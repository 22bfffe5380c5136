"""
The text VAE's learning curve: held-out token accuracy with the text's own z (z = mu) and with
another text's z (shuffled) against wall minutes (evaluations included, as train_vae.py counts
them) or steps of training, from train_vae.py checkpoints (their `history`, one entry per evaluation). The gap between a run's two lines is what z carries.
Several runs share one picture (LABEL=DIR names a run's lines). The last line printed is one JSON
object with the points.

    python train_vae.py                                                     # the default run, out-vae/
    python experiments/vae_curve.py out-vae --out assets/vae_curve.png
    python experiments/vae_curve.py SmolLM2=out-smol tiny=out-tiny --x step --out bases.png   # bases side by side
"""

import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # this repository's modules

from checkpoint import load_checkpoint  # noqa: E402
from common import UserError, make_parser, run_cli  # noqa: E402
from experiments.plot import draw  # noqa: E402


def parse_args(argv=None):
    parser = make_parser(__doc__)
    parser.add_argument("runs", nargs="+", metavar="[LABEL=]DIR", help="the --out-dir of each train_vae.py run; "
                        "LABEL= names its lines (a run on its own needs none)")
    parser.add_argument("--x", choices=["minutes", "step"], default="minutes", help="the x axis: wall "
                        "minutes of the run (evaluations included), or optimizer steps (runs on different bases at "
                        "equal steps; default: %(default)s)")
    parser.add_argument("--out", default="vae_curve.png", help="where the picture goes (default: %(default)s)")
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    series, points = [], {}
    for run in args.runs:
        label, _, path = run.partition("=") if "=" in run and not os.path.isdir(run) else ("", "", run)
        if (label or path) in points:
            raise UserError(f"two runs are named {label or path}: give each its own LABEL=")
        history = load_checkpoint(path, "vae").get("history", [])
        if not history:
            raise UserError(f"{path} holds no evaluation history (written by train_vae.py since its curve "
                            "existed); run train_vae.py into it")
        prefix = f"{label}: " if label else ("" if len(args.runs) == 1 else f"{path}: ")
        series += [{"label": prefix + name, "points": [(h[args.x], h[key], 0.0) for h in history]}
                   for name, key in (("z = mu (the text's own)", "val_acc"), ("z of another text", "val_acc_shuffled"))]
        points[label or path] = [{k: h[k] for k in ("step", "minutes", "val_acc", "val_acc_shuffled",
                                                   "val_char_similarity", "val_exact")} for h in history]
    x_label = "wall minutes, evaluations included" if args.x == "minutes" else "optimizer steps"
    draw(series, args.out, x_label, "text VAE: held-out token accuracy", y_digits=2)
    print(json.dumps({"picture": args.out, "points": points}))


if __name__ == "__main__":
    run_cli(main)
