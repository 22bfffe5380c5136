"""
The world model as train_wm.py and train_agent.py set it up, in one place: its flags
(add_world_model_args) and their checks, the settings a checkpoint records, the observation
tokenizer (made, fitted or trained, then frozen and applied to the data), the world model built
from WorldModelSettings (IRIS's transformer, an LM through lm_backbone.py, or latent_wm.py's), its
training batches, and what a checkpoint keeps of it. Each script parses the flags, then makes
TokenizerSettings and WorldModelSettings of them once (common.config_from, settings_from); below
the scripts, everything takes these dataclasses or plain values.
"""

from dataclasses import dataclass, field, fields, replace

import gymnasium as gym
import torch

import lm
import lora
from checkpoint import load_optimizer, save_checkpoint
from common import (TINY_MODELS, UserError, at_least_2, batch_seed, config_from, flag_name, nonneg_int, number,
                    positive_float, positive_int, standing)
from data_wm import add_episode_bounds, segments
from latent_wm import LatentWorldModel, LatentWorldModelConfig, iris_sized_lm
from lm_backbone import LMBackbone, first_layers, lm_token_tables, randomized
from obs_tokenizer import (DiscreteTokenizer, FrameTokenizer, FrameTokenizerConfig, VectorTokenizer,
                           VectorTokenizerConfig)
from offload import MemoryConfig, add_memory_args, check_memory, load_with_memory, place
from trainer import TrainConfig, make_optimizer, train
from worldmodel import Transformer, TransformerConfig, WorldModel, WorldModelConfig


@dataclass
class TokenizerSettings:
    """The observation tokenizer's flags (obs_tokenizer.py)."""
    num_bins: int = 64  # vector observations: bins per dimension
    fsq_levels: tuple = (8, 8, 8)  # frame observations: FSQ levels per latent number; vocabulary = their product
    tokenizer_iters: int = 0  # frames: training steps before the world model's (each script sets its default)
    tokenizer_lr: float = 1e-3  # frames: the tokenizer's learning rate
    tokenizer_batch_size: int = 64  # frames: frames per tokenizer step


@dataclass
class WorldModelSettings:
    """The world model's flags: what build_world_model makes (settings_from makes them of the flags)."""
    state: str = "tokens"  # "tokens": IRIS, K observation tokens + an action a step; "latent": latent_wm.py
    latent_size: int = 64  # --state latent: size of z
    next_latent: str = "kl"  # --state latent: how the next latent is learned, "kl" or "decode" (latent_wm.py)
    backbone: str = "iris"  # "iris": IRIS's minGPT, sized below; "lm": the `model` LM with LoRA adapters
    segment_steps: int = 20  # steps per training segment, and the world model's context in steps (IRIS: 20)
    width: int = 128  # --backbone iris: transformer width (IRIS: 256)
    num_layers: int = 3  # its layers (IRIS: 10)
    num_heads: int = 4  # its attention heads, a divisor of width (IRIS: 4)
    dropout: float = 0.1  # its dropout (IRIS: 0.1)
    model: str | None = None  # --backbone lm: the LM (a name lm.load_base knows, or a directory; check_model_flags
    #                           makes None tiny); iris: None
    embeddings: str = "iris"  # IRIS's own tables, or the LM's last rows: "lm-frozen" or "lm-trained"
    lm_init: str = "pretrained"  # "random": the same architecture with fresh weights, the control
    lm_layers: int | None = None  # keep only the LM's first N layers; None: all
    train_base: bool = False  # train every weight of the LM too; else it stays frozen, with LoRA adapters
    lora_r: int = 16  # the adapters' rank
    lora_alpha: float = 32.0  # their alpha; scale = alpha / r
    memory: MemoryConfig = field(default_factory=MemoryConfig)  # how the LM is loaded and placed (offload.py)

    @property
    def transformer(self):
        """--backbone iris: IRIS's transformer at this size."""
        return TransformerConfig(width=self.width, num_layers=self.num_layers, num_heads=self.num_heads,
                                 dropout=self.dropout)


def settings_from(flags):
    """WorldModelSettings of the parsed flags (a dict, vars(args)), their memory flags in a MemoryConfig."""
    return config_from(WorldModelSettings, {**flags, "memory": config_from(MemoryConfig, flags)})


def train_config_from(flags):
    """The shared loop's TrainConfig of the parsed flags. --dtype is the LM backbone's: IRIS's transformer
    is fp32 whatever it says, so that a diverging run's hint blames float16 only where something runs in it."""
    return config_from(TrainConfig, {**flags, "dtype": flags["dtype"] if flags["backbone"] == "lm" else "float32"})


