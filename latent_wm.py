"""
One LM as the whole world model, with a VAE's latent as the state (issue #16): the other answer
to "IRIS with an LM inside" (worldmodel.py + lm_backbone.py, K + 1 tokens per step). Here one
transformer carries three LoRA adapters, as BigVAE's one LM carries two (JD-P/minihf, branch
adavae-moe), and each step of the world model is ONE latent z instead of K observation tokens,
as in the latent-dynamics world models (Dreamer, Hafner et al.; TWM, Robine et al. 2023; STORM,
Zhang et al. 2023: one token per frame from a VAE's latent).

    adapter    reads                                        attention       gives
    encoder    one observation's K tokens                   bidirectional   attention pooling -> w_e -> mu
    decoder    [w_d(z), o_1 .. o_{K-1}] (teacher-forced)    causal          o_1 .. o_K   (the obs head)
    dynamics   [w_d(z_1), a_1, w_d(z_2), a_2, ...]           causal          at each a_t: z_{t+1}, reward, end

The VAE head is vae.VAEComponent (BigVAE's `f` pooling scores, `w_e`, `w_d`); the posterior is
BigVAE's N(mu, I), so its KL to N(0, I) is |mu|^2 / 2 (small weight, BigVAE's sin^2 warm-up). The
decoder trains on z = mu + noise * eps, after a plain autoencoder phase and with the noise ramped in
(vae_math.noise_scale, vae_math.kl_weight), so it learns to read latents that are off by some noise, as
predicted ones are; the dynamics read the posterior means, as imagination feeds them the prior's.
The heads are worldmodel.Head: the dynamics heads read the action positions of 2-token blocks,
exactly as IRIS's read the action position of its (K + 1)-token blocks, also inside a KV cache.

How the next latent is learned (`next_latent`):
- "kl" (the default): the dynamics head gives the mean of a prior p(z_{t+1} | z_<=t, a_<=t) =
  N(pred, I). The posterior is N(mu_{t+1}, I) too, so the sequential VAE's KL term (Dreamer's) is
  exactly |mu_{t+1} - pred|^2 / 2, with DreamerV3's balancing: weight dyn_weight with the posterior
  held fixed (trains the dynamics) and rep_weight with the prior held fixed (pulls the encoder
  toward predictable latents; the fixed unit noise keeps it from shrinking z to nothing). It costs
  no decoder pass per predicted step, and the dynamics learn from the latent alone.
- "decode": the decoder's cross-entropy of the next observation's tokens from the predicted
  latent (teacher-forced): the loss that is measured, at the price of one more decoder pass
  over every step, and the dynamics and the decoder then learn their own code together.
Either way the held-out "obs" metric is that decoder cross-entropy and accuracy, so the numbers
sit beside the token world model's (train_wm.py, eval_wm.py).

LatentWorldModelEnv imagines behind WorldModelEnv's interface: reset(obs) encodes the observation;
each step is ONE dynamics pass of 2 tokens (the current latent's soft token and the action)
through the LM's KV cache; the observation is decoded (K cached single-token decoder passes) only
when should_decode is on (eval_wm.py needs it; an agent reading latents, train_agent.py
--policy-input latent, need not).

    python train_wm.py --state latent --out-dir out-wm-latent          # CartPole, GPT-2-shaped, from scratch
    python train_wm.py --state latent --backbone lm --out-dir out-wm-latent-tiny  # tiny LM + three adapters
    python train_wm.py --state latent --backbone lm --model out-lm/base --num-bins 32 --out-dir out-wm-latent-lm
    python bench.py imagine                                            # imagined steps/s beside the token model
"""

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

import lora
from lm import hidden_size
from lm_backbone import LMBackbone, LMCache
from vae import VAE, VAEComponent, VAEConfig
from vae_math import kl_weight, noise_scale
from worldmodel import Head, WorldModelEnv, compute_labels, init_weights, mean_cross_entropy

