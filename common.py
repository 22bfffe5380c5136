"""
Small things every file shares, kept free of torch and transformers so that a library
file can import them without the training loop, and a script's --help answers at once:
the one-line error for bad input, flag checks, the one seed formula.

    from common import UserError, make_parser, parse, positive_int, run_cli
    parser = make_parser(__doc__)
    parser.add_argument("--batch-size", type=positive_int, default=16)
    args = parse(parser, argv)        # args.explicit: the flags given on the command line
    run_cli(main)                      # a UserError becomes `error: ...` and exit code 2
"""

import argparse
import re
import sys

# the models lm.py builds from a config, with random weights (tiny reads UTF-8 bytes, tiny-bpe GPT-2's
# first lm.TINY_BPE_TOKENS tokens): nothing pretrained, so scripts give them their own CPU defaults
TINY_MODELS = ("tiny", "tiny-bpe")


class UserError(Exception):
    """Bad input (a flag, a file, a checkpoint): reported as one line, exit code 2."""


def run_cli(main):
    """Run a script's main(); a UserError becomes `error: ...` on stderr and exit code 2."""
    try:
        main()
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


class Parser(argparse.ArgumentParser):
    """argparse, with a bad flag reported as one line (not usage + error) and exit code 2."""

    def error(self, message):
        print(f"error: {message} (see {self.prog} --help)", file=sys.stderr)
        sys.exit(2)


def make_parser(description):
    """A parser whose --help shows the module docstring's commands verbatim."""
    return Parser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)


def parse(parser, argv=None):
    """parser.parse_args(argv), plus `args.explicit`: the dests of the flags actually given,
    so a resumed run can take the rest from its checkpoint's config."""
    args = parser.parse_args(argv)
    probe = Parser(add_help=False)
    for action in parser._actions:
        if action.option_strings and action.dest != "help":
            probe._add_action(_suppressed(action))
    args.explicit = set(vars(probe.parse_known_args(argv)[0]))
    return args


def _suppressed(action):
    """A copy of an argparse action whose default is SUPPRESS (absent unless given)."""
    copy = argparse.Action.__new__(type(action))
    copy.__dict__.update(action.__dict__, default=argparse.SUPPRESS, required=False)
    return copy


# ----------------------------------------------------------------------------- flag checks (argparse `type=`)

def number(kind, is_valid, what):
    """An argparse `type=` for numbers of `kind` (int or float) that pass is_valid; `what` says
    the range in the error. NaN fails every comparison, so it is refused too."""
    def check(text):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a{'n integer' if kind is int else ' number'}")
        if not is_valid(value):
            raise argparse.ArgumentTypeError(f"{text} is out of range: it must be {what}")
        return value

    check.__name__ = what  # argparse names the type in its messages
    return check


positive_int = number(int, lambda v: v >= 1, "an integer >= 1")
nonneg_int = number(int, lambda v: v >= 0, "an integer >= 0")
positive_float = number(float, lambda v: v > 0, "a number > 0")
nonneg_float = number(float, lambda v: v >= 0, "a number >= 0")
fraction = number(float, lambda v: 0 <= v <= 1, "a number from 0 to 1")
at_least_2 = number(int, lambda v: v >= 2, "an integer >= 2")


def device_name(text):
    """--device: auto, cpu, mps, cuda or cuda:N."""
    if not re.fullmatch(r"auto|cpu|mps|cuda(:\d+)?", text):
        raise argparse.ArgumentTypeError(f"{text!r} is not a device: give auto, cpu, cuda or cuda:N")
    return text


def add_machine_args(group):
    """--device and --dtype, the same in every script that loads a model."""
    group.add_argument("--device", type=device_name, default="auto", help="auto (cuda when available), cpu, cuda, "
                       "cuda:1, ... (default: %(default)s)")
    group.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"], help="base "
                       "model weights: auto (bf16 on CUDA, fp32 on CPU; fp32 for a base that trains) (default: "
                       "%(default)s)")


# ----------------------------------------------------------------------------- seeds

def batch_seed(seed, index):
    """The seed of micro-batch `index` (its data and its noise): a pure function of (--seed, index),
    so a resumed run, or the ranks of a distributed one, draw exactly what one straight run draws."""
    return seed * 1_000_003 + index
