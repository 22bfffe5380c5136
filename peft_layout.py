"""
Our LoRA adapters (lora.py) in the ecosystem's files: peft's layout, one folder per adapter with
adapter_config.json and adapter_model.safetensors, so that
`PeftModel.from_pretrained(base, folder, adapter_name=name)` loads ours with the same logits; and
the reverse, plus BigVAE's published checkpoint (JD-P/minihf, adavae-moe: peft adapters "encoder"
and "decoder" beside the head in vae.safetensors) read into our VAE.

    peft_layout.save_peft(vae.base, "out-vae/peft", ["encoder", "decoder"], "gpt2")
    peft_layout.load_peft(base, "out-vae/peft/decoder", "decoder")
    peft_layout.load_bigvae(vae, "bigvae-checkpoint")

Loading reads JSON and safetensors only: nothing is unpickled. What peft's files cannot say stays in
train_vae.py's checkpoint: the VAE head, and how many layers the encoder runs (--encoder-layers).
"""

import json
import os
import re

import torch.nn as nn
from safetensors.torch import load_file, save_file

from common import UserError, replace_folder
from lora import LoRALayer, adapter_state_dict, add_adapter, is_conv1d, load_adapter_state_dict


PEFT_PREFIX = "base_model.model."  # peft's keys: the LM's module paths under its wrapper
PEFT_CONFIG, PEFT_WEIGHTS = "adapter_config.json", "adapter_model.safetensors"


def adapter_layers(model, name):
    return {n: m for n, m in model.named_modules() if isinstance(m, LoRALayer) and name in m.lora_A}


def peft_config(model, name, base_name):
    """adapter_config.json for adapter `name`: our r, alpha and dropout, its layers by full name."""
    layers = adapter_layers(model, name)
    if not layers:
        raise ValueError(f"no adapter '{name}' to save")
    layer = next(iter(layers.values()))  # add_adapter gives every layer the same r, alpha and dropout
    r, dropout = layer.lora_A[name].out_features, layer.lora_dropout[name]
    return {"peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base_name,
            "r": r, "lora_alpha": layer.scaling[name] * r, "lora_dropout": getattr(dropout, "p", 0.0),
            "target_modules": sorted(layers), "bias": "none", "inference_mode": True,
            "fan_in_fan_out": is_conv1d(layer.base)}  # GPT-2's Conv1D stores its weight (in, out)


def save_peft(model, directory, adapter_names, base_name):
    """Write adapters `adapter_names` of `model` (the LM they sit in) as directory/<name>/ in peft's
    layout, base_name being what the LM loads from. The folder is replaced whole: written next to
    it, then renamed into place, so a failed write leaves the previous one as it was."""
    # peft's A is (r, in) and B (out, r) for Conv1D too, as ours: only the key prefix differs
    adapters = {name: (peft_config(model, name, base_name),
                       {PEFT_PREFIX + k: v.cpu().contiguous() for k, v in adapter_state_dict(model, name).items()})
                for name in adapter_names}

    def write(path):
        for name, (config, weights) in adapters.items():
            os.makedirs(os.path.join(path, name))
            with open(os.path.join(path, name, PEFT_CONFIG), "w") as f:
                json.dump(config, f, indent=2)
            save_file(weights, os.path.join(path, name, PEFT_WEIGHTS))

    replace_folder(directory, write)


