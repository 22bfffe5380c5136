"""
A text VAE made from a decoder-only language model: BigVAE's recipe (JD-P/minihf, branch
adavae-moe) with two pieces from Optimus (Li et al. 2020) and AdaVAE (Tu et al. 2022).

    model, tokenizer = lm.load_base("gpt2")
    vae = VAE(model, VAEConfig(), tokenizer)       # tokenizer: only for the text helpers
    terms = vae.compute_loss(batch, step)        # {"loss", "rec", "kl", "beta", "noise"}
    vae.reconstruct(["Return the sum of a and b."])   # any length: span by span, z refined (reconstruct_ids)
    vae.interpolate("first text", "second text", steps=5)
    vae = vae_setup.load_vae("out-vae", device)   # a trained one, from train_vae.py's checkpoint

One base LM, two LoRA adapters (lora.py) switched per call:
- encode: the "encoder" adapter reads the span with bidirectional attention (a 4-D mask;
  transformers 5.x needs no patching for it; `encoder_layers`: with the base's first layers
  only, as AdaVAE), an attention pooling over the real (not padded) positions and `w_e` give
  mu (and log-variance for the diagonal posterior);
- decode: the "decoder" adapter predicts `target_ids` from `[w_d(z), prefix, target[:-1]]`,
  BigVAE's one soft token in `inputs_embeds` (`soft_tokens` K > 1: w_d(z) cut into K of them,
  ICAE's memory slots, z still one vector; they did not pay on tiny, results/vae_levers.md; `lead_token`: an
  end-of-text token before them, off a pretrained LM's attention sink). With `z_memory` z is also an extra
  key/value in every layer (Optimus's "memory" injection). In our CPU prototype the small
  decoder learned to read z far sooner this way (README, "The text VAE"); 8 keys/values per
  layer, all made from the one z, gained a little more (results/vae_levers.md).
Posteriors: "bigvae" is N(mu, I), KL = |mu|^2 / 2 (BigVAE has no variance head);
"diagonal" is N(mu, diag(exp(logvar))) (Optimus, AdaVAE).
The sampling noise and the KL weight follow schedules of the step: an optional noise-free,
KL-free autoencoder phase first (`ae_iters`), the noise then grows to full over
`noise_ramp_iters`, and the KL weight warms up (BigVAE's sin^2), cycles (Optimus, AdaVAE)
or stays constant; free bits (per-dimension KL floor) are optional.
"""

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

import lm
import lora
from common import UserError
from lm import cache_kwarg, hidden_size, read_only_cache_class
from vae_math import bidirectional_mask, gumbel_max, kl_per_dim, kl_weight, noise_scale, slerp, token_weights

# encoding past the encoder (VAE.refine): Adam steps that move z from mu toward the decoder's own best code
# for the text, and their lr per coordinate of z (small against BigVAE's unit noise, which the decoder
# trains through once the noise has ramped in)
NUM_REFINE_STEPS, REFINE_LR = 10, 0.05


@dataclass
class VAEConfig:
    latent_size: int = 768  # size of z (BigVAE: 768)
    pool_queries: int = 1  # attention-pooling queries, their pooled states concatenated before w_e (BigVAE: 1)
    posterior: str = "bigvae"  # "bigvae": N(mu, I); "diagonal": N(mu, diag(exp(logvar)))
    z_memory: int = 1  # z also as this many keys/values in every layer (Optimus: 1); 0: BigVAE's soft token only
    soft_tokens: int = 1  # input embeddings made from z by w_d, before the text (BigVAE: 1; ICAE: memory slots)
    lora_r: int = 32  # adapter rank (BigVAE: 32)
    lora_alpha: float = 8.0  # adapter scale is alpha / r (BigVAE: 8)
    decoder_init: str = "bigvae"  # "bigvae": w_d starts as w_e's transpose; "lm": z adds nothing at first
    #                               (soft token = the LM's end-of-text embedding, z's memory zero)
    ae_iters: int = 0  # first steps: plain autoencoder, z = mu and no KL term
    noise_ramp_iters: int = 0  # then the sampling noise grows linearly from 0 to full over these steps
    kl_schedule: str = "cosine"  # "cosine" (BigVAE's sin^2 warm-up), "cyclical" (Optimus, AdaVAE), "constant"
    kl_max: float = 0.01  # KL weight reached (BigVAE: 0.01, later 0.1)
    kl_iters: int = 5000  # cosine: warm-up steps; cyclical: steps per cycle (both counted after ae_iters)
    free_bits: float = 0.0  # KL floor per latent dimension, in nats (0: off)
    edge_weights: bool = False  # BigVAE's token weights: 0.05 on the first 8, 0.15 on the last 8 targets
    prefix_slots: int = 0  # positions kept for the prefix: the target sits at the same positions with or
    #                        without one (0: a prefix shifts the target's positions)
    word_dropout: float = 0.0  # in training, share of the decoder's teacher-forced target tokens blanked to a zero
    #                            embedding, so it must read them from z (Bowman et al. 2016; 0: off)
    own_tokens: float = 0.0  # in training, share of the teacher-forced inputs replaced by the decoder's own greedy
    #                          guess from a first pass without gradients: scheduled sampling (Bengio et al. 2015), in
    #                          the two passes of Mihaylova & Martins 2019; one share throughout, no schedule (0: off)
    lead_token: bool = False  # an end-of-text token before the soft tokens, which then are not the first position: a
    #                           pretrained LM's attention sink (Xiao et al. 2023), that all its layers are tuned to
    #                           (off: BigVAE's order)
    encoder_layers: int = 0  # the encoder reads the span with the base's first this many layers (AdaVAE: 8 of GPT-2's
    #                          12; the decoder always has all): a cheaper step; 0: all of them (BigVAE)