# the settings a checkpoint records and a resumed run takes from it: what makes the observation tokenizer
# (each script adds what makes its data before these), then the world model's
TOKENIZER_KEYS = tuple(f.name for f in fields(TokenizerSettings))
LATENT_KEYS = ("state", "latent_size", "next_latent")  # the state: tokens (IRIS) or a latent (latent_wm.py)
MODEL_KEYS = ("backbone", "segment_steps", "width", "num_layers", "num_heads", "dropout", "model", "embeddings",
              "lm_init", "lm_layers", "train_base", "lora_r", "lora_alpha", "load_8bit", "load_4bit") + LATENT_KEYS
LM_FLAGS = ("model", "embeddings", "lm_init", "lm_layers", "train_base", "lora_r", "lora_alpha", "load_8bit",
            "load_4bit", "offload", "grad_checkpoint")  # they configure the LM backbone, so need --backbone lm


# -----------------------------------------------------------------------------
# the flags and their checks

dropout_rate = number(float, lambda v: 0 <= v < 1, "a number from 0 up to, not including, 1")


def add_world_model_args(parser, tokenizer_iters_default):
    """The flags of the environment, the state (tokens or a latent), the world model, its LM backbone
    and the observation tokenizer; tokenizer_iters_default: --tokenizer-iters's default, in words."""
    g = parser.add_argument_group("what to model")
    g.add_argument("--env", default="CartPole-v1", help="Gymnasium id with a Discrete action space and a "
                   "vector or RGB-frame Box observation or a Discrete state, e.g. CartPole-v1, Acrobot-v1, "
                   "ALE/Pong-v5, FrozenLake-v1 (default: %(default)s)")
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
    g.add_argument("--width", type=positive_int, default=128, help="--backbone iris: transformer width, with "
                   "the next three flags (--backbone lm: unused, the LM has its shape; IRIS: 256; default: %(default)s)")
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
    g.add_argument("--lora-r", type=positive_int, default=16, help="rank of the LM's LoRA adapters: the "
                   "dynamics one, and with --state latent the encoder's and decoder's too (default: %(default)s)")
    g.add_argument("--lora-alpha", type=positive_float, default=32.0, help="its alpha; scale = alpha / r "
                   "(default: %(default)s)")
    add_memory_args(parser)
    g = parser.add_argument_group("observation tokenizer")
    g.add_argument("--num-bins", type=at_least_2, default=64, help="vector observations: bins per dimension "
                   "(default: %(default)s)")
    g.add_argument("--tokenizer-iters", type=nonneg_int, default=None, help="frame observations: tokenizer "
                   f"training steps before the world model's (default: {tokenizer_iters_default})")
    g.add_argument("--fsq-levels", type=at_least_2, nargs="+", default=[8, 8, 8], help="frame observations: FSQ "
                   "levels per latent number; vocabulary = their product (IRIS: 512; default: %(default)s)")
    g.add_argument("--tokenizer-lr", type=positive_float, default=1e-3, help="frame tokenizer peak learning rate, "
                   "warmed up and decayed as --warmup-iters says "
                   "(default: %(default)s)")
    g.add_argument("--tokenizer-batch-size", type=positive_int, default=64, help="frames per tokenizer step "
                   "(default: %(default)s)")


def check_world_model_flags(parser, flags):
    """At parse time, the checks that need several flags (flags: the parsed flags as a dict, vars(args)):
    a new run's shape (a resumed one's is checked once it took the saved flags: check_model_flags), and
    --eval-only with the --resume checkpoint it evaluates."""
    if flags["resume"] is None and shape_error(flags) is not None:
        parser.error(shape_error(flags))
    if flags["eval_only"] and flags["resume"] is None:
        parser.error("--eval-only evaluates a checkpoint: pass --resume DIR too")


def shape_error(flags):
    """Why IRIS's transformer cannot take this shape, or None: --width a multiple of --num-heads (for
    --backbone iris; an LM has its own shape)."""
    if flags["backbone"] == "iris" and flags["width"] % flags["num_heads"] != 0:
        return (f"--width {flags['width']} is not a multiple of --num-heads {flags['num_heads']}: each head gets "
                "width / heads numbers")
    return None


