"""
LoRA, written out: low-rank adapters on a frozen model (Hu et al. 2021, "LoRA: Low-Rank
Adaptation of Large Language Models"; microsoft/loralib). The layout of the weights, a
`lora_A` and a `lora_B` dict keyed by adapter name inside each wrapped layer, is peft's
(huggingface/peft), so the two compute the same thing and tests/test_lora.py compares them.

A wrapped layer computes  y = base(x) + B(A(dropout(x))) * alpha / r,  with A (r x in)
Kaiming-initialised and B (out x r) zero-initialised, so a freshly injected model equals
its base until trained. One layer holds several *named* adapters ("encoder", "decoder",
...) and uses one at a time; BigVAE switches between two per call over one frozen LM:

    add_adapter(model, "encoder"); add_adapter(model, "decoder")
    mark_only_lora_trainable(model)
    with use_adapter(model, "encoder"):
        h = model(...)             # encoder adapter on; the previous one comes back after

The base layer can be an nn.Linear, GPT-2's Conv1D (weight stored transposed, in x out)
or a bitsandbytes 8-bit/4-bit linear: the adapter only adds to the base's output.
merge() folds the active adapter into a floating-point base weight (for fast inference);
unmerge() takes it out again. Neither happens behind your back. folded() leaves the weights
alone: inside its block, passes without gradients use a copy of the base weight with the
adapter folded in (imagination: thousands of small passes, one product a layer instead of three).

peft_layout.py writes and reads these adapters in peft's own files.
"""

import contextlib
import re

import torch
import torch.nn as nn
from safetensors.torch import load_file, save_file

from common import UserError

# Default layers to adapt, per architecture (model.config.model_type).
DEFAULT_TARGETS = {
    "gpt2": ["c_attn", "c_proj", "c_fc"],  # qkv, attention and MLP output, MLP input
    **{llama_like: ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
       for llama_like in ("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2")},
    # (Mixtral's experts hold their MLP weights as stacked tensors, not Linear layers: not adapted here)
}


def is_conv1d(module):
    """Whether a layer is GPT-2's Conv1D, told by its class name: importing transformers for the class
    takes ~2 s, which a script's --help should not wait for."""
    return type(module).__name__ == "Conv1D"


class LoRALayer(nn.Module):
    """A frozen base layer plus named low-rank adapters, one of them active."""

    def __init__(self, base):
        super().__init__()
        self.base = base
        if is_conv1d(base):  # GPT-2: weight is (in, out)
            self.in_features, self.out_features = base.weight.shape
        else:  # nn.Linear and the bitsandbytes linears that subclass it
            self.in_features, self.out_features = base.in_features, base.out_features
        self.lora_A, self.lora_B = nn.ModuleDict(), nn.ModuleDict()
        self.lora_dropout = nn.ModuleDict()
        self.scaling = {}
        self.active = None  # name of the adapter in use; None = base layer only
        self.merged = None  # name of the adapter folded into base.weight, if any
        self.folded = None  # inside lora.folded(): adapter name -> (base.weight with it folded in, made from what)
        self.can_fold = True  # offload.py clears it: its weights move between devices

    def add(self, name, r, alpha, dropout):
        device = self.base.weight.device
        self.lora_A[name] = nn.Linear(self.in_features, r, bias=False, device=device)  # Kaiming uniform
        self.lora_B[name] = nn.Linear(r, self.out_features, bias=False, device=device)
        nn.init.zeros_(self.lora_B[name].weight)
        self.lora_dropout[name] = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.scaling[name] = alpha / r

    def sources(self, name):
        """What a folded copy was made from: each weight's storage and its count of in-place changes
        (an optimizer step, a load, a merge)."""
        return tuple((w.data_ptr(), w._version) for w in (self.base.weight, self.lora_A[name].weight,
                                                           self.lora_B[name].weight))

    def folded_forward(self, x):
        """The active adapter folded into a copy of base.weight, made on its first pass in the block."""
        name, sources = self.active, self.sources(self.active)
        if name not in self.folded:  # its sources kept too, so a replaced one's storage is not reused
            with torch.no_grad():
                kept = (self.base.weight.detach(), self.lora_A[name].weight.detach(), self.lora_B[name].weight.detach())
                self.folded[name] = (self.merged_weight(name, +1), sources, kept)
        weight, made_from, _ = self.folded[name]
        if made_from != sources:
            raise RuntimeError("a weight changed inside lora.folded(): its folded copy is stale; open a new block")
        if is_conv1d(self.base):  # GPT-2's Conv1D: y = bias + x @ weight, weight (in, out)
            return torch.addmm(self.base.bias, x.reshape(-1, self.in_features), weight).view(*x.shape[:-1], -1)
        return nn.functional.linear(x, weight, self.base.bias)  # (B, T, out)

    def forward(self, x):
        if (self.folded is not None and self.active is not None and self.merged is None
                and not torch.is_grad_enabled() and isinstance(self.lora_dropout[self.active], nn.Identity)):
            return self.folded_forward(x)
        out = self.base(x)
        if self.active is None or self.merged is not None:
            return out
        A, B = self.lora_A[self.active], self.lora_B[self.active]
        x = self.lora_dropout[self.active](x.to(A.weight.dtype))
        return out + (B(A(x)) * self.scaling[self.active]).to(out.dtype)  # (B, T, out)

    def delta_weight(self, name):
        """The adapter as a dense update, laid out like base.weight."""
        delta = self.lora_B[name].weight @ self.lora_A[name].weight * self.scaling[name]  # (out, in)
        return delta.T if is_conv1d(self.base) else delta

    def merged_weight(self, name, sign):
        """base.weight plus (sign +1) or minus (-1) adapter `name`'s update, in the base's dtype."""
        w = self.base.weight
        return (w.float() + sign * self.delta_weight(name)).to(w.dtype)

    def merge(self):
        if self.merged is not None or self.active is None:
            return
        if not self.base.weight.is_floating_point():
            raise ValueError("merge() needs a floating-point base weight; 8-bit and 4-bit layers "
                             "cannot be merged, run them with the adapter unmerged")
        with torch.no_grad():
            self.base.weight.copy_(self.merged_weight(self.active, +1))
        self.merged = self.active

    def unmerge(self):
        if self.merged is None:
            return
        with torch.no_grad():
            self.base.weight.copy_(self.merged_weight(self.merged, -1))
        self.merged = None


