"""
Train an IRIS-style world model (worldmodel.py) on a Gymnasium environment, and measure
it on held-out episodes against the copy-last-observation baseline.

    python train_wm.py                                    # CartPole-v1 on the CPU, a few minutes
    python train_wm.py --env ALE/Pong-v5 --max-iters 600  # Atari through ale-py (ROMs ship with it), ~20 min
    python train_wm.py --eval-only --resume out-wm        # evaluate a checkpoint again
    python train_wm.py --resume out-wm --max-iters 4000   # continue a run

With a pretrained LM as the transformer (lm_backbone.py; README, "Does a pretrained LM help?"):
    python train_vae.py --objective lm --out-dir out-lm   # a tiny LM pretrained on text, offline
    python train_wm.py --backbone lm --model out-lm/base --num-bins 32 --embeddings lm-frozen
    python train_wm.py --backbone lm --model gpt2          # GPT-2 small, frozen, + a LoRA adapter
    python train_wm.py --backbone lm --model mistral --load-8bit --offload   # one small GPU
    python compare_wm.py                                   # the README's comparison table

Steps, as IRIS (Micheli et al. 2023) with the agent left out:
1. collect --collect-steps transitions with a uniformly random policy (seeded), split by
   episode into train and held-out (the last --val-fraction of the episodes);
2. fit the observation tokenizer to the training observations (vectors: bin edges;
   frames: the background), train it (frames: --tokenizer-iters), then turn every
   observation into K tokens once (the tokenizer is frozen from then on);
3. train the world model on --segment-steps-step segments from random starts, padded
   past an episode's end (mask_padding), as IRIS samples them;
4. evaluate on the held-out episodes: obs-token accuracy and cross-entropy, reward and
   end accuracy, and open-loop imagination: from real observations, imagine --horizon
   steps with the real actions and compare with the real future, and with the baseline
   that predicts "nothing changes". Error: vectors, mean |x - x_real| in units of each
   dimension's standard deviation; frames, mean |pixel - pixel_real| / 255 at 64x64.
   A picture of real vs imagined goes to OUT_DIR/imagination.png.
The last line printed is one JSON object of the run's metrics.
"""

import copy
import json
import os
import time
from collections import defaultdict

import numpy as np
import torch
import torch.nn as nn

import lora
import offload
from plot_wm import draw
from lm_backbone import LMBackbone, lm_token_tables, randomized
from obs_tokenizer import FrameTokenizer, FrameTokenizerConfig, VectorTokenizer, VectorTokenizerConfig
from trainer import (UserError, add_common_args, check_out_dir, load_checkpoint, make_parser, run_cli,
                     save_checkpoint, setup, train)
from worldmodel import Transformer, TransformerConfig, WorldModel, WorldModelConfig, WorldModelEnv


