"""
CPU offload of a frozen LM's decoder layers, written out: how a 7B model trains on a GPU
smaller than its weights.

The frozen weights of every decoder layer live in pinned CPU memory. Just before a layer
runs, a wrapper around its forward makes its weights resident on the GPU (waiting for a copy that
was started early on a side CUDA stream, so copy and compute overlap) and starts copying
the next layer; every other layer's GPU copy is dropped. Everything else (embeddings,
final norm, LM head, LoRA adapters, the VAE head) stays on the GPU.

Training needs the weights a second time, in the backward pass. Without more, autograd
would keep every layer's weights alive until then and offload would save nothing. So the
wrapper also checkpoints each layer's activations (torch.utils.checkpoint, when gradients
are on): the backward pass re-runs each layer's forward just before that layer's backward,
which fetches its weights again, now walking the layers last to first (the prefetch follows
the direction). At any moment at most two layers are resident: the one running and the one
being fetched. (transformers' own checkpointing can't be used for this: it deliberately
runs the recomputation outside module hooks and wrappers. --grad-checkpoint is the same
wrapper without the fetching, so it adds nothing to --offload.)

bitsandbytes 8-bit layers keep their int8 weight and scales in `layer.state` (their
backward reads it there), so those two tensors are what moves for them; 4-bit layers are
not supported. On a CPU-only machine the same code runs with the CPU as both storage and
compute device (copies are clones), which is how the tests check it.

Every script that loads a base (train_vae.py, sample.py, train_wm.py, train_agent.py) takes
the same memory flags (add_memory_args), makes a MemoryConfig of them, loads the base through
load_with_memory and puts its model on the device through place, at the end of this file
(train_router.py: a MemoryConfig of its --dtype alone). place also refuses, in one line, a run
whose training step would not fit in the device's free memory (check_memory, which the scripts
whose model has no base to place call themselves).
"""

import os
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.utils.checkpoint

from common import TINY_MODELS, UserError

# lm and lora import transformers (~2 s), so they are imported inside the functions that use them:
# a script's --help needs add_memory_args and answers before transformers is loaded


def decoder_layers(model):
    """The model's stack of transformer blocks (GPT-2: transformer.h; Llama/Mistral: model.layers)."""
    num_layers = model.config.num_hidden_layers
    for module in model.modules():
        if isinstance(module, nn.ModuleList) and len(module) == num_layers:
            return module
    raise ValueError(f"cannot find the {num_layers} decoder layers of {type(model).__name__}")


def checkpointed(layer, before=None):
    """The layer's forward, activation-checkpointed whenever gradients are on: only its inputs
    are kept, and the backward pass re-runs it just before the layer's own backward. `before()`
    runs first on every run, the re-run included (offload fetches the layer's weights there).
    The re-run happens after the caller has switched LoRA adapters (the VAE runs the encoder,
    then the decoder, then one backward pass), so it puts back the adapters of the first run."""
    from lora import LoRALayer

    forward = layer.forward
    adapters = [m for m in layer.modules() if isinstance(m, LoRALayer)]

    def run(active, *inputs, **kwargs):
        if before is not None:
            before()
        now = [m.active for m in adapters]
        for m, name in zip(adapters, active):
            m.active = name
        try:
            return forward(*inputs, **kwargs)
        finally:
            for m, name in zip(adapters, now):
                m.active = name

    def maybe_checkpointed(*inputs, **kwargs):
        active = [m.active for m in adapters]
        if torch.is_grad_enabled():
            return torch.utils.checkpoint.checkpoint(run, active, *inputs, use_reentrant=False, **kwargs)
        return run(active, *inputs, **kwargs)

    return maybe_checkpointed


def checkpoint_layers(model):
    """Per-layer activation checkpointing (--grad-checkpoint). Not transformers' own
    (`gradient_checkpointing_enable`): that one drops any KV cache passed in, and the VAE
    passes z to every layer as a cache entry (vae.py's z memory)."""
    for layer in decoder_layers(model):
        layer.forward = checkpointed(layer)


