"""vae_eval.py's metrics on cases whose answer is known by hand."""

import math

import pytest
import torch

from vae_eval import (char_similarity, evaluate_paragraphs, exact_prefix_fraction, iw_log_likelihood, log_normal,
                      mutual_information, perplexity)


def test_log_normal_matches_torch_distributions():
    g = torch.Generator().manual_seed(0)
    z, mu, logvar = (torch.randn(5, 3, generator=g) for _ in range(3))
    expected = torch.distributions.Normal(mu, (0.5 * logvar).exp()).log_prob(z).sum(-1)
    assert torch.allclose(log_normal(z, mu, logvar), expected, atol=1e-5)
    assert torch.allclose(log_normal(z, mu), torch.distributions.Normal(mu, 1.0).log_prob(z).sum(-1), atol=1e-5)


def test_iw_bound_is_exact_with_the_true_posterior():
    """p(z) = N(0, 1), p(x|z) = N(z, 1): p(x) = N(0, 2) and the posterior is N(x/2, 1/2). With q the
    true posterior every importance weight is p(x), so the estimate is exact for any K; with a
    wrong q it is not."""
    x = torch.tensor([-1.5, 0.0, 2.0])
    exact = torch.distributions.Normal(0.0, math.sqrt(2.0)).log_prob(x)
    mu, logvar = (x / 2)[:, None], torch.full((3, 1), math.log(0.5))
    for K in (1, 7):
        z = mu + (0.5 * logvar).exp() * torch.randn(K, 3, 1)  # (K, B, D)
        log_px_given_z = torch.distributions.Normal(z[..., 0], 1.0).log_prob(x)  # (K, B)
        assert torch.allclose(iw_log_likelihood(log_px_given_z, z, mu, logvar), exact, atol=1e-5)
    wrong_mu = mu + 1.0
    z = wrong_mu + (0.5 * logvar).exp() * torch.randn(1, 3, 1)
    log_px_given_z = torch.distributions.Normal(z[..., 0], 1.0).log_prob(x)
    assert not torch.allclose(iw_log_likelihood(log_px_given_z, z, wrong_mu, logvar), exact, atol=1e-2)


def test_mutual_information_of_identical_and_of_separated_posteriors():
    """Posteriors that are all alike carry nothing about x (MI ~ 0); posteriors too far apart to
    overlap identify x among N (MI ~ log N, the estimator's ceiling)."""
    torch.manual_seed(0)
    n = 512
    same = torch.zeros(n, 4)
    assert abs(mutual_information(same)) < 1e-5
    apart = 100.0 * torch.arange(n, dtype=torch.float)[:, None]
    assert abs(mutual_information(apart, torch.zeros(n, 1)) - math.log(n)) < 1e-4
    overlapping = 0.5 * torch.randn(n, 2)  # in between: more than nothing, less than the ceiling
    assert 0.05 < mutual_information(overlapping) < math.log(n) - 1


def test_char_similarity_by_hand():
    assert char_similarity("kitten", "sitting") == 1 - 3 / 7  # two substitutions and one insertion
    assert char_similarity("same", "same") == 1.0
    assert char_similarity("", "") == 1.0
    assert char_similarity("abc", "") == 0.0
    assert char_similarity("abcd", "abXd") == 0.75


def test_exact_prefix_fraction_by_hand():
    target = torch.tensor([[1, 2, 3, 4], [1, 2, 3, 4], [1, 2, 3, 4]])
    predicted = torch.tensor([[1, 2, 3, 4], [1, 2, 9, 4], [9, 2, 3, 4]])  # exact; wrong at 2; wrong at 0
    assert exact_prefix_fraction(predicted, target).tolist() == [1.0, 0.5, 0.0]  # right after an error counts not


class EchoOrNot:
    """A stand-in VAE whose reconstruction is right for even-length paragraphs and drops the last
    token of odd-length ones: evaluate_paragraphs' figures are then known by hand."""

    def __init__(self):
        self.steps = []  # num_refine_steps of each call

    def reconstruct_ids(self, ids, span, should_stop_at_eos=True, num_refine_steps=0):
        assert span == 4 and not should_stop_at_eos
        self.steps.append(num_refine_steps)
        return ids if len(ids) % 2 == 0 else ids[:-1]

    def detokenize(self, rows):
        return [bytes(row).decode() for row in rows]


def test_evaluate_paragraphs_by_hand():
    paragraphs = [list(b"abcd"), list(b"abcdefgh"), list(b"abcde")]
    metrics = evaluate_paragraphs(EchoOrNot(), paragraphs, 4, num_refine_steps=0)
    assert metrics == {"val_paragraph_exact": 2 / 3, "val_paragraph_char_similarity": 1.0, "val_paragraphs": 3}
    metrics = evaluate_paragraphs(EchoOrNot(), [list(b"abcde"), list(b"abc"), list(b"abcdefgh")], 4, num_refine_steps=0)
    assert metrics["val_paragraph_exact"] == 1 / 3 and metrics["val_paragraph_char_similarity"] == 0.8  # median
    model = EchoOrNot()
    both = evaluate_paragraphs(model, paragraphs, 4, num_refine_steps=3)  # z = mu, then refined: here alike
    assert model.steps == [0, 0, 0, 3, 3, 3]
    assert both == {"val_paragraph_exact": 2 / 3, "val_paragraph_char_similarity": 1.0, "val_paragraphs": 3,
                    "val_paragraph_exact_refined": 2 / 3, "val_paragraph_char_similarity_refined": 1.0}


def test_perplexity_past_floats_range_is_inf_not_an_error():
    assert perplexity(math.log(7.0)) == pytest.approx(7.0) and perplexity(1000.0) == math.inf  # math.exp raises there
