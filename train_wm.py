"""
Train an IRIS-style world model (worldmodel.py) on a Gymnasium environment, and measure
it on held-out episodes against the copy-last-observation baseline.

    python train_wm.py                                    # CartPole-v1, 1500 steps on one CPU core: ~6 min
    python train_wm.py --max-iters 100 --out-dir out-wm-quick   # a quick look: ~30 s
    python train_wm.py --env ALE/Pong-v5 --max-iters 600  # Atari through ale-py (ROMs ship with it)
    python train_wm.py --eval-only --resume out-wm        # evaluate a checkpoint again
    python train_wm.py --resume out-wm --max-iters 4000   # continue a run, with the settings it was started with

With a pretrained LM as the transformer (lm_backbone.py; README, "Does a pretrained LM help the world model?"):
    python pretrain_lm.py                                 # a tiny LM pretrained on text, offline (out-lm)
    python train_wm.py --backbone lm --model out-lm/base --num-bins 32 --embeddings lm-frozen
    python train_wm.py --backbone lm --model smollm2 --lm-layers 2 --num-bins 32   # SmolLM2's first 2 layers (CPU)
    python train_wm.py --backbone lm --model gpt2          # GPT-2 small, frozen, + a LoRA adapter
    python train_wm.py --backbone lm --model mistral --load-8bit --offload   # one small GPU
    python experiments/compare_wm.py                       # the README's comparison table

With the VAE's latent as the state (latent_wm.py: one LM, encoder/decoder/dynamics adapters, 2 tokens a step):
    python train_wm.py --state latent                     # a GPT-2-shaped transformer sized by --width etc.
    python train_wm.py --state latent --backbone lm --model out-lm/base --num-bins 32   # a frozen LM + 3 adapters

Steps, as IRIS (Micheli et al. 2023) with the agent left out:
1. collect --collect-steps transitions with a uniformly random policy (seeded), split by
   episode into train and held-out (the last --val-fraction of the episodes);
2. fit the observation tokenizer to the training observations (vectors: bin edges;
   frames: the background), train it (frames: --tokenizer-iters), then turn every
   observation into K tokens once (the tokenizer is frozen from then on);
3. train the world model on segments of --segment-steps steps from random starts, padded
   past an episode's end (mask_padding), as IRIS samples them;
4. evaluate on the held-out episodes: obs-token accuracy and cross-entropy, reward and
   end accuracy, and open-loop imagination: from real observations, imagine --horizon
   steps with the real actions and compare with the real future, and with the baseline
   that predicts "nothing changes". Error: vectors, mean |x - x_real| in units of each
   dimension's standard deviation; frames, mean |pixel - pixel_real| / 255 at 64x64.
   A picture of real vs imagined goes to OUT_DIR/imagination.png.
A resumed run takes its data and architecture settings from the checkpoint. The last line
printed is one JSON object of the run's metrics.
"""

import time
from dataclasses import replace

from common import (UserError, at_least_2, batch_seed, make_parser, nonneg_int, number, parse, positive_float,
                    positive_int, run_cli)
from offload import add_memory_args, check_memory
from trainer import add_common_args

# the settings a checkpoint records and a resumed run takes from it: what makes the data and the
# observation tokenizer (a run reusing another's tokenizer must match these too), then the model
DATA_KEYS = ("env", "seed", "collect_steps", "val_fraction", "num_bins", "fsq_levels", "tokenizer_iters",
             "tokenizer_lr", "tokenizer_batch_size")
LATENT_KEYS = ("state", "latent_size", "next_latent")  # the state: tokens (IRIS) or a latent (latent_wm.py)
MODEL_KEYS = ("backbone", "segment_steps", "width", "num_layers", "num_heads", "dropout", "model", "embeddings",
              "lm_init", "lm_layers", "train_base", "lora_r", "lora_alpha", "load_8bit", "load_4bit") + LATENT_KEYS
LM_FLAGS = ("model", "embeddings", "lm_init", "lm_layers", "train_base", "lora_r", "lora_alpha", "load_8bit",
            "load_4bit", "offload", "grad_checkpoint")  # they configure the LM backbone, so need --backbone lm


open_fraction = number(float, lambda v: 0 < v < 1, "a number between 0 and 1, both excluded")
dropout_rate = number(float, lambda v: 0 <= v < 1, "a number from 0 up to, not including, 1")


