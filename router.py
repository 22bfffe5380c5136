"""
BigVAE's second stage, the router (JD-P/minihf, branch adavae-moe): a third LoRA adapter on the
VAE's base LM learns p(next span | context, z), with the VAE frozen; generation mixes its logits
with the plain base LM's by classifier-free guidance and chains span after span, steering long
text toward a latent while the base keeps it fluent.

    router = Router(vae)                                    # "router" adapter = a copy of "decoder"
    terms = router.compute_loss(batch, step)                # {"loss"}: z encodes the target span
    ids = router.generate(context_ids, z, num_spans=4, span_tokens=64, scale=1.25, temperature=0.8)
    router, _, _ = load_router("out-vae", device, load_checkpoint("out-router", "router"), "out-router")  # a trained one

- Training input `[context, w_d(z), target[:-1]]` predicting `target`, z ~ q(z | target) from
  the VAE's frozen encoder. The router starts as the VAE's decoder: its adapter and its own
  copies of `w_d` (and of `w_memory` when the VAE gives z to every layer as keys/values) are
  the decoder's; only these train, as BigVAE trains the router and w_d.
- Guidance: logits = base + s * (router - base), s = 1.25 in BigVAE, then Gumbel-max sampling
  at the temperature (argmax at 0). s = 0 is the base alone, s = 1 the router alone, s > 1
  pushes past the router, away from the base. The base is the frozen LM with no adapter, so a
  VAE whose base trained (tiny trained fully) has no base to guide against (VAE.base_logits).
- Each span: both passes prefill on the last `context` tokens of the text so far (the window
  the router was trained on; the router's with z's K soft tokens after it), then decode one token
  per step, each with its own KV cache.
"""

import copy
import hashlib

import torch
import torch.nn as nn
import torch.nn.functional as F

import lora
from checkpoint import load_checkpoint
from common import TINY_MODELS, UserError
from lm import cache_kwarg
from vae_math import gumbel_max
from vae_setup import load_vae, should_train_base


def guided_logits(base_logits, router_logits, scale):
    """Classifier-free guidance: base + scale * (router - base)."""
    return base_logits + scale * (router_logits - base_logits)


class Router(nn.Module):
    """The router adapter and its own z projections over a frozen VAE (vae.py)."""

    def __init__(self, vae):
        super().__init__()
        self.vae = vae
        for p in vae.parameters():
            p.requires_grad = False
        base = vae.base
        lora.add_adapter(base, "router", r=vae.cfg.lora_r, alpha=vae.cfg.lora_alpha)
        lora.load_adapter_state_dict(base, "router", lora.adapter_state_dict(base, "decoder"))
        self.w_d = copy.deepcopy(vae.head.w_d)
        self.w_memory = copy.deepcopy(vae.head.w_memory)
        for p in self.trained_parameters():
            p.requires_grad = True

    def trained_parameters(self):
        """What the router trains and its checkpoint holds: the router adapter, w_d, w_memory."""
        return [*lora.lora_parameters(self.vae.base, "router"), *self.w_d.parameters(),
                *(self.w_memory.parameters() if self.w_memory is not None else [])]

    def state(self):
        return {k: v for k, v in self.state_dict().items()
                if lora.is_lora_key(k, "router") or not k.startswith("vae.")}

    def inputs(self, z, context_ids, ids=None):
        """Router inputs [context, w_d(z), ids], positioned after z's memory: (B, L, C), (1, L). w_d(z) is the
        VAE's K soft tokens (vae.head.soft_tokens with the router's w_d); the context comes first, so no lead token.
        A context shorter than the VAE's --context (the router trains on full ones) ends where a full one would,
        so that the soft tokens and the text sit at the positions they trained at (the VAE's prefix_slots)."""
        embed = self.vae.base.get_input_embeddings()
        context_len = 0 if context_ids is None else context_ids.shape[1]
        parts = [embed(context_ids)] if context_len > 0 else []
        parts.append(self.vae.head.soft_tokens(z, self.w_d).to(embed.weight.dtype))  # (B, K, C)
        parts += [embed(ids)] if ids is not None and ids.shape[1] > 0 else []
        embeds = torch.cat(parts, 1)  # (B, L, C)
        start = self.text_start(context_len) - context_len - self.vae.cfg.soft_tokens  # memory first, as the VAE's
        return embeds, torch.arange(start, start + embeds.shape[1], device=embeds.device)[None]

    def text_start(self, context_len):
        """Position of the first token after a context of context_len tokens (inputs' layout); a span of T
        tokens reaches text_start + T - 2 (its last token is never an input)."""
        return (1 if self.w_memory is not None else 0) + max(context_len, self.vae.cfg.prefix_slots) + \
            self.vae.cfg.soft_tokens

    def forward(self, z, target_ids, context_ids=None):
        """Teacher-forced router logits for target_ids given the context and z: (B, T, V)."""
        embeds, positions = self.inputs(z, context_ids, target_ids[:, :-1])
        memory = ({"use_cache": True, **cache_kwarg(self.vae.base, self.vae.memory(z, w_memory=self.w_memory))}
                  if self.w_memory is not None else {"use_cache": False})  # z's keys/values, read, never extended
        with lora.use_adapter(self.vae.base, "router"):
            out = self.vae.base(inputs_embeds=embeds, position_ids=positions, logits_to_keep=target_ids.shape[1],
                                **memory)
        return out.logits

    def encode(self, ids):
        """z ~ q(z | ids) from the frozen encoder, at the VAE's full sampling noise."""
        with torch.no_grad():
            mu, logvar = self.vae.encode(ids)
        return self.vae.sample(mu, logvar)

    def compute_loss(self, batch, step):
        target = batch["target_ids"]
        logits = self(self.encode(batch["input_ids"]), target, batch["prefix_ids"])
        loss = F.cross_entropy(logits.float().flatten(0, 1), target.flatten())
        return {"loss": loss}

    @torch.no_grad()
    def generate(self, context_ids, z, num_spans, span_tokens, scale=1.25, temperature=0.0, window=None):
        """Chain num_spans spans of span_tokens after context_ids (B, P), each steered toward z (B, D).
        window: context tokens each span sees (default: the length of context_ids). Returns the
        generated ids (B, num_spans * span_tokens); scale 0 never runs the router."""
        from transformers import DynamicCache  # not at the top: see lm.import_transformers

        base, text = self.vae.base, context_ids
        window = context_ids.shape[1] if window is None else window
        for _ in range(num_spans):
            seen = text[:, max(0, text.shape[1] - window):]
            step_logits, caches, positions = {}, {}, {}
            # the base: prefill on the window (after end of text when it is empty)
            start = seen if seen.shape[1] > 0 else torch.full((text.shape[0], 1), self.vae.eos_id, device=text.device)
            caches["base"] = DynamicCache(config=base.config)
            with lora.use_adapter(base, None):
                out = base(input_ids=start, use_cache=True, logits_to_keep=1, **cache_kwarg(base, caches["base"]))
            step_logits["base"], positions["base"] = out.logits[:, -1].float(), start.shape[1]
            if scale != 0:  # the router: z's memory, then [window, w_d(z)]
                caches["router"] = self.vae.memory(z, DynamicCache, self.w_memory)
                embeds, pos = self.inputs(z, seen)
                with lora.use_adapter(base, "router"):
                    out = base(inputs_embeds=embeds, position_ids=pos, use_cache=True, logits_to_keep=1,
                               **cache_kwarg(base, caches["router"]))
                step_logits["router"], positions["router"] = out.logits[:, -1].float(), pos[0, -1].item() + 1
            for i in range(span_tokens):
                mixed = step_logits["base"] if scale == 0 else guided_logits(step_logits["base"], step_logits["router"], scale)
                next_id = gumbel_max(mixed, temperature)[:, None]  # (B, 1)
                text = torch.cat([text, next_id], 1)
                if i + 1 == span_tokens:
                    break
                for name, cache in caches.items():  # one token per step through each cache
                    position = torch.full((1, 1), positions[name] + i, device=next_id.device)
                    with lora.use_adapter(base, None if name == "base" else "router"):
                        out = base(input_ids=next_id, position_ids=position, use_cache=True,
                                   **cache_kwarg(base, cache))
                    step_logits[name] = out.logits[:, -1].float()
        return text[:, context_ids.shape[1]:]


