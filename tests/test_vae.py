"""Tests for vae.py and vae_math.py on tiny GPT-2 and Mistral models built from configs (offline, CPU)."""

import math

import pytest
import torch
import torch.nn.functional as F
from conftest import assert_greedy, tiny_gpt2, tiny_mistral

import lm
import lora
from vae import VAE, VAEConfig
from vae_math import bidirectional_mask, gumbel_max, kl_per_dim, kl_weight, noise_scale, slerp, token_weights


def make_vae(base="gpt2", **overrides):
    torch.manual_seed(0)
    model = tiny_gpt2() if base == "gpt2" else tiny_mistral()
    cfg = VAEConfig(latent_size=16, lora_r=4, lora_alpha=8, **overrides)
    return VAE(model, cfg, lm.ByteTokenizer()).eval()


def ids(*rows):
    return torch.tensor(rows, dtype=torch.long)


@pytest.mark.parametrize("base", ["gpt2", "mistral"])
def test_encoder_is_bidirectional_and_decoder_causal(base):
    vae = make_vae(base)
    lora.mark_only_lora_trainable(vae.base)
    for p in lora.lora_parameters(vae.base):  # non-zero adapters, so the adapter path is exercised too
        torch.nn.init.normal_(p, std=0.05)
    a, b = ids([5, 6, 7, 8, 9]), ids([5, 6, 7, 8, 10])  # differ in the last token only
    with torch.no_grad():
        ha, hb = vae.encoder_hidden(a)[0], vae.encoder_hidden(b)[0]
        assert not torch.allclose(ha[:, 0], hb[:, 0])  # the first position sees the last one
        assert not torch.allclose(vae.encode(a)[0], vae.encode(b)[0])
        z = torch.randn(1, 16)  # target position t is predicted from z and the targets before t only:
        la, lb = vae(z, ids([5, 6, 1, 8, 9])), vae(z, a)  # changing target 2 changes the predictions of 3 on
        assert torch.allclose(la[:, :3], lb[:, :3], atol=1e-6) and not torch.allclose(la[:, 3:], lb[:, 3:])


@pytest.mark.parametrize("base", ["gpt2", "mistral"])
def test_the_encoder_can_read_with_its_first_layers_only(base):
    """encoder_layers = 1 of the 2: the encoder's states are the first layer's output (adapter on), put
    through the final norm; every layer is back after it, in its place, even after an error; and the
    decoder, which runs all of them, is the same as a VAE's whose encoder has every layer."""
    import offload
    full, cut = make_vae(base), make_vae(base, encoder_layers=1)
    for vae in (full, cut):  # the same weights (make_vae seeds), with non-zero adapters
        torch.manual_seed(1)
        for p in lora.lora_parameters(vae.base):
            torch.nn.init.normal_(p, std=0.05)
    a, mask = ids([5, 6, 7, 8, 9]), torch.ones(1, 5, dtype=torch.bool)
    layers = offload.decoder_layers(cut.base)
    before = list(layers)
    with torch.no_grad(), lora.use_adapter(full.base, "encoder"):
        states = full.base.base_model(input_ids=a, attention_mask=bidirectional_mask(mask, torch.float32),
                                      output_hidden_states=True).hidden_states  # embeddings, then each layer's output
        norm = full.base.base_model.ln_f if base == "gpt2" else full.base.base_model.norm
        assert torch.allclose(cut.encoder_hidden(a)[0], norm(states[1]), atol=1e-6)
        assert not torch.allclose(full.encoder_hidden(a)[0], norm(states[1]), atol=1e-3)
        assert list(layers) == before
        z = torch.randn(1, 16)
        assert torch.equal(cut(z, a), full(z, a))
    with pytest.raises(RuntimeError, match="inside"):
        with lm.first_layers_only(cut.base, 1):
            assert list(layers) == before[:1]
            raise RuntimeError("inside")
    assert list(layers) == before


