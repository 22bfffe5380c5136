"""
Use a trained text VAE (train_vae.py's checkpoint): reconstruct texts, interpolate between
two texts' latents, or decode samples of the prior. As nanoGPT's sample.py is to its train.py.

    python sample.py --resume out-vae --reconstruct "Return the sum of a and b." "Close the file."
    python sample.py --resume out-vae --interpolate "Return a list." "Close the file." --interp-steps 5
    python sample.py --resume out-vae --sample 4 --temperature 0.7
    python sample.py --resume out-vae --sample 4 --device cpu          # the CPU, whatever the machine has
    python sample.py --resume out-vae-lm --router out-router --guide "Return the" --target "Close the file."

The model's settings come from the checkpoint; a pretrained base reloads from the --model
it names. Decoding is greedy at --temperature 0, else Gumbel-max sampling (BigVAE's
sampler: argmax(logits + T * gumbel), the same as sampling softmax(logits / T)). Prior
samples are z ~ N(0, r^2 I) with r the latent RMS measured on held-out text (BigVAE: 1.28).
Interpolation decodes points on the slerp (or lerp) path between the two posterior means.
Guided generation (--guide, with a router from train_router.py): --num-spans spans after the
context, each steered toward the mean latent of the --target texts by classifier-free guidance
at --scale (router.py). A text to reconstruct may be of any length: one longer than the
checkpoint's --context comes back span by span, each span decoded after the decoded text before
it (vae.reconstruct, BigVAE's chaining), each span's z refined from mu toward the span by
--refine-steps Adam steps on the decoder's loss (vae.VAE.refine). A text to interpolate or steer
toward is one latent, so one longer than --context is cut to it (the encoder saw spans of that
length), with a warning.
Prints the texts, then one JSON object.
"""

import json
import math
import sys

import torch

from checkpoint import load_checkpoint
from common import (UserError, add_machine_args, at_least_2, config_from, flag_name, make_parser, nonneg_float, parse,
                    nonneg_int, positive_int, run_cli, seed_int)
from lm import num_positions
from offload import MemoryConfig, add_memory_args, check_memory
from router import load_router
from trainer import pick_device
from vae import NUM_REFINE_STEPS
from vae_setup import load_vae

# flags that only one way of decoding reads: given without it they would do nothing, so they are refused
ONLY_WITH = {"guide": ("router", "target", "scale", "num_spans", "span_tokens"),
             "interpolate": ("interp_steps", "interp_mode"), "sample": ("num_tokens",), "reconstruct": ("refine_steps",)}


def parse_args(argv=None):
    parser = make_parser(__doc__)
    parser.add_argument("--resume", metavar="DIR", required=True, help="the --out-dir of a train_vae.py run")
    g = parser.add_argument_group("what to decode (one of)").add_mutually_exclusive_group(required=True)
    g.add_argument("--reconstruct", metavar="TEXT", nargs="+", help="encode these texts (z = mu, refined: "
                   "--refine-steps) and decode them")
    g.add_argument("--interpolate", metavar="TEXT", nargs=2, help="decode points between two texts' latents")
    g.add_argument("--sample", metavar="N", type=positive_int, help="decode N texts from prior samples of z")
    g.add_argument("--guide", metavar="CONTEXT", help="continue this text toward --target with --router")
    g = parser.add_argument_group("guided generation (--guide; router.py)")
    g.add_argument("--router", metavar="DIR", help="the --out-dir of a train_router.py run on this VAE")
    g.add_argument("--target", metavar="TEXT", nargs="+", help="the goal: the mean latent of these texts")
    g.add_argument("--scale", type=nonneg_float, default=1.25, help="guidance scale: 0 the base alone, 1 the "
                   "router alone (BigVAE: 1.25; default: %(default)s)")
    g.add_argument("--num-spans", type=positive_int, default=4, help="spans to generate (default: %(default)s)")
    g.add_argument("--span-tokens", type=positive_int, default=None, help="tokens per span (default: the "
                   "checkpoint's --context)")
    g = parser.add_argument_group("decoding")
    g.add_argument("--temperature", type=nonneg_float, default=0.0, help="0: greedy; else Gumbel-max sampling "
                   "at this temperature (default: %(default)s)")
    g.add_argument("--refine-steps", type=nonneg_int, default=NUM_REFINE_STEPS, help="--reconstruct: move each "
                   "span's z from mu by this many Adam steps on the decoder's loss of the span (vae.VAE.refine); 0: "
                   "z = mu (default: %(default)s)")
    g.add_argument("--interp-steps", type=at_least_2, default=5, help="points on the --interpolate path, both "
                   "ends included (default: %(default)s)")
    g.add_argument("--interp-mode", default="slerp", choices=["slerp", "lerp"], help="the --interpolate path "
                   "(default: %(default)s)")
    g.add_argument("--num-tokens", type=positive_int, default=None, help="tokens per --sample text (default: "
                   "the checkpoint's --context)")
    g = parser.add_argument_group("machine")
    add_machine_args(g)
    g.add_argument("--seed", type=seed_int, default=1337, help="seed of the noise (default: %(default)s)")
    add_memory_args(parser)
    args = parse(parser, argv)
    for mode, flags in ONLY_WITH.items():
        given = [flag_name(flag) for flag in flags if flag in args.explicit]
        if getattr(args, mode) is None and given:
            parser.error(f"{', '.join(given)} only apply to --{mode}: add --{mode}, or drop them")
    if args.guide is not None and (args.router is None or args.target is None):
        parser.error("--guide needs --router DIR and --target TEXT")
    return args