NEXT_LATENT = ("kl", "decode")


@dataclass
class LatentWorldModelConfig:
    tokens_per_obs: int = 16  # K: tokens per observation (IRIS: 16)
    obs_vocab_size: int = 512  # observation token vocabulary (IRIS: 512)
    num_actions: int = 6  # the env's Discrete action space
    max_steps: int = 20  # steps per training segment, and the dynamics context in steps (IRIS: 20)
    latent_size: int = 64  # D: size of z (BigVAE: 768 for 64 text tokens; an observation is a few tokens)
    next_latent: str = "kl"  # how the next latent is learned: "kl" or "decode" (module docstring)
    dyn_weight: float = 0.5  # next-latent KL with the posterior held fixed: trains the dynamics (DreamerV3: 0.5)
    rep_weight: float = 0.1  # the same KL with the prior held fixed: trains the encoder (DreamerV3: 0.1)
    kl_max: float = 0.01  # weight of the posterior's KL to N(0, I), |mu|^2 / 2, after warm-up (BigVAE: 0.01)
    kl_iters: int = 500  # steps of its sin^2 warm-up (BigVAE: 5000, for a run 10x longer)
    ae_iters: int = 300  # first steps: a plain autoencoder, z = mu, no KL (vae.py; the text VAE's main lever)
    noise_ramp_iters: int = 500  # then the posterior's unit noise grows from 0 to full over these steps

    @property
    def max_tokens(self) -> int:
        return 2 * self.max_steps  # the dynamics pass: a soft token and an action per step

    @property
    def vae(self) -> VAEConfig:
        """The schedules' settings in vae.py's terms (noise_scale, kl_weight): BigVAE's N(mu, I)."""
        return VAEConfig(latent_size=self.latent_size, posterior="bigvae", z_memory=0, ae_iters=self.ae_iters,
                         noise_ramp_iters=self.noise_ramp_iters, kl_schedule="cosine", kl_max=self.kl_max,
                         kl_iters=self.kl_iters)


def masked_mean(values, mask):
    """Mean of values over the positions where mask (the same shape, e.g. (B, L)) holds; 0 when none does."""
    return values[mask].sum() / mask.sum().clamp(min=1)