def frozen_slots(layer):
    """(owner, attribute) pairs holding the layer's frozen tensors, the things offload moves."""
    slots = []
    for module in layer.modules():
        params = dict(module.named_parameters(recurse=False))
        state = getattr(module, "state", None)
        if hasattr(state, "SCB"):  # bitsandbytes Linear8bitLt: int8 weight and scales live in .state
            if module.weight.CB is not None:
                module.init_8bit_state()
            slots += [(state, "CB"), (state, "SCB"), (params.pop("weight"), "data")]
        elif type(params.get("weight")).__name__ == "Params4bit":
            raise ValueError("offload does not support 4-bit layers; use --load-8bit or bf16 with --offload")
        slots += [(p, "data") for p in params.values() if not p.requires_grad]
        slots += [(module, name) for name, _ in module.named_buffers(recurse=False)]
    return slots


class LayerOffloader:
    """Keeps the frozen weights of `layers` on the CPU and brings each to `device` as it runs."""

    def __init__(self, layers, device):
        self.layers, self.device = list(layers), torch.device(device)
        self.cuda = self.device.type == "cuda"
        self.stream = torch.cuda.Stream(self.device) if self.cuda else None
        self.slots, self.stored = [], []  # per layer: [(owner, attr, key)]; {key: CPU tensor}
        self.resident = {}  # layer index -> (CUDA event or None, {slot key: device tensor})
        self.last_started = -1
        self.num_fetches = 0  # copies to the device, for the tests and the curious
        self.max_resident = 0
        for i, layer in enumerate(self.layers):
            slots = frozen_slots(layer)
            stored, keys = {}, []
            for owner, attr in slots:
                t = getattr(owner, attr)
                key = (t.data_ptr(), t.dtype, tuple(t.shape))  # 8-bit: state.CB and weight.data share memory
                if key not in stored:
                    cpu = t.detach().to("cpu")
                    stored[key] = cpu.pin_memory() if self.cuda else cpu
                keys.append(key)
            self.slots.append([(owner, attr, key) for (owner, attr), key in zip(slots, keys)])
            self.stored.append(stored)
            self._release(i)
            for module in layer.modules():  # what is not offloaded (LoRA, trainable parts) lives on the device
                for p in module.parameters(recurse=False):
                    if p.requires_grad:
                        p.data = p.data.to(self.device)
                if hasattr(module, "can_fold"):  # a lora.LoRALayer: its base weight comes and goes, never folded
                    module.can_fold = False
            layer.forward = checkpointed(layer, before=lambda i=i: self._before(i))

    def _fetch(self, i):
        """Start copying layer i's weights to the device (on the side stream on CUDA)."""
        if i in self.resident or not 0 <= i < len(self.layers):
            return
        self.num_fetches += 1
        if not self.cuda:
            self.resident[i] = (None, {key: cpu.clone() for key, cpu in self.stored[i].items()})
            return
        self.stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(self.stream):
            copies = {key: cpu.to(self.device, non_blocking=True) for key, cpu in self.stored[i].items()}
            event = torch.cuda.Event()
            event.record(self.stream)
        self.resident[i] = (event, copies)

    def _release(self, i):
        """Drop layer i's device copy: its slots point at empty placeholders again."""
        self.resident.pop(i, None)
        for owner, attr, key in self.slots[i]:
            setattr(owner, attr, torch.empty(0, dtype=self.stored[i][key].dtype, device=self.device))

    def _before(self, i):
        """Before layer i runs: make it resident, drop the others, prefetch the next."""
        # the next layer up when this one follows the one below (or starts a pass from layer 0); else the next
        # one down: a backward pass re-runs the layers last to first, starting at the top (again, or after
        # another pass's backward through the same layers ended at 0). From 0 reached going down: no prefetch.
        is_up = i == self.last_started + 1 or (i == 0 and self.last_started != 1)
        direction = 1 if is_up else -1
        self.last_started = i
        self._fetch(i)
        event, copies = self.resident[i]
        if event is not None:
            torch.cuda.current_stream(self.device).wait_event(event)
            for t in copies.values():  # tell the allocator the main stream uses them now
                t.record_stream(torch.cuda.current_stream(self.device))
        for owner, attr, key in self.slots[i]:
            setattr(owner, attr, copies[key])
        for j in list(self.resident):
            if j != i:
                self._release(j)
        self._fetch(i + direction)
        self.max_resident = max(self.max_resident, len(self.resident))