def lora_layers(model):
    return [m for m in model.modules() if isinstance(m, LoRALayer)]


def find_targets(model, targets=None):
    """Names of the Linear/Conv1D layers to adapt: a target is a layer's last name component
    (e.g. "c_attn") or a regular expression for its whole name (e.g. r"h\\.[0-5]\\.attn\\.c_attn")."""
    wrapped = [n for n, m in model.named_modules() if isinstance(m, LoRALayer)]
    linears = [n for n, m in model.named_modules()
               if isinstance(m, LoRALayer) or (isinstance(m, nn.Linear) or is_conv1d(m))
               and not any(n.startswith(w + ".") for w in wrapped)]  # not a LoRA layer's insides
    candidates = sorted({n.rsplit(".", 1)[-1] for n in linears})
    if targets is None:
        model_type = getattr(getattr(model, "config", None), "model_type", None)
        if model_type not in DEFAULT_TARGETS:
            raise ValueError(f"no default LoRA targets for architecture '{model_type}'; name them with "
                             f"targets=[...] from its Linear layers: {', '.join(candidates)}")
        targets = DEFAULT_TARGETS[model_type]
    names = []
    for target in targets:
        found = [n for n in linears if n.rsplit(".", 1)[-1] == target or re.fullmatch(target, n)]
        if not found:
            raise ValueError(f"LoRA target '{target}' matches no Linear layer; candidates: {', '.join(candidates)}")
        names += found
    return sorted(set(names))


def add_adapter(model, name, r=8, alpha=16, dropout=0.0, targets=None):
    """Add adapter `name` to the target layers (wrapping them on first use); returns their names."""
    wrapped = {n: m for n, m in model.named_modules() if isinstance(m, LoRALayer)}
    names = list(wrapped) if wrapped and targets is None else find_targets(model, targets)
    for layer_name in names:
        layer = wrapped.get(layer_name)
        if layer is None:
            parent_name, _, child = layer_name.rpartition(".")
            parent = model.get_submodule(parent_name)
            base = getattr(parent, child)
            layer = LoRALayer(base)
            setattr(parent, child, layer)
        if name in layer.lora_A:
            raise ValueError(f"adapter '{name}' already exists")
        layer.add(name, r, alpha, dropout)
    return names


def set_adapter(model, name, layers=None):
    """Make adapter `name` active in every LoRA layer that has it; None runs the plain base model.
    layers: the model's LoRA layers when the caller has them (lora_layers walks every module)."""
    layers = lora_layers(model) if layers is None else layers
    if name is not None and not any(name in layer.lora_A for layer in layers):
        known = sorted({n for layer in layers for n in layer.lora_A})
        raise ValueError(f"no adapter '{name}'; this model has: {', '.join(known) or 'none'}")
    for layer in layers:
        if layer.merged is not None and layer.merged != name:
            raise ValueError(f"adapter '{layer.merged}' is merged; unmerge() before switching adapters")
        layer.active = name if name in layer.lora_A else None


def active_adapter(model, layers=None):
    layers = lora_layers(model) if layers is None else layers
    return next((layer.active for layer in layers if layer.active is not None), None)


