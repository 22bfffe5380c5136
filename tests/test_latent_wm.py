"""Tests for latent_wm.py (one LM with encoder, decoder and dynamics adapters; the VAE's latent as
the world model's state) and its train_wm.py path (--state latent). Small models built here."""

import contextlib
import os

import pytest
import torch

import latent_wm
import lora
import train_wm
import wm_setup
from conftest import crash_at_step_2_then_resume, run_script, run_script_error, tiny_gpt2, tiny_mistral
from latent_wm import LatentWorldModel, LatentWorldModelConfig, LatentWorldModelEnv
from obs_tokenizer import TokenObservations, VectorTokenizer, VectorTokenizerConfig
from worldmodel import TransformerConfig

K, V, A, L, D = 4, 16, 3, 5, 8  # tokens per observation, their vocabulary, actions, steps, latent size
CONFIG = LatentWorldModelConfig(tokens_per_obs=K, obs_vocab_size=V, num_actions=A, max_steps=L, latent_size=D)


def make_model(lm=None, **config):
    torch.manual_seed(0)
    lm = tiny_gpt2() if lm is None else lm
    return LatentWorldModel(LatentWorldModelConfig(**{**vars(CONFIG), **config}), lm, r=4, alpha=8.0)


@torch.no_grad()
def as_if_trained(model):
    """Nonzero adapters (a fresh one adds nothing, B being zero), so that each one matters."""
    for p in lora.lora_parameters(model.backbone.lm):
        p.normal_(0, 0.05)
    return model