def parse_args(argv=None):
    parser = make_parser(__doc__)
    add_common_args(parser, model=None, out_dir="out-wm", max_iters=1500, eval_interval=500, batch_size=32,
                    lr=1e-3, warmup_iters=100, weight_decay=0.01)
    g = parser.add_argument_group("data")
    g.add_argument("--collect-steps", type=positive_int, default=20000, help="random-policy transitions to "
                   "collect (default: %(default)s)")
    g.add_argument("--val-fraction", type=open_fraction, default=0.1, help="share of the episodes held out for "
                   "evaluation (default: %(default)s)")
    add_world_model_args(parser)
    parser.add_argument("--tokenizer-from", metavar="DIR", default=None, help="take the trained tokenizer from "
                        "another run's checkpoint with the same env, data and tokenizer flags "
                        "(experiments/compare_wm.py trains Pong's once for all rows)")
    g = parser.add_argument_group("evaluation")
    g.add_argument("--horizon", type=positive_int, default=20, help="imagined steps in the open-loop test "
                   "(default: %(default)s)")
    g.add_argument("--num-imagine", type=positive_int, default=256, help="held-out starts imagined from "
                   "(default: %(default)s)")
    return check_world_model_args(parser, parse(parser, argv))


def add_world_model_args(parser):
    """The flags of the environment, the state (tokens or a latent), the world model, its LM backbone
    and the observation tokenizer; train_agent.py has them too."""
    g = parser.add_argument_group("what to model")
    g.add_argument("--env", default="CartPole-v1", help="Gymnasium id with a Discrete action space and a "
                   "vector or RGB-frame Box observation, e.g. CartPole-v1, Acrobot-v1, ALE/Pong-v5 "
                   "(default: %(default)s)")
    g.add_argument("--backbone", default="iris", choices=["iris", "lm"], help="the transformer inside the world "
                   "model: iris = IRIS's minGPT, sized by --width, --num-layers, --num-heads; lm = the --model "
                   "LM, fed embeddings, with a LoRA adapter (default: %(default)s)")
    g = parser.add_argument_group("the state (latent_wm.py)")
    g.add_argument("--state", default="tokens", choices=["tokens", "latent"], help="tokens: IRIS, K observation "
                   "tokens + an action per step; latent: one VAE latent per step, one LM with encoder, decoder and "
                   "dynamics adapters (default: %(default)s)")
    g.add_argument("--latent-size", type=positive_int, default=64, help="--state latent: size of z (default: "
                   "%(default)s)")
    g.add_argument("--next-latent", default="kl", choices=["kl", "decode"], help="--state latent: how the next "
                   "latent is learned: kl, the dynamics prior's KL to the next posterior; decode, the decoder's "
                   "cross-entropy of the next observation (default: %(default)s)")
    g = parser.add_argument_group("the world model")
    g.add_argument("--segment-steps", type=at_least_2, default=20, help="steps per training segment, and the "
                   "world model's context in steps (IRIS: 20; default: %(default)s)")
    g.add_argument("--width", type=positive_int, default=128, help="--backbone iris: transformer width (IRIS: "
                   "256; default: %(default)s)")
    g.add_argument("--num-layers", type=positive_int, default=3, help="its layers (IRIS: 10; default: "
                   "%(default)s)")
    g.add_argument("--num-heads", type=positive_int, default=4, help="its attention heads, a divisor of --width "
                   "(IRIS: 4; default: %(default)s)")
    g.add_argument("--dropout", type=dropout_rate, default=0.1, help="its dropout (IRIS: 0.1; default: "
                   "%(default)s)")
    g = parser.add_argument_group("the LM backbone (--backbone lm; --model picks the LM, default tiny)")
    g.add_argument("--embeddings", default="iris", choices=["iris", "lm-frozen", "lm-trained"], help="iris: "
                   "IRIS's own tables, learned; lm-frozen / lm-trained: rows of the LM's own token-embedding "
                   "table (its last vocabulary rows), kept frozen or trained (default: %(default)s)")
    g.add_argument("--lm-init", default="pretrained", choices=["pretrained", "random"], help="random: the "
                   "same architecture with fresh random weights, the control for pretraining (default: "
                   "%(default)s)")
    g.add_argument("--lm-layers", type=positive_int, default=None, help="keep only the LM's first N layers (and "
                   "its final norm): its lower layers as pretrained, at a CPU's cost (default: all)")
    g.add_argument("--train-base", action="store_true", help="train every weight of the LM too (with "
                   "--lm-init random: the LM's architecture trained from scratch); default: frozen + LoRA")
    g.add_argument("--lora-r", type=positive_int, default=16, help="rank of the dynamics adapter (default: "
                   "%(default)s)")
    g.add_argument("--lora-alpha", type=positive_float, default=32.0, help="its alpha; scale = alpha / r "
                   "(default: %(default)s)")
    add_memory_args(parser)
    g = parser.add_argument_group("observation tokenizer")
    g.add_argument("--num-bins", type=at_least_2, default=64, help="vector observations: bins per dimension "
                   "(default: %(default)s)")
    g.add_argument("--tokenizer-iters", type=nonneg_int, default=None, help="frame observations: tokenizer "
                   "training steps before the world model's (default: train_wm.py: --max-iters, at most 2000; "
                   "train_agent.py: 2000)")
    g.add_argument("--fsq-levels", type=at_least_2, nargs="+", default=[8, 8, 8], help="frame observations: FSQ "
                   "levels per latent number; vocabulary = their product (IRIS: 512; default: %(default)s)")
    g.add_argument("--tokenizer-lr", type=positive_float, default=1e-3, help="frame tokenizer learning rate "
                   "(default: %(default)s)")
    g.add_argument("--tokenizer-batch-size", type=positive_int, default=64, help="frames per tokenizer step "
                   "(default: %(default)s)")