def check_model_flags(flags, explicit):
    """Checked once a resumed run took its settings, before anything is written (flags: vars(args), explicit:
    the flags given): a shape IRIS's transformer can take, LM flags need --backbone lm, no quantized random
    LM, an LM whose architecture the adapters know, --lm-layers within its layers, and the latent world
    model's flags need --state latent. Returns the --model to use: tiny for --backbone lm without one."""
    model = "tiny" if flags["backbone"] == "lm" and flags["model"] is None else flags["model"]
    if shape_error(flags) is not None:
        raise UserError(shape_error(flags))
    if flags["backbone"] == "iris":
        given = [flag_name(k) for k in LM_FLAGS if k in explicit]
        if given:
            raise UserError(f"{', '.join(given)} configure(s) the LM backbone: add --backbone lm, or size "
                            "IRIS's transformer with --width, --num-layers, --num-heads")
    if flags["lm_init"] == "random" and (flags["load_8bit"] or flags["load_4bit"]):
        raise UserError("--lm-init random draws fresh weights, which --load-8bit/--load-4bit cannot quantize")
    if flags["backbone"] == "lm":  # these two read the LM's config, before a tokenizer trains and anything is written
        lm.check_lora_architecture(model)
    if flags["lm_layers"] is not None:
        num_layers = lm.num_layers(model)
        if flags["lm_layers"] > num_layers:
            raise UserError(f"--lm-layers {flags['lm_layers']}: --model {model} has {num_layers} layers; "
                            "give that many or fewer")
    given = [flag_name(k) for k in LATENT_KEYS[1:] if k in explicit]
    if flags["state"] == "tokens" and given:
        raise UserError(f"{', '.join(given)} configure(s) the latent world model: add --state latent")
    return model


# -----------------------------------------------------------------------------
# the observation tokenizer


def make_tokenizer(env, settings):
    """Bins for vector observations, the FSQ autoencoder for frames, a state's own token for Discrete
    observations (obs_tokenizer.py)."""
    space = env.observation_space
    if isinstance(space, gym.spaces.Discrete):
        return DiscreteTokenizer(int(space.n), int(space.start))
    shape = space.shape
    if len(shape) == 1:
        return VectorTokenizer(VectorTokenizerConfig(obs_dim=shape[0], num_bins=settings.num_bins))
    return FrameTokenizer(FrameTokenizerConfig(levels=tuple(settings.fsq_levels)))


def prepare_tokenizer(tokenizer, train_data, val_obs, scale, settings, config, run, state):
    """Make the tokenizer ready and frozen: from the checkpoint (or --tokenizer-from's), or fitted
    to the training observations and, for frames, trained (held-out error on val_obs; config: the
    run's TrainConfig, which the tokenizer's phase changes)."""
    if "tokenizer" in state:
        tokenizer.load_state_dict(state["tokenizer"])
    else:
        tokenizer.fit(train_data["obs"].to(run.device))
    if isinstance(tokenizer, FrameTokenizer) and state.get("tokenizer_step", 0) < settings.tokenizer_iters:
        train_frame_tokenizer(tokenizer, train_data, val_obs, scale, settings, config, run, state)
    tokenizer.eval()


@torch.no_grad()
def tokenize(tokenizer, data, device):
    """Add obs_tokens (N, K) and the episode bounds to data, for segments()."""
    data["obs_tokens"] = torch.cat([tokenizer.encode(o.to(device)).cpu() for o in data["obs"].split(512)])
    add_episode_bounds(data)


def train_frame_tokenizer(tokenizer, train_data, val_obs, scale, settings, config, run, state):
    """The tokenizer's own training phase, with the shared loop; resumes from state, saves to config.out_dir."""
    config = replace(config, max_iters=settings.tokenizer_iters, lr=settings.tokenizer_lr,
                     eval_interval=settings.tokenizer_iters, dtype="float32")  # the tokenizer is fp32, whatever the LM
    optimizer = make_optimizer(tokenizer, settings.tokenizer_lr, weight_decay=0.0)
    if "tokenizer_optimizer" in state:
        optimizer.load_state_dict(state["tokenizer_optimizer"])
    frames = train_data["obs"]

    def get_batch(index):
        g = torch.Generator().manual_seed(batch_seed(config.seed, index))
        picks = torch.randint(len(frames), (settings.tokenizer_batch_size,), generator=g)
        return {"frames": frames[picks].to(run.device)}

    def save(step):
        save_checkpoint(config.out_dir, {**state, "tokenizer": tokenizer.state_dict(), "tokenizer_step": step,
                                         "tokenizer_optimizer": optimizer.state_dict()})

    if run.is_main:
        print(f"training the frame tokenizer for {settings.tokenizer_iters} steps")
    before = standing["step"]  # what an interruption named before this phase (train_agent.py: the epoch)
    train(tokenizer, optimizer, get_batch, lambda: tokenizer_metrics(tokenizer, val_obs, scale, run.device),
          config, run, start_step=state.get("tokenizer_step", 0), save=save, flags=("--tokenizer-lr", "--grad-clip"))
    standing["step"] = before  # its steps are not the next loop's: an interruption from here names what it did before
    tokenizer.eval()