def checked_texts(texts, vae, context, what="text"):
    """Texts to encode: none may be empty (attention pooling over no position has no mean), and
    each is cut to the context the encoder was trained on (cut, not refused: its first --context
    tokens are what this VAE can encode, and the warning says what was dropped)."""
    for i, text in enumerate(texts):
        ids = vae.tokenizer.encode(text)
        if not text.strip() or not ids:
            raise UserError(f"{what} {i + 1} is empty; give each {what} at least one character")
        if len(ids) > context:
            texts[i] = vae.tokenizer.decode(ids[:context])
            while len(vae.tokenizer.encode(texts[i])) > context:  # a cut inside a character decodes to a longer one
                texts[i] = texts[i][:-1]
            if not texts[i]:
                raise UserError(f"{what} {i + 1}: its first character takes more than the checkpoint's --context "
                                f"{context} tokens; give a text that starts with a shorter one")
            print(f"warning: {what} {i + 1} has {len(ids)} tokens; cut to the checkpoint's --context {context}",
                  file=sys.stderr)
    return texts


def check_length(flag, value, limit):
    """Decoding past the base's last position would index outside its position table."""
    if value > limit:
        raise UserError(f"{flag} {value} goes past the base's last position: it has room for {limit} tokens after z "
                        f"and the context; give {flag} {limit} or less")


def main(argv=None):
    args = parse_args(argv)
    device = torch.device(pick_device(args.device))
    torch.manual_seed(args.seed)
    if args.guide is not None:
        router, _, _ = load_router(args.resume, device, load_checkpoint(args.router, "router", "--router"), args.router,
                                   "--resume", config_from(MemoryConfig, vars(args)))
        vae, context = router.vae, router.vae.cfg.prefix_slots  # the VAE's --context
        ids, mask = vae.tokenize(checked_texts(args.target, vae, context, "target"))
        with torch.no_grad():
            z = vae.encode(ids, mask)[0].mean(0, keepdim=True)  # (1, D): the targets' mean latent
        guide_ids = vae.tokenizer.encode(args.guide)
        if not guide_ids:
            raise UserError("--guide is empty; give the text to continue, at least one character")
        context_ids = torch.tensor([guide_ids[-context:]], dtype=torch.long, device=z.device)
        span_tokens = context if args.span_tokens is None else args.span_tokens
        check_length("--span-tokens", span_tokens, num_positions(vae.base) - router.text_start(context) + 1)
        # every span sees the last --context tokens, the window the router was trained on
        generated = router.generate(context_ids, z, args.num_spans, span_tokens, args.scale, args.temperature,
                                    window=context)
        result = {"guided": vae.detokenize(generated), "scale": args.scale, "num_spans": args.num_spans}
        print(args.guide + result["guided"][0])
        print(json.dumps(result))
        return
    vae = load_vae(args.resume, device, config_from(MemoryConfig, vars(args)), "--resume").eval()
    context = vae.cfg.prefix_slots  # the VAE's --context
    num_tokens = context if args.num_tokens is None else args.num_tokens
    check_length("--num-tokens", num_tokens, num_positions(vae.base) - vae.text_start(None) + 1)
    # --sample's and --interpolate's rows decode at once (--reconstruct's texts one at a time): estimated as a
    # training step of the base over them (which keeps far more than decoding's cache), refused if it cannot fit
    if args.reconstruct is None:
        rows, flag = (args.interp_steps, "--interp-steps") if args.interpolate is not None else (args.sample, "--sample")
        check_memory(vae.base, device, rows * (vae.text_start(None) + num_tokens), f"{flag} (now {rows})")
    if args.reconstruct is not None:
        result = {"reconstructions": vae.reconstruct(checked_texts(args.reconstruct, vae, math.inf),
                                                     args.temperature, args.refine_steps)}
    elif args.interpolate is not None:
        a, b = checked_texts(args.interpolate, vae, context)
        result = {"interpolation": vae.interpolate(a, b, args.interp_steps, args.interp_mode, args.temperature)}
    else:
        result = {"samples": vae.sample_prior(args.sample, num_tokens, args.temperature)}
    for texts in result.values():
        for t in texts:
            print(t)
    print(json.dumps(result))


if __name__ == "__main__":
    run_cli(main)