POSTERIORS = ("bigvae", "diagonal")
DECODER_INITS = ("bigvae", "lm")
KL_SCHEDULES = ("cosine", "cyclical", "constant")


# -----------------------------------------------------------------------------
# the VAE head


class VAEComponent(nn.Module):
    """BigVAE's head: `f` scores positions for pooling, `w_e` maps the pooled state to mu,
    `w_d` maps z to K soft tokens; plus `w_logvar` (diagonal posterior) and `w_memory`
    (z as a key/value per layer) when chosen.
    With Q = cfg.pool_queries > 1, `f` scores every position Q times and the Q pooled states are
    concatenated (B, Q * C) before `w_e`. BigVAE pools once: on a 4096-wide Mistral one pooled state
    is wider than z, but on a 128-wide model it would hold z to 128 of its dimensions."""

    def __init__(self, width, cfg, memory_size=0):
        super().__init__()
        Q, K = cfg.pool_queries, cfg.soft_tokens
        self.f = nn.Linear(width, Q)
        self.w_e = nn.Linear(Q * width, cfg.latent_size)
        self.w_d = nn.Linear(cfg.latent_size, K * width)
        nn.init.orthogonal_(self.w_e.weight)  # as BigVAE: orthogonal w_e, w_d starts as its transpose
        with torch.no_grad():  # (Q = K: block k of w_d reads what pooling query k wrote; else the mean block)
            w_t = self.w_e.weight.T.view(Q, width, cfg.latent_size)  # (Q, C, D)
            self.w_d.weight.copy_((w_t if K == Q else w_t.mean(0, keepdim=True).expand(K, -1, -1)).flatten(0, 1))
        self.K = K
        self.w_logvar = nn.Linear(Q * width, cfg.latent_size) if cfg.posterior == "diagonal" else None
        self.w_memory = nn.Linear(cfg.latent_size, memory_size) if memory_size else None
        # per-dimension RMS of posterior samples, measured on held-out text; sample_prior scales by it
        self.register_buffer("latent_rms", torch.ones(()))

    def pool(self, hidden, mask):
        """Attention pooling over the real positions: (B, T, C), (B, T) -> (B, Q * C)."""
        scores = self.f(hidden).masked_fill(~mask[..., None], float("-inf"))  # (B, T, Q)
        return torch.einsum("btq,btc->bqc", scores.softmax(1), hidden).flatten(1)  # (B, Q, C) -> (B, Q * C)

    def soft_tokens(self, z, w_d=None):
        """z -> the K soft tokens the decoder reads before the text: (B, D) -> (B, K, C).
        w_d: the projection to use (default: the head's; the router has its own copy)."""
        w_d = self.w_d if w_d is None else w_d
        return w_d(z).view(z.shape[0], self.K, -1)  # (B, K * C) -> (B, K, C)


# -----------------------------------------------------------------------------
# the VAE