@pytest.mark.parametrize("base", ["gpt2", "mistral"])
def test_padding_does_not_change_mu(base):
    vae = make_vae(base, posterior="diagonal")
    with torch.no_grad():
        mu, logvar = vae.encode(ids([3, 4, 5]))
        padded = ids([3, 4, 5, 256, 256], [7, 7, 7, 7, 7])
        mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]], dtype=torch.bool)
        mu_p, logvar_p = vae.encode(padded, mask)
    assert torch.allclose(mu, mu_p[:1], atol=1e-5) and torch.allclose(logvar, logvar_p[:1], atol=1e-5)


def test_pooling_with_several_queries_by_hand():
    """Q queries: each is a softmax over the real positions of its own scores; the Q pooled states
    are concatenated, query-major, and padding changes nothing. Q = 1 is BigVAE's pooling."""
    from vae import VAEComponent
    torch.manual_seed(0)
    head = VAEComponent(4, VAEConfig(latent_size=6, pool_queries=3))
    hidden, mask = torch.randn(2, 5, 4), torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]], dtype=torch.bool)
    pooled = head.pool(hidden, mask)
    assert pooled.shape == (2, 3 * 4)
    for b in range(2):
        n = int(mask[b].sum())
        for q in range(3):
            scores = hidden[b, :n] @ head.f.weight[q] + head.f.bias[q]  # (n,)
            expected = (scores.softmax(0)[:, None] * hidden[b, :n]).sum(0)  # (C,)
            assert torch.allclose(pooled[b, 4 * q:4 * q + 4], expected, atol=1e-6)
    # w_d starts as the mean of w_e's transposed blocks: for Q = 1 exactly BigVAE's transpose
    assert torch.allclose(head.w_d.weight, head.w_e.weight.T.view(3, 4, 6).mean(0))
    one = VAEComponent(4, VAEConfig(latent_size=6))
    assert torch.equal(one.w_d.weight, one.w_e.weight.T)


def test_word_dropout_blanks_teacher_forced_tokens_in_training_only():
    """Blanked inputs are zero vectors (the soft token stays); at p = 1 the decoder sees none of the
    target, so two targets give the same logits; in eval mode nothing is blanked."""
    vae = make_vae("mistral", word_dropout=1.0, ae_iters=10**6)  # z = mu, no noise; Mistral has no dropout
    z, a, b = torch.randn(2, 16), ids([1, 2, 3, 4], [5, 6, 7, 8]), ids([9, 9, 9, 9], [0, 1, 0, 1])
    none = torch.zeros(2, 3, dtype=torch.bool)
    with torch.no_grad():
        embeds = vae.decoder_inputs(z, None, a[:, :-1], none)
        assert embeds[:, 1:].abs().sum() == 0 and embeds[:, 0].abs().sum() > 0
        assert torch.allclose(vae(z, a, keep=none), vae(z, b, keep=none))
        batch = {"input_ids": a, "target_ids": a}
        plain = make_vae("mistral", ae_iters=10**6)  # the same weights, no word dropout
        assert torch.allclose(vae.eval().compute_loss(batch, 0)["loss"], plain.compute_loss(batch, 0)["loss"])
        mu, _ = vae.encode(a)
        blanked = F.cross_entropy(vae(mu, a, keep=none).flatten(0, 1), a.flatten())
        assert torch.allclose(vae.train().compute_loss(batch, 0)["loss"], blanked, atol=1e-6)


def test_the_word_dropout_mask_is_drawn_before_z_noise():
    """A run is a function of its seed, in the order every run has drawn: the word-dropout mask, then z's noise."""
    vae, a = make_vae("mistral", word_dropout=0.5).train(), ids([1, 2, 3, 4], [5, 6, 7, 8])  # full noise at step 10^6
    with torch.no_grad():
        torch.manual_seed(3)
        rec = vae.compute_loss({"input_ids": a, "target_ids": a}, 10**6)["rec"]
        mu, logvar = vae.encode(a)
        torch.manual_seed(3)
        keep = torch.rand(2, 3) >= 0.5
        z = vae.sample(mu, logvar, noise_scale(10**6, vae.cfg))
        assert noise_scale(10**6, vae.cfg) == 1.0 and not keep.all()
        assert torch.allclose(rec, F.cross_entropy(vae(z, a, keep=keep).flatten(0, 1), a.flatten()), atol=1e-6)