def parse_args(argv=None):
    parser = make_parser(__doc__)
    add_common_args(parser, model=None, out_dir="out-wm", max_iters=1500, eval_interval=500, batch_size=32,
                    lr=1e-3, warmup_iters=100, weight_decay=0.01)
    g = parser.add_argument_group("world model")
    g.add_argument("--env", default="CartPole-v1", help="Gymnasium id with a Discrete action space and a "
                   "vector or RGB-frame Box observation, e.g. CartPole-v1, Acrobot-v1, ALE/Pong-v5 "
                   "(default: %(default)s)")
    g.add_argument("--backbone", default="iris", choices=["iris", "lm"], help="the transformer inside the world "
                   "model: iris = IRIS's minGPT, sized by --width, --num-layers, --num-heads; lm = the --model "
                   "LM, fed embeddings, with a LoRA adapter (default: %(default)s)")
    g.add_argument("--collect-steps", type=int, default=20000, help="random-policy transitions to collect "
                   "(default: %(default)s)")
    g.add_argument("--val-fraction", type=float, default=0.1, help="share of the episodes held out for "
                   "evaluation (default: %(default)s)")
    g.add_argument("--segment-steps", type=int, default=20, help="steps per training segment, and the "
                   "world model's context in steps (IRIS: 20; default: %(default)s)")
    g.add_argument("--width", type=int, default=128, help="transformer width (IRIS: 256; default: %(default)s)")
    g.add_argument("--num-layers", type=int, default=3, help="transformer layers (IRIS: 10; default: "
                   "%(default)s)")
    g.add_argument("--num-heads", type=int, default=4, help="attention heads (IRIS: 4; default: %(default)s)")
    g.add_argument("--dropout", type=float, default=0.1, help="dropout (IRIS: 0.1; default: %(default)s)")
    g = parser.add_argument_group("the LM backbone (--backbone lm; --model picks the LM, default tiny)")
    g.add_argument("--embeddings", default="iris", choices=["iris", "lm-frozen", "lm-trained"], help="iris: "
                   "IRIS's own tables, learned; lm-frozen / lm-trained: rows of the LM's own token-embedding "
                   "table (its last vocabulary rows), kept frozen or trained (default: %(default)s)")
    g.add_argument("--lm-init", default="pretrained", choices=["pretrained", "random"], help="random: the "
                   "same architecture with fresh random weights, the control for pretraining (default: "
                   "%(default)s)")
    g.add_argument("--train-base", action="store_true", help="train every weight of the LM too (with "
                   "--lm-init random: the LM's architecture trained from scratch); default: frozen + LoRA")
    g.add_argument("--lora-r", type=int, default=16, help="rank of the dynamics adapter (default: %(default)s)")
    g.add_argument("--lora-alpha", type=float, default=32.0, help="its alpha; scale = alpha / r (default: "
                   "%(default)s)")
    offload.add_memory_args(parser)
    g = parser.add_argument_group("observation tokenizer")
    g.add_argument("--num-bins", type=int, default=64, help="vector observations: bins per dimension "
                   "(default: %(default)s)")
    g.add_argument("--tokenizer-iters", type=int, default=2000, help="frame observations: tokenizer "
                   "training steps before the world model's (default: %(default)s)")
    g.add_argument("--fsq-levels", type=int, nargs="+", default=[8, 8, 8], help="frame observations: FSQ "
                   "levels per latent number; vocabulary = their product (IRIS: 512; default: %(default)s)")
    g.add_argument("--tokenizer-lr", type=float, default=1e-3, help="frame tokenizer learning rate "
                   "(default: %(default)s)")
    g.add_argument("--tokenizer-batch-size", type=int, default=64, help="frames per tokenizer step "
                   "(default: %(default)s)")
    g.add_argument("--tokenizer-from", metavar="DIR", default=None, help="take the trained tokenizer from "
                   "another run's checkpoint with the same env, data and tokenizer flags (compare_wm.py "
                   "trains Pong's once for all rows)")
    g = parser.add_argument_group("evaluation")
    g.add_argument("--horizon", type=int, default=20, help="imagined steps in the open-loop test "
                   "(default: %(default)s)")
    g.add_argument("--num-imagine", type=int, default=256, help="held-out starts imagined from "
                   "(default: %(default)s)")
    args = parser.parse_args(argv)
    lm_only = {"--model": args.model is not None, "--embeddings": args.embeddings != "iris",
               "--lm-init": args.lm_init != "pretrained", "--train-base": args.train_base,
               "--load-8bit": args.load_8bit, "--load-4bit": args.load_4bit, "--offload": args.offload,
               "--grad-checkpoint": args.grad_checkpoint}
    if args.backbone == "iris" and any(lm_only.values()):
        raise UserError(f"{', '.join(f for f, given in lm_only.items() if given)} configure(s) the LM backbone: "
                        "add --backbone lm, or size IRIS's transformer with --width, --num-layers, --num-heads")
    if args.backbone == "lm":
        args.model = args.model or "tiny"
    if args.lm_init == "random" and (args.load_8bit or args.load_4bit):
        raise UserError("--lm-init random draws fresh weights, which --load-8bit/--load-4bit cannot quantize")
    if args.eval_only and not args.resume:
        raise UserError("--eval-only evaluates a checkpoint: pass --resume DIR too")
    return args


# -----------------------------------------------------------------------------
# environment and data


