"""
Train the text VAE (vae.py) on a base LM and evaluate it on held-out text. BigVAE's recipe
(JD-P/minihf, branch adavae-moe) with the changes that make it learn on a small CPU model,
and options from Optimus (Li et al. 2020) and AdaVAE (Tu et al. 2022): z as a key/value in
every layer (Optimus), a diagonal posterior and a cyclical KL schedule (both).

    python train_vae.py                               # tiny model, default corpus, CPU: ~16 min on 2 cores
    python train_vae.py --max-iters 500 --out-dir out-vae-quick   # a quick look: ~45 s
    python train_vae.py --model gpt2 --out-dir out-vae-gpt2       # GPT-2 small, frozen, + two LoRA adapters (GPU)
    python train_vae.py --model gpt2 --data my.txt --out-dir out-my   # your own UTF-8 text file
    python train_vae.py --eval-only --resume out-vae [--data FILE]
    python train_vae.py --resume out-vae --max-iters 20000   # continue a run
    torchrun --nproc_per_node=2 train_vae.py --out-dir out-ddp   # data parallel (DDP; gloo on CPU, nccl on CUDA)
    python sample.py --resume out-vae --reconstruct "Return the sum of a and b."   # use it

The data (textdata.py): windows of 2 x --context tokens; the first half is `prefix_ids`, the
second the span that is encoded and reconstructed. As BigVAE, the prefix is dropped for half
the batches (--prefix-drop; per batch, so a batch without it is also shorter), and during the
autoencoder phase (--ae-iters) for all unless --ae-prefix: with the prefix in view a small decoder
learns to predict from it and ignores z (README, "The text VAE"). `tiny`'s spans are 16 bytes and its decoder
trains with word dropout (TINY_DEFAULTS below; a pretrained base has BigVAE's).
`tiny`'s base trains too (it has nothing pretrained to protect; --freeze-base stops it): its
checkpoint holds everything. Any other base is frozen; only the adapters and the VAE head
train and are saved, and the base reloads from --model. A resumed run takes the model's
settings from its checkpoint. The last line printed is one JSON object of the run's metrics.
"""

import dataclasses
import json
import os
import time

import torch

import lora
import peft_layout
import textdata
from checkpoint import TRAIN_KEYS, adopt_config, load_optimizer, open_run, save_checkpoint
from common import (TINY_MODELS, UserError, batch_seed, config_from, fraction, make_parser, nonneg_float, nonneg_int,
                    parse, positive_float, positive_int, run_cli)
from offload import MemoryConfig, add_memory_args
from trainer import TrainConfig, add_common_args, finish, make_optimizer, setup, train
from vae import NUM_REFINE_STEPS, VAEConfig
from vae_eval import evaluate, evaluate_paragraphs
from vae_setup import build_vae, load_weights, should_train_base

# what a checkpoint records and a resumed run takes from it (unless a flag is given): the model's
# settings, then the schedules
MODEL_KEYS = ("model", "freeze_base", "context", "latent_size", "pool_queries", "posterior", "z_memory", "soft_tokens", "lora_r",
              "lora_alpha", "decoder_init", "lead_token", "encoder_layers")
# per-base defaults (README, "The text VAE"): tiny trains fully on a CPU, on spans short enough to
# learn in minutes, with word dropout; a frozen pretrained base starts from BigVAE's settings
TINY_DEFAULTS = dict(lr=1e-3, context=16, word_dropout=0.3)
PRETRAINED_DEFAULTS = dict(lr=1e-4, context=64, word_dropout=0.0)
VAE_TRAIN_KEYS = ("head_lr_scale",)  # optimisation settings of this script alone (a flag given wins)
SCHEDULE_KEYS = ("ae_iters", "ae_prefix", "noise_ramp_iters", "kl_schedule", "kl_max", "kl_iters", "free_bits",
                 "edge_weights", "word_dropout", "own_tokens", "prefix_drop")


def per_base(key):
    return f"{TINY_DEFAULTS[key]:g} for tiny, {PRETRAINED_DEFAULTS[key]:g} for a pretrained base"