def test_own_tokens_feed_the_decoder_its_greedy_guesses_in_training_only():
    """Scheduled sampling at share 1: the training loss is the cross-entropy of the targets after the
    decoder's own teacher-forced greedy guesses as inputs; in eval mode it is the plain loss."""
    vae = make_vae("mistral", own_tokens=1.0, ae_iters=10**6)  # z = mu, no noise; Mistral has no dropout
    lora.mark_only_lora_trainable(vae.base)
    for p in lora.lora_parameters(vae.base):  # a decoder whose guesses are not the targets
        torch.nn.init.normal_(p, std=0.2)
    target = ids([1, 2, 3, 4, 5, 6], [7, 8, 9, 10, 11, 12])
    batch = {"input_ids": target, "target_ids": target}
    with torch.no_grad():
        mu, _ = vae.encode(target)
        guess = vae(mu, target).argmax(-1)  # (B, T)
        assert not torch.equal(guess[:, :-1], target[:, :-1])  # else the test could not tell them apart
        own = F.cross_entropy(vae(mu, guess).flatten(0, 1), target.flatten())
        plain = F.cross_entropy(vae(mu, target).flatten(0, 1), target.flatten())
        assert torch.allclose(vae.eval().compute_loss(batch, 0)["loss"], plain, atol=1e-6)
        assert torch.allclose(vae.train().compute_loss(batch, 0)["loss"], own, atol=1e-6)
        assert not torch.allclose(own, plain, atol=1e-4)


def test_kl_matches_closed_form():
    mu, logvar = torch.randn(4, 6), torch.randn(4, 6)
    q = torch.distributions.Normal(mu, (0.5 * logvar).exp())
    p = torch.distributions.Normal(torch.zeros_like(mu), torch.ones_like(mu))
    assert torch.allclose(kl_per_dim(mu, logvar), torch.distributions.kl_divergence(q, p), atol=1e-5)
    assert torch.allclose(kl_per_dim(mu, None), torch.distributions.kl_divergence(
        torch.distributions.Normal(mu, torch.ones_like(mu)), p), atol=1e-6)  # BigVAE: N(mu, I)


def test_schedules_at_known_steps():
    cfg = VAEConfig(ae_iters=100, noise_ramp_iters=50, kl_max=0.01, kl_iters=200)
    assert noise_scale(99, cfg) == 0 and kl_weight(99, cfg) == 0  # autoencoder phase
    assert noise_scale(124, cfg) == pytest.approx(0.5) and noise_scale(149, cfg) == 1 == noise_scale(10**6, cfg)
    assert kl_weight(100, cfg) == 0 and kl_weight(200, cfg) == pytest.approx(0.005)  # sin^2(pi/4) = 1/2
    assert kl_weight(300, cfg) == pytest.approx(0.01) and kl_weight(10**6, cfg) == pytest.approx(0.01)
    cyc = VAEConfig(kl_schedule="cyclical", kl_max=1.0, kl_iters=8)  # per cycle: 0, ramp, hold
    assert [kl_weight(s, cyc) for s in (0, 1, 2, 3, 4, 7, 8, 11)] == pytest.approx([0, 0, 0, 0.5, 1, 1, 0, 0.5])
    assert kl_weight(7, VAEConfig(kl_schedule="constant", kl_max=0.3)) == 0.3
    assert noise_scale(0, VAEConfig()) == 1  # no autoencoder phase: BigVAE's full noise from the start
    w = token_weights(20, True, "cpu")
    assert w[:8].eq(0.05).all() and w[-8:].eq(0.15).all() and w[8:12].eq(1).all()