def load_peft(model, directory, name):
    """Read the peft LoRA adapter in `directory` into adapter `name` of `model` (the LM), adding
    the adapter when the model has none of that name; an existing one must have its layers and
    its r and alpha. Only plain LoRA is read (no DoRA, rsLoRA, per-layer ranks or trained biases)."""
    config_path, weights_path = os.path.join(directory, PEFT_CONFIG), os.path.join(directory, PEFT_WEIGHTS)
    if not (os.path.isfile(config_path) and os.path.isfile(weights_path)):
        raise UserError(f"no {PEFT_CONFIG} and {PEFT_WEIGHTS} in {directory}; pass a folder written by "
                        "save_peft or by peft's save_pretrained (safe_serialization=True)")
    try:
        with open(config_path) as f:
            config = json.load(f)
        r, alpha = config["r"], config["lora_alpha"]
        weights = load_file(weights_path)
    except Exception as e:  # bad JSON, no r or lora_alpha, or safetensors' own error
        cause = " ".join(str(e).split())[:80]  # one line
        raise UserError(f"cannot read the adapter in {directory} ({type(e).__name__}: {cause}); it is damaged or "
                        "not a peft LoRA adapter") from e
    plain = {"peft_type": "LORA", "use_dora": False, "use_rslora": False, "rank_pattern": {},
             "alpha_pattern": {}, "bias": "none", "modules_to_save": None}  # plain LoRA's settings
    other = [f"{k}={config[k]!r}" for k, v in plain.items() if config.get(k) not in (v, None, {}, [])]
    if other:
        raise UserError(f"{config_path} has {', '.join(other)}; only plain LoRA adapters (peft_type LORA, "
                        "one rank, no DoRA, rsLoRA, biases or extra modules) can be read")
    state = {}
    for key, value in weights.items():
        if not re.fullmatch(rf"{re.escape(PEFT_PREFIX)}.+\.lora_[AB]\.weight", key):
            raise UserError(f"{weights_path} holds {key}, which is not a LoRA A or B weight of a linear layer")
        state[key.removeprefix(PEFT_PREFIX)] = value
    layer_names = sorted({k.rsplit(".lora_", 1)[0] for k in state})
    linears = {n for n, m in model.named_modules() if isinstance(m, (LoRALayer, nn.Linear)) or is_conv1d(m)}
    missing = [n for n in layer_names if n not in linears]
    if missing:
        raise UserError(f"the adapter in {directory} adapts {missing[0]}, which this model lacks; it was made for "
                        f"{config.get('base_model_name_or_path')}: load that model")
    for key, value in state.items():  # before anything is added or written: A is (r, in), B is (out, r)
        layer = model.get_submodule(key.rsplit(".lora_", 1)[0])
        size_in, size_out = ((layer.in_features, layer.out_features) if isinstance(layer, (LoRALayer, nn.Linear))
                             else tuple(layer.weight.shape))  # GPT-2's Conv1D keeps its weight as (in, out)
        expected = (r, size_in) if ".lora_A." in key else (size_out, r)
        if tuple(value.shape) != expected:
            raise UserError(f"the adapter in {directory} has {key} of shape {tuple(value.shape)}, where this model "
                            f"needs {expected}; it was made for {config.get('base_model_name_or_path')}: load that "
                            "model")
    existing = adapter_layers(model, name)
    if not existing:
        add_adapter(model, name, r=r, alpha=alpha, dropout=config.get("lora_dropout", 0.0),
                    targets=[re.escape(n) for n in layer_names])
    else:
        layer = next(iter(existing.values()))
        own_r = layer.lora_A[name].out_features
        if sorted(existing) != layer_names or own_r != r or layer.scaling[name] != alpha / r:
            raise UserError(f"the adapter in {directory} (r={r}, lora_alpha={alpha}, {len(layer_names)} layers) does "
                            f"not fit adapter '{name}' of this model (r={own_r}, alpha={layer.scaling[name] * own_r}, "
                            f"{len(existing)} layers)")
    load_adapter_state_dict(model, name, state)


def load_bigvae(vae, directory):
    """Read a checkpoint in BigVAE's layout (JD-P/minihf, adavae-moe, vae_infer.py's
    DecoderOnlyTransformerVAE.save_pretrained) into `vae` (vae.VAE): directory/encoder/ and
    directory/decoder/ are peft adapters, directory/vae.safetensors is the head's f, w_e and w_d.
    BigVAE's head pools once and has no variance head and no z memory, so `vae` must be built with
    pool_queries=1, posterior="bigvae", z_memory=0, soft_tokens=1, lead_token=False (and its r and alpha).
    latent_rms stays 1."""
    cfg, head = vae.cfg, vae.head
    if (cfg.pool_queries != 1 or cfg.posterior != "bigvae" or cfg.z_memory != 0 or cfg.soft_tokens != 1
            or cfg.lead_token):
        raise UserError("BigVAE's head pools once, has no variance head, no z memory and one soft token first: build "
                        "the VAE with pool_queries=1, posterior='bigvae', z_memory=0, soft_tokens=1, lead_token=False "
                        "to load it")
    head_path = os.path.join(directory, "vae.safetensors")
    if not os.path.isfile(head_path):
        raise UserError(f"no vae.safetensors in {directory}; pass a folder saved by minihf's VAE save_pretrained")
    saved = load_file(head_path)
    own = {k: v for k, v in head.state_dict().items() if k.split(".")[0] in ("f", "w_e", "w_d")}
    if {k: tuple(v.shape) for k, v in saved.items()} != {k: tuple(v.shape) for k, v in own.items()}:
        raise UserError(f"{head_path} does not fit this VAE's head (f, w_e, w_d differ in names or shapes); build "
                        "the VAE with BigVAE's latent_size over the LM it was trained on")
    for name in ("encoder", "decoder"):
        load_peft(vae.base, os.path.join(directory, name), name)
    head.load_state_dict(saved, strict=False)  # strict=False: latent_rms is ours, not BigVAE's