class VAE(nn.Module):
    """A VAE over one base LM with "encoder" and "decoder" LoRA adapters and a VAEComponent."""

    def __init__(self, base, cfg, tokenizer=None):
        super().__init__()
        if (cfg.posterior not in POSTERIORS or cfg.kl_schedule not in KL_SCHEDULES
                or cfg.decoder_init not in DECODER_INITS):
            raise ValueError(f"posterior must be one of {POSTERIORS}, kl_schedule one of {KL_SCHEDULES}, "
                             f"decoder_init one of {DECODER_INITS}")
        if not 0 <= cfg.encoder_layers <= base.config.num_hidden_layers:
            raise ValueError(f"encoder_layers must be 0 (all) to {base.config.num_hidden_layers}")
        self.base, self.cfg, self.tokenizer = base, cfg, tokenizer
        self.eos_id = tokenizer.eos_id if tokenizer is not None else base.config.eos_token_id
        for name in ("encoder", "decoder"):
            lora.add_adapter(base, name, r=cfg.lora_r, alpha=cfg.lora_alpha)
        c = base.config
        self.num_layers = c.num_hidden_layers
        self.num_kv_heads = getattr(c, "num_key_value_heads", None) or c.num_attention_heads
        self.head_dim = getattr(c, "head_dim", None) or hidden_size(base) // c.num_attention_heads
        memory_size = self.num_layers * 2 * self.num_kv_heads * cfg.z_memory * self.head_dim
        self.head = VAEComponent(hidden_size(base), cfg, memory_size)
        if cfg.decoder_init == "lm":
            self.start_as_the_lm()

    @torch.no_grad()
    def start_as_the_lm(self):
        """z adds nothing at first: the soft token is the LM's own end-of-text embedding (the scale of
        a real token; BigVAE's w_e-transpose start gives a pretrained LM's pooled states back at
        ~13x it) and z's keys/values are zero. With one soft token first and no memory the decoder is the
        LM itself; a zero key of z still takes a share of attention, and more soft tokens or a lead token
        move the text's positions, so otherwise it starts near the LM's loss (README). z's path opens as
        w_d and w_memory move, as LoRA's zero B opens an adapter."""
        self.head.w_d.weight.zero_()
        self.head.w_d.bias.copy_(self.base.get_input_embeddings().weight[self.eos_id].repeat(self.cfg.soft_tokens))
        if self.head.w_memory is not None:
            self.head.w_memory.weight.zero_()
            self.head.w_memory.bias.zero_()

    # --- encoder -------------------------------------------------------------------------

    def encoder_hidden(self, input_ids, mask=None):
        """Last hidden states of the encoder adapter, every position seeing every real one: (B, T, C)."""
        mask = torch.ones_like(input_ids, dtype=torch.bool) if mask is None else mask.bool()
        dtype = self.base.get_input_embeddings().weight.dtype
        with lora.use_adapter(self.base, "encoder"), lm.first_layers_only(self.base, self.cfg.encoder_layers):
            out = self.base.base_model(input_ids=input_ids, attention_mask=bidirectional_mask(mask, dtype),
                                       use_cache=False)  # no cache to fill: a checkpointed re-run would fill it twice
        return out.last_hidden_state, mask

    def encode(self, input_ids, mask=None):
        """Posterior parameters (mu, logvar) of a batch of spans, (B, D) each; logvar None for bigvae."""
        hidden, mask = self.encoder_hidden(input_ids, mask)
        pooled = self.head.pool(hidden.to(self.head.w_e.weight.dtype), mask)  # (B, Q * C)
        logvar = self.head.w_logvar(pooled) if self.head.w_logvar is not None else None
        return self.head.w_e(pooled), logvar

    def refine(self, mu, target_ids, prefix_ids=None, num_steps=NUM_REFINE_STEPS, lr=REFINE_LR):
        """z moved from mu by num_steps steps of Adam on the decoder's cross-entropy of target_ids (after the
        prefix, as it will decode them). The refinement of SA-VAE (Kim et al. 2018), simplified: the
        likelihood alone (no KL term; mu only, a logvar is not used) and at evaluation only (the encoder
        does not train through it); Kuratov et al. 2025 fit one input vector per text from scratch. The
        encoder has read the text, so this is still encoding; the decoder later sees only z. Only z moves:
        autograd.grad touches no parameter's .grad, and each row's loss is its own sum, so its steps do not
        depend on the batch. (B, D) -> (B, D)."""
        z = mu.detach().clone().requires_grad_(True)
        optimizer = torch.optim.Adam([z], lr=lr)
        with torch.enable_grad():
            for _ in range(num_steps):
                logits = self(z, target_ids, prefix_ids)  # (B, T, V)
                loss = F.cross_entropy(logits.float().flatten(0, 1), target_ids.flatten(), reduction="sum")
                z.grad, = torch.autograd.grad(loss, z)
                optimizer.step()
        if not torch.isfinite(z).all():  # a float16 base's backward can overflow
            raise UserError("z is not finite after refining: give --dtype bfloat16 or float32 (a float16 base's "
                            "backward pass overflows), or --refine-steps 0 (z = mu)")
        return z.detach()

    @staticmethod
    def sample(mu, logvar, scale=1.0):
        """z = mu + scale * std * eps (reparameterised); scale 0 gives z = mu."""
        if scale == 0.0:
            return mu
        std = torch.ones_like(mu) if logvar is None else (0.5 * logvar).exp()
        return mu + scale * std * torch.randn_like(mu)

    # --- decoder -------------------------------------------------------------------------

    def memory(self, z, cache_class=None, w_memory=None):
        """A KV cache holding z as M = cfg.z_memory keys/values per layer (Optimus: M = 1), or an
        empty one. With one, every position reads the same value vector of z (only its weight
        differs); with several, attention can pick a different part of z for each position.
        cache_class: None for one that is read, never extended (lm.read_only_cache_class: a layer re-run
        for its backward pass sees the same memory); DynamicCache for one that generation extends.
        w_memory: the projection to use (default: the head's; the router has its own copy)."""
        from transformers import DynamicCache  # not at the top: see lm.import_transformers

        cache_class = read_only_cache_class() if cache_class is None else cache_class
        cache = cache_class(config=self.base.config)
        w_memory = self.head.w_memory if w_memory is None else w_memory
        if w_memory is not None:
            M = self.cfg.z_memory
            kv = w_memory(z).view(z.shape[0], self.num_layers, 2, self.num_kv_heads, M, self.head_dim)
            kv = kv.to(self.base.get_input_embeddings().weight.dtype)
            for layer in range(self.num_layers):  # (B, heads, M, head_dim) each
                DynamicCache.update(cache, kv[:, layer, 0], kv[:, layer, 1], layer)
        return cache

    def first_position(self, prefix_ids):
        """Position of the decoder's first input: after z's memory (when there), and right-aligned with the prefix
        so that the target starts at the same position with or without it (cfg.prefix_slots)."""
        prefix_len = 0 if prefix_ids is None else prefix_ids.shape[1]
        if self.cfg.prefix_slots and prefix_len > self.cfg.prefix_slots:
            raise ValueError(f"a prefix of {prefix_len} tokens does not fit prefix_slots={self.cfg.prefix_slots}")
        return (1 if self.head.w_memory is not None else 0) + max(0, self.cfg.prefix_slots - prefix_len)

    def text_start(self, prefix_ids):
        """Position of the text's first token, after the lead token, the K soft tokens and the prefix. A
        text of T tokens reaches position text_start + T - 2 (its last token is never an input)."""
        prefix_len = 0 if prefix_ids is None else prefix_ids.shape[1]
        return self.first_position(prefix_ids) + self.cfg.lead_token + self.cfg.soft_tokens + prefix_len

    def decoder_inputs(self, z, prefix_ids=None, ids=None, keep=None):
        """inputs_embeds [end of text (cfg.lead_token), w_d(z), prefix, ids]: (B, (1 +) K + P + T, C).
        keep (B, T) bool: ids' tokens to show; the others become zero vectors (word dropout)."""
        embed = self.base.get_input_embeddings()
        parts = [self.head.soft_tokens(z).to(embed.weight.dtype)]
        if self.cfg.lead_token:
            parts.insert(0, embed.weight[self.eos_id].expand(z.shape[0], 1, -1))  # (B, 1, C)
        if prefix_ids is not None and prefix_ids.shape[1] > 0:
            parts.append(embed(prefix_ids))
        if ids is not None and ids.shape[1] > 0:
            parts.append(embed(ids) if keep is None else embed(ids) * keep[..., None])
        return torch.cat(parts, 1)

    def forward(self, z, target_ids, prefix_ids=None, keep=None):
        """Teacher-forced logits for target_ids given z (and the prefix): (B, T, V); the inputs are
        target_ids[:, :-1] (its last token only sets T). keep: see decoder_inputs."""
        embeds = self.decoder_inputs(z, prefix_ids, target_ids[:, :-1], keep)
        memory = ({**cache_kwarg(self.base, self.memory(z)), "use_cache": True} if self.head.w_memory is not None
                  else {"use_cache": False})
        start = self.first_position(prefix_ids)
        positions = torch.arange(start, start + embeds.shape[1], device=embeds.device)[None]  # (1, L)
        with lora.use_adapter(self.base, "decoder"):
            out = self.base(inputs_embeds=embeds, position_ids=positions, logits_to_keep=target_ids.shape[1],
                            **memory)
        return out.logits

    def base_logits(self, target_ids, prefix_ids=None):
        """The base LM alone (no adapter, no z) on target_ids after the prefix, or after end of
        text when there is none: (B, T, V). A frozen base's own prediction, the reference."""
        if prefix_ids is None or prefix_ids.shape[1] == 0:
            prefix_ids = torch.full_like(target_ids[:, :1], self.eos_id)
        ids = torch.cat([prefix_ids, target_ids[:, :-1]], 1)
        with lora.use_adapter(self.base, None):
            return self.base(input_ids=ids, use_cache=False, logits_to_keep=target_ids.shape[1]).logits

    def compute_loss(self, batch, step):
        """Named loss terms for a batch {"input_ids", "target_ids", optional "input_mask", "prefix_ids"}."""
        cfg, target = self.cfg, batch["target_ids"]
        mu, logvar = self.encode(batch["input_ids"], batch.get("input_mask"))
        noise = noise_scale(step, cfg)
        keep = None
        if self.training and cfg.word_dropout > 0:
            keep = torch.rand(target[:, :-1].shape, device=target.device) >= cfg.word_dropout  # (B, T - 1)
        z, prefix, shown = self.sample(mu, logvar, noise), batch.get("prefix_ids"), target  # the mask, then z's noise
        if self.training and cfg.own_tokens > 0:  # the inputs are shown[:, :-1]: the last token is never one
            with torch.no_grad():
                guess = self(z, target, prefix, keep).argmax(-1)  # (B, T): the greedy guess of each target token
            swap = torch.rand(target.shape, device=target.device) < cfg.own_tokens  # (B, T)
            shown = torch.where(swap, guess, target)
        logits = self(z, shown, prefix, keep)
        ce = F.cross_entropy(logits.float().flatten(0, 1), target.flatten(), reduction="none").view_as(target)
        weights = token_weights(target.shape[1], cfg.edge_weights, target.device)
        rec = (ce * weights).sum() / (weights.sum() * target.shape[0])  # weighted mean over tokens
        kl_dims = kl_per_dim(mu.float(), None if logvar is None else logvar.float())  # (B, D)
        kl = kl_dims.sum(-1).mean()  # nats per example
        kl_term = kl_dims.mean(0).clamp(min=cfg.free_bits).sum() if cfg.free_bits > 0 else kl
        beta = kl_weight(step, cfg)
        loss = rec + beta * kl_term / target.shape[1]  # BigVAE: the KL is spread over the target tokens
        return {"loss": loss, "rec": rec, "kl": kl.detach(), "beta": torch.tensor(beta),
                "noise": torch.tensor(noise)}

    # --- generation (no autograd graph: nothing here needs gradients) -------------------------

    @torch.no_grad()
    def generate(self, z, num_tokens, prefix_ids=None, temperature=0.0, should_stop_at_eos=True):
        """Decode num_tokens tokens from z with the KV cache: greedy at temperature 0, else
        Gumbel-max sampling argmax(logits + temperature * gumbel) (= softmax(logits / T)).
        After an end-of-text token a row keeps emitting it, unless should_stop_at_eos is False:
        a training window is cut from a stream where end-of-text only separates documents, so
        reconstructing one decodes on past it. Returns (B, num_tokens)."""
        from transformers import DynamicCache  # not at the top: see lm.import_transformers

        cache, eos = self.memory(z, DynamicCache), self.eos_id
        done = torch.zeros(z.shape[0], dtype=torch.bool, device=z.device)
        out_ids = []
        embeds = self.decoder_inputs(z, prefix_ids)
        position = self.first_position(prefix_ids)
        with lora.use_adapter(self.base, "decoder"):
            positions = torch.arange(position, position + embeds.shape[1], device=z.device)[None]
            out = self.base(inputs_embeds=embeds, position_ids=positions, use_cache=True, logits_to_keep=1,
                            **cache_kwarg(self.base, cache))
            position += embeds.shape[1]
            for i in range(num_tokens):
                logits = out.logits[:, -1].float()
                next_id = gumbel_max(logits, temperature).masked_fill(done, eos)
                if should_stop_at_eos:
                    done |= next_id == eos
                out_ids.append(next_id)
                if i + 1 == num_tokens or done.all():
                    break
                positions = torch.full((1, 1), position + i, device=z.device)
                out = self.base(input_ids=next_id[:, None], position_ids=positions, use_cache=True,
                                **cache_kwarg(self.base, cache))
        ids = torch.stack(out_ids, 1)
        return F.pad(ids, (0, num_tokens - ids.shape[1]), value=eos)

    def tokenize(self, texts):
        """Texts -> right-padded ids (B, T) and their mask. An empty text is refused: pooling over
        no position would give a NaN mu."""
        rows = [self.tokenizer.encode(t) for t in texts]
        if not all(rows):
            raise ValueError(f"text {[len(r) for r in rows].index(0) + 1} has no tokens; every text needs one")
        length = max(len(r) for r in rows)
        device = self.head.w_e.weight.device
        ids = torch.full((len(rows), length), self.tokenizer.eos_id, dtype=torch.long, device=device)
        mask = torch.zeros_like(ids, dtype=torch.bool)
        for i, r in enumerate(rows):
            ids[i, :len(r)], mask[i, :len(r)] = torch.tensor(r, dtype=torch.long), True
        return ids, mask

    def detokenize(self, ids):
        """(B, T) ids, or a list of token lists -> texts, end-of-text tokens left out."""
        eos = self.tokenizer.eos_id
        return [self.tokenizer.decode([i for i in row if i != eos]) for row in (ids.tolist() if torch.is_tensor(ids) else ids)]

    @torch.no_grad()
    def reconstruct_ids(self, ids, span, temperature=0.0, should_stop_at_eos=True, num_refine_steps=NUM_REFINE_STEPS):
        """A token list of any length back through z (greedy at temperature 0), span by span as BigVAE
        chains spans: each span of `span` tokens is encoded alone (z = mu, then num_refine_steps of refine
        toward it after that prefix) and decoded after the previous decoded tokens as its prefix. The last
        span is the text's last `span` tokens, overlapping the one before it, so every span the encoder
        reads is as long as the ones it trained on."""
        device = self.head.w_e.weight.device
        starts = [0] if len(ids) <= span else [*range(0, len(ids) - span, span), len(ids) - span]
        out = []
        for start in starts:
            chunk = torch.tensor([ids[start:start + span]], device=device)  # (1, S)
            mu, _ = self.encode(chunk)
            prefix = torch.tensor([out[max(0, start - span):start]], device=device) if start else None  # (1, P)
            z = self.refine(mu, chunk, prefix, num_refine_steps)  # 0 steps: mu
            decoded = self.generate(z, chunk.shape[1], prefix, temperature, should_stop_at_eos)
            out = out[:start] + decoded[0].tolist()
        return out

    def reconstruct(self, texts, temperature=0.0, num_refine_steps=NUM_REFINE_STEPS):
        """Texts back through z (refined, reconstruct_ids); one longer than the trained span (cfg.prefix_slots)
        in chained spans."""
        ids, mask = self.tokenize(texts)
        rows = [row[keep].tolist() for row, keep in zip(ids, mask)]
        span = self.cfg.prefix_slots
        return self.detokenize([self.reconstruct_ids(ids, span or len(ids), temperature,
                                                     num_refine_steps=num_refine_steps) for ids in rows])

    @torch.no_grad()
    def sample_prior(self, n, num_tokens, temperature=0.0):
        """Texts decoded from z ~ N(0, latent_rms^2 I) (BigVAE samples randn * the measured RMS)."""
        z = torch.randn(n, self.cfg.latent_size, device=self.head.w_e.weight.device) * self.head.latent_rms
        return self.detokenize(self.generate(z, num_tokens, temperature=temperature))

    @torch.no_grad()
    def interpolate(self, text_a, text_b, steps=5, mode="slerp", temperature=0.0):
        """Decode steps points on the lerp or slerp path between the two posterior means."""
        ids, mask = self.tokenize([text_a, text_b])
        mu, _ = self.encode(ids, mask)
        t = torch.linspace(0, 1, steps, device=mu.device)[:, None]  # (S, 1)
        a, b = mu[:1].expand(steps, -1), mu[1:].expand(steps, -1)
        z = torch.lerp(a, b, t) if mode == "lerp" else slerp(a, b, t)
        return self.detokenize(self.generate(z, ids.shape[1], temperature=temperature))