def offload_layers(model, device):
    """Move `model` to `device` except the frozen weights of its decoder layers, which are
    offloaded to the CPU and fetched layer by layer; returns the LayerOffloader."""
    layers = decoder_layers(model)
    offloader = LayerOffloader(layers, device)
    inside = {id(m) for m in layers.modules()}
    move_to((m for m in model.modules() if id(m) not in inside), device)  # all outside the decoder layers
    return offloader


def move_to(modules, device):
    """Move the parameters and buffers that each of `modules` holds itself (not its children's)."""
    for module in modules:
        for p in module.parameters(recurse=False):
            p.data = p.data.to(device)
        for name, b in module.named_buffers(recurse=False):
            setattr(module, name, b.to(device))


def activation_bytes(device):
    """What a training step on `device` keeps per token, in bytes per value of linear_values. Each
    linear layer's input and output stay for the backward pass (2 bytes each under bf16 autocast on
    CUDA, 4 in fp32), and on CUDA as much again around them: norms, nonlinearities, dropout masks
    (Korthikanti et al. 2022 count 17 x width values per GPT block, whose linear layers have 16).
    On a CPU twice that: unfused kernels' temporaries, and the attention weights that dropout makes
    the math kernel keep. Measured: Mistral-7B's VAE step on an H100 (README), 27.0 GiB estimated for
    a 23.7 GiB peak; on a CPU, 1.0x to 1.3x the peak's growth for the tiny VAE, 2.1x and 1.4x for
    IRIS's world model on CartPole and on Pong frames."""
    if device.type == "cuda":
        return 2 * (2 if torch.cuda.is_bf16_supported() else 4)
    return 4 * 4


def linear_values(module):
    """What the linear layers in `module` (nn.Linear, GPT-2's Conv1D) read and write per token: the
    sum of their in + out features. LoRA's adapters are left out: the one in use reads its layer's
    input and adds its rank."""
    from lora import LoRALayer

    adapters = {id(m) for layer in module.modules() if isinstance(layer, LoRALayer)
                for m in [*layer.lora_A.values(), *layer.lora_B.values()]}
    total = 0
    for m in module.modules():
        if isinstance(m, nn.Linear) and id(m) not in adapters:
            total += m.in_features + m.out_features
        elif type(m).__name__ == "Conv1D":
            total += m.nx + m.nf
    return total


def estimate_memory(model, tokens_per_step, should_checkpoint=False, should_offload=False, value_bytes=4,
                    others=(), should_train=True):
    """The memory of a training step of `model` (any module) over tokens_per_step tokens, in bytes,
    an estimate that errs high: the weights as stored; for each trainable weight its gradient and
    AdamW's two moments, in its dtype; activations, linear_values per token at value_bytes each
    (activation_bytes; the default 4 is CUDA's with bf16). With should_checkpoint or should_offload
    `model` is an LM whose decoder layers keep only their input (width values), one layer's
    activations living at a time, during its re-run; offload has two layers' frozen weights on the
    device at a time. others: parameters outside `model` that the step also keeps (a VAE's head
    around its base: `outside`), counted as `model`'s are. should_train False: a model that is used,
    not trained (sample.py), keeps no gradients or moments."""
    params = [*model.parameters(), *others]
    weights = sum(p.numel() * p.element_size() for p in params)
    optimizer = sum(3 * p.numel() * p.element_size() for p in params if p.requires_grad and should_train)
    per_token = linear_values(model)
    if should_checkpoint or should_offload:
        layers = decoder_layers(model)
        per_token += model.config.hidden_size * len(layers) - linear_values(layers) + linear_values(layers[0])
    if should_offload:
        frozen = sum(p.numel() * p.element_size() for p in layers.parameters() if not p.requires_grad)
        weights -= frozen - 2 * frozen // len(layers)
    activations = per_token * value_bytes * tokens_per_step
    return {"weights": weights, "optimizer": optimizer, "activations": activations,
            "total": weights + optimizer + activations}