def check_world_model_args(parser, args):
    """The checks of add_world_model_args's flags that need several of them; returns args."""
    if args.width % args.num_heads != 0:
        parser.error(f"--width {args.width} is not a multiple of --num-heads {args.num_heads}: each head gets "
                     "width / heads numbers")
    if args.eval_only and args.resume is None:
        parser.error("--eval-only evaluates a checkpoint: pass --resume DIR too")
    return args


def check_model_flags(args):
    """Checked once a resumed run took its settings, before anything is written: LM flags need --backbone
    lm (which without --model takes tiny), no quantized random LM, --lm-layers within the LM's, and the
    latent world model's flags need --state latent."""
    if args.backbone == "iris":
        given = [f"--{k.replace('_', '-')}" for k in LM_FLAGS if k in args.explicit]
        if given:
            raise UserError(f"{', '.join(given)} configure(s) the LM backbone: add --backbone lm, or size "
                            "IRIS's transformer with --width, --num-layers, --num-heads")
    elif args.model is None:
        args.model = "tiny"
    if args.lm_init == "random" and (args.load_8bit or args.load_4bit):
        raise UserError("--lm-init random draws fresh weights, which --load-8bit/--load-4bit cannot quantize")
    if args.lm_layers is not None:  # checked before a tokenizer trains and a checkpoint is written
        num_layers = lm.num_layers(args.model)
        if args.lm_layers > num_layers:
            raise UserError(f"--lm-layers {args.lm_layers}: --model {args.model} has {num_layers} layers; give "
                            "that many or fewer")
    given = [f"--{k.replace('_', '-')}" for k in LATENT_KEYS[1:] if k in args.explicit]
    if args.state == "tokens" and given:
        raise UserError(f"{', '.join(given)} configure(s) the latent world model: add --state latent")


if __name__ == "__main__":
    parse_args()  # --help and bad flags answer before the heavy imports below

import torch

import lm
import lora
from data_wm import add_episode_bounds, collect, make_env, segments, split
from eval_wm import evaluate
from latent_wm import LatentWorldModelConfig, latent_world_model
from lm_backbone import lm_world_model, should_save_base
from obs_tokenizer import FrameTokenizer, FrameTokenizerConfig, VectorTokenizer, VectorTokenizerConfig
from checkpoint import (TRAIN_KEYS, adopt_config, check_out_dir, load_checkpoint, load_optimizer,
                        save_checkpoint)
from common import config_from
from trainer import TrainConfig, finish, make_optimizer, setup, train
from worldmodel import Transformer, TransformerConfig, WorldModel, WorldModelConfig


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
    check_model_flags(args)
    env = make_env(args.env)
    if args.tokenizer_iters is None:  # frames: a short run gets a short tokenizer phase; vectors have none
        args.tokenizer_iters = min(2000, args.max_iters) if len(env.observation_space.shape) == 3 else 0
    state["config"] = {k: getattr(args, k) for k in TRAIN_KEYS + DATA_KEYS + MODEL_KEYS}
    if "tokenizer" not in state and args.tokenizer_from is not None:  # the same data, so the same tokenizer fits
        other = load_checkpoint(args.tokenizer_from, "wm", "--tokenizer-from")
        differ = [f"--{k.replace('_', '-')} {other['config'].get(k)!r}" for k in DATA_KEYS
                  if other["config"].get(k) != getattr(args, k)]
        if differ:
            raise UserError(f"--tokenizer-from {args.tokenizer_from} was made from other data ({', '.join(differ)}); "
                            "give the same data and tokenizer flags, or drop --tokenizer-from")
        state.update({k: other[k] for k in ("tokenizer", "tokenizer_step") if k in other})
    return state, env