@torch.no_grad()
def tokenizer_metrics(tokenizer, obs, scale, device):
    """Held-out reconstruction error, in the units of the imagination error."""
    errors = [(tokenizer.decode(tokenizer.encode(o.to(device))).float().cpu() - o.float()).abs() / scale
              for o in obs.split(512)]
    return {"tokenizer_err": torch.cat(errors).mean().item()}


def obs_scale(obs):
    """What one unit of error is: 255 for frames, each dimension's std for vectors (1 where a dimension
    never changes, e.g. a one-hot state never visited)."""
    if obs.dtype == torch.uint8:
        return 255.0
    std = obs.float().std(0)
    return torch.where(std > 0, std, torch.ones_like(std))


# -----------------------------------------------------------------------------
# the world model


def build_world_model(settings, tokenizer, num_actions, device, batch_size, should_print):
    """--state tokens: IRIS's transformer, or an LM (lm_backbone.py) with the tables `embeddings` picks;
    --state latent: latent_wm.py's, the --backbone iris shape from scratch or the LM with adapters.
    Refused in one line when batch_size segments would not fit in the device's memory."""
    shapes = dict(tokens_per_obs=tokenizer.tokens_per_obs, obs_vocab_size=tokenizer.vocab_size,
                  num_actions=num_actions, max_steps=settings.segment_steps)
    if settings.state == "latent":
        config = LatentWorldModelConfig(**shapes, latent_size=settings.latent_size, next_latent=settings.next_latent)
        return latent_world_model(settings, config, device, batch_size, should_print)
    if settings.backbone == "lm":
        return lm_world_model(settings, WorldModelConfig(**shapes), device, batch_size, should_print)
    backbone = Transformer(settings.transformer)
    world_model = WorldModel(WorldModelConfig(**shapes), backbone).to(device)
    world_model.base_fingerprint = None  # nothing pretrained
    check_memory(world_model, device, batch_size * world_model.config.max_tokens,
                 f"--batch-size (now {batch_size})")  # offload.place checks a model with an LM base
    return world_model


def lm_and_tables(settings, config, device, num_tokens):
    """The LM as settings ask (pretrained or --lm-init random, its first --lm-layers), checked to take
    num_tokens positions, the token tables --embeddings picks (None: IRIS's own), and the fingerprint
    of a frozen pretrained LM, which a checkpoint does not keep (lm.fingerprint; else None)."""
    base, _ = load_with_memory(settings.model, settings.memory, device, settings.train_base,
                               should_load_tokenizer=False, should_save_base=should_save_base(settings))
    if settings.lm_layers is not None:
        base = first_layers(base, settings.lm_layers)
    fingerprint = None if should_save_base(settings) else lm.fingerprint(base)  # before offload moves it
    if settings.lm_init == "random":
        base = randomized(base)  # drawn from --seed (the scripts seed torch before building)
    if num_tokens > lm.num_positions(base):
        raise UserError(f"--segment-steps {config.max_steps} needs {num_tokens} positions, more than the LM's "
                        f"{lm.num_positions(base)}: lower --segment-steps")
    tables = None
    if settings.embeddings != "iris":
        tables = lm_token_tables(base, config.obs_vocab_size, config.num_actions,
                                 should_train=settings.embeddings == "lm-trained")
    return base, tables, fingerprint


def lm_world_model(settings, config, device, batch_size, should_print):
    """The world model (WorldModelConfig `config`) around the LM (lm_and_tables): frozen + the dynamics
    adapter or --train-base, placed on `device` as the memory settings ask (offload.py)."""
    base, tables, fingerprint = lm_and_tables(settings, config, device, config.max_tokens)
    backbone = LMBackbone(base, r=settings.lora_r, alpha=settings.lora_alpha, should_train_base=settings.train_base)
    world_model = WorldModel(config, backbone, tables)
    world_model.base_fingerprint = fingerprint
    lower = f"--batch-size (now {batch_size})"
    place(world_model, base, settings.memory, device, batch_size * config.max_tokens, lower, should_print)
    return world_model


