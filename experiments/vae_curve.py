"""
The text VAE's learning curve: held-out token accuracy with the text's own z (z = mu) and with
another text's z (shuffled) against minutes of training, from a train_vae.py checkpoint (its
`history`, one entry per evaluation). The gap between the two lines is what z carries. The last
line printed is one JSON object with the points.

    python train_vae.py                                                     # the default run, out-vae/
    python experiments/vae_curve.py out-vae --out assets/vae_curve.png
"""

import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # this repository's modules

from common import UserError, make_parser, run_cli  # noqa: E402
from experiments.plot import draw  # noqa: E402


def parse_args(argv=None):
    parser = make_parser(__doc__)
    parser.add_argument("run", help="the --out-dir of a train_vae.py run")
    parser.add_argument("--out", default="vae_curve.png", help="where the picture goes (default: %(default)s)")
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    from trainer import load_checkpoint

    history = load_checkpoint(args.run, "vae").get("history", [])
    if not history:
        raise UserError(f"{args.run} holds no evaluation history (written by train_vae.py since its curve "
                        "existed); run train_vae.py into it")
    series = [{"label": label, "points": [(h["minutes"], h[key], 0.0) for h in history]}
              for label, key in (("z = mu (the text's own)", "val_acc"), ("z of another text", "val_acc_shuffled"))]
    draw(series, args.out, "minutes of training", "text VAE: held-out token accuracy", y_digits=2)
    print(json.dumps({"picture": args.out, "points": [{k: h[k] for k in ("step", "minutes", "val_acc",
                      "val_acc_shuffled", "val_char_similarity", "val_exact")} for h in history]}))


if __name__ == "__main__":
    run_cli(main)
