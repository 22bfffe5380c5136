"""
Train an IRIS-style world model (worldmodel.py) on a Gymnasium environment, and measure
it on held-out episodes against the copy-last-observation baseline.

    python train_wm.py                                    # CartPole-v1, 1500 steps on one CPU core: ~6 min
    python train_wm.py --max-iters 100 --out-dir out-wm-quick   # a quick look: ~30 s
    python train_wm.py --env ALE/Pong-v5 --max-iters 600 --out-dir out-wm-pong   # Atari through ale-py
    python train_wm.py --env FrozenLake-v1 --out-dir out-wm-lake   # a Discrete state (the cell): one token a step
    python train_wm.py --eval-only --resume out-wm        # evaluate a checkpoint again
    python train_wm.py --resume out-wm --max-iters 4000   # continue a run, with the settings it was started with

With a pretrained LM as the transformer (lm_backbone.py; README, "Does a pretrained LM help the world model?"):
    python pretrain_lm.py                                 # a tiny LM pretrained on text, offline (out-lm)
    python train_wm.py --backbone lm --model out-lm/base --num-bins 32 --embeddings lm-frozen --out-dir out-wm-lm
    python train_wm.py --backbone lm --model smollm2 --lm-layers 2 --num-bins 32 --out-dir out-wm-smollm2   # (CPU)
    python train_wm.py --backbone lm --model gpt2 --out-dir out-wm-gpt2   # GPT-2 small, frozen, + a LoRA adapter
    python train_wm.py --backbone lm --model mistral --load-8bit --offload --out-dir out-wm-mistral   # a small GPU
    python experiments/compare_wm.py                       # the README's comparison table

With the VAE's latent as the state (latent_wm.py: one LM, encoder/decoder/dynamics adapters, 2 tokens a step):
    python train_wm.py --state latent --out-dir out-wm-latent   # a GPT-2-shaped transformer sized by --width etc.
    python train_wm.py --state latent --backbone lm --model out-lm/base --num-bins 32 --out-dir out-wm-latent-lm

Steps, as IRIS (Micheli et al. 2023) with the agent left out:
1. collect --collect-steps transitions with a uniformly random policy (seeded), split by
   episode into train and held-out (the last --val-fraction of the episodes);
2. fit the observation tokenizer to the training observations (vectors: bin edges;
   frames: the background; a Discrete state, e.g. FrozenLake-v1's cell, is its own token),
   train it (frames: --tokenizer-iters), then turn every observation into K tokens once
   (the tokenizer is frozen from then on);
3. train the world model on segments of --segment-steps steps from random starts, padded
   past an episode's end (mask_padding), as IRIS samples them;
4. evaluate on the held-out episodes: obs-token accuracy and cross-entropy, reward and
   end accuracy, and open-loop imagination: from real observations, imagine --horizon
   steps with the real actions and compare with the real future, and with the baseline
   that predicts "nothing changes". Error: vectors (and states, one-hot), mean |x - x_real| in
   units of each dimension's standard deviation; frames, mean |pixel - pixel_real| / 255 at 64x64.
   A picture of real vs imagined goes to OUT_DIR/imagination.png.
A resumed run takes its data and architecture settings from the checkpoint. The last line
printed is one JSON object of the run's metrics.
"""

import os
import time

import torch

from checkpoint import TRAIN_KEYS, adopt_config, check_out_dir, load_checkpoint, save_checkpoint
from common import UserError, config_from, flag_name, make_parser, number, parse, positive_int, run_cli
from data_wm import collect, make_env, split
from eval_wm import evaluate, imagination_starts
from trainer import add_common_args, finish, make_optimizer, setup, train
from wm_setup import (MODEL_KEYS, TOKENIZER_KEYS, TokenizerSettings, add_world_model_args, build_world_model,
                      check_model_flags, check_world_model_flags, make_tokenizer, obs_scale, prepare_tokenizer,
                      restore, saved_state, segment_batches, settings_from, tokenize, tokenizer_metrics,
                      train_config_from)

# the settings a checkpoint records and a resumed run takes from it: what makes the data and the
# observation tokenizer (a run reusing another's tokenizer must match these too), then the model's
DATA_KEYS = ("env", "seed", "collect_steps", "val_fraction") + TOKENIZER_KEYS

open_fraction = number(float, lambda v: 0 < v < 1, "a number between 0 and 1, both excluded")


def parse_args(argv=None):
    parser = make_parser(__doc__)
    add_common_args(parser, model=None, out_dir="out-wm", max_iters=1500, eval_interval=500, batch_size=32,
                    lr=1e-3, warmup_iters=100, weight_decay=0.01)
    g = parser.add_argument_group("data")
    g.add_argument("--collect-steps", type=positive_int, default=20000, help="random-policy transitions to "
                   "collect (default: %(default)s)")
    g.add_argument("--val-fraction", type=open_fraction, default=0.1, help="share of the episodes held out for "
                   "evaluation (default: %(default)s)")
    add_world_model_args(parser, tokenizer_iters_default="--max-iters, at most 2000")
    parser.add_argument("--tokenizer-from", metavar="DIR", default=None, help="take the trained tokenizer from "
                        "another run's checkpoint with the same env, data and tokenizer flags "
                        "(experiments/compare_wm.py trains Pong's once for all rows)")
    g = parser.add_argument_group("evaluation")
    g.add_argument("--horizon", type=positive_int, default=20, help="imagined steps in the open-loop test "
                   "(default: %(default)s)")
    g.add_argument("--num-imagine", type=positive_int, default=256, help="held-out starts imagined from "
                   "(default: %(default)s)")
    args = parse(parser, argv)
    check_world_model_flags(parser, vars(args))
    return args