def latent_world_model(settings, config, device, batch_size, should_print):
    """The latent world model (LatentWorldModelConfig `config`): --backbone iris, a GPT-2-shaped transformer
    from scratch (every weight trains, plus the adapters); --backbone lm, the LM pretrained or random, frozen
    + the three adapters or --train-base, with the tables --embeddings picks, placed as the memory settings ask."""
    # encoder, decoder, dynamics (2 a step), and with --next-latent decode the decoder once more
    decoder_passes = 2 if config.next_latent == "decode" else 1
    num_tokens = batch_size * config.max_steps * ((1 + decoder_passes) * config.tokens_per_obs + 2)
    if settings.backbone == "iris":
        world_model = LatentWorldModel(config, iris_sized_lm(settings.transformer, config), should_train_base=True)
        world_model.base_fingerprint = None  # nothing pretrained
        check_memory(world_model.to(device), device, num_tokens, f"--batch-size (now {batch_size})")
        return world_model
    base, tables, fingerprint = lm_and_tables(settings, config, device, max(config.max_tokens, config.tokens_per_obs))
    world_model = LatentWorldModel(config, base, tables, r=settings.lora_r, alpha=settings.lora_alpha,
                                   should_train_base=settings.train_base)
    world_model.base_fingerprint = fingerprint
    place(world_model, base, settings.memory, device, num_tokens, f"--batch-size (now {batch_size})", should_print)
    return world_model


def segment_batches(data, tokenizer, segment_steps, batch_size, seed, device, end_share=0.0):
    """get_batch(index) for trainer.train: batch_size segments of segment_steps steps from random starts in data,
    drawn from (seed, index). end_share: round(end_share * batch_size) of them (at least one for a share above
    0) are drawn to hold an episode end instead, a rare event (IRIS draws each segment's episode, the newest
    ones more often, which weighs short episodes' ends up; here ends are drawn outright): one of data's ends,
    uniformly, at a uniform position in the segment (never before its episode's start, so never padded); the
    others start uniformly. With no end in data all start uniformly; with end_share 0 nothing more is drawn,
    so the batches are the uniform ones exactly."""
    num_tokens = batch_size * segment_steps * (tokenizer.tokens_per_obs + 1)
    end_steps = torch.nonzero(data["ends"]).squeeze(1)  # (E,)
    num_ends = max(1, round(end_share * batch_size)) if end_share > 0 and len(end_steps) > 0 else 0
    # an end at step e lies unpadded in the segment from e - p for p up to segment_steps - 1 within its episode
    num_positions = (end_steps - data["episode_start"][end_steps]).clamp(max=segment_steps - 1) + 1  # (E,)

    def get_batch(index):
        g = torch.Generator().manual_seed(batch_seed(seed, index))
        starts = torch.randint(len(data["actions"]), (batch_size - num_ends,), generator=g)
        if num_ends > 0:
            picks = torch.randint(len(end_steps), (num_ends,), generator=g)
            # uniform in 0 .. num_positions - 1 (float64: the product never rounds up to num_positions)
            positions = (torch.rand(num_ends, generator=g, dtype=torch.float64) * num_positions[picks]).long()
            starts = torch.cat([starts, end_steps[picks] - positions])
        batch = {k: v.to(device) for k, v in segments(data, starts, segment_steps).items()}
        return {**batch, "num_tokens": num_tokens}

    return get_batch


# -----------------------------------------------------------------------------
# what a checkpoint keeps


def should_save_base(settings):
    """Whether a checkpoint must keep the LM's own weights: when they train, or are random (--lm-init
    random, or tiny, which has no pretrained weights); a frozen pretrained LM reloads from --model.
    --backbone iris: nothing pretrained (latent_wm.py's transformer trains from scratch)."""
    return (settings.backbone == "iris" or settings.train_base or settings.lm_init == "random"
            or settings.model in TINY_MODELS)


def saved_state(world_model, settings):
    """What a checkpoint keeps, {"world_model": ...} and the base's fingerprint where it has one: all
    but a frozen pretrained LM's own weights, which reload from --model (an IRIS world model has no
    backbone.lm. weights, so all of it is kept)."""
    fingerprint = {} if world_model.base_fingerprint is None else {"base_fingerprint": world_model.base_fingerprint}
    return {"world_model": lora.saved_state(world_model, "backbone.lm.", should_save_base(settings)), **fingerprint}


def restore(world_model, optimizer, state, settings, path):
    """Load the world model and optimizer of a resumed run's checkpoint `state` (read from path), once its
    frozen pretrained LM is known to be the one it trained on; returns the step to start from (0 when it
    has no world model yet)."""
    if "world_model" not in state:
        return 0
    if world_model.base_fingerprint is not None:
        world_model.base_fingerprint = lm.check_fingerprint(state.get("base_fingerprint"),
                                                            world_model.base_fingerprint, settings.model, path)
    lora.load_saved_state(world_model, state["world_model"], "backbone.lm.", should_save_base(settings), path)
    load_optimizer(optimizer, state["optimizer"])
    return state["step"]