# -----------------------------------------------------------------------------
# tokenizer


def make_tokenizer(env, args):
    """Bins for vector observations, the FSQ autoencoder for frames (obs_tokenizer.py)."""
    shape = env.observation_space.shape
    if len(shape) == 1:
        return VectorTokenizer(VectorTokenizerConfig(obs_dim=shape[0], num_bins=args.num_bins))
    return FrameTokenizer(FrameTokenizerConfig(levels=tuple(args.fsq_levels)))


def prepare_tokenizer(tokenizer, train_data, val_obs, scale, args, run, state):
    """Make the tokenizer ready and frozen: from the checkpoint (or --tokenizer-from's), or fitted
    to the training observations and, for frames, trained (held-out error on val_obs)."""
    if "tokenizer" in state:
        tokenizer.load_state_dict(state["tokenizer"])
    else:
        tokenizer.fit(train_data["obs"].to(run.device))
    if isinstance(tokenizer, FrameTokenizer) and state.get("tokenizer_step", 0) < args.tokenizer_iters:
        train_frame_tokenizer(tokenizer, train_data, val_obs, scale, args, run, state)
    tokenizer.eval()


@torch.no_grad()
def tokenize(tokenizer, data, run):
    """Add obs_tokens (N, K) and the episode bounds to data, for segments()."""
    data["obs_tokens"] = torch.cat([tokenizer.encode(o.to(run.device)).cpu() for o in data["obs"].split(512)])
    add_episode_bounds(data)


def train_frame_tokenizer(tokenizer, train_data, val_obs, scale, args, run, state):
    """The tokenizer's own training phase, with the shared loop; resumes from state."""
    config = replace(config_from(TrainConfig, vars(args)), max_iters=args.tokenizer_iters, lr=args.tokenizer_lr,
                     eval_interval=args.tokenizer_iters)
    optimizer = make_optimizer(tokenizer, args.tokenizer_lr, weight_decay=0.0)
    if "tokenizer_optimizer" in state:
        optimizer.load_state_dict(state["tokenizer_optimizer"])
    frames = train_data["obs"]

    def get_batch(index):
        g = torch.Generator().manual_seed(batch_seed(args.seed, index))
        return {"frames": frames[torch.randint(len(frames), (args.tokenizer_batch_size,), generator=g)].to(run.device)}

    def save(step):
        save_checkpoint(args.out_dir, {**state, "tokenizer": tokenizer.state_dict(), "tokenizer_step": step,
                                       "tokenizer_optimizer": optimizer.state_dict()})

    if run.is_main:
        print(f"training the frame tokenizer for {args.tokenizer_iters} steps")
    train(tokenizer, optimizer, get_batch, lambda: tokenizer_metrics(tokenizer, val_obs, scale, run),
          config, run, start_step=state.get("tokenizer_step", 0), save=save)
    tokenizer.eval()


@torch.no_grad()
def tokenizer_metrics(tokenizer, obs, scale, run):
    """Held-out reconstruction error, in the units of the imagination error."""
    errors = [(tokenizer.decode(tokenizer.encode(o.to(run.device))).float().cpu() - o.float()).abs() / scale
              for o in obs.split(512)]
    return {"tokenizer_err": torch.cat(errors).mean().item()}


def obs_scale(obs):
    """What one unit of error is: 255 for frames, each dimension's std for vectors."""
    return 255.0 if obs.dtype == torch.uint8 else obs.float().std(0).clamp(min=1e-8)


# -----------------------------------------------------------------------------
# the world model


def build_world_model(args, tokenizer, env, run):
    """--state tokens: IRIS's transformer, or an LM (lm_backbone.py) with the tables --embeddings picks;
    --state latent: latent_wm.py's, the --backbone iris shape from scratch or the --model LM with adapters."""
    shapes = dict(tokens_per_obs=tokenizer.tokens_per_obs, obs_vocab_size=tokenizer.vocab_size,
                  num_actions=int(env.action_space.n), max_steps=args.segment_steps)
    if args.state == "latent":
        config = LatentWorldModelConfig(**shapes, latent_size=args.latent_size, next_latent=args.next_latent)
        return latent_world_model(args, config, run.device, run.is_main)
    if args.backbone == "lm":
        return lm_world_model(args, WorldModelConfig(**shapes), run.device, run.is_main)
    backbone = Transformer(TransformerConfig(width=args.width, num_layers=args.num_layers,
                                             num_heads=args.num_heads, dropout=args.dropout))
    world_model = WorldModel(WorldModelConfig(**shapes), backbone).to(run.device)
    check_memory(world_model, run.device, args.batch_size * world_model.config.max_tokens,
                 f"--batch-size (now {args.batch_size})")  # offload.place checks a model with an LM base
    return world_model