def make_batch(batch_size=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    mask_padding = torch.ones(batch_size, L, dtype=torch.bool)
    mask_padding[0, 3:] = False  # an episode that ends inside the segment
    return {"obs_tokens": torch.randint(V, (batch_size, L, K), generator=g),
            "actions": torch.randint(A, (batch_size, L), generator=g),
            "rewards": torch.randint(-1, 2, (batch_size, L), generator=g).float(),
            "ends": torch.rand(batch_size, L, generator=g) < 0.3, "mask_padding": mask_padding}


@torch.no_grad()
def test_dynamics_and_decoder_are_causal():
    """Changing step t's latent or action leaves every head before step t unchanged; changing an
    observation's last token leaves the decoder's earlier predictions unchanged."""
    model = as_if_trained(make_model()).eval()
    z, actions = torch.randn(2, L, D), torch.randint(A, (2, L))
    before = model(model.dynamics_inputs(z, actions))
    t = 2
    z2, actions2 = z.clone(), actions.clone()
    z2[:, t] += 1.0
    actions2[:, t] = (actions[:, t] + 1) % A
    after = model(model.dynamics_inputs(z2, actions2))
    for name in ("latent", "reward", "end"):
        assert before[name].shape[:2] == (2, L)
        assert torch.equal(before[name][:, :t], after[name][:, :t]), name
        assert not torch.allclose(before[name][:, t], after[name][:, t]), name
    tokens = torch.randint(V, (2, K))
    changed = tokens.clone()
    changed[:, -1] = (tokens[:, -1] + 1) % V
    a, b = model.decode_logits(z[:, 0], tokens), model.decode_logits(z[:, 0], changed)
    assert torch.equal(a, b)  # the last token is a target only, never an input
    changed[:, 1] = (tokens[:, 1] + 1) % V
    b = model.decode_logits(z[:, 0], changed)
    assert torch.equal(a[:, :2], b[:, :2]) and not torch.allclose(a[:, 2:], b[:, 2:])


@pytest.mark.parametrize("make_lm", [tiny_gpt2, tiny_mistral], ids=["gpt2", "mistral"])
@torch.no_grad()
def test_encoder_is_bidirectional_within_an_observation(make_lm):
    """The last token of an observation changes the first position's hidden state and the pooled latent."""
    model = as_if_trained(make_model(make_lm())).eval()
    tokens = torch.randint(V, (2, K))
    changed = tokens.clone()
    changed[:, -1] = (tokens[:, -1] + 1) % V
    mask = torch.ones_like(tokens, dtype=torch.bool)
    first = [model.run_adapter("encoder", model.obs_table(x), mask=mask)[:, 0] for x in (tokens, changed)]
    assert not torch.allclose(*first)
    assert not torch.allclose(model.encode(tokens), model.encode(changed))
    # the same LM without the mask (the decoder's and the dynamics' causal pass) does not see ahead
    causal = [model.run_adapter("encoder", model.obs_table(x))[:, 0] for x in (tokens, changed)]
    assert torch.equal(*causal)


@torch.no_grad()
def test_each_pass_runs_its_own_adapter():
    """Changing one adapter changes its pass only: the encoder's mu, the decoder's logits, the dynamics' heads."""
    model = as_if_trained(make_model()).eval()
    tokens, z, actions = torch.randint(V, (2, K)), torch.randn(2, L, D), torch.randint(A, (2, L))

    def passes():
        return {"encoder": model.encode(tokens), "decoder": model.decode_logits(z[:, 0], tokens),
                "dynamics": model(model.dynamics_inputs(z, actions))["latent"]}

    before = passes()
    for adapter in before:
        for p in lora.lora_parameters(model.backbone.lm, adapter):
            p.add_(0.1)
        after = passes()
        for name in before:
            assert torch.equal(before[name], after[name]) != (name == adapter), (adapter, name)
        before = after


@pytest.mark.parametrize("should_decode", [True, False])
def test_cached_imagination_equals_recomputation(should_decode):
    """One 2-token dynamics pass per step through the KV cache gives what recomputing the whole
    context gives, across a context rebuild (3 * L steps from a context of L)."""
    model = as_if_trained(make_model()).eval()
    start = torch.randint(V, (4, K))
    actions = torch.randint(A, (3 * L, 4))
    runs = []
    for should_use_cache in (True, False):
        env = LatentWorldModelEnv(model, TokenObservations(), should_use_cache=should_use_cache,
                                  generator=torch.Generator().manual_seed(0), should_decode=should_decode)
        obs, info = env.reset(start)
        assert torch.equal(obs, start) and info["latent"].shape == (4, D)
        steps = []
        for action in actions:
            before, latent = env.context, env.latent
            steps.append(env.step(action))
            with torch.no_grad():  # the step's two inputs last, after all of the context or its newest steps
                assert torch.equal(env.context[:, -2:], model.dynamics_inputs(latent[:, None], action[:, None]))
            kept = env.context.shape[1] - 2
            assert kept in (before.shape[1], 2 * env.keep_steps)
            assert torch.equal(env.context[:, :kept], before[:, before.shape[1] - kept:])
        runs.append(steps)
    for cached, recomputed in zip(*runs):
        obs, reward, terminated, truncated, info = cached
        assert torch.allclose(info["latent"], recomputed[4]["latent"], atol=1e-5)
        assert torch.equal(reward, recomputed[1]) and torch.equal(terminated, recomputed[2])
        assert not truncated.any() and set(reward.tolist()) <= {-1.0, 0.0, 1.0}
        if should_decode:
            assert obs.shape == (4, K) and torch.equal(obs, recomputed[0]) and torch.equal(obs, info["obs_tokens"])
        else:
            assert obs is None and "obs_tokens" not in info


def test_imagination_with_folded_adapters_follows_the_unfolded_one():
    """agent.imagine runs the adapters folded into the weights (lora.folded): the same latents up to
    rounding, step after step, across a context rebuild."""
    model = as_if_trained(make_model()).eval()
    start, actions = torch.randint(V, (4, K)), torch.randint(A, (3 * L, 4))
    runs = []
    for should_fold in (True, False):
        env = LatentWorldModelEnv(model, TokenObservations(), should_decode=False)
        with lora.folded(model) if should_fold else contextlib.nullcontext():
            latents = [env.reset(start)[1]["latent"]] + [env.step(action)[4]["latent"] for action in actions]
            if should_fold:
                assert all(set(layer.folded) == {"encoder", "dynamics"} for layer in lora.lora_layers(model.backbone.lm))
        runs.append(torch.stack(latents))
    assert torch.allclose(runs[0], runs[1], atol=1e-5)


def test_iris_sized_gelu_is_gpt2s_up_to_rounding():
    from transformers.activations import ACT2FN

    lm = latent_wm.iris_sized_lm(TransformerConfig(width=16, num_layers=1, num_heads=2), CONFIG)
    x = torch.linspace(-8, 8, 1001)
    assert torch.allclose(lm.transformer.h[0].mlp.act(x), ACT2FN["gelu_new"](x), atol=1e-6)


@torch.no_grad()
def test_cached_decoding_equals_the_teacher_forced_decoder():
    """generate's K single-token passes through the decoder's cache give the logits that one
    teacher-forced pass over the tokens it chose gives."""
    model, z, steps = as_if_trained(make_model()).eval(), torch.randn(3, D), []
    tokens = model.generate(z, lambda logits, k: steps.append(logits) or logits.argmax(-1))
    assert tokens.shape == (3, K) and len(steps) == K
    assert torch.allclose(torch.stack(steps, 1), model.decode_logits(z, tokens), atol=1e-5)


@torch.no_grad()
def test_imagined_vector_tokens_stay_in_their_own_dimension():
    """As WorldModelEnv: the decoder's position d samples only dimension d's bins of a VectorTokenizer,
    here though every logit favours the last token of the vocabulary."""
    tokenizer = VectorTokenizer(VectorTokenizerConfig(obs_dim=K, num_bins=V // K))
    tokenizer.fit(torch.randn(100, K))
    model = make_model().eval()
    model.obs_head.mlp[-1].bias.copy_(torch.arange(V, dtype=torch.float) * 50)
    env = LatentWorldModelEnv(model, tokenizer, generator=torch.Generator().manual_seed(0))
    env.reset(torch.randn(8, K))
    tokens = env.step(torch.zeros(8, dtype=torch.long))[4]["obs_tokens"]  # (8, K)
    assert torch.equal(tokens, ((torch.arange(K) + 1) * (V // K) - 1).expand(8, K))  # each dimension's last bin


def test_the_kl_balance_trains_the_dynamics_and_the_encoder_at_their_own_weights(monkeypatch):
    """The next-latent KL's gradient reaches the predicted latent at dyn_weight and the encoder's
    mean at rep_weight (DreamerV3's balance, by the two detach calls): equal and opposite but for
    the ratio of the weights, 0.1 / 0.5, and zero at padding."""
    model, batch = as_if_trained(make_model()), make_batch()
    mu, out = model.segment(batch)
    mu, latent = mu.detach().requires_grad_(), out["latent"].detach().requires_grad_()
    monkeypatch.setattr(model, "segment", lambda b: (mu, {**{k: v.detach() for k, v in out.items()}, "latent": latent}))
    model.compute_loss(batch)["next"].backward()
    cfg = model.config
    assert latent.grad[:, :-1].abs().sum() > 0 and cfg.rep_weight != cfg.dyn_weight
    assert torch.allclose(mu.grad[:, 1:], -(cfg.rep_weight / cfg.dyn_weight) * latent.grad[:, :-1], atol=1e-7)
    assert not mu.grad[0, 3:].any() and mu.grad[0, 1:3].any()  # row 0's steps 3 and 4 are padding


@pytest.mark.parametrize("next_latent", ["kl", "decode"])
def test_only_the_adapters_and_heads_get_gradients(next_latent):
    """A frozen base: its weights get no gradient and no graph; each of the three adapters, the VAE
    head, the tables and the heads do."""
    model = as_if_trained(make_model(next_latent=next_latent))
    terms = model.compute_loss(make_batch(), step=100)
    assert set(terms) == {"loss", "rec", "next", "reward", "end", "kl", "beta"}
    terms["loss"].backward()
    for name, p in model.named_parameters():
        if lora.is_lora_key(name) or not name.startswith("backbone.lm."):
            assert p.requires_grad and p.grad is not None and p.grad.abs().sum() > 0, name
        else:
            assert not p.requires_grad and p.grad is None, name
    adapters = {name.split(".lora_A.")[1].split(".")[0] for name, _ in model.named_parameters() if ".lora_A." in name}
    assert adapters == {"encoder", "decoder", "dynamics"}


def test_the_memory_check_counts_the_second_decoder_pass(monkeypatch):
    """--next-latent decode runs the decoder once more a step (K tokens): the memory check counts it."""
    counted = []
    monkeypatch.setattr(wm_setup, "place", lambda model, base, memory, device, num_tokens, *a:
                        counted.append(num_tokens))
    for flags in ([], ["--next-latent", "decode"]):
        args = train_wm.parse_args(["--state", "latent", "--backbone", "lm", *flags])
        args.model = wm_setup.check_model_flags(vars(args), args.explicit)
        config = LatentWorldModelConfig(**{**vars(CONFIG), "next_latent": args.next_latent})
        wm_setup.latent_world_model(wm_setup.settings_from(vars(args)), config, torch.device("cpu"), 4, False)
    assert counted == [4 * L * (2 * K + 2), 4 * L * (3 * K + 2)]


def test_the_loss_overfits_one_batch():
    """Dropout makes each step's loss noisy: the best of the last 10 steps meets the bound. Over 8
    seeds (another machine's rounding changes the path as much) it was 0.018 to 0.042 of the first
    loss, the accuracy 0.95 to 1.0; at lr 1e-2 the loss oscillated and ended at 0.11 to 0.125."""
    model = make_model()
    model.train()
    batch = make_batch(batch_size=4)
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=3e-3)
    losses = []
    for step in range(300):
        terms = model.compute_loss(batch, step=0)
        losses.append(terms["loss"].item())
        optimizer.zero_grad()
        terms["loss"].backward()
        optimizer.step()
    assert min(losses[-10:]) < 0.1 * losses[0], (losses[0], losses[-10:])
    model.eval()
    with torch.no_grad():  # the next observations decoded from the predicted latents are learned too
        logits, labels = model.logits_and_labels(batch)["obs"]
    assert (logits.argmax(-1) == labels).float().mean() > 0.8  # chance: 1/16


# ----------------------------------------------------------------------------- train_wm.py --state latent

TINY = ["--width", "32", "--num-layers", "1", "--num-heads", "2", "--batch-size", "4", "--log-interval", "1",
        "--warmup-iters", "1", "--horizon", "5", "--num-imagine", "8", "--device", "cpu", "--state", "latent",
        "--latent-size", "8"]
CARTPOLE = TINY + ["--collect-steps", "600", "--segment-steps", "6"]
LM = ["--backbone", "lm", "--num-bins", "16", "--lora-r", "4"]  # tiny (random weights) frozen + three adapters
EVAL = ["--horizon", "5", "--num-imagine", "8", "--device", "cpu"]


@pytest.fixture(autouse=True)
def in_tmp_dir(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)


def train_and_reload(out, argv, capsys):
    """A 3-step run into out, then --eval-only on its checkpoint: the same held-out numbers. Returns
    the checkpoint's world model."""
    metrics, lines = run_script(train_wm.main, argv + ["--max-iters", "3", "--eval-interval", "3", "--out-dir", out],
                                capsys)
    assert any("latent state" in line and "M trainable of" in line for line in lines)
    assert any(line.startswith("step 3/3 |") and "rec " in line and "next " in line for line in lines)
    for key in ("val_obs_acc", "val_obs_ce", "val_reward_acc", "val_end_acc", "imag_err_h1", "copy_err_h1",
                "imag_acc_h5", "imag_err_h5", "imagined_steps_per_s"):
        assert key in metrics, key
    state = torch.load(os.path.join(out, "ckpt.pt"), weights_only=True)
    assert state["config"]["state"] == "latent" and state["config"]["latent_size"] == 8
    again, _ = run_script(train_wm.main, ["--eval-only", "--resume", out, *EVAL], capsys)
    for key in ("val_obs_ce", "val_end_acc", "imag_err_h5"):
        assert again[key] == pytest.approx(metrics[key], abs=1e-6), key
    return state["world_model"]


@pytest.mark.parametrize("backbone", [[], LM], ids=["iris", "lm"])
def test_train_wm_state_latent_trains_evaluates_and_reloads(tmp_path, capsys, backbone):
    """IRIS's size from scratch, and tiny (random weights): the whole transformer is saved."""
    state = train_and_reload(str(tmp_path / "run"), CARTPOLE + backbone, capsys)
    assert any(k.startswith("backbone.lm.") and not lora.is_lora_key(k) for k in state)


def test_train_wm_state_latent_on_a_frozen_lm_saves_only_its_adapters(tmp_path, capsys, saved_model_dir):
    """A pretrained GPT-2 / Mistral (saved here), frozen: the checkpoint holds the three adapters, not
    the base, and --eval-only rebuilds the same model from --model and the checkpoint."""
    state = train_and_reload(str(tmp_path / "run"), CARTPOLE + LM + ["--model", saved_model_dir], capsys)
    lm_keys = [k for k in state if k.startswith("backbone.lm.")]
    assert lm_keys and all(lora.is_lora_key(k) for k in lm_keys)
    assert {k.split(".lora_A.")[1].split(".")[0] for k in lm_keys if ".lora_A." in k} == {"encoder", "decoder",
                                                                                          "dynamics"}


@pytest.mark.parametrize("backbone", [[], LM + ["--next-latent", "decode"]], ids=["iris", "lm-decode"])
@pytest.mark.parametrize("should_add_noise", [False, True], ids=["autoencoder-phase", "noise-and-kl"])
def test_train_wm_state_latent_resume_is_exact(tmp_path, capsys, monkeypatch, backbone, should_add_noise):
    """Also with the posterior's noise and the KL term on from the first step (in a real run they start
    after the autoencoder phase): the noise draws come from each step's seed, so a resumed run draws the same."""
    if should_add_noise:
        calls = []
        monkeypatch.setattr(latent_wm, "noise_scale", lambda step, cfg: calls.append(step) or 1.0)
        monkeypatch.setattr(latent_wm, "kl_weight", lambda step, cfg: 0.01)
    straight, crashed = str(tmp_path / "straight"), str(tmp_path / "crashed")
    argv = CARTPOLE + backbone + ["--max-iters", "4", "--eval-interval", "2"]
    run_script(train_wm.main, argv + ["--out-dir", straight], capsys)
    if should_add_noise:
        assert sorted(set(calls)) == [0, 1, 2, 3]  # every step sampled z with full noise
    crash_at_step_2_then_resume(train_wm, argv, crashed, monkeypatch, capsys)
    a = torch.load(os.path.join(straight, "ckpt.pt"), weights_only=True)
    b = torch.load(os.path.join(crashed, "ckpt.pt"), weights_only=True)
    assert a["step"] == b["step"] == 4 and a["world_model"].keys() == b["world_model"].keys()
    for name, tensor in a["world_model"].items():
        assert torch.equal(tensor, b["world_model"][name]), name


@pytest.mark.parametrize("argv, message", [
    (["--latent-size", "8"], "--latent-size configure(s) the latent world model: add --state latent"),
    (["--next-latent", "decode"], "--next-latent configure(s) the latent world model"),
    (["--state", "latent", "--lora-r", "4"], "--lora-r configure(s) the LM backbone"),
], ids=lambda v: v if isinstance(v, str) else " ".join(v))
def test_bad_flags_are_one_line_and_exit_2(argv, message, capsys):
    assert message in run_script_error(train_wm.main, argv, capsys)
    assert not os.path.exists("out-wm")