@contextlib.contextmanager
def use_adapter(model, name, layers=None):
    """Run a block with adapter `name` (None: no adapter), then restore the previous one. One walk
    over the model's modules for all three steps, none when the caller keeps its `layers`
    (lora_layers(model)): imagination switches adapters at every pass."""
    layers = lora_layers(model) if layers is None else layers
    previous = active_adapter(model, layers)
    set_adapter(model, name, layers)
    try:
        yield model
    finally:
        set_adapter(model, previous, layers)


@contextlib.contextmanager
def folded(model):
    """Within the block, a pass without gradients runs the active adapter folded into a copy of the base
    weight, W + (alpha / r) B A: one product instead of three (W's, A's, B's), equal up to rounding.
    Each adapter is folded on its first such pass (a copy of the base weights each); passes with
    gradients run as usual; the copies are dropped at the end. Only float32 bases fold (in bfloat16 the
    fold would round a small update away, which the unfolded sum keeps), not offloaded ones, nor adapters
    with dropout. A weight changed in place or replaced after its copy was made makes the next folded pass raise."""
    layers = [layer for layer in lora_layers(model) if layer.folded is None and layer.can_fold
              and layer.base.weight.dtype == torch.float32 and layer.merged is None]
    for layer in layers:
        layer.folded = {}
    try:
        yield model
    finally:
        for layer in layers:
            layer.folded = None


def merge(model):
    """Fold the active adapter into the base weights (forward then skips the LoRA path)."""
    for layer in lora_layers(model):
        layer.merge()


def unmerge(model):
    for layer in lora_layers(model):
        layer.unmerge()


def is_lora_key(key, name=None):
    """Is this parameter name part of adapter `name` (of any adapter when None)?"""
    return re.search(rf"\.lora_[AB]\.{re.escape(name) if name else '[^.]+'}\.", key) is not None


def saved_state(model, base_prefix, should_save_base):
    """What a checkpoint keeps of a model built around a base LM (its weights under
    `base_prefix`): everything when the base's own weights matter (it trains, or it is random),
    else everything but the frozen pretrained base, which reloads from its name; adapters stay."""
    state = model.state_dict()
    if should_save_base:
        return state
    return {k: v for k, v in state.items() if is_lora_key(k) or not k.startswith(base_prefix)}


def load_saved_state(model, saved, base_prefix, should_save_base, path):
    """Load what saved_state kept into a model built with the same settings."""
    load_fitting(model, saved, saved_state(model, base_prefix, should_save_base), path)


def load_fitting(model, saved, own, path):
    """Load `saved` into model if it holds exactly the keys and shapes of `own`, what the model itself
    saves; a checkpoint that holds other weights (another version, other settings) is one clear error."""
    if set(saved) != set(own) or any(saved[k].shape != own[k].shape for k in own):
        raise UserError(f"the checkpoint in {path} does not fit this model (other weights saved); it was made "
                        "by another version of this repository or with other settings")
    model.load_state_dict(saved, strict=False)  # strict=False: the rest (a frozen pretrained base) is not saved


def lora_parameters(model, name=None):
    """The LoRA parameters of adapter `name`, or of all adapters."""
    return (p for n, p in model.named_parameters() if is_lora_key(n, name))


def mark_only_lora_trainable(model):
    """Freeze everything but the adapters: the base gets neither gradients nor optimizer state."""
    for n, p in model.named_parameters():
        p.requires_grad = is_lora_key(n)


def strip_name(key, name):
    return key.replace(f".lora_A.{name}.", ".lora_A.").replace(f".lora_B.{name}.", ".lora_B.")


def adapter_state_dict(model, name):
    """Adapter `name`'s weights, keyed without its name so they load under any name."""
    return {strip_name(k, name): v.detach().clone() for k, v in model.state_dict().items() if is_lora_key(k, name)}


def load_adapter_state_dict(model, name, state_dict):
    own = {strip_name(k, name): k for k in model.state_dict() if is_lora_key(k, name)}
    if set(own) != set(state_dict):
        raise ValueError(f"adapter weights do not fit adapter '{name}' of this model "
                         f"({len(state_dict)} tensors given, {len(own)} expected); were they saved from another model?")
    params = model.state_dict()
    wrong = [k for k, v in state_dict.items() if params[own[k]].shape != v.shape]
    if wrong:  # copy_ would broadcast a (1, in) A into an (r, in) one without a word
        raise ValueError(f"adapter weight {wrong[0]} is {tuple(state_dict[wrong[0]].shape)}, adapter '{name}' of this "
                         f"model has {tuple(params[own[wrong[0]]].shape)}; were they saved from another model?")
    with torch.no_grad():
        for k, v in state_dict.items():
            params[own[k]].copy_(v)


def save_adapter(model, name, path):
    save_file({k: v.contiguous() for k, v in adapter_state_dict(model, name).items()}, path)


def load_adapter(model, name, path):
    load_adapter_state_dict(model, name, load_file(path))
