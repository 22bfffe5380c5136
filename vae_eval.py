"""
Held-out metrics of a text VAE (vae.py), the ones Optimus (Li et al. 2020) and AdaVAE (Tu et
al. 2022) report, so that a run here can be set beside theirs. train_vae.py prints them.

    metrics = evaluate(vae, val_batches)                         # cheap: during training
    metrics = evaluate(vae, val_batches, num_iw_samples=32)      # everything: the end, --eval-only

Every figure is on held-out windows (textdata.py); half of them keep their prefix, and there
each likelihood is of the span given its prefix.
- accuracy / cross-entropy, teacher-forced, with z = mu and with z of another example
  (`_shuffled`): the gap is what z carries; the accuracy also apart for the spans with their prefix
  and those without (`val_acc_with_prefix`, `val_acc_without_prefix`, each where the held-out batches
  hold that kind: train_vae.py's autoencoder phase sees no prefix, unless --ae-prefix);
- greedy reconstruction from z = mu: exact match, the exact-prefix fraction (the share of a span's
  tokens before its first wrong one, ICAE's measure) and character similarity (1 - Levenshtein
  distance / the longer length); decoded on past end-of-text, which in a window of the stream
  only separates two documents;
- with num_refine_steps (the full evaluation), z refined from mu toward the span (vae.VAE.refine:
  encoding past the encoder): accuracy and cross-entropy with it and with another span's refined z
  (the control), and its greedy figures, each `..._refined`;
- whole held-out paragraphs back through z in chained spans (vae.reconstruct_ids, as BigVAE
  chains them): their exact match and character similarity (`evaluate_paragraphs`), with z = mu
  and, with num_refine_steps, refined (`..._refined`);
- ELBO = E_q[log p(x|z)] - KL(q(z|x) || p(z)), one sample of z, per token and per example;
- importance-weighted NLL (Burda et al. 2016): -log (1/K sum_k p(x|z_k) p(z_k) / q(z_k|x)),
  z_k ~ q(z|x); it bounds -log p(x) from above, tighter as K grows; and its perplexity;
- mutual information I(x; z) under q, with the estimator of Optimus and AdaVAE (the aggregate
  posterior q(z) approximated by the mixture of the held-out posteriors, so it is at most
  log(number of held-out spans): 4.85 nats for the default 128);
- active units (Var_x E[z|x] > 0.01) and the latent RMS (sample_prior scales by it);
- the base LM's own perplexity on the same spans (no adapter, no z) when its base is frozen, so
  "how much z helps" is one ratio; a base the VAE trained (tiny) is no LM any more, and there
  the shuffled-z perplexity is the reference.
"""

import math
import statistics

import torch
import torch.nn.functional as F

from vae import NUM_REFINE_STEPS
from vae_math import kl_per_dim


def log_normal(z, mu, logvar=None):
    """log N(z; mu, diag(exp(logvar))) summed over the last dimension; logvar None: unit variance."""
    logvar = torch.zeros_like(mu) if logvar is None else logvar
    return -0.5 * (math.log(2 * math.pi) + logvar + (z - mu).pow(2) / logvar.exp()).sum(-1)


def iw_log_likelihood(log_px_given_z, z, mu, logvar=None):
    """Burda et al.'s bound on log p(x) from K posterior samples: log_px_given_z (K, B), z (K, B, D),
    mu and logvar (B, D) -> (B,)."""
    log_weights = log_px_given_z + log_normal(z, torch.zeros_like(mu)) - log_normal(z, mu, logvar)  # (K, B)
    return torch.logsumexp(log_weights, 0) - math.log(z.shape[0])


def mutual_information(mu, logvar=None):
    """I(x; z) under q, estimated as Optimus and AdaVAE do (their calc_mi) with one z_i ~ q(z|x_i)
    per held-out span and the aggregate posterior q(z) taken as the mixture of the N posteriors:
    mean_i [log q(z_i|x_i) - log q(z_i)]. Optimus puts the analytic E_q log q(z|x) in the first
    term; the sampled one has the same mean and far less noise when z is large, and keeps the
    estimate at most log N (and non-negative in expectation). (N, D) -> float."""
    logvar = torch.zeros_like(mu) if logvar is None else logvar
    z = mu + (0.5 * logvar).exp() * torch.randn_like(mu)  # one sample of each posterior
    log_q = log_normal(z[:, None], mu[None], logvar[None])  # (N z's, N posteriors)
    log_qz = torch.logsumexp(log_q, 1) - math.log(mu.shape[0])
    return (log_q.diagonal() - log_qz).mean().item()