def free_memory(device):
    """Bytes free on `device`: CUDA's own count, or the kernel's MemAvailable for the CPU; None
    where neither can be read (MPS, a system without /proc/meminfo)."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    if device.type == "cpu" and os.path.exists("/proc/meminfo"):
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024  # the file counts kB
    return None


def outside(model, base):
    """The parameters of `model` that are not `base`'s: a VAE's head, a world model's embedder and heads."""
    inside = {id(p) for p in base.parameters()}
    return [p for p in model.parameters() if id(p) not in inside]


def check_memory(model, device, tokens_per_step, lower, should_checkpoint=False, should_offload=False, others=(),
                 should_train=True):
    """Refuse, in one line, a step that would not fit in what `device` has free: the estimate
    (estimate_memory of `model` and `others`) less the weights already on the device, which are out
    of the free memory already. lower: what to lower, e.g. "--batch-size (now 64)". Returns the
    estimate."""
    others = list(others)
    estimate = estimate_memory(model, tokens_per_step, should_checkpoint, should_offload, activation_bytes(device),
                               others, should_train)
    there = sum(p.numel() * p.element_size() for p in [*model.parameters(), *others] if p.device.type == device.type)
    needed, free = estimate["total"] - there, free_memory(device)
    if free is not None and needed > free:
        raise UserError(f"one step would need about {needed / 2**30:.1f} GiB more {device.type} memory (estimated by "
                        f"offload.estimate_memory), and {free / 2**30:.1f} GiB is free: lower {lower}")
    return estimate


# ----------------------------------------------------------------------------- the flags, and loading and placing by them

def add_memory_args(parser):
    g = parser.add_argument_group("memory, for big bases (offload.py)")
    g.add_argument("--load-8bit", action="store_true", help="load the base's linear layers in 8 bits (bitsandbytes)")
    g.add_argument("--load-4bit", action="store_true", help="load them in 4-bit NF4, as BigVAE did (bitsandbytes)")
    g.add_argument("--offload", action="store_true", help="keep the frozen decoder layers in CPU memory and fetch "
                   "each to the GPU as it runs")
    g.add_argument("--grad-checkpoint", action="store_true", help="recompute the decoder layers' activations in "
                   "the backward pass instead of keeping them")


@dataclass
class MemoryConfig:
    """add_memory_args's flags and --dtype: how a base is loaded and placed."""
    dtype: str = "auto"  # --dtype: auto is bfloat16 on a GPU that has it, float32 elsewhere (lm.resolve_dtype)
    load_8bit: bool = False  # the base's linear layers in 8 bits (bitsandbytes)
    load_4bit: bool = False  # in 4-bit NF4, as BigVAE
    offload: bool = False  # frozen decoder layers in CPU memory, fetched to the GPU as each runs
    grad_checkpoint: bool = False  # recompute the decoder layers' activations in the backward pass