def parse_args(argv=None):
    parser = make_parser(__doc__)
    # defaults: tiny's CPU run (README, "The text VAE"); a pretrained base starts from BigVAE's lr
    add_common_args(parser, model="tiny", out_dir="out-vae", max_iters=12000, eval_interval=3000, batch_size=16,
                    lr=None, lr_text=per_base("lr"),
                    warmup_iters=100)
    g = textdata.add_data_args(parser)
    g.add_argument("--context", type=positive_int, default=None, help="tokens in the encoded span, and in the "
                   f"prefix before it (BigVAE: 64; default: {per_base('context')})")
    g.add_argument("--iw-samples", type=positive_int, default=32, help="posterior samples per span for the "
                   "importance-weighted NLL at the end and in --eval-only (Optimus: 100; default: %(default)s)")
    g.add_argument("--refine-steps", type=nonneg_int, default=NUM_REFINE_STEPS, help="at the end and in --eval-only, "
                   "also report the figures of z refined from mu by this many Adam steps on the decoder's loss of "
                   "the span itself (vae.VAE.refine), paragraphs too (the evaluations during training: z = mu only; "
                   "0: z = mu only; default: %(default)s)")
    g.add_argument("--eval-paragraphs", type=nonneg_int, default=16, help="whole held-out paragraphs of at most 256 "
                   "tokens reconstructed in chained spans at the end and in --eval-only (0: none; default: "
                   "%(default)s)")
    g.add_argument("--prefix-drop", type=fraction, default=0.5, help="share of batches without the prefix "
                   "(BigVAE: half; default: %(default)s)")
    g = parser.add_argument_group("model (vae.py)")
    g.add_argument("--latent-size", type=positive_int, default=768, help="size of z (BigVAE: 768; default: "
                   "%(default)s)")
    g.add_argument("--pool-queries", type=positive_int, default=1, help="attention-pooling queries; their pooled "
                   "states are concatenated before w_e (BigVAE: 1; default: %(default)s)")
    g.add_argument("--posterior", default="bigvae", choices=["bigvae", "diagonal"], help="bigvae: N(mu, I); "
                   "diagonal: N(mu, diag(exp(logvar))) as Optimus and AdaVAE (default: %(default)s)")
    g.add_argument("--z-memory", type=nonneg_int, default=1, help="also give z to every layer as this many "
                   "keys/values (Optimus: 1); 0 is BigVAE's soft token alone (default: %(default)s)")
    g.add_argument("--soft-tokens", type=positive_int, default=1, help="input embeddings made from z by w_d before "
                   "the text (BigVAE: 1; ICAE's memory slots: several; default: %(default)s)")
    g.add_argument("--lora-r", type=positive_int, default=32, help="LoRA rank of both adapters (BigVAE: 32; "
                   "default: %(default)s)")
    g.add_argument("--lora-alpha", type=positive_float, default=8.0, help="LoRA alpha; scale = alpha / r "
                   "(BigVAE: 8; default: %(default)s)")
    g.add_argument("--decoder-init", default="bigvae", choices=["bigvae", "lm"], help="bigvae: w_d starts as "
                   "w_e's transpose (BigVAE); lm: z adds nothing yet, the decoder starts as (with z's keys/values or "
                   "more soft tokens: near) the frozen LM (for a pretrained base; default: %(default)s)")
    g.add_argument("--lead-token", action="store_true", help="put an end-of-text token before z's soft tokens, "
                   "so that they are not the first position, a pretrained LM's attention sink (default: BigVAE's order, "
                   "the soft token first)")
    g.add_argument("--encoder-layers", type=nonneg_int, default=0, help="the encoder reads the span with the "
                   "base's first this many layers, the decoder with all (AdaVAE: 8 of GPT-2's 12): a cheaper step; 0: "
                   "all (BigVAE; default: %(default)s)")
    g.add_argument("--head-lr-scale", type=positive_float, default=1.0, help="the VAE head (f, w_e, w_d, z's "
                   "keys/values, w_logvar) trains at this multiple of --lr, the adapters at --lr (BigVAE: one lr; default: "
                   "%(default)s)")
    g.add_argument("--freeze-base", action="store_true", help="keep tiny's base frozen too (pretrained bases "
                   "always are)")
    g = parser.add_argument_group("noise and KL schedule (vae.py)")
    g.add_argument("--ae-iters", type=nonneg_int, default=None, help="first steps as a plain autoencoder: "
                   "z = mu, no KL (default: half of --max-iters)")
    g.add_argument("--ae-prefix", action="store_true", help="keep the prefix in the autoencoder phase too "
                   "(dropped for --prefix-drop of the batches, as after it; default: no prefix before the noise)")
    g.add_argument("--noise-ramp-iters", type=nonneg_int, default=None, help="then grow the sampling noise "
                   "from 0 to full over this many steps; 0: full at once (default: the rest of the run)")
    g.add_argument("--kl-schedule", default="cosine", choices=["cosine", "cyclical", "constant"], help="cosine: "
                   "BigVAE's sin^2 warm-up; cyclical: Optimus/AdaVAE cycles; constant (default: %(default)s)")
    g.add_argument("--kl-max", type=nonneg_float, default=0.01, help="KL weight reached (BigVAE: 0.01, later "
                   "0.1; default: %(default)s)")
    g.add_argument("--kl-iters", type=positive_int, default=None, help="warm-up length (cosine) or cycle "
                   "length (cyclical), after --ae-iters (default: the rest of the run)")
    g.add_argument("--free-bits", type=nonneg_float, default=0.0, help="KL floor per latent dimension in nats "
                   "(default: off)")
    g.add_argument("--word-dropout", type=fraction, default=None, help="in training, blank this share of the "
                   "decoder's teacher-forced tokens, so it must read them from z (Bowman et al. 2016; default: "
                   f"{per_base('word_dropout')})")
    g.add_argument("--own-tokens", type=fraction, default=0.0, help="in training, replace this share of the "
                   "decoder's teacher-forced inputs by its own greedy guess from a pass without gradients, as it "
                   "meets them when it decodes (scheduled sampling; one more decoder pass a step; default: off)")
    g.add_argument("--edge-weights", action="store_true", help="BigVAE's loss weights 0.05 / 0.15 on the first "
                   "/ last 8 target tokens")
    add_memory_args(parser)
    args = parse(parser, argv)
    defaults = TINY_DEFAULTS if args.model in TINY_MODELS else PRETRAINED_DEFAULTS
    for k, v in defaults.items():  # a resumed run takes its checkpoint's values instead (adopt_config)
        setattr(args, k, v if getattr(args, k) is None else getattr(args, k))
    if args.ae_iters is None:
        args.ae_iters = args.max_iters // 2
    rest = max(1, args.max_iters - args.ae_iters)
    args.noise_ramp_iters = rest if args.noise_ramp_iters is None else args.noise_ramp_iters
    args.kl_iters = rest if args.kl_iters is None else args.kl_iters
    return args