def make_env(env_id):
    import gymnasium as gym

    if env_id.startswith("ALE/"):
        import ale_py

        gym.register_envs(ale_py)
    try:
        env = gym.make(env_id)
    except gym.error.Error as e:
        raise UserError(f"unknown Gymnasium env {env_id!r} ({e}); try CartPole-v1, Acrobot-v1 or "
                        "ALE/Pong-v5") from e
    space = env.observation_space
    if not isinstance(env.action_space, gym.spaces.Discrete):
        raise UserError(f"{env_id} has actions {env.action_space}; the world model needs a Discrete "
                        "action space (e.g. CartPole-v1, ALE/Pong-v5)")
    is_vector = isinstance(space, gym.spaces.Box) and len(space.shape) == 1
    is_frame = (isinstance(space, gym.spaces.Box) and len(space.shape) == 3 and space.shape[2] == 3
                and space.dtype == np.uint8)
    if not (is_vector or is_frame):
        raise UserError(f"{env_id} has observations {space}; supported are vectors (a 1-D Box) and RGB "
                        "frames (an (H, W, 3) uint8 Box)")
    return env


def make_tokenizer(env, args):
    shape = env.observation_space.shape
    if len(shape) == 1:
        return VectorTokenizer(VectorTokenizerConfig(obs_dim=shape[0], num_bins=args.num_bins))
    return FrameTokenizer(FrameTokenizerConfig(levels=tuple(args.fsq_levels)))


def collect(env, tokenizer, num_steps, seed):
    """num_steps transitions of a seeded uniformly random policy, as flat tensors:
    obs (N, *obs_shape) preprocessed, actions, rewards, ends (terminated) and episode (N,).
    The last episode is cut at num_steps (like a time limit: no end label)."""
    env.action_space.seed(seed)
    obs, _ = env.reset(seed=seed)
    chunks, raw = [], []
    actions, rewards, ends, episode = [], [], [], []
    num_episodes = 0
    for _ in range(num_steps):
        action = env.action_space.sample()
        raw.append(obs)
        obs, reward, terminated, truncated, _ = env.step(action)
        actions.append(action), rewards.append(reward), ends.append(terminated), episode.append(num_episodes)
        if terminated or truncated:
            obs, _ = env.reset()
            num_episodes += 1
        if len(raw) == 1000:  # preprocess as we go: raw Atari frames are 100 kB each
            chunks.append(tokenizer.preprocess(np.stack(raw)))
            raw = []
    if raw:
        chunks.append(tokenizer.preprocess(np.stack(raw)))
    return {"obs": torch.cat(chunks), "actions": torch.tensor(actions), "ends": torch.tensor(ends),
            "rewards": torch.tensor(rewards, dtype=torch.float32), "episode": torch.tensor(episode)}


def split(data, val_fraction):
    """Split by episode: the last val_fraction of the episodes (at least one) are held out."""
    num_episodes = int(data["episode"][-1]) + 1
    if num_episodes < 2:
        raise UserError(f"only {num_episodes} episode collected: raise --collect-steps")
    num_val = min(num_episodes - 1, max(1, round(num_episodes * val_fraction)))
    first_val = int((data["episode"] < num_episodes - num_val).sum())
    return ({k: v[:first_val] for k, v in data.items()}, {k: v[first_val:] for k, v in data.items()})


def add_episode_bounds(data):
    """For each step, the index of its episode's first step and one past its last."""
    n = len(data["episode"])
    first = torch.nonzero(data["episode"][1:] != data["episode"][:-1]).squeeze(1) + 1
    bounds = torch.cat([torch.tensor([0]), first, torch.tensor([n])])
    which = torch.bucketize(torch.arange(n), bounds, right=True) - 1  # episode number within data
    data["episode_start"], data["episode_end"] = bounds[which], bounds[which + 1]


def batch_generator(args, index):
    """The random source of batch `index`: a function of (--seed, index) only, so a resumed
    run draws the very batches the uninterrupted run would have."""
    return torch.Generator().manual_seed(args.seed * 1_000_003 + index)


def segments(data, starts, num_steps):
    """IRIS's training segments: num_steps steps from each start, padded past the episode's end."""
    idx = starts.unsqueeze(1) + torch.arange(num_steps)  # (B, L)
    mask_padding = idx < data["episode_end"][starts].unsqueeze(1)
    idx = torch.where(mask_padding, idx, starts.unsqueeze(1))  # padded steps repeat the start; never labels
    return {"obs_tokens": data["obs_tokens"][idx], "actions": data["actions"][idx],
            "rewards": data["rewards"][idx], "ends": data["ends"][idx], "mask_padding": mask_padding}


# -----------------------------------------------------------------------------
# tokenizer


