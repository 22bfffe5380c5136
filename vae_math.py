"""
The text VAE's plain functions (vae.py), each tested at known points: the schedules of the
sampling noise and the KL weight (functions of the step), the loss's KL and token weights, the
Gumbel-max sampler, the bidirectional attention mask and slerp. Apart from the model they are
shared: the router samples with gumbel_max, vae_eval.py measures the same KL, and the latent
world model (latent_wm.py) follows the same schedules and masks.
"""

import math

import torch
import torch.nn.functional as F


def noise_scale(step, cfg):
    """How much of the posterior's noise is sampled: 0 in the autoencoder phase, then a ramp to 1."""
    if step < cfg.ae_iters:
        return 0.0
    return min(1.0, (step - cfg.ae_iters + 1) / cfg.noise_ramp_iters) if cfg.noise_ramp_iters else 1.0


def kl_weight(step, cfg):
    """The KL term's weight (beta) at this step; 0 during the autoencoder phase."""
    s = step - cfg.ae_iters
    if s < 0:
        return 0.0
    if cfg.kl_schedule == "cosine":  # BigVAE: v * sin^2(min(s / steps, 1) * pi / 2)
        return cfg.kl_max * math.sin(min(s / cfg.kl_iters, 1.0) * math.pi / 2) ** 2
    if cfg.kl_schedule == "cyclical":  # each cycle: 0 for a quarter, linear ramp for a quarter, then hold
        u = (s % cfg.kl_iters) / cfg.kl_iters
        return cfg.kl_max * min(1.0, max(0.0, (u - 0.25) / 0.25))
    return cfg.kl_max


def kl_per_dim(mu, logvar):
    """KL(q(z|x) || N(0, I)) per example and dimension, (B, D). logvar None: BigVAE's N(mu, I)."""
    if logvar is None:
        return 0.5 * mu.pow(2)
    return 0.5 * (mu.pow(2) + logvar.exp() - logvar - 1.0)


def token_weights(num_tokens, should_weight_edges, device):
    """Per-position loss weights: BigVAE's 0.05 on the first 8 and 0.15 on the last 8 targets, else 1."""
    weights = torch.ones(num_tokens, device=device)
    if should_weight_edges:
        weights[:8], weights[-8:] = 0.05, 0.15
    return weights


def gumbel_max(logits, temperature):
    """argmax(logits + T * gumbel) samples softmax(logits / T) (BigVAE's sampler); T = 0 is greedy."""
    if temperature > 0:
        uniform = torch.rand_like(logits).clamp_(1e-10, 1.0)
        logits = logits + temperature * -torch.log(-torch.log(uniform))
    return logits.argmax(-1)


def bidirectional_mask(mask, dtype):
    """(B, T) True-for-real-token mask -> additive (B, 1, T, T) mask: every position sees every
    real position, none sees padding. Additive, so eager and sdpa attention read it alike."""
    keep = mask[:, None, None, :].expand(-1, 1, mask.shape[1], -1)  # (B, 1, T, T)
    return torch.zeros(keep.shape, dtype=dtype, device=mask.device).masked_fill(~keep, torch.finfo(dtype).min)


def slerp(a, b, t):
    """Spherical interpolation between the rows of a and b; lerp for a row whose two are parallel."""
    cos = F.cosine_similarity(a, b, dim=-1).clamp(-1.0, 1.0)[:, None]  # (N, 1)
    omega = torch.acos(cos)
    is_parallel = omega.abs() < 1e-4
    sin = torch.where(is_parallel, 1.0, torch.sin(omega))  # a parallel row divides by 1 and is replaced
    spherical = (torch.sin((1 - t) * omega) * a + torch.sin(t * omega) * b) / sin
    return torch.where(is_parallel, torch.lerp(a, b, t), spherical)