def test_loss_terms_and_free_bits():
    vae = make_vae(ae_iters=0, kl_schedule="constant", kl_max=0.5)
    span = torch.randint(0, 256, (3, 10))
    batch = {"input_ids": span, "target_ids": span, "prefix_ids": torch.randint(0, 256, (3, 4))}
    torch.manual_seed(1)
    terms = vae.compute_loss(batch, step=0)
    assert set(terms) == {"loss", "rec", "kl", "beta", "noise"}
    assert terms["loss"].item() == pytest.approx(terms["rec"].item() + 0.5 * terms["kl"].item() / 10, rel=1e-5)
    vae.cfg.free_bits = 1e3  # every dimension below the floor: the KL term is the floor itself
    torch.manual_seed(1)
    floored = vae.compute_loss(batch, step=0)
    assert floored["loss"].item() == pytest.approx(terms["rec"].item() + 0.5 * 1e3 * 16 / 10, rel=1e-4)
    # the floor is per dimension, on the batch's mean: mu = 3 in dimension 0 of one span and in dimension 1 of
    # the other gives KLs 4.5 / 2 = 2.25 in those two and 0 in the 14 others, floored to 1 each: 18.5 nats
    # (a floor on the total, 16, would give 16; a floor per span and dimension, 19.5)
    vae.cfg.free_bits = 1.0
    mu = torch.zeros(2, 16)
    mu[0, 0] = mu[1, 1] = 3.0
    vae.encode = lambda ids, mask=None: (mu, None)
    two = {k: v[:2] for k, v in batch.items()}
    floored = vae.compute_loss(two, step=0)
    assert (floored["loss"] - floored["rec"]).item() == pytest.approx(0.5 * 18.5 / 10, rel=1e-5)


def test_frozen_base_gets_no_gradients():
    vae = make_vae()
    lora.mark_only_lora_trainable(vae.base)
    span = torch.randint(0, 256, (2, 8))
    vae.compute_loss({"input_ids": span, "target_ids": span}, step=0)["loss"].backward()
    base = [p for n, p in vae.base.named_parameters() if not lora.is_lora_key(n)]
    assert all(p.grad is None for p in base)
    assert all(p.grad is not None for p in lora.lora_parameters(vae.base, "encoder"))
    assert all(p.grad is not None for p in vae.head.parameters())


@pytest.mark.parametrize("soft_tokens, z_memory, lead_token", [(1, 1, False), (3, 1, False), (3, 0, False),
                                                              (1, 1, True), (3, 0, True)])
def test_generation_builds_no_graph_and_matches_teacher_forcing(soft_tokens, z_memory, lead_token):
    vae = make_vae(prefix_slots=5, soft_tokens=soft_tokens, z_memory=z_memory, lead_token=lead_token)
    for p in lora.lora_parameters(vae.base):
        torch.nn.init.normal_(p, std=0.05)
    z, prefix = torch.randn(2, 16), torch.randint(0, 256, (2, 3))
    out = vae.generate(z, 6, prefix)  # greedy, KV cache with z's memory
    assert out.shape == (2, 6) and not out.requires_grad
    with torch.no_grad():
        logits = vae(z, out, prefix)  # the cached greedy path picks the teacher-forced argmax
    assert_greedy(logits, out)


def test_reconstruction_of_a_stream_window_decodes_past_end_of_text():
    torch.manual_seed(0)
    vae = make_vae()
    with torch.no_grad():
        vae.base.transformer.wpe.weight.normal_(std=1.0)  # positions that differ: greedy does not repeat one token
    z = torch.randn(2, 16)
    free = vae.generate(z, 8, should_stop_at_eos=False)
    with torch.no_grad():
        assert_greedy(vae(z, free), free)  # every token is the teacher-forced argmax
    vae.eos_id = int(free[0, 2])  # as if row 0's third token ended a document
    first = int((free[0] == vae.eos_id).nonzero()[0])
    assert (free[0, first + 1:] != vae.eos_id).any()  # the row goes on to other tokens after it
    stopped = vae.generate(z, 8)
    assert torch.equal(stopped[0, :first + 1], free[0, :first + 1]) and (stopped[0, first + 1:] == vae.eos_id).all()
    assert torch.equal(vae.generate(z, 8, should_stop_at_eos=False), free)