class LatentWorldModel(nn.Module):
    """The world model over a causal LM `lm` (random or pretrained) with the encoder, decoder and
    dynamics adapters; tables: (observation table, action table) of the LM's width, by default
    new ones (IRIS's); should_train_base: the LM's own weights train too (else only the adapters)."""

    def __init__(self, config: LatentWorldModelConfig, lm, tables=None, r=16, alpha=32.0,
                 should_train_base=False):
        super().__init__()
        if config.next_latent not in NEXT_LATENT:
            raise ValueError(f"next_latent must be one of {NEXT_LATENT}")
        self.config = config
        # the LM as worldmodel.py's backbone, with the dynamics adapter (only it, and the base if asked, train)
        self.backbone = LMBackbone(lm, r=r, alpha=alpha, should_train_base=should_train_base)
        for name in ("encoder", "decoder"):  # fresh adapters: trainable from the start
            lora.add_adapter(lm, name, r=r, alpha=alpha)
        C, V = hidden_size(lm), config.obs_vocab_size
        new = []  # what this file creates gets IRIS's initialisation (the head keeps BigVAE's, vae.py)
        if tables is None:
            tables = (nn.Embedding(V, C), nn.Embedding(config.num_actions, C))
            new += tables
        self.obs_table, self.action_table = tables
        self.head = VAEComponent(C, config.vae)  # f (pooling), w_e (-> mu), w_d (z -> soft token)
        action_mask = torch.tensor([0, 1])  # a dynamics step: the soft token, then the action
        self.heads = nn.ModuleDict({"latent": Head(action_mask, C, config.latent_size),
                                    "reward": Head(action_mask, C, 3), "end": Head(action_mask, C, 2)})
        self.obs_head = Head(torch.ones(1), C, V)  # the decoder: every position predicts a token
        for module in new + [self.heads, self.obs_head]:
            module.apply(init_weights)

    # --- the three passes --------------------------------------------------------------------

    def run_adapter(self, adapter, embeds, cache=None, mask=None):
        """The LM's body with one adapter on (LMBackbone.run): embeds (B, T, C) -> hidden (B, T, C). mask
        (B, T): bidirectional over those positions (the encoder); None: causal. cache: an LMCache to extend."""
        return self.backbone.run(adapter, embeds, cache, mask)

    def encode(self, obs_tokens):
        """Posterior means of observations: obs tokens (N, K) -> mu (N, D)."""
        mask = torch.ones_like(obs_tokens, dtype=torch.bool)
        hidden = self.run_adapter("encoder", self.obs_table(obs_tokens), mask=mask)  # (N, K, C)
        return self.head.w_e(self.head.pool(hidden, mask))  # (N, C) -> (N, D)

    def decode_logits(self, z, obs_tokens):
        """Teacher-forced decoder: latents (N, D), their observations' tokens (N, K) -> logits (N, K, V)."""
        embeds = torch.cat([self.head.w_d(z)[:, None], self.obs_table(obs_tokens[:, :-1])], 1)  # (N, K, C)
        return self.obs_head(self.run_adapter("decoder", embeds))

    @torch.no_grad()
    def generate(self, z, sample):
        """Decode latents (B, D) into observation tokens (B, K) with the decoder's KV cache:
        sample(logits (B, V), k) -> tokens (B,) picks token k."""
        cache, embeds, tokens = LMCache(), self.head.w_d(z)[:, None], []  # (B, 1, C)
        for k in range(self.config.tokens_per_obs):
            tokens.append(sample(self.obs_head(self.run_adapter("decoder", embeds, cache))[:, -1], k))
            embeds = self.obs_table(tokens[-1])[:, None]  # (B, 1, C)
        return torch.stack(tokens, 1)  # (B, K)

    def dynamics_inputs(self, z, actions):
        """Latents (B, L, D) and actions (B, L) -> the dynamics pass's input (B, 2L, C):
        w_d(z_1), a_1, w_d(z_2), a_2, ..."""
        pairs = torch.stack([self.head.w_d(z), self.action_table(actions)], 2)  # (B, L, 2, C)
        return pairs.flatten(1, 2)  # (B, 2L, C)

    def forward(self, embeds, cache=None, keep_last=None):
        """The dynamics pass (WorldModel.forward's contract, on inputs made by dynamics_inputs):
        embeds (B, T, C) after the cache's content -> each head at the action positions of this window:
        {"latent": (B, T_a, D), "reward": (B, T_a, 3), "end": (B, T_a, 2)}. keep_last=n: the heads read
        the window's last n positions only (imagining without a cache)."""
        prev = 0 if cache is None else cache.length
        T = embeds.shape[1]
        if prev + T > self.config.max_tokens:
            raise ValueError(f"{prev + T} tokens > max_tokens {self.config.max_tokens}")
        hidden = self.backbone(embeds, cache)  # (B, T, C), the dynamics adapter
        if keep_last is not None:
            hidden, prev = hidden[:, T - keep_last:], prev + T - keep_last
        return {name: head(hidden, prev) for name, head in self.heads.items()}

    # --- training ----------------------------------------------------------------------------

    def segment(self, batch):
        """Encode a batch of segments and run the dynamics over their posterior means: (mu (B, L, D), heads)."""
        obs_tokens = batch["obs_tokens"]  # (B, L, K)
        B, L, K = obs_tokens.shape
        mu = self.encode(obs_tokens.flatten(0, 1)).view(B, L, -1)  # (B*L, D) -> (B, L, D)
        return mu, self(self.dynamics_inputs(mu, batch["actions"]))

    def next_obs_logits(self, batch, predicted):
        """The decoder's logits for each real next observation from the latent predicted for it, and
        that observation's tokens: (N, K, V), (N, K); N = steps whose next step is not padding."""
        valid = batch["mask_padding"][:, 1:]  # (B, L - 1)
        tokens = batch["obs_tokens"][:, 1:][valid]  # (N, K)
        return self.decode_logits(predicted[:, :-1][valid], tokens), tokens

    def logits_and_labels(self, batch: dict) -> dict:
        """As WorldModel's, for eval_wm.py: name -> (logits (N, classes), labels (N,)); "obs" are the next
        observations' tokens decoded (teacher-forced) from the latents the dynamics predict, z = mu."""
        _, out = self.segment(batch)
        labels = compute_labels(batch["obs_tokens"], batch["rewards"], batch["ends"], batch["mask_padding"])
        logits, tokens = self.next_obs_logits(batch, out["latent"])
        pairs = {"obs": (logits.flatten(0, 1), tokens.flatten())}
        pairs.update({name: (out[name].flatten(0, 1), labels[name].flatten()) for name in ("reward", "end")})
        return pairs

    def compute_loss(self, batch: dict, step: int = 0) -> dict:
        """rec (the observations through encoder and decoder), next (the next latent, per next_latent) and
        beta * kl (|mu|^2 / 2), each per observation token; reward and end cross-entropies, per step."""
        cfg = self.config
        K = cfg.tokens_per_obs
        mask = batch["mask_padding"]  # (B, L)
        mu, out = self.segment(batch)
        z = VAE.sample(mu[mask], None, noise_scale(step, cfg.vae))  # (N, D), the real steps
        rec = F.cross_entropy(self.decode_logits(z, batch["obs_tokens"][mask]).flatten(0, 1),
                              batch["obs_tokens"][mask].flatten())
        if cfg.next_latent == "kl":  # KL(N(mu_{t+1}, I) || N(pred_t, I)) = |mu_{t+1} - pred_t|^2 / 2, balanced
            target, predicted = mu[:, 1:], out["latent"][:, :-1]  # (B, L - 1, D)
            kl_dyn = 0.5 * (target.detach() - predicted).pow(2).sum(-1)
            kl_rep = 0.5 * (target - predicted.detach()).pow(2).sum(-1)
            next_term = masked_mean(cfg.dyn_weight * kl_dyn + cfg.rep_weight * kl_rep, mask[:, 1:]) / K
        else:
            logits, tokens = self.next_obs_logits(batch, out["latent"])
            next_term = mean_cross_entropy(logits.flatten(0, 1), tokens.flatten())  # 0 when no next step is real
        labels = compute_labels(batch["obs_tokens"], batch["rewards"], batch["ends"], mask)
        reward, end = (mean_cross_entropy(out[name].flatten(0, 1), labels[name].flatten())
                       for name in ("reward", "end"))
        kl = masked_mean(0.5 * mu.pow(2).sum(-1), mask) / K
        beta = kl_weight(step, cfg.vae)
        return {"loss": rec + next_term + reward + end + beta * kl, "rec": rec, "next": next_term,
                "reward": reward, "end": end, "kl": kl.detach(), "beta": torch.tensor(beta)}


