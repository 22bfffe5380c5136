"""
The text VAE as the scripts set it up (train_vae.py, sample.py, router.py): a VAE over a named base,
placed on the device as offload.MemoryConfig asks and checked against its positions, and one rebuilt
with its weights from a checkpoint of train_vae.py (refused if its base changed since). vae.py holds
the model; this file only builds and loads it.

    vae = load_vae("out-vae", torch.device("cpu"))   # a trained one, ready to use (.eval())
"""

from dataclasses import asdict

import lm
import lora
import offload
from checkpoint import load_checkpoint
from common import TINY_MODELS, UserError, config_from
from lm import num_positions
from vae import VAE, VAEConfig

def should_train_base(base_name, freeze_base):
    """tiny's base trains with the VAE (it has nothing pretrained to protect) unless frozen; any other stays frozen."""
    return base_name in TINY_MODELS and not freeze_base


def build_vae(base_name, cfg, memory, device, should_train_base, batch_size, should_print):
    """A VAE over the base named base_name, placed on the device as the offload.MemoryConfig `memory`
    asks; its memory check is for a step of batch_size windows (the encoder's span of train_vae.py's
    --context, the decoder's inputs: a prefix, the soft tokens, a span; None: one window and no gradients
    or moments, for a user that trains nothing), with should_print as offload.place's."""
    context = cfg.prefix_slots
    base, tokenizer = offload.load_with_memory(base_name, memory, device, should_train_base,
                                               should_save_base=base_name in TINY_MODELS)
    if cfg.encoder_layers > base.config.num_hidden_layers:
        raise UserError(f"--encoder-layers {cfg.encoder_layers}: {base_name} has {base.config.num_hidden_layers} "
                        f"layers; give at most that, or 0 for all of them")
    vae = VAE(base, cfg, tokenizer)
    # a base that loads by name, not from the checkpoint: what tells it apart later (load_weights), read
    # before offload moves its layers
    vae.base_fingerprint = None if base_name in TINY_MODELS else lm.fingerprint(base)
    needed = vae.text_start(None) + context - 1  # the prefix's slots, then a span of --context tokens
    if needed > num_positions(base):
        fit = (num_positions(base) - needed + 2 * context) // 2  # the longest --context that would fit
        raise UserError(f"--context {context} needs {needed} positions, more than the {num_positions(base)} of "
                        f"{base_name}: " + (f"use --context {fit} or less" if fit >= 1 else "lower --soft-tokens"))
    if not should_train_base:
        lora.mark_only_lora_trainable(base)
    # a user that trains nothing (sample.py) has no --batch-size: the flags that load this base smaller, if any
    lower = f"--batch-size (now {batch_size})" if batch_size is not None else offload.smaller(base_name, memory, device)
    num_windows = 1 if batch_size is None else batch_size
    offload.place(vae, base, memory, device, num_windows * (context + needed), lower, should_print,
                  should_train=batch_size is not None)
    # the encoder adapter above its layers never runs: no gradient, no moments, nothing for DDP to wait for
    # (frozen after place, which takes every frozen parameter for the base's and swaps it out)
    if cfg.encoder_layers > 0:
        for layer in offload.decoder_layers(base)[cfg.encoder_layers:]:
            for p in lora.lora_parameters(layer, "encoder"):
                p.requires_grad_(False)
    return vae


def load_vae(ckpt_dir, device, memory=None, flag=None, batch_size=None, should_print=False):
    """The VAE saved in ckpt_dir (flag: the flag that named it, for the errors), rebuilt by build_vae
    (memory None: offload.MemoryConfig(); batch_size None: to use it, not to train it) with its weights.
    A checkpoint from before "vae_config" and "base" were saved has them in its flags: --context is the
    prefix's slots too. A field either lacks did not exist yet (--word-dropout, --own-tokens): it was off,
    VAEConfig's default."""
    state = load_checkpoint(ckpt_dir, "vae", flag)
    flags = state["config"]
    base_name = state.get("base", flags["model"])
    saved = state.get("vae_config", {**flags, "prefix_slots": flags["context"]})
    cfg = config_from(VAEConfig, {**asdict(VAEConfig()), **saved})  # a field it lacks came later: its default
    memory = offload.MemoryConfig() if memory is None else memory
    vae = build_vae(base_name, cfg, memory, device, should_train_base(base_name, flags["freeze_base"]), batch_size,
                    should_print)
    # tiny's base is saved whether it trains or not: its weights are random, nothing reloads them
    load_weights(vae, state, base_name, ckpt_dir)
    return vae


def load_weights(vae, state, base_name, ckpt_dir):
    """A checkpoint's weights into the VAE build_vae rebuilt, once its base (loaded by name) is known to be
    the one they were trained on: a directory that pretrain_lm.py replaced since is refused. A checkpoint
    saved before the fingerprint was kept has none to check."""
    if vae.base_fingerprint is not None:
        vae.base_fingerprint = lm.check_fingerprint(state.get("base_fingerprint"), vae.base_fingerprint, base_name,
                                                    ckpt_dir)
    lora.load_saved_state(vae, state["model"], "base.", base_name in TINY_MODELS, ckpt_dir)