def test_soft_tokens_are_k_blocks_of_w_d():
    """K soft tokens: w_d(z) cut into K embeddings, all before the text (the text's logits do not move)."""
    vae = make_vae(soft_tokens=3, pool_queries=3, z_memory=0)
    z = torch.randn(2, 16)
    tokens = vae.head.soft_tokens(z)
    assert tokens.shape == (2, 3, lm.hidden_size(vae.base))
    assert torch.equal(tokens.flatten(1), vae.head.w_d(z))
    assert torch.equal(vae.head.w_d.weight, vae.head.w_e.weight.T)  # Q = K: block k reads what query k wrote
    inputs = vae.decoder_inputs(z, ids=ids([5, 6], [7, 8]))
    assert inputs.shape[1] == 3 + 2 and torch.equal(inputs[:, :3], tokens)


def test_lead_token_is_end_of_text_before_the_soft_tokens():
    """lead_token: the decoder's first input is the end-of-text embedding, the same for every z; then
    the K soft tokens and the text, as without it."""
    vae, plain = make_vae(soft_tokens=2, lead_token=True), make_vae(soft_tokens=2)
    z = torch.randn(2, 16)
    inputs, without = vae.decoder_inputs(z, ids=ids([5, 6], [7, 8])), plain.decoder_inputs(z, ids=ids([5, 6], [7, 8]))
    eos = vae.base.get_input_embeddings().weight[vae.eos_id]
    assert inputs.shape[1] == 1 + 2 + 2 and torch.equal(inputs[:, 0], eos.expand(2, -1))
    assert torch.equal(inputs[:, 1:], without)


@pytest.mark.parametrize("soft_tokens, z_memory, lead_token", [(1, 1, False), (3, 1, True), (3, 0, True)])
def test_text_start_is_the_first_text_position_and_a_text_fits_up_to_the_last(soft_tokens, z_memory, lead_token):
    """text_start: after z's memory, the prefix's slots, the lead token and the K soft tokens, with or
    without a prefix; a text of num_positions - text_start + 1 tokens fits tiny GPT-2's 64 positions,
    one more indexes past its position table."""
    vae = make_vae(prefix_slots=5, soft_tokens=soft_tokens, z_memory=z_memory, lead_token=lead_token)
    z, prefix = torch.randn(1, 16), ids([1, 2, 3])
    start = vae.text_start(None)
    assert start == vae.first_position(None) + vae.decoder_inputs(z).shape[1] == vae.text_start(prefix)
    T = lm.num_positions(vae.base) - start + 1
    with torch.no_grad():
        for p in (None, prefix):
            assert vae(z, torch.randint(0, 256, (1, T)), p).shape == (1, T, 257)
            with pytest.raises(IndexError):
                vae(z, torch.randint(0, 256, (1, T + 1)), p)