def segment_batches(data, tokenizer, args, run):
    """get_batch(index) for trainer.train: --batch-size segments from random starts in data."""
    num_tokens = args.batch_size * args.segment_steps * (tokenizer.tokens_per_obs + 1)

    def get_batch(index):
        g = torch.Generator().manual_seed(batch_seed(args.seed, index))
        starts = torch.randint(len(data["actions"]), (args.batch_size,), generator=g)
        batch = {k: v.to(run.device) for k, v in segments(data, starts, args.segment_steps).items()}
        return {**batch, "num_tokens": num_tokens}

    return get_batch


def saved_state(world_model, args):
    """What a checkpoint keeps: all but a frozen pretrained LM's own weights, which reload from
    --model (an IRIS world model has no backbone.lm. weights, so all of it is kept; the latent one's
    --backbone iris transformer trains from scratch, so it is kept too: lm_backbone.should_save_base)."""
    return lora.saved_state(world_model, "backbone.lm.", should_save_base(args))


def restore(world_model, optimizer, state, args):
    """Load a resumed run's world model and optimizer; returns the step to start from."""
    if "world_model" not in state:
        return 0
    lora.load_saved_state(world_model, state["world_model"], "backbone.lm.", should_save_base(args), args.resume)
    load_optimizer(optimizer, state["optimizer"])
    return state["step"]


# -----------------------------------------------------------------------------
# main


def main(argv=None):
    args = parse_args(argv)
    t_start = time.time()
    run = setup(args.device, args.seed)
    check_out_dir(args.out_dir, args.resume)
    state, env = start_or_resume(args)

    tokenizer = make_tokenizer(env, args).to(run.device)
    torch.manual_seed(args.seed)  # the world model's initialisation: --seed's, whatever ran before
    world_model = build_world_model(args, tokenizer, env, run)  # before the slow work: it checks the memory
    t_collect = time.time()
    data = collect(env, tokenizer, args.collect_steps, args.seed)
    train_data, val_data = split(data, args.val_fraction)
    scale = obs_scale(train_data["obs"])
    if run.is_main:
        print(f"collected {len(data['actions'])} steps, {int(data['episode'][-1]) + 1} episodes "
              f"({len(val_data['actions'])} steps held out) in {time.time() - t_collect:.1f}s")
    prepare_tokenizer(tokenizer, train_data, val_data["obs"], scale, args, run, state)
    for part in (train_data, val_data):
        tokenize(tokenizer, part, run)
    metrics = tokenizer_metrics(tokenizer, val_data["obs"], scale, run)

    optimizer = make_optimizer(world_model, args.lr, args.weight_decay)
    start_step = restore(world_model, optimizer, state, args)
    num_trainable = sum(p.numel() for p in world_model.parameters() if p.requires_grad)
    if run.is_main:
        model = "" if args.model is None else f", {args.model}"
        print(f"world model ({args.state} state, {args.backbone} backbone{model}): "
              f"{num_trainable / 1e6:.2f}M trainable of {sum(p.numel() for p in world_model.parameters()) / 1e6:.2f}M"
              f" parameters, {tokenizer.tokens_per_obs} tokens per observation, vocabulary {tokenizer.vocab_size}")

    get_batch = segment_batches(train_data, tokenizer, args, run)

    def save(step):
        save_checkpoint(args.out_dir, {
            "kind": "wm", "config": state["config"], "step": step, "tokenizer": tokenizer.state_dict(),
            "tokenizer_step": args.tokenizer_iters, "world_model": saved_state(world_model, args),
            "optimizer": optimizer.state_dict()})

    def evaluate_now():
        return evaluate(world_model, tokenizer, val_data, scale, args, run)

    if args.eval_only:
        metrics.update(evaluate_now())
    else:
        metrics.update(train(world_model, optimizer, get_batch, evaluate_now, config_from(TrainConfig, vars(args)), run,
                             start_step, save))
    metrics["wall_seconds"] = round(time.time() - t_start, 1)
    finish(run, metrics)


if __name__ == "__main__":
    run_cli(main)