def train_frame_tokenizer(tokenizer, train_data, val_data, scale, args, run, state):
    """The tokenizer's own training phase, with the shared loop; resumes from state."""
    targs = copy.copy(args)
    targs.max_iters, targs.lr, targs.eval_interval = args.tokenizer_iters, args.tokenizer_lr, args.tokenizer_iters
    optimizer = torch.optim.Adam(tokenizer.parameters(), lr=args.tokenizer_lr)
    if "tokenizer_optimizer" in state:
        optimizer.load_state_dict(state["tokenizer_optimizer"])
    frames = train_data["obs"]

    def get_batch(index):
        idx = torch.randint(len(frames), (args.tokenizer_batch_size,), generator=batch_generator(args, index))
        return {"frames": frames[idx].to(run.device)}

    def save(step):
        save_checkpoint(args.out_dir, {**state, "tokenizer": tokenizer.state_dict(), "tokenizer_step": step,
                                       "tokenizer_optimizer": optimizer.state_dict()})

    print(f"training the frame tokenizer for {args.tokenizer_iters} steps")
    train(tokenizer, optimizer, get_batch, lambda: tokenizer_metrics(tokenizer, val_data["obs"], scale, run),
          targs, run, start_step=state.get("tokenizer_step", 0), save=save)
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
# evaluation


@torch.no_grad()
def evaluate(world_model, tokenizer, val, scale, args, run):
    world_model.eval()
    metrics = heldout_metrics(world_model, val, args, run)
    curves, example, metrics["imagined_steps_per_s"] = imagine(world_model, tokenizer, val, scale, args, run)
    for h in sorted({1, 5, args.horizon} & set(range(1, args.horizon + 1))):
        for name, curve in curves.items():
            metrics[f"{name}_h{h}"] = curve[h - 1]
    beats = [i < c for i, c in zip(curves["imag_err"], curves["copy_err"])]
    metrics["imag_beats_copy_up_to_h"] = (beats + [False]).index(False)  # first horizon where it does not
    draw(example, curves, os.path.join(args.out_dir, "imagination.png"))
    return metrics


def heldout_metrics(world_model, val, args, run):
    """Accuracy and cross-entropy of each head over the held-out episodes, cut into
    consecutive segments from each episode's start; and the accuracy on the rare events
    that plain accuracy hides: steps with a nonzero reward, steps where the episode ended."""
    steps = torch.arange(len(val["episode"]))
    starts = steps[(steps - val["episode_start"]) % args.segment_steps == 0]
    sums = defaultdict(float)
    for chunk in starts.split(64):
        batch = {k: v.to(run.device) for k, v in segments(val, chunk, args.segment_steps).items()}
        for name, (logits, labels) in world_model.logits_and_labels(batch).items():
            keep = labels != -100
            logits, labels = logits[keep].float(), labels[keep]
            correct = logits.argmax(-1) == labels
            sums[f"{name}_ce"] += nn.functional.cross_entropy(logits, labels, reduction="sum").item()
            sums[f"{name}_acc"] += correct.sum().item()
            sums[f"{name}_n"] += len(labels)
            if name != "obs":
                event = labels != 1 if name == "reward" else labels == 1  # reward class 1 is 0
                sums[f"{name}_event_acc"] += correct[event].sum().item()
                sums[f"{name}_event_n"] += event.sum().item()
    metrics = {f"val_{name}_{m}": sums[f"{name}_{m}"] / sums[f"{name}_n"]
               for name in ("obs", "reward", "end") for m in ("acc", "ce")}
    for name in ("reward", "end"):  # 0 when there is no such event in the held-out episodes
        metrics[f"val_{name}_event_acc"] = sums[f"{name}_event_acc"] / max(1, sums[f"{name}_event_n"])
    return metrics