@pytest.mark.parametrize("num_refine_steps", [0, 3])
def test_reconstruct_ids_chains_spans(num_refine_steps, monkeypatch):
    """A text longer than a span: span by span, each decoded after the decoded tokens before it as its
    prefix, the last span overlapping the one before (BigVAE's chaining); refined, each span's z is
    refined toward it after that same prefix (the calls to refine are recorded: on this untrained model
    a few steps may change no greedy token; 0 steps give mu)."""
    torch.manual_seed(0)
    vae = make_vae(prefix_slots=4)
    with torch.no_grad():
        vae.base.transformer.wpe.weight.normal_(std=1.0)
    text = list(range(40, 50))  # 10 tokens, spans of 4: starts 0, 4, 6

    def decode(start, prefix):
        span = torch.tensor([text[start:start + 4]])
        mu = vae.encode(span)[0]
        prefix = torch.tensor([prefix]) if prefix else None
        z = vae.refine(mu, span, prefix, num_refine_steps)
        return vae.generate(z, 4, prefix, should_stop_at_eos=False)[0].tolist()

    first = decode(0, [])
    second = first + decode(4, first)
    expected = second[:6] + decode(6, second[2:6])
    assert vae.reconstruct_ids(text, 4, should_stop_at_eos=False, num_refine_steps=num_refine_steps) == expected
    assert len(expected) == 10
    calls, refine = [], vae.refine
    monkeypatch.setattr(vae, "refine", lambda mu, span, prefix, steps: calls.append(
        (span.tolist(), None if prefix is None else prefix.tolist(), steps)) or refine(mu, span, prefix, steps))
    vae.reconstruct_ids(text, 4, should_stop_at_eos=False, num_refine_steps=num_refine_steps)
    assert calls == [([text[0:4]], None, num_refine_steps), ([text[4:8]], [first], num_refine_steps),
                     ([text[6:10]], [second[2:6]], num_refine_steps)]
    monkeypatch.undo()
    short = torch.tensor([text[:3]])
    short = vae.generate(vae.refine(vae.encode(short)[0], short, None, num_refine_steps), 3)[0].tolist()
    assert vae.reconstruct_ids(text[:3], 4, num_refine_steps=num_refine_steps) == short  # shorter than a span: one span
    assert vae.reconstruct([bytes(text[:3]).decode()], num_refine_steps=num_refine_steps) == vae.detokenize([short])


@pytest.mark.parametrize("base, overrides", [("gpt2", {}), ("mistral", {}), ("gpt2", dict(soft_tokens=2, lead_token=True)),
                                             ("gpt2", dict(z_memory=0)), ("gpt2", dict(posterior="diagonal"))])
def test_refine_moves_only_z_and_lowers_each_spans_loss(base, overrides):
    """VAE.refine: Adam on z alone, after the prefix: no parameter changes or gets a .grad, every span's
    loss falls below mu's, a span refined alone gets the z it gets in the batch (float64: the rounding
    between the two batch shapes stays far below the tolerance), 0 steps give mu."""
    vae = make_vae(base, **overrides).double()
    torch.manual_seed(1)
    span, prefix = torch.randint(0, 256, (3, 8)), torch.randint(0, 256, (3, 4))
    with torch.no_grad():
        mu, _ = vae.encode(span)
    before = {k: v.clone() for k, v in vae.state_dict().items()}

    @torch.no_grad()
    def losses(z):  # (B,): each span's summed cross-entropy after its prefix
        return F.cross_entropy(vae(z, span, prefix).transpose(1, 2), span, reduction="none").sum(1)

    z = vae.refine(mu, span, prefix, num_steps=20, lr=0.3)
    assert all(p.grad is None for p in vae.parameters()) and not z.requires_grad
    assert all(torch.equal(v, vae.state_dict()[k]) for k, v in before.items())
    assert (losses(z) < losses(mu) - 0.02).all(), (losses(mu), losses(z))
    assert (losses(vae.refine(mu, span, prefix)) < losses(mu)).all()  # the defaults' steps lower it too
    assert torch.allclose(vae.refine(mu[1:2], span[1:2], prefix[1:2], num_steps=20, lr=0.3), z[1:2], atol=1e-9)
    assert torch.equal(vae.refine(mu, span, prefix, num_steps=0), mu)


@pytest.mark.parametrize("base", ["gpt2", "mistral"])
def test_target_positions_do_not_depend_on_the_prefix(base):
    vae = make_vae(base, prefix_slots=4, z_memory=False)
    z, span = torch.randn(1, 16), ids([9, 8, 7])
    with torch.no_grad():
        assert vae.first_position(None) == 4 and vae.first_position(ids([1, 2, 3, 4])) == 0
        alone = vae(z, span)  # no prefix: the soft token sits at 4, where a 4-token prefix would end
        embeds = vae.decoder_inputs(z, None, span[:, :-1])
        with lora.use_adapter(vae.base, "decoder"):
            manual = vae.base(inputs_embeds=embeds, position_ids=torch.arange(4, 7)[None], use_cache=False).logits
        assert torch.allclose(alone, manual, atol=1e-5)
    with pytest.raises(ValueError, match="prefix_slots"):
        vae(z, span, ids([1, 2, 3, 4, 5]))
    out = vae.generate(z, 5, ids([1, 2]))  # cached generation uses the same positions as teacher forcing
    with torch.no_grad():
        assert_greedy(vae(z, out, ids([1, 2])), out)