def load_with_memory(model_name, memory, device, should_train_base, should_load_tokenizer=True, should_save_base=False):
    """lm.load_base(model_name) as the MemoryConfig `memory` asks: quantized, or on the CPU when
    offloading (place moves it). should_load_tokenizer=False for a user that reads no text (the world
    model); should_save_base: the checkpoint keeps the base's own weights (random ones), which an
    offloaded base's state_dict no longer holds."""
    import lm

    if memory.load_8bit and memory.load_4bit:
        raise UserError("--load-8bit and --load-4bit exclude each other; pick one")
    if memory.offload and should_train_base:
        raise UserError("--offload keeps a frozen base on the CPU, but this base trains: freeze it "
                        "(train_vae.py: add --freeze-base; train_wm.py: drop --train-base) or drop --offload")
    if (memory.load_8bit or memory.load_4bit) and should_train_base:
        raise UserError(f"--load-{'8' if memory.load_8bit else '4'}bit quantizes a frozen base, but this base trains "
                        "(integer weights take no gradient): freeze it (train_vae.py: add --freeze-base; train_wm.py: "
                        "drop --train-base) or drop the flag")
    if memory.offload and should_save_base:
        raise UserError(f"--offload is for a frozen pretrained base; {model_name}'s weights here are random and saved "
                        "in the checkpoint, which an offloaded base cannot give: drop --offload")
    if memory.offload and memory.grad_checkpoint:
        raise UserError("--offload already re-runs each layer in the backward pass; drop --grad-checkpoint")
    if memory.offload and memory.load_4bit:
        raise UserError("--offload moves 8-bit or 16-bit layers, not 4-bit ones; use --load-8bit with --offload")
    quantize = "8bit" if memory.load_8bit else "4bit" if memory.load_4bit else None
    # auto: the dtype of where it computes, not of the CPU that holds it; fp32 weights for a base
    # that trains (AdamW on bf16 weights loses small updates; autocast gives bf16 compute anyway)
    dtype = "float32" if should_train_base and memory.dtype == "auto" else memory.dtype
    dtype = str(lm.resolve_dtype(dtype, device)).removeprefix("torch.")
    return lm.load_base(model_name, "cpu" if memory.offload else device, dtype, quantize,
                        should_load_tokenizer=should_load_tokenizer, should_check_lora=True)  # every user adds LoRA


def smaller(model_name, memory, device):
    """What to lower when loading model_name for use, not training, does not fit: the memory flags not given
    yet that load_with_memory and lm.load_base accept for it (none for tiny, random and saved whole, or a
    GGUF file; --offload only onto a GPU)."""
    can_shrink = not (model_name in TINY_MODELS or model_name == "smollm2" or model_name.endswith(".gguf"))
    unused = [flag for flag, is_on in (("--load-8bit", memory.load_8bit or memory.load_4bit),
                                       ("--offload", memory.offload or memory.load_4bit or device.type != "cuda"))
              if can_shrink and not is_on]
    return f"what the base takes: add {' or '.join(unused)}" if unused else "what else uses the device's memory"


def place(model, base, memory, device, tokens_per_step, lower, should_print, should_train=True):
    """Put `model`, which contains `base` (after the adapters are added), on `device` as the
    MemoryConfig asks: per-layer checkpointing, the memory check (check_memory, the rest of `model`
    counted too, with should_train: a step of tokens_per_step tokens that cannot fit is refused,
    asking to lower `lower`; the estimate printed on CUDA), offload of the base's frozen layers. A
    quantized or offloaded base is placed already (bitsandbytes put it there while loading;
    offload_layers just did), so only the parts of `model` outside it move; otherwise all of `model`
    moves."""
    if memory.grad_checkpoint:  # our per-layer checkpointing, which keeps the caches a model passes along
        checkpoint_layers(base)
    estimate = check_memory(base, device, tokens_per_step, lower, memory.grad_checkpoint, memory.offload,
                            outside(model, base), should_train)
    if should_print and device.type == "cuda":
        print("memory estimate (GiB): " + ", ".join(f"{k} {v / 2**30:.2f}" for k, v in estimate.items()))
    if memory.offload:
        offload_layers(base, device)
    if memory.offload or memory.load_8bit or memory.load_4bit:
        inside = {id(m) for m in base.modules()}
        move_to((m for m in model.modules() if id(m) not in inside), device)
    else:
        model.to(device)