# ----------------------------------------------------------------------------- imagination

class LatentWorldModelEnv(WorldModelEnv):
    """WorldModelEnv's interface, imagining in latent space (batched, torch tensors throughout):

    reset(obs (B, *obs_shape)) -> (obs, info {"obs_tokens": (B, K), "latent": (B, D)})
    step(action (B,)) -> (obs, reward float (B,) in {-1, 0, 1}, terminated bool (B,), truncated (B,)
                          always False, info {"latent": (B, D)} and, decoded, {"obs_tokens": (B, K)})
    One dynamics pass of 2 tokens per step (the current latent's soft token and the action) through
    the KV cache; the next latent is the prior's mean (its unit variance is the posterior's fixed
    noise, which the decoder learned to read through), reward and end are sampled. The observation
    is decoded only with should_decode (else obs is None). A full context is cut to its last
    keep_steps steps and the cache rebuilt, as in WorldModelEnv; should_use_cache=False recomputes
    the whole context every step instead (the same numbers, slowly: for tests and bench.py).
    """

    def __init__(self, world_model: LatentWorldModel, tokenizer, should_use_cache=True, temperature=1.0,
                 keep_steps=None, generator=None, should_decode=True):
        super().__init__(world_model, tokenizer, should_use_cache, temperature, keep_steps, generator)
        self.should_decode = should_decode

    @torch.no_grad()
    def reset(self, obs):
        obs_tokens = self.tokenizer.encode(obs)  # (B, K)
        self.latent = self.world_model.encode(obs_tokens)  # (B, D)
        self._rebuild(self.latent.new_zeros(len(obs_tokens), 0, self.world_model.backbone.width))  # empty context
        return self.tokenizer.decode(obs_tokens), {"obs_tokens": obs_tokens, "latent": self.latent}

    @torch.no_grad()
    def step(self, action):
        if self.context.shape[1] + 2 > self.world_model.config.max_tokens:
            self._rebuild(self.context[:, self.context.shape[1] - 2 * self.keep_steps:])
        action = torch.as_tensor(action, device=self.latent.device).long()
        out = self._feed(self.world_model.dynamics_inputs(self.latent[:, None], action[:, None]))  # (B, 2, C) in
        self.latent = out["latent"]  # (B, D)
        reward = self._sample(out["reward"]).float() - 1
        terminated = self._sample(out["end"]).bool()
        truncated = torch.zeros_like(terminated)
        if not self.should_decode:
            return None, reward, terminated, truncated, {"latent": self.latent}
        obs_tokens = self.world_model.generate(self.latent, self._sample_obs)  # (B, K)
        info = {"latent": self.latent, "obs_tokens": obs_tokens}
        return self.tokenizer.decode(obs_tokens), reward, terminated, truncated, info

    def _rebuild(self, embeds):
        """Restart the context (and cache) from these dynamics inputs (B, T, C); T may be 0."""
        self.context = embeds[:, :0]
        if self.should_use_cache:
            self.cache = self.world_model.backbone.new_cache(len(embeds), self.world_model.config.max_tokens)
        if embeds.shape[1] > 0:
            self._feed(embeds)