def imagine(world_model, tokenizer, val, scale, args, run):
    """Open-loop imagination from held-out starts with the real actions; per-horizon
    token accuracy and error of the world model and of copying the start observation;
    imagined steps per second (all starts imagine at once, as one batch)."""
    H = args.horizon
    valid = torch.nonzero(torch.arange(len(val["episode"])) + H < val["episode_end"]).squeeze(1)
    if len(valid) == 0:
        raise UserError(f"no held-out episode is longer than --horizon {H}; lower it or raise --collect-steps")
    starts = valid[torch.linspace(0, len(valid) - 1, min(args.num_imagine, len(valid))).long()]
    env = WorldModelEnv(world_model, tokenizer, generator=torch.Generator(run.device).manual_seed(args.seed))
    obs, info = env.reset(val["obs"][starts].to(run.device))
    real_tokens = val["obs_tokens"][starts]
    imagined = [obs.cpu()]
    curves = {"imag_acc": [], "copy_acc": [], "imag_err": [], "copy_err": []}
    seconds = 0.0
    for h in range(1, H + 1):
        t = time.time()
        obs, _, _, _, info = env.step(val["actions"][starts + h - 1].to(run.device))
        seconds += time.time() - t
        imagined.append(obs.cpu())
        real, real_next = val["obs"][starts], val["obs"][starts + h]
        next_tokens = val["obs_tokens"][starts + h]
        curves["imag_acc"].append((info["obs_tokens"].cpu() == next_tokens).float().mean().item())
        curves["copy_acc"].append((real_tokens == next_tokens).float().mean().item())
        curves["imag_err"].append(((obs.cpu().float() - real_next.float()).abs() / scale).mean().item())
        curves["copy_err"].append(((real.float() - real_next.float()).abs() / scale).mean().item())
    i = len(starts) // 2  # a start from the middle of the held-out data, not an episode's first frame
    example = {"real": val["obs"][starts[i]:starts[i] + H + 1], "imagined": torch.stack(imagined)[:, i]}
    return curves, example, len(starts) * H / seconds


# -----------------------------------------------------------------------------
# the world model


def build_world_model(args, tokenizer, env, run):
    """IRIS's transformer, or an LM (lm_backbone.py) with the tables --embeddings picks."""
    config = WorldModelConfig(tokens_per_obs=tokenizer.tokens_per_obs, obs_vocab_size=tokenizer.vocab_size,
                              num_actions=int(env.action_space.n), max_steps=args.segment_steps)
    if args.backbone == "iris":
        backbone = Transformer(TransformerConfig(width=args.width, num_layers=args.num_layers,
                                                 num_heads=args.num_heads, dropout=args.dropout))
        return WorldModel(config, backbone).to(run.device)
    base, _ = offload.load_with_memory_flags(args, run.device, args.train_base, should_load_tokenizer=False)
    if args.lm_init == "random":
        base = randomized(base)  # drawn from --seed (setup seeded torch)
    num_positions = getattr(base.config, "n_positions", None) or base.config.max_position_embeddings
    if config.max_tokens > num_positions:
        raise UserError(f"--segment-steps {args.segment_steps} makes {config.max_tokens} tokens, more than the "
                        f"LM's {num_positions} positions: lower --segment-steps")
    tables = None
    if args.embeddings != "iris":
        tables = lm_token_tables(base, config.obs_vocab_size, config.num_actions,
                                 should_train=args.embeddings == "lm-trained")
    backbone = LMBackbone(base, r=args.lora_r, alpha=args.lora_alpha, should_train_base=args.train_base)
    world_model = WorldModel(config, backbone, tables)
    offload.place(world_model, base, args, run.device, args.batch_size * config.max_tokens, run.is_main)
    return world_model


def saved_state(world_model, args):
    """What a checkpoint keeps: everything, but of a frozen pretrained LM only the adapter
    (its weights reload from --model; tiny's are random, so they are kept)."""
    state = world_model.state_dict()
    if args.backbone == "lm" and args.model != "tiny" and args.lm_init == "pretrained" and not args.train_base:
        return lora.without_frozen_base(state, "backbone.lm.")
    return state


# -----------------------------------------------------------------------------
# main