# -----------------------------------------------------------------------------
# a router rebuilt from its checkpoint (train_router.py's), on the VAE it was trained on


def fingerprint(vae_state):
    """What identifies a VAE checkpoint: its base, its step and a hash of its encoder head."""
    w_e = vae_state["model"]["head.w_e.weight"].float().contiguous().numpy().tobytes()
    return f"{vae_state['config']['model']}@{vae_state['step']}:{hashlib.sha256(w_e).hexdigest()[:16]}"


def load_router(vae_dir, device, state=None, router_dir=None, vae_flag=None, memory=None, batch_size=None,
                should_print=False):
    """The frozen VAE in vae_dir (given with vae_flag) and a router on it, with the weights of a router
    checkpoint `state` (from router_dir) when given; refuses a VAE with no plain base to guide against,
    and a router trained on another VAE, before any base loads. memory, batch_size, should_print:
    vae_setup.load_vae's.
    Returns (router, the VAE's checkpoint, its fingerprint)."""
    vae_state = load_checkpoint(vae_dir, "vae", vae_flag)  # read here too: the refusals come before the base loads
    base_name = vae_state.get("base", vae_state["config"]["model"])
    if base_name in TINY_MODELS:
        how = "trained fully" if should_train_base(base_name, vae_state["config"]["freeze_base"]) else "frozen, random"
        raise UserError(f"the VAE in {vae_dir} is on {base_name}'s base ({how}), so no pretrained LM is there to guide "
                        "against; train one on a frozen pretrained base (python pretrain_lm.py, then python "
                        "train_vae.py --model out-lm/base) and give that"
                        + ("" if vae_flag is None else f" to {vae_flag}"))
    vae_print = fingerprint(vae_state)
    if state is not None and state["config"]["vae_fingerprint"] != vae_print:
        raise UserError(f"the router in {router_dir} was trained on another VAE ({state['config']['vae_fingerprint']}"
                        f"), not on {vae_dir} ({vae_print}); give the VAE it was trained on")
    router = Router(load_vae(vae_dir, device, memory, vae_flag, batch_size, should_print).eval())
    if state is not None:
        lora.load_fitting(router, state["model"], router.state(), router_dir)  # the VAE is not in it
    return router, vae_state, vae_print