def test_memory_cache_is_read_only():
    vae = make_vae()
    z, span = torch.randn(2, 16), torch.randint(0, 256, (2, 5))
    cache = vae.memory(z)
    assert isinstance(cache, lm.read_only_cache_class()) and cache.get_seq_length() == 1
    with torch.no_grad(), lora.use_adapter(vae.base, "decoder"):
        first = vae.base(span, use_cache=True, **lm.cache_kwarg(vae.base, cache)).logits
        again = vae.base(span, use_cache=True, **lm.cache_kwarg(vae.base, cache)).logits
    assert cache.get_seq_length() == 1 and torch.equal(first, again)  # a re-run sees the same memory


def test_gumbel_max_samples_follow_the_softmax_at_its_temperature():
    logits = torch.tensor([2.0, 1.0, 0.0, -1.0]).expand(20000, -1)
    torch.manual_seed(0)
    for T in (0.5, 2.0):
        observed = torch.bincount(gumbel_max(logits, T), minlength=4).float() / len(logits)
        assert torch.allclose(observed, F.softmax(logits[0] / T, -1), atol=0.02)  # ~6 standard errors
        assert (observed - F.softmax(logits[0], -1)).abs().max() > 0.15  # T matters
    assert torch.equal(gumbel_max(logits[:3], 0.0), torch.zeros(3, dtype=torch.long))  # T = 0: greedy
    vae = make_vae()  # generate draws its tokens with it: the same noise gives the same first tokens
    z = torch.randn(64, 16)
    with torch.no_grad():
        first_logits = vae(z, ids(*[[0]] * 64))[:, 0]  # (64, V): the first token's, teacher-forced
    torch.manual_seed(1)
    expected = gumbel_max(first_logits, 2.0)
    torch.manual_seed(1)
    assert torch.equal(vae.generate(z, 1, temperature=2.0)[:, 0], expected)


def test_slerp_and_interpolate(monkeypatch):
    a, b = torch.randn(3, 8), torch.randn(3, 8)
    b = b / b.norm(dim=-1, keepdim=True) * a.norm(dim=-1, keepdim=True)
    assert torch.allclose(slerp(a, b, torch.zeros(3, 1)), a, atol=1e-5)
    assert torch.allclose(slerp(a, b, torch.ones(3, 1)), b, atol=1e-5)
    mid = slerp(a, b, torch.full((3, 1), 0.5))
    assert torch.allclose(mid.norm(dim=-1), a.norm(dim=-1), atol=1e-4)  # stays on the sphere
    e = torch.zeros(1, 8)
    e[0, 0] = 1.0  # with 2 * e: norms 1 and 2, cosine exactly 1, so slerp's formula would divide by sin 0
    mixed = slerp(torch.cat([a[:1], e]), torch.cat([b[:1], 2 * e]), torch.full((2, 1), 0.5))
    assert torch.allclose(mixed[0], mid[0], atol=1e-6) and torch.equal(mixed[1], 1.5 * e[0])  # that row: lerp
    vae = make_vae()
    decoded, generate = [], VAE.generate
    monkeypatch.setattr(VAE, "generate", lambda self, z, *a, **k: decoded.append((z, k, generate(self, z, *a, **k)))
                        or decoded[-1][-1])
    path = vae.interpolate("hello there", "bye now", steps=4, mode="lerp")
    ids, mask = vae.tokenize(["hello there", "bye now"])
    ((z, kwargs, out),) = decoded
    mu = vae.encode(ids, mask)[0]
    assert len(path) == 4 and path == vae.detokenize(out) and z.shape == (4, 16) and kwargs["temperature"] == 0.0
    assert torch.equal(z[0], mu[0]) and torch.equal(z[-1], mu[1])  # the path ends at the two texts' means
    vae.interpolate("hello there", "bye now", steps=4, temperature=0.7)
    assert decoded[-1][1]["temperature"] == 0.7  # sampled, as sample.py's --temperature asks
    with pytest.raises(ValueError, match="text 2 has no tokens"):  # no position to pool: mu would be NaN
        vae.reconstruct(["hello", ""])
    vae.head.latent_rms.fill_(1.28)  # prior samples are z ~ N(0, rms^2 I), decoded
    torch.manual_seed(3)
    texts = vae.sample_prior(3, 5)
    torch.manual_seed(3)
    assert texts == vae.detokenize(vae.generate(torch.randn(3, vae.cfg.latent_size) * 1.28, 5))