def main(argv=None):
    args = parse_args(argv)
    run = setup(args.device, args.seed)
    state = open_run("vae", args.out_dir, args.resume, args.eval_only, args.max_iters)
    if state is not None:  # the checkpoint's settings: the optimisation's unless given, the model's always
        adopt_config(vars(args), args.explicit, state["config"], TRAIN_KEYS + VAE_TRAIN_KEYS, args.resume,
                     overridable=True)
        # a key the checkpoint lacks came after it was saved: that run had the feature off (VAEConfig's default)
        before = {**{k: v for k, v in dataclasses.asdict(VAEConfig()).items() if k in MODEL_KEYS}, "ae_prefix": False,
                  "own_tokens": 0.0}
        adopt_config(vars(args), args.explicit, {**before, **state["config"]}, MODEL_KEYS + SCHEDULE_KEYS, args.resume)
        if "word_dropout" not in state["config"].keys() | args.explicit:  # saved before the flag existed: it had none
            args.word_dropout = 0.0
    if state is None and args.edge_weights and args.context < 16:  # a new run's (one saved so loads as it trained)
        raise UserError(f"--edge-weights weighs a span's first 8 and last 8 tokens apart, which --context "
                        f"{args.context} cannot hold both of: use --context 16 or more, or drop --edge-weights")
    # a --data file is read (and a bad one refused) before the base loads; the default corpus, known good, after
    docs = None if args.data is None else textdata.read_documents(args.data)
    should_train = should_train_base(args.model, args.freeze_base)
    model = build_vae(args.model, config_from(VAEConfig, {**vars(args), "prefix_slots": args.context}),
                      config_from(MemoryConfig, vars(args)), run.device, should_train, args.batch_size, run.is_main)
    if state is not None:  # tiny's base is saved whether it trains or not: its weights are random
        load_weights(model, state, args.model, args.resume)
    docs = textdata.stdlib_docstrings() if docs is None else docs
    span = 2 * args.context
    train_stream, val_stream = textdata.split_streams(docs, model.tokenizer, span, "the default corpus" if args.data is None else args.data)
    starts = textdata.spread_starts(val_stream, span, args.eval_batches, args.batch_size)
    val_batches = [textdata.to_device(textdata.vae_batch(val_stream, s, args.context, i % 2 == 0), run.device)
                   for i, s in enumerate(starts)]  # fixed held-out windows; half the batches keep the prefix
    paragraphs = textdata.held_out_paragraphs(docs, model.tokenizer, args.eval_paragraphs, 256)

    def evaluate_all():  # every metric of vae_eval.py: the end of a run, and --eval-only
        model.eval()
        metrics = evaluate(model, val_batches, args.iw_samples, should_train, should_print=run.is_main,
                           num_refine_steps=args.refine_steps)
        return {**metrics, **(evaluate_paragraphs(model, paragraphs, args.context, args.refine_steps) if paragraphs
                              else {})}

    if args.eval_only:
        print(json.dumps({**evaluate_all(), "step": state["step"]}))
        return
    optimizer = make_optimizer(model, args.lr, args.weight_decay, lr_scales=[(model.head, args.head_lr_scale)])
    if state is not None:
        load_optimizer(optimizer, state["optimizer"])
    t_start = time.time()

    def get_batch(index):
        g = torch.Generator().manual_seed(batch_seed(args.seed, index))
        step = index // (args.grad_accum * run.world_size)
        # the autoencoder phase sees no prefix unless --ae-prefix
        should_keep_prefix = ((step >= args.ae_iters or args.ae_prefix)
                              and torch.rand((), generator=g).item() >= args.prefix_drop)
        batch = textdata.vae_batch(train_stream, textdata.random_starts(train_stream, span, args.batch_size, g),
                                   args.context, should_keep_prefix)
        return textdata.to_device(batch, run.device)

    history = [] if state is None else state.get("history", [])  # every evaluation: experiments/vae_curve.py
    last_eval = {}
    # a resumed run's clock goes on from its last save (an evaluation's, or SIGTERM's between them)
    minutes_before = 0.0 if state is None else state.get("minutes", history[-1]["minutes"] if history else 0.0)

    def minutes_now():
        return round(minutes_before + (time.time() - t_start) / 60, 2)

    def save(step):  # the trainer saves right after each evaluation, and on SIGTERM between them
        if last_eval:  # an evaluation since the last save
            history.append({"step": step, **last_eval})
            last_eval.clear()
        config = {k: getattr(args, k) for k in TRAIN_KEYS + VAE_TRAIN_KEYS + MODEL_KEYS + SCHEDULE_KEYS}
        saved = {"kind": "vae", "config": config, "vae_config": dataclasses.asdict(model.cfg), "base": args.model,
                 "step": step, "history": history, "minutes": minutes_now(),
                 "model": lora.saved_state(model, "base.", args.model in TINY_MODELS),
                 "optimizer": optimizer.state_dict()}
        if model.base_fingerprint is not None:  # a base that loads by name: what tells it apart (vae_setup.load_weights)
            saved["base_fingerprint"] = model.base_fingerprint
        if args.model not in TINY_MODELS:  # the adapters over a base that loads by name: peft's layout too, first
            # (a save cut short between the two leaves the checkpoint a step behind, which resumes and rewrites it)
            peft_layout.save_peft(model.base, os.path.join(args.out_dir, "peft"), ["encoder", "decoder"], args.model)
        save_checkpoint(args.out_dir, saved)

    if run.is_main:
        num_params = sum(p.numel() for p in model.parameters() if p.requires_grad)
        print(f"{args.model}: {num_params:,} trainable parameters, {len(train_stream):,} training / "
              f"{len(val_stream):,} held-out tokens, {run.world_size} process(es)")

    def evaluate_now():
        last_eval.update(evaluate(model, val_batches, should_print=run.is_main),
                         minutes=minutes_now())
        return dict(last_eval)

    metrics = train(model, optimizer, get_batch, evaluate_now, config_from(TrainConfig, vars(args)), run,
                    0 if state is None else state["step"], save)
    if run.is_main:
        metrics.update(evaluate_all())
    finish(run, metrics)


if __name__ == "__main__":
    run_cli(main)
