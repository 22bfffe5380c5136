"""Tests for worldmodel.py and obs_tokenizer.py: tiny models, CPU, a few seconds each."""

import numpy as np
import pytest
import torch

from obs_tokenizer import (DiscreteTokenizer, FrameTokenizer, FrameTokenizerConfig, TokenObservations,
                           VectorTokenizer, VectorTokenizerConfig)
from worldmodel import (Embedder, Head, Slicer, Transformer, TransformerConfig, WorldModel,
                        WorldModelConfig, WorldModelEnv, compute_labels, interleave)


def tiny_world_model(K=3, vocab=7, actions=2, max_steps=4, dropout=0.0, seed=0):
    torch.manual_seed(seed)
    backbone = Transformer(TransformerConfig(width=32, num_layers=2, num_heads=2, dropout=dropout))
    config = WorldModelConfig(tokens_per_obs=K, obs_vocab_size=vocab, num_actions=actions, max_steps=max_steps)
    return WorldModel(config, backbone).eval()


def random_segment(wm, B=2, L=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    c = wm.config
    obs = torch.randint(c.obs_vocab_size, (B, L, c.tokens_per_obs), generator=g)
    actions = torch.randint(c.num_actions, (B, L), generator=g)
    return obs, actions


def test_world_model_block_masks_partition_the_block():
    wm = tiny_world_model(K=3)
    masks = torch.stack([s.block_mask for s in wm.embedder.slicers]).long()
    assert masks.tolist() == [[1, 1, 1, 0], [0, 0, 0, 1]]
    assert masks.sum(0).tolist() == [1, 1, 1, 1]
    with pytest.raises(ValueError, match="partition"):
        Embedder([torch.tensor([1, 1, 0]), torch.tensor([0, 1, 1])],
                 [torch.nn.Embedding(5, 4), torch.nn.Embedding(5, 4)])


def test_world_model_starts_from_iris_initialisation():
    """normal(0, 0.02) weights, zero biases, LayerNorms at 1 and 0, in every module it makes."""
    wm = tiny_world_model(vocab=4096)
    assert abs(wm.embedder.tables[0].weight.std().item() - 0.02) < 0.001  # 4096 x 32 draws
    for table in (wm.embedder.tables[1], wm.pos_emb):  # the action and position tables too, not torch's N(0, 1)
        assert 0.005 < table.weight.std().item() < 0.05
    linears = [m for m in wm.modules() if isinstance(m, torch.nn.Linear)]
    assert len(linears) == 2 * 4 + 3 * 2  # 4 per block, 2 per head
    for m in linears:
        assert torch.equal(m.bias, torch.zeros_like(m.bias)) and m.weight.std() < 0.03
    for m in [m for m in wm.modules() if isinstance(m, torch.nn.LayerNorm)]:
        assert torch.equal(m.weight, torch.ones_like(m.weight)) and torch.equal(m.bias, torch.zeros_like(m.bias))
    # given tables (an LM's rows) keep their values; the heads are still initialised
    rows = torch.nn.Embedding(7, 32), torch.nn.Embedding(2, 32)
    before = [t.weight.clone() for t in rows]
    given = WorldModel(wm.config, Transformer(TransformerConfig(width=32, num_layers=1, num_heads=2)), rows)
    assert all(torch.equal(t.weight, b) for t, b in zip(given.embedder.tables, before))
    assert before[0].std() > 0.5 and given.heads["obs"].mlp[0].weight.std() < 0.03  # torch's N(0, 1), kept


def test_slicer_positions_with_and_without_cache_offset():
    slicer = Slicer(torch.tensor([1, 1, 0, 1]))  # block of 4, position 2 excluded
    assert slicer.positions(8).tolist() == [0, 1, 3, 4, 5, 7]
    # a window of 3 tokens after 6 cached ones covers absolute positions 6, 7, 8
    assert slicer.positions(3, prev_tokens=6).tolist() == [1, 2]  # absolute 7, 8
    assert slicer.positions(1, prev_tokens=6).tolist() == []  # absolute 6 is excluded


def test_embedder_uses_the_table_each_mask_picks():
    obs_table, act_table = torch.nn.Embedding(5, 4), torch.nn.Embedding(2, 4)
    embedder = Embedder([torch.tensor([1, 1, 0]), torch.tensor([0, 0, 1])], [obs_table, act_table])
    tokens = torch.tensor([[3, 4, 1, 0, 2, 0]])
    x = embedder(tokens)
    assert torch.equal(x[0, 2], act_table.weight[1]) and torch.equal(x[0, 5], act_table.weight[0])
    assert torch.equal(x[0, 4], obs_table.weight[2])
    # with 2 tokens cached, the window's first token is absolute position 2: an action
    assert torch.equal(embedder(torch.tensor([[1, 3]]), prev_tokens=2)[0, 0], act_table.weight[1])


def test_labels_shift_as_iris():
    obs = torch.tensor([[[1, 2], [3, 4], [5, 6]]])  # (B=1, L=3, K=2)
    rewards = torch.tensor([[0.5, -2.0, 0.0]])
    ends = torch.tensor([[0, 1, 0]])
    mask = torch.tensor([[True, True, False]])  # the third step is padding
    labels = compute_labels(obs, rewards, ends, mask)
    assert labels["obs"].tolist() == [[2, 3, 4, -100, -100]]
    assert labels["reward"].tolist() == [[2, 0, -100]]
    assert labels["end"].tolist() == [[0, 1, -100]]
    assert interleave(obs, torch.tensor([[7, 8, 9]])).tolist() == [[1, 2, 7, 3, 4, 8, 5, 6, 9]]


def test_logits_line_up_with_labels():
    wm = tiny_world_model(K=3)
    obs, actions = random_segment(wm, B=2, L=3)
    batch = {"obs_tokens": obs, "actions": actions, "rewards": torch.zeros(2, 3),
             "ends": torch.zeros(2, 3), "mask_padding": torch.ones(2, 3, dtype=torch.bool)}
    pairs = wm.logits_and_labels(batch)
    assert pairs["obs"][0].shape == (2 * (3 * 3 - 1), 7) and pairs["obs"][1].shape == (2 * 8,)
    assert pairs["reward"][0].shape == (6, 3) and pairs["end"][0].shape == (6, 2)


def test_heads_read_only_their_positions():
    head = Head(torch.tensor([0, 0, 1]), width=8, num_outputs=3)
    hidden = torch.randn(2, 6, 8)
    out = head(hidden)
    assert out.shape == (2, 2, 3)
    changed = hidden.clone()
    changed[:, [0, 1, 3, 4]] = torch.randn(2, 4, 8)  # everything but positions 2 and 5
    assert torch.equal(head(changed), out)
    changed[:, 5] += 1
    assert not torch.allclose(head(changed)[:, 1], out[:, 1])


def test_transformer_is_causal():
    wm = tiny_world_model()
    obs, actions = random_segment(wm, B=1, L=4)
    tokens = interleave(obs, actions)  # (1, 16)
    out = wm(tokens)
    changed = tokens.clone()
    changed[0, 9] = (changed[0, 9] + 1) % 7  # step 3's second obs token (blocks of 4: obs, obs, obs, action)
    out2 = wm(changed)
    # the obs head reads positions 0,1,3 of each block; positions < 9 come first
    n_obs_before = len(wm.heads["obs"].slicer.positions(9))
    assert torch.allclose(out["obs"][:, :n_obs_before], out2["obs"][:, :n_obs_before], atol=1e-6)
    assert not torch.allclose(out["obs"][:, n_obs_before:], out2["obs"][:, n_obs_before:])
    assert torch.equal(out["reward"][:, :2], out2["reward"][:, :2])  # read at 3 and 7, before 9
    assert not torch.allclose(out["reward"][:, 2], out2["reward"][:, 2])


def test_kv_cached_token_by_token_equals_full_sequence():
    wm = tiny_world_model()
    obs, actions = random_segment(wm, B=2, L=4)
    tokens = interleave(obs, actions)  # (2, 16) = max_tokens
    full = wm(tokens)
    cache = wm.backbone.new_cache(2, wm.config.max_tokens)
    pieces = {name: [] for name in full}
    chunks = [tokens[:, :5], *tokens[:, 5:].split(1, dim=1)]  # a prompt, then one token at a time
    for chunk in chunks:
        for name, logits in wm(chunk, cache).items():
            pieces[name].append(logits)
    assert cache.length == 16
    for name in full:
        assert torch.allclose(torch.cat(pieces[name], dim=1), full[name], atol=1e-5), name
    with pytest.raises(ValueError, match="max_tokens"):
        wm(tokens[:, :1], cache)


def test_vector_tokenizer_bins_and_round_trip():
    torch.manual_seed(0)
    data = torch.randn(4000, 3) * torch.tensor([1.0, 10.0, 0.1])
    tok = VectorTokenizer(VectorTokenizerConfig(obs_dim=3, num_bins=16))
    tok.fit(data)
    tokens = tok.encode(data)
    assert tokens.shape == (4000, 3) and tok.vocab_size == 48
    for d in range(3):  # dimension d owns tokens d*16 .. d*16+15, each used about equally
        counts = torch.bincount(tokens[:, d] - d * 16, minlength=16)
        assert tokens[:, d].min() >= d * 16 and tokens[:, d].max() < (d + 1) * 16
        assert counts.min() > 200 and counts.max() < 300
    decoded = tok.decode(tokens)
    assert torch.equal(tok.encode(decoded), tokens)  # a bin's mean lies inside the bin
    # error well under one bin: the mean bin width is about range / 16
    assert ((decoded - data).abs().mean(0) / data.std(0)).max() < 0.1


def test_discrete_tokenizer_gives_each_state_its_token_and_back():
    tok = DiscreteTokenizer(num_states=5, start=-2)  # gym's Discrete(5, start=-2): states -2 .. 2
    obs = tok.preprocess(np.array([-2, 0, 2, 1]))
    assert torch.equal(obs, torch.eye(5)[[0, 2, 4, 3]])  # one-hot (N, 5)
    tokens = tok.encode(obs)
    assert tokens.tolist() == [[0], [2], [4], [3]] and tok.tokens_per_obs == 1 and tok.vocab_size == 5
    assert torch.equal(tok.decode(tokens), obs)  # nothing lost
    tok.fit(obs)  # nothing to fit, nothing to save
    assert tok.state_dict() == {} and torch.equal(tok.encode(obs), tokens)


def test_frame_tokenizer_shapes_and_a_dim_ball_survives_resizing():
    tok = FrameTokenizer(FrameTokenizerConfig())
    assert tok.vocab_size == 512 and tok.tokens_per_obs == 16
    raw = torch.zeros(2, 210, 160, 3, dtype=torch.uint8)
    raw[0, 100:102, 80:82] = 255  # a 2x2 ball, 10 frame pixels per 64x64 pixel
    frames = tok.preprocess(raw.numpy())
    assert frames.shape == (2, 64, 64, 3) and frames.dtype == torch.uint8
    assert frames[0].max() > 0 and frames[1].max() == 0
    tokens = tok.encode(frames)
    assert tokens.shape == (2, 16) and tokens.dtype == torch.long
    decoded = tok.decode(tokens)
    assert decoded.shape == (2, 64, 64, 3) and decoded.dtype == torch.uint8
    # mixed radix: every token is one digit tuple and back
    all_tokens = torch.arange(512)
    digits = (all_tokens.unsqueeze(-1) // tok.radix) % tok.levels  # (512, 3)
    assert torch.equal((digits * tok.radix).sum(-1), all_tokens)
    assert len({tuple(d) for d in digits.tolist()}) == 512
    # fit: the per-pixel median; a frame seen in 3 of 5 samples is the background
    sample = torch.stack([frames[0]] * 3 + [frames[1]] * 2)
    tok.fit(sample)
    assert torch.allclose(tok.background, frames[0].permute(2, 0, 1).float() / 255)


def test_frame_tokenizer_learns_to_reconstruct():
    torch.manual_seed(0)
    tok = FrameTokenizer(FrameTokenizerConfig(frame_size=16, channels=(16, 32, 32), levels=(4, 4)))
    # 8 frames with one coloured rectangle each, at different places
    frames = torch.zeros(8, 16, 16, 3, dtype=torch.uint8)
    for i in range(8):
        frames[i, 2 * (i % 4):2 * (i % 4) + 6, 8 * (i // 4):8 * (i // 4) + 8, i % 3] = 255

    tok.fit(frames)  # most pixels are black in most frames: the background is black
    assert tok.background.abs().max() == 0

    def round_trip_error():
        return ((tok.decode(tok.encode(frames)).float() - frames.float()) / 255).pow(2).mean()

    first = round_trip_error()
    opt = torch.optim.Adam(tok.parameters(), lr=3e-3)
    for _ in range(200):
        loss = tok.compute_loss({"frames": frames})
        opt.zero_grad()
        loss["loss"].backward()
        opt.step()
    # the training loss goes through the same quantiser as encode/decode (decode clamps
    # to [0, 1] and rounds to uint8, which can only lower the error or add ~1e-6)
    assert round_trip_error() <= tok.compute_loss({"frames": frames})["recon"] + 1e-5
    assert round_trip_error() < first / 20, (round_trip_error(), first)
    assert len(tok.encode(frames).unique()) >= 4


def test_world_model_overfits_a_tiny_deterministic_dataset():
    # next obs = (obs + action) mod vocab, reward = +1 when action 1, end after step 3
    wm = tiny_world_model(K=2, vocab=5, actions=2, max_steps=4).train()
    g = torch.Generator().manual_seed(0)
    B, L = 16, 4
    actions = torch.randint(2, (B, L), generator=g)
    obs = torch.zeros(B, L, 2, dtype=torch.long)
    obs[:, 0] = torch.randint(5, (B, 2), generator=g)
    for t in range(1, L):
        obs[:, t] = (obs[:, t - 1] + actions[:, t - 1, None]) % 5
    batch = {"obs_tokens": obs, "actions": actions, "rewards": actions.float(),
             "ends": (torch.arange(L) == 2).long().expand(B, L),
             "mask_padding": torch.arange(L).expand(B, L) < 3}
    opt = torch.optim.AdamW(wm.parameters(), lr=5e-3)  # exact from step 60 to 90 over 8 seeds (3e-3: 50 to 150)
    for _ in range(200):
        loss = wm.compute_loss(batch)
        opt.zero_grad()
        loss["loss"].backward()
        opt.step()
    assert set(loss) == {"loss", "obs", "reward", "end"}
    wm.eval()
    pairs = wm.logits_and_labels(batch)
    obs_logits, obs_labels = pairs["obs"]
    # the first observation is random: its second token (each row's label 0) cannot be predicted
    predictable = obs_labels.view(B, -1)[:, 1:]
    predicted = obs_logits.argmax(-1).view(B, -1)[:, 1:]
    keep = predictable != -100
    assert (predicted[keep] == predictable[keep]).float().mean() == 1.0
    for name in ("reward", "end"):
        logits, labels = pairs[name]
        keep = labels != -100
        assert (logits.argmax(-1)[keep] == labels[keep]).all(), name


def test_imagination_env_types_and_cache_matches_recompute():
    wm = tiny_world_model(K=3, vocab=7, actions=2, max_steps=4)
    start = torch.randint(7, (2, 3))
    runs = []
    for should_use_cache in (True, False):
        env = WorldModelEnv(wm, TokenObservations(), should_use_cache=should_use_cache, keep_steps=1,
                            generator=torch.Generator().manual_seed(1))
        obs, info = env.reset(start)
        assert torch.equal(obs, start) and torch.equal(info["obs_tokens"], start)
        steps, lengths = [], []
        for t in range(6):  # 3 + 6 * 4 tokens > max_tokens 16: the context is rebuilt
            before = env.context
            obs, reward, terminated, truncated, info = env.step(torch.tensor([0, 1]))
            lengths.append(env.context.shape[1])
            assert torch.equal(env.context[:, -4:], torch.cat([torch.tensor([[0], [1]]), obs], 1))  # action, obs
            kept = env.context.shape[1] - 4  # all of it, or after a cut the newest 7 (the last step and the obs)
            assert torch.equal(env.context[:, :kept], before[:, before.shape[1] - kept:])
            assert obs.shape == (2, 3) and obs.dtype == torch.long
            assert reward.dtype == torch.float32 and set(reward.tolist()) <= {-1.0, 0.0, 1.0}
            assert terminated.dtype == torch.bool and truncated.dtype == torch.bool
            assert not truncated.any() and torch.equal(info["obs_tokens"], obs)
            steps.append((obs, reward, terminated))
        # full at 15 tokens: cut to the last step (4 tokens) + the current obs (3), then + 4
        assert lengths == [7, 11, 15, 11, 15, 11]
        if should_use_cache:
            assert env.cache.length == env.context.shape[1]
        runs.append(steps)
    for (o1, r1, e1), (o2, r2, e2) in zip(*runs):
        assert torch.equal(o1, o2) and torch.equal(r1, r2) and torch.equal(e1, e2)


def test_imagined_vector_tokens_stay_in_their_own_dimension():
    """The obs head scores the whole vocabulary; with a VectorTokenizer, position d samples only
    dimension d's bins (another's token would decode to that dimension's value). Here every logit
    favours the last dimension's last bin, which only position 1 may take."""
    tokenizer = VectorTokenizer(VectorTokenizerConfig(obs_dim=2, num_bins=4))
    tokenizer.fit(torch.randn(100, 2))
    assert tokenizer.allowed_tokens().tolist() == [[True] * 4 + [False] * 4, [False] * 4 + [True] * 4]
    wm = tiny_world_model(K=2, vocab=8)
    with torch.no_grad():
        wm.heads["obs"].mlp[-1].bias.copy_(torch.tensor([0.0] * 7 + [50.0]))
    env = WorldModelEnv(wm, tokenizer, generator=torch.Generator().manual_seed(0))
    env.reset(torch.randn(16, 2))
    for _ in range(3):
        tokens = env.step(torch.zeros(16, dtype=torch.long))[4]["obs_tokens"]
        assert (tokens[:, 0] < 4).all() and (tokens[:, 1] == 7).all()


def test_on_the_cpu_a_mask_changes_only_the_draws_it_forbids():
    """WorldModelEnv._sample's comment: the same generator gives the same token wherever the unmasked
    draw was allowed, and the generator ends in the same state."""
    env = WorldModelEnv(tiny_world_model(), TokenObservations())
    logits, allowed = torch.randn(4096, 8) * 2, torch.tensor([True] * 6 + [False] * 2)
    env.generator = torch.Generator().manual_seed(0)
    free, next_free = env._sample(logits), torch.rand(3, generator=env.generator)
    env.generator = torch.Generator().manual_seed(0)
    masked, next_masked = env._sample(logits, allowed), torch.rand(3, generator=env.generator)
    kept = allowed[free]
    assert (~kept).any() and torch.equal(masked[kept], free[kept]) and allowed[masked].all()
    assert torch.equal(next_free, next_masked)


def test_imagination_follows_the_learned_dynamics():
    # a world model trained on "next obs = obs + action" imagines exactly that
    wm = tiny_world_model(K=1, vocab=6, actions=2, max_steps=4).train()
    g = torch.Generator().manual_seed(0)
    B, L = 32, 4
    actions = torch.randint(2, (B, L), generator=g)
    first = torch.randint(3, (B, 1, 1), generator=g)
    obs = torch.cat([first, first + actions[:, :-1].cumsum(1).unsqueeze(-1)], dim=1)  # (B, L, 1)
    batch = {"obs_tokens": obs, "actions": actions, "rewards": torch.zeros(B, L),
             "ends": torch.zeros(B, L), "mask_padding": torch.ones(B, L, dtype=torch.bool)}
    opt = torch.optim.AdamW(wm.parameters(), lr=3e-3)
    for _ in range(150):
        loss = wm.compute_loss(batch)["loss"]
        opt.zero_grad()
        loss.backward()
        opt.step()
    env = WorldModelEnv(wm.eval(), TokenObservations(), temperature=0.1,
                        generator=torch.Generator().manual_seed(0))
    obs0, _ = env.reset(torch.tensor([[0], [1]]))
    o1 = env.step(torch.tensor([1, 0]))[0]
    o2 = env.step(torch.tensor([1, 1]))[0]
    assert o1.flatten().tolist() == [1, 1] and o2.flatten().tolist() == [2, 2]


def test_a_batch_with_no_obs_label_has_a_finite_loss():
    """One token per observation (FrozenLake, Taxi): a segment that starts on its episode's last step has
    no observation to predict (its only token has no predictor; the next steps are padding). A batch of
    only such segments gives an obs term of 0, not 0 / 0, and the loss of the others is unchanged."""
    wm = tiny_world_model(K=1)
    obs, actions = random_segment(wm, B=2, L=3)
    batch = {"obs_tokens": obs, "actions": actions, "rewards": torch.zeros(2, 3), "ends": torch.zeros(2, 3),
             "mask_padding": torch.ones(2, 3, dtype=torch.bool)}
    batch["ends"][:, 0], batch["mask_padding"][:, 1:] = 1, False
    terms = wm.compute_loss(batch)
    assert terms["obs"].item() == 0 and torch.isfinite(terms["loss"]) and terms["end"] > 0
    batch["mask_padding"][0, 1:], batch["ends"][0, 0] = True, 0  # one segment with its next two steps real
    logits, labels = wm.logits_and_labels(batch)["obs"]
    expected = torch.nn.functional.cross_entropy(logits, labels, ignore_index=-100)
    assert (labels != -100).sum() == 2
    torch.testing.assert_close(wm.compute_loss(batch)["obs"], expected)