def imagination_env(world_model, tokenizer, **kwargs):
    """The env that imagines in world_model: LatentWorldModelEnv for a latent one, else WorldModelEnv."""
    env_class = LatentWorldModelEnv if isinstance(world_model, LatentWorldModel) else WorldModelEnv
    return env_class(world_model, tokenizer, **kwargs)


# ----------------------------------------------------------------------------- IRIS's size, as an LM

def iris_sized_lm(shape, config):
    """A GPT-2-shaped transformer of IRIS's world-model shape (worldmodel.TransformerConfig: width, layers,
    heads, dropout) for LatentWorldModelConfig `config`, random and trained whole: --backbone iris (wm_setup.py
    builds the rest). Its token table is never read. Its GELU is GPT-2's tanh approximation as one fused
    kernel ("gelu_pytorch_tanh", the same function as GPT-2's "gelu_new" up to rounding, which spends eight
    element-wise kernels on it: about a tenth of an imagined step's time at this size, results/agent_cartpole.md)."""
    from transformers import GPT2Config, GPT2LMHeadModel  # not at the top: see lm.import_transformers

    return GPT2LMHeadModel(GPT2Config(n_layer=shape.num_layers, n_head=shape.num_heads, n_embd=shape.width,
                                      vocab_size=1, bos_token_id=0, eos_token_id=0,
                                      n_positions=max(config.max_tokens, config.tokens_per_obs),
                                      resid_pdrop=shape.dropout, embd_pdrop=shape.dropout, attn_pdrop=shape.dropout,
                                      activation_function="gelu_pytorch_tanh"))