def main(argv=None):
    args = parse_args(argv)
    t_start = time.time()
    run = setup(args)
    env = make_env(args.env)
    tokenizer = make_tokenizer(env, args).to(run.device)
    data_keys = ("env", "collect_steps", "val_fraction", "num_bins", "fsq_levels", "tokenizer_iters", "seed")
    config = {k: getattr(args, k) for k in data_keys + (
        "backbone", "segment_steps", "width", "num_layers", "num_heads", "model", "embeddings", "lm_init",
        "train_base", "lora_r", "lora_alpha", "load_8bit", "load_4bit")}
    must_match = list(config)
    state = {"config": config}
    if args.resume:
        state = load_checkpoint(args.resume, config, must_match)
        if args.eval_only and "world_model" not in state:
            raise UserError(f"{args.resume} stopped while training the tokenizer and has no world model "
                            "yet; resume it without --eval-only")
    else:
        check_out_dir(args)
    os.makedirs(args.out_dir, exist_ok=True)  # the picture goes there too

    t_collect = time.time()
    data = collect(env, tokenizer, args.collect_steps, args.seed)
    train_data, val_data = split(data, args.val_fraction)
    scale = obs_scale(train_data["obs"])
    print(f"collected {len(data['actions'])} steps, {int(data['episode'][-1]) + 1} episodes "
          f"({len(val_data['actions'])} steps held out) in {time.time() - t_collect:.1f}s")

    if "tokenizer" not in state and args.tokenizer_from:  # the same data, so the same tokenizer fits
        other = load_checkpoint(args.tokenizer_from, config, must_match=data_keys)
        state.update({k: other[k] for k in ("tokenizer", "tokenizer_step") if k in other})
    if "tokenizer" in state:
        tokenizer.load_state_dict(state["tokenizer"])
    else:
        tokenizer.fit(train_data["obs"].to(run.device))
    if isinstance(tokenizer, FrameTokenizer) and state.get("tokenizer_step", 0) < args.tokenizer_iters:
        train_frame_tokenizer(tokenizer, train_data, val_data, scale, args, run, state)
    tokenizer.eval()
    metrics = tokenizer_metrics(tokenizer, val_data["obs"], scale, run)
    for part in (train_data, val_data):
        part["obs_tokens"] = torch.cat([tokenizer.encode(o.to(run.device)).cpu() for o in part["obs"].split(512)])
        add_episode_bounds(part)

    world_model = build_world_model(args, tokenizer, env, run)
    # IRIS: weight decay on Linear weights only (not embeddings, LayerNorms or biases)
    decayed = {id(m.weight) for m in world_model.modules() if isinstance(m, nn.Linear)}
    params = [p for p in world_model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW([
        {"params": [p for p in params if id(p) in decayed], "weight_decay": args.weight_decay},
        {"params": [p for p in params if id(p) not in decayed], "weight_decay": 0.0}], lr=args.lr)
    start_step = 0
    if "world_model" in state:
        if set(state["world_model"]) != set(saved_state(world_model, args)):
            raise UserError(f"the checkpoint in {args.resume} does not fit this world model (other weights "
                            "saved); resume it with the flags it was trained with")
        world_model.load_state_dict(state["world_model"], strict=False)  # strict=False: a frozen LM is not saved
        optimizer.load_state_dict(state["optimizer"])
        start_step = state["step"]
    print(f"world model ({args.backbone} backbone{f', {args.model}' if args.model else ''}): "
          f"{sum(p.numel() for p in params) / 1e6:.2f}M trainable of "
          f"{sum(p.numel() for p in world_model.parameters()) / 1e6:.2f}M parameters, "
          f"{tokenizer.tokens_per_obs} tokens per observation, vocabulary {tokenizer.vocab_size}")

    train_starts = len(train_data["actions"])
    num_tokens = args.batch_size * args.segment_steps * (tokenizer.tokens_per_obs + 1)

    def get_batch(index):
        starts = torch.randint(train_starts, (args.batch_size,), generator=batch_generator(args, index))
        batch = {k: v.to(run.device) for k, v in segments(train_data, starts, args.segment_steps).items()}
        return {**batch, "num_tokens": num_tokens}

    def save(step):
        save_checkpoint(args.out_dir, {
            "config": config, "tokenizer": tokenizer.state_dict(), "tokenizer_step": args.tokenizer_iters,
            "world_model": saved_state(world_model, args), "optimizer": optimizer.state_dict(), "step": step})

    def evaluate_now():
        return evaluate(world_model, tokenizer, val_data, scale, args, run)

    if args.eval_only:
        metrics.update(evaluate_now())
    else:
        metrics.update(train(world_model, optimizer, get_batch, evaluate_now, args, run, start_step, save))
    metrics["wall_seconds"] = round(time.time() - t_start, 1)
    print(json.dumps(metrics))


if __name__ == "__main__":
    run_cli(main)