def start_or_resume(args):
    """Settle everything before any slow work: (state, env). The state is a new run's, or the
    --resume checkpoint, whose data and model settings the run takes unless given (given ones that
    differ are an error); then the checks of flags that only make sense together, the env, the
    run's config, and the tokenizer of --tokenizer-from."""
    state = {"kind": "wm", "step": 0}
    if args.resume is not None:
        state = load_checkpoint(args.resume, "wm", "--resume")
        adopt_config(vars(args), args.explicit, state["config"], DATA_KEYS + MODEL_KEYS, args.resume)
        adopt_config(vars(args), args.explicit, state["config"], TRAIN_KEYS, args.resume, overridable=True)
        if args.eval_only and "world_model" not in state:
            raise UserError(f"{args.resume} stopped while training the tokenizer and has no world model "
                            "yet; resume it without --eval-only")
        if not args.eval_only and "world_model" in state and state["step"] >= args.max_iters:
            raise UserError(f"the checkpoint in {args.resume} is at step {state['step']} already; give --max-iters "
                            "above it to continue, or --eval-only to evaluate it")
    args.model = check_model_flags(vars(args), args.explicit)
    env = make_env(args.env)
    if args.tokenizer_iters is None:  # frames: a short run gets a short tokenizer phase; vectors have none
        args.tokenizer_iters = min(2000, args.max_iters) if len(env.observation_space.shape) == 3 else 0
    state["config"] = {k: getattr(args, k) for k in TRAIN_KEYS + DATA_KEYS + MODEL_KEYS}
    if "tokenizer" not in state and args.tokenizer_from is not None:  # the same data, so the same tokenizer fits
        other = load_checkpoint(args.tokenizer_from, "wm", "--tokenizer-from")
        differ = [f"{flag_name(k)} {other['config'].get(k)!r}" for k in DATA_KEYS
                  if other["config"].get(k) != getattr(args, k)]
        if differ:
            raise UserError(f"--tokenizer-from {args.tokenizer_from} was made from other data ({', '.join(differ)}); "
                            "give the same data and tokenizer flags, or drop --tokenizer-from")
        state.update({k: other[k] for k in ("tokenizer", "tokenizer_step") if k in other})
    return state, env


# -----------------------------------------------------------------------------
# main


def main(argv=None):
    args = parse_args(argv)
    t_start = time.time()
    run = setup(args.device, args.seed)
    check_out_dir(args.out_dir, args.resume)
    state, env = start_or_resume(args)
    config, settings = train_config_from(vars(args)), settings_from(vars(args))
    tokenizer_settings = config_from(TokenizerSettings, vars(args))

    tokenizer = make_tokenizer(env, tokenizer_settings).to(run.device)
    torch.manual_seed(args.seed)  # the world model's initialisation: --seed's, whatever ran before
    # before the slow work: it checks the memory
    world_model = build_world_model(settings, tokenizer, int(env.action_space.n), run.device, args.batch_size,
                                    run.is_main)
    t_collect = time.time()
    data = collect(env, tokenizer, args.collect_steps, args.seed)
    train_data, val_data = split(data, args.val_fraction)
    imagination_starts(val_data["episode"], args.horizon, args.num_imagine)  # refuses a --horizon too long now
    scale = obs_scale(train_data["obs"])
    if run.is_main:
        print(f"collected {len(data['actions'])} steps, {int(data['episode'][-1]) + 1} episodes "
              f"({len(val_data['actions'])} steps held out) in {time.time() - t_collect:.1f}s")
    prepare_tokenizer(tokenizer, train_data, val_data["obs"], scale, tokenizer_settings, config, run, state)
    for part in (train_data, val_data):
        tokenize(tokenizer, part, run.device)
    metrics = tokenizer_metrics(tokenizer, val_data["obs"], scale, run.device)

    optimizer = make_optimizer(world_model, args.lr, args.weight_decay)
    start_step = restore(world_model, optimizer, state, settings, args.resume)
    num_trainable = sum(p.numel() for p in world_model.parameters() if p.requires_grad)
    if run.is_main:
        model = "" if args.model is None else f", {args.model}"
        print(f"world model ({args.state} state, {args.backbone} backbone{model}): "
              f"{num_trainable / 1e6:.2f}M trainable of {sum(p.numel() for p in world_model.parameters()) / 1e6:.2f}M"
              f" parameters, {tokenizer.tokens_per_obs} tokens per observation, vocabulary {tokenizer.vocab_size}")

    get_batch = segment_batches(train_data, tokenizer, args.segment_steps, args.batch_size, args.seed, run.device)

    def save(step):
        save_checkpoint(args.out_dir, {
            "kind": "wm", "config": state["config"], "step": step, "tokenizer": tokenizer.state_dict(),
            "tokenizer_step": args.tokenizer_iters, **saved_state(world_model, settings),
            "optimizer": optimizer.state_dict()})

    def evaluate_now():
        return evaluate(world_model, tokenizer, val_data, scale, args.segment_steps, args.horizon, args.num_imagine,
                        args.seed, os.path.join(args.out_dir, "imagination.png"), run.device)

    if args.eval_only:
        if run.is_main:  # as train() evaluates: one process writes the picture
            metrics.update(evaluate_now())
    else:
        metrics.update(train(world_model, optimizer, get_batch, evaluate_now, config, run, start_step, save))
    metrics["wall_seconds"] = round(time.time() - t_start, 1)
    finish(run, metrics)


if __name__ == "__main__":
    run_cli(main)