@pytest.mark.parametrize("z_memory, pool_queries, soft_tokens", [(1, 1, 1), (0, 1, 1), (4, 4, 1), (0, 4, 4)])
def test_overfits_one_batch(z_memory, pool_queries, soft_tokens):
    """The whole model learns to reconstruct 4 spans exactly, teacher-forced and greedy."""
    vae = make_vae(z_memory=z_memory, pool_queries=pool_queries, soft_tokens=soft_tokens, ae_iters=10**6)  # z = mu
    vae.train()
    torch.manual_seed(0)
    span = torch.randint(0, 256, (4, 12))
    batch = {"input_ids": span, "target_ids": span}
    opt = torch.optim.AdamW(vae.parameters(), lr=3e-3)
    losses = []
    for step in range(150):
        loss = vae.compute_loss(batch, step)["loss"]
        losses.append(loss.item())
        opt.zero_grad()
        loss.backward()
        opt.step()
    vae.eval()
    with torch.no_grad():
        mu, _ = vae.encode(span)
        accuracy = (vae(mu, span).argmax(-1) == span).float().mean().item()
    # exact from step 30 to 60 over 4 seeds each; dropout's noisy loss: the best of the last 10 steps
    assert accuracy == 1.0 and min(losses[-10:]) < 0.1, losses[-10:]
    assert torch.equal(vae.generate(mu, 12), span)
    assert not math.isnan(loss.item())


@pytest.mark.parametrize("base", ["gpt2", "mistral"])
def test_decoder_init_lm_starts_as_the_lm_itself(base):
    """decoder_init="lm": whatever z is, the fresh decoder predicts as the base LM after end of text
    (its adapters start at zero, the soft token is the end-of-text embedding) when z has no keys/values
    and one soft token comes first; BigVAE's start does not; and z's path still gets a gradient. With
    z's memory, more soft tokens or a lead token, z still adds nothing (the same output for any z)."""
    target, z = ids([5, 9, 2, 7, 1, 3], [4, 4, 8, 0, 6, 2]), torch.randn(2, 16)
    vae = make_vae(base, z_memory=0, decoder_init="lm")
    with torch.no_grad():
        assert torch.allclose(vae(z, target), vae.base_logits(target), atol=1e-5)
        assert not torch.allclose(make_vae(base, z_memory=0)(z, target), vae.base_logits(target), atol=1e-3)
        for layout in [dict(z_memory=1), dict(z_memory=1, soft_tokens=4, lead_token=True)]:
            other = make_vae(base, decoder_init="lm", **layout)
            assert torch.equal(other(z, target), other(torch.randn(2, 16), target))
            assert not torch.equal(make_vae(base, **layout)(z, target), make_vae(base, **layout)(-z, target))
    kv = make_vae(base, decoder_init="lm").memory(z)
    assert all(layer.keys.abs().max() == 0 and layer.values.abs().max() == 0 for layer in kv.layers)
    vae = make_vae(base, decoder_init="lm").train()
    batch = {"input_ids": target, "target_ids": target}
    vae.compute_loss(batch, 10**6)["loss"].backward()
    assert vae.head.w_d.weight.grad.abs().sum() > 0 and vae.head.w_memory.weight.grad.abs().sum() > 0