def perplexity(nats):
    """exp(nats per token); inf past float's range (a diverged run: the trainer then stops it, not a traceback)."""
    try:
        return math.exp(nats)
    except OverflowError:
        return math.inf


def char_similarity(a, b):
    """1 - Levenshtein distance / the longer length: 1 for equal strings, 0 for nothing in common."""
    if not a and not b:
        return 1.0
    row = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        previous, row[0] = row[0], i
        for j, cb in enumerate(b, 1):
            previous, row[j] = row[j], min(row[j] + 1, row[j - 1] + 1, previous + (ca != cb))
    return 1.0 - row[-1] / max(len(a), len(b))


def exact_prefix_fraction(predicted, target):
    """The share of each row's tokens before its first wrong one: (B, T), (B, T) -> (B,)."""
    is_right_so_far = (predicted == target).long().cumprod(1)  # (B, T): 1 up to the first error
    return is_right_so_far.float().mean(1)


def token_log_probs(logits, target):
    """log p of each target token: (B, T, V), (B, T) -> (B, T)."""
    return -F.cross_entropy(logits.float().flatten(0, 1), target.flatten(), reduction="none").view_as(target)


@torch.no_grad()
def evaluate(model, val_batches, num_iw_samples=0, should_train_base=True, num_shown=3, should_print=True,
             num_refine_steps=NUM_REFINE_STEPS):
    """Held-out metrics (module docstring). num_iw_samples 0: the cheap ones only, with greedy
    decoding on the first two batches; else all of them, greedy on every batch, and with num_refine_steps
    > 0 the figures of z refined from mu too."""
    is_full = num_iw_samples > 0
    should_refine = is_full and num_refine_steps > 0
    ways = ("", "_refined") if should_refine else ("",)
    sums, num_tokens, num_spans, mus, logvars = {}, 0, 0, [], []
    exact, exact_prefix, similarity, shown = ({way: [] for way in ways} for _ in range(4))
    for i, batch in enumerate(val_batches):
        target, prefix = batch["target_ids"], batch.get("prefix_ids")
        B, T = target.shape
        mu, logvar = model.encode(batch["input_ids"])
        mu, logvar = mu.float(), None if logvar is None else logvar.float()
        mus.append(mu)
        logvars.append(torch.zeros_like(mu) if logvar is None else logvar)
        kl = kl_per_dim(mu, logvar).sum(-1)  # (B,)
        terms = {"kl": kl.sum().item(), "power": (mu.pow(2) + logvars[-1].exp()).sum().item() / mu.shape[1]}
        codes = {"": mu, **({"_refined": model.refine(mu, target, prefix, num_refine_steps)} if should_refine else {})}
        for way in ways:  # each z and another span's (the control)
            for name, z in ((way, codes[way]), (way + "_shuffled", codes[way].roll(1, 0))):
                logits = model(z, target, prefix)  # (B, T, V)
                terms["ce" + name] = -token_log_probs(logits, target).sum().item()
                terms["acc" + name] = (logits.argmax(-1) == target).sum().item()
        if is_full:
            z = model.sample(mu[None].expand(num_iw_samples, -1, -1), None if logvar is None else logvar[None])
            log_px = torch.stack([token_log_probs(model(z_k, target, prefix), target).sum(-1) for z_k in z])  # (K, B)
            terms["rec"] = -log_px[0].sum().item()  # one sample: the ELBO's reconstruction term
            terms["iw_nll"] = -iw_log_likelihood(log_px, z, mu, logvar).sum().item()
            if not should_train_base:
                terms["lm_nll"] = -token_log_probs(model.base_logits(target, prefix), target).sum().item()
        kind = "with_prefix" if prefix is not None else "without_prefix"
        terms[f"acc_{kind}"], terms[f"tokens_{kind}"] = terms["acc"], target.numel()
        for k, v in terms.items():
            sums[k] = sums.get(k, 0.0) + v
        num_tokens, num_spans = num_tokens + target.numel(), num_spans + B
        for way in ways if is_full or i < 2 else ():  # greedy decoding from z = mu (and refined)
            greedy = model.generate(codes[way], T, prefix, should_stop_at_eos=False)  # a stream's windows: past end-of-text
            exact[way] += (greedy == target).all(1).tolist()
            exact_prefix[way] += exact_prefix_fraction(greedy, target).tolist()
            pairs = list(zip(model.detokenize(target), model.detokenize(greedy)))
            similarity[way] += [char_similarity(a, b) for a, b in pairs]
            shown[way] += pairs[: num_shown - len(shown[way])]
    mu, logvar = torch.cat(mus), torch.cat(logvars)
    model.head.latent_rms.fill_(math.sqrt(sums["power"] / num_spans))
    metrics = {f"val_{k}{way}{control}": sums[f"{k}{way}{control}"] / num_tokens
               for way in ways for control in ("", "_shuffled") for k in ("ce", "acc")}
    metrics.update({f"val_acc_{kind}": sums[f"acc_{kind}"] / sums[f"tokens_{kind}"]
                    for kind in ("with_prefix", "without_prefix") if f"tokens_{kind}" in sums})
    metrics.update(val_ppl=perplexity(metrics["val_ce"]), val_ppl_shuffled=perplexity(metrics["val_ce_shuffled"]),
                   val_kl=sums["kl"] / num_spans, val_active_units=int((mu.var(0) > 0.01).sum().item()),
                   val_latent_rms=model.head.latent_rms.item())
    for way in ways:
        metrics.update({f"val_exact{way}": sum(exact[way]) / len(exact[way]),
                        f"val_exact_prefix{way}": sum(exact_prefix[way]) / len(exact_prefix[way]),
                        f"val_char_similarity{way}": statistics.median(similarity[way])})
    if should_refine:
        metrics.update(val_refine_steps=num_refine_steps)
    if is_full:
        metrics.update(val_rec_per_token=sums["rec"] / num_tokens, val_kl_per_token=sums["kl"] / num_tokens,
                       val_elbo=-(sums["rec"] + sums["kl"]) / num_spans,
                       val_elbo_per_token=-(sums["rec"] + sums["kl"]) / num_tokens,
                       val_iw_nll=sums["iw_nll"] / num_spans, val_iw_ppl=perplexity(sums["iw_nll"] / num_tokens),
                       val_mi=mutual_information(mu, logvar),
                       val_iw_samples=num_iw_samples, val_spans=num_spans)
        if not should_train_base:
            metrics.update(val_ppl_lm=perplexity(sums["lm_nll"] / num_tokens))
    if should_print:
        for i, (original, greedy) in enumerate(shown[""]):
            print(f"  original: {original!r}\n  greedy:   {greedy!r}")
            if should_refine:
                print(f"  refined:  {shown['_refined'][i][1]!r}")
    return metrics


@torch.no_grad()
def evaluate_paragraphs(model, paragraphs, span, num_refine_steps=NUM_REFINE_STEPS):
    """Whole paragraphs (token lists) back through z in chained spans of `span` tokens
    (vae.VAE.reconstruct_ids), with z = mu and, for num_refine_steps > 0, each z refined that many steps
    (`_refined`): the share that comes back exactly, and the median character similarity."""
    metrics = {"val_paragraphs": len(paragraphs)}
    for way, steps in (("", 0), ("_refined", num_refine_steps)) if num_refine_steps > 0 else (("", 0),):
        exact, similarity = [], []
        for ids in paragraphs:
            reconstruction = model.reconstruct_ids(ids, span, should_stop_at_eos=False, num_refine_steps=steps)
            original, greedy = model.detokenize([ids, reconstruction])
            exact.append(original == greedy)
            similarity.append(char_similarity(original, greedy))
        metrics.update({f"val_paragraph_exact{way}": sum(exact) / len(exact),
                        f"val_paragraph_char_similarity{way}": statistics.median(similarity)})
    return metrics
