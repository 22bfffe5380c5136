"""Tests for agent.py and train_agent.py: lambda-returns by hand, gradients that never reach the
world model, imagination that is causal and runs on the KV cache, a policy that reads the latent
world model's z without decoding, the loop's exact resume and its one-line errors. Every test runs
in its own tmp directory."""

import os

import gymnasium as gym
import numpy as np
import pytest
import torch

import train_agent
from agent import ActorCritic, ActorCriticConfig, first_reaching, imagine, lambda_returns, policy_view, still_running
from checkpoint import save_checkpoint
from common import UserError
from conftest import crash_at_step_2_then_resume, run_script, run_script_error, tiny_gpt2
from data_wm import collect, make_env, with_space_bounds
from latent_wm import LatentWorldModel, LatentWorldModelConfig, LatentWorldModelEnv
from obs_tokenizer import VectorTokenizer, VectorTokenizerConfig
from worldmodel import Transformer, TransformerConfig, WorldModel, WorldModelConfig, WorldModelEnv

QUICK = ["--collect-steps", "120", "--wm-iters", "3", "--ac-iters", "2", "--ac-batch-size", "4", "--horizon", "4",
         "--segment-steps", "5", "--width", "32", "--num-layers", "1", "--num-heads", "2", "--batch-size", "4",
         "--num-bins", "8", "--eval-episodes", "2", "--warmup-iters", "1", "--device", "cpu"]


@pytest.fixture(autouse=True)
def in_tmp_dir(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)


def test_lambda_returns_by_hand():
    rewards = torch.tensor([[1.0, 2.0, 3.0]])
    values = torch.tensor([[0.5, 1.0, 2.0, 4.0]])  # V(o_0) ... V(o_3)
    gamma, lam = 0.9, 0.5
    # G_3 = V_3 = 4; G_2 = 3 + 0.9 * (0.5 * 4 + 0.5 * 4) = 6.6
    # G_1 = 2 + 0.9 * (0.5 * 2 + 0.5 * 6.6) = 5.87; G_0 = 1 + 0.9 * (0.5 * 1 + 0.5 * 5.87) = 4.0915
    returns = lambda_returns(rewards, values, torch.zeros(1, 3, dtype=torch.bool), gamma, lam)
    assert torch.allclose(returns, torch.tensor([[4.0915, 5.87, 6.6]]))
    # an end at step 1: G_1 = r_1, no bootstrap from after it; G_0 = 1 + 0.9 * (0.5 * 1 + 0.5 * 2) = 2.35
    ends = torch.tensor([[False, True, False]])
    returns = lambda_returns(rewards, values, ends, gamma, lam)
    assert torch.allclose(returns, torch.tensor([[2.35, 2.0, 6.6]]))
    assert still_running(ends).tolist() == [[1.0, 1.0, 0.0]]  # the step after the end does not count


def cartpole_parts(seed=0):
    """A small untrained world model over CartPole-shaped vectors, its fitted tokenizer, an actor-critic."""
    torch.manual_seed(seed)
    tokenizer = VectorTokenizer(VectorTokenizerConfig(obs_dim=4, num_bins=8))
    obs = torch.randn(500, 4)
    tokenizer.fit(obs)
    config = WorldModelConfig(tokens_per_obs=4, obs_vocab_size=tokenizer.vocab_size, num_actions=2, max_steps=6)
    world_model = WorldModel(config, Transformer(TransformerConfig(width=32, num_layers=2, num_heads=2,
                                                                   dropout=0.0))).eval()
    actor_critic = ActorCritic(ActorCriticConfig(width=16), (4,), 2)
    return tokenizer, world_model, actor_critic, obs


def test_actor_critic_gradients_reach_only_the_policy_and_value():
    tokenizer, world_model, actor_critic, obs = cartpole_parts()
    batch = imagine(actor_critic, WorldModelEnv(world_model, tokenizer), obs[:8], horizon=5)
    assert batch["obs"].shape == (8, 6, 4) and batch["actions"].shape == batch["ends"].shape == (8, 5)
    terms = actor_critic.compute_loss(batch)
    assert {"loss", "actor", "critic", "entropy"} <= set(terms)
    terms["loss"].backward()
    assert all(p.grad is None for p in world_model.parameters())
    for name, p in actor_critic.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_imagination_with_the_policy_uses_the_cache_and_equals_recomputing():
    tokenizer, world_model, actor_critic, obs = cartpole_parts()
    windows = []
    hook = world_model.backbone.register_forward_pre_hook(lambda module, inputs: windows.append(inputs[0].shape[1]))
    runs = []
    for should_use_cache in (True, False):
        windows.clear()
        torch.manual_seed(3)
        runs.append(imagine(actor_critic, WorldModelEnv(world_model, tokenizer, should_use_cache=should_use_cache),
                            obs[:6], horizon=8))
        if should_use_cache:
            # the first observation (4 tokens); at steps 6 and 8 the 30-token context is full and is
            # rebuilt from its last 3 steps + the current observation (19 tokens); else one token per pass
            assert [w for w in windows if w > 1] == [4, 19, 19] and len(windows) == 3 + 8 * 5
    hook.remove()
    for key in runs[0]:
        assert torch.equal(runs[0][key], runs[1][key]), key


def test_imagination_is_causal_a_longer_rollout_starts_with_the_shorter_one():
    tokenizer, world_model, actor_critic, obs = cartpole_parts()
    rollouts = []
    for horizon in (3, 5):
        torch.manual_seed(7)
        rollouts.append(imagine(actor_critic, WorldModelEnv(world_model, tokenizer), obs[:4], horizon))
    short, long = rollouts
    for key in short:
        assert torch.equal(short[key], long[key][:, :short[key].shape[1]]), key


@pytest.mark.parametrize("policy_input", ["obs", "latent"])
def test_a_policy_reading_z_imagines_without_the_decoder(policy_input, monkeypatch):
    """--policy-input latent: imagination never runs the latent world model's decoder and the policy
    reads z (B, D), the same view of a real observation as policy_view's; "obs" decodes every step."""
    tokenizer, _, _, obs = cartpole_parts()
    D = 8
    config = LatentWorldModelConfig(tokens_per_obs=4, obs_vocab_size=tokenizer.vocab_size, num_actions=2,
                                    max_steps=4, latent_size=D)
    world_model = LatentWorldModel(config, tiny_gpt2(), r=4, alpha=8.0).eval()
    reads_latent = policy_input == "latent"
    actor_critic = ActorCritic(ActorCriticConfig(width=16), (D,) if reads_latent else (4,), 2)
    adapters, inputs, run_adapter = [], [], LatentWorldModel.run_adapter

    def noted(self, adapter, *args, **kwargs):  # the encoder's and the decoder's passes, named by their adapter
        adapters.append(adapter)
        return run_adapter(self, adapter, *args, **kwargs)

    monkeypatch.setattr(LatentWorldModel, "run_adapter", noted)
    actor_critic.register_forward_pre_hook(lambda module, args: inputs.append(args[0].shape))
    env = LatentWorldModelEnv(world_model, tokenizer, should_decode=not reads_latent)
    batch = imagine(actor_critic, env, obs[:5], horizon=6, policy_input=policy_input)  # the context rebuilt once
    assert adapters.count("encoder") == 1  # the start observations, once
    assert adapters.count("decoder") == (0 if reads_latent else 6 * 4)  # K cached passes per decoded step
    assert inputs == [(5, D) if reads_latent else (5, 4)] * 6
    assert batch["obs"].shape == ((5, 7, D) if reads_latent else (5, 7, 4))
    assert torch.equal(batch["obs"][:, 0], policy_view(tokenizer, obs[:5], world_model if reads_latent else None))


def test_a_policy_trained_on_fixed_imagined_returns_prefers_the_rewarded_action():
    # compute_loss is a real policy gradient: with reward 1 for action 1 and 0 for action 0, it learns action 1
    torch.manual_seed(0)
    actor_critic = ActorCritic(ActorCriticConfig(width=16, gamma=0.9), (4,), 2)
    optimizer = torch.optim.Adam(actor_critic.parameters(), lr=1e-2)
    obs = torch.randn(32, 6, 4)
    for _ in range(100):
        actions = actor_critic.act(obs[:, :-1])  # (32, 5)
        batch = {"obs": obs, "actions": actions, "rewards": actions.float(),
                 "ends": torch.zeros(32, 5, dtype=torch.bool)}
        loss = actor_critic.compute_loss(batch)["loss"]
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert actor_critic.act(obs[:, 0], should_sample=False).float().mean() == 1.0


def test_advantages_are_scaled_by_the_moving_range_of_the_returns():
    torch.manual_seed(0)
    actor_critic = ActorCritic(ActorCriticConfig(width=16, gamma=0.5, lambda_=1.0, return_scale_decay=0.5), (4,), 2)
    # a one-step trajectory per row: G = r, rewards 0 ... 300, so the returns' 5-95% range is 270
    batch = {"obs": torch.randn(301, 2, 4), "actions": torch.zeros(301, 1, dtype=torch.long),
             "rewards": torch.arange(301.0).unsqueeze(1), "ends": torch.ones(301, 1, dtype=torch.bool)}
    terms = actor_critic.compute_loss(batch)
    assert torch.isclose(terms["return_scale"], torch.tensor(135.0))  # 0 moved half way to 270
    actor_critic.compute_loss(batch)
    assert torch.isclose(actor_critic.return_scale, torch.tensor(202.5))
    assert "return_scale" in actor_critic.state_dict()  # resumes with the checkpoint
    actor_critic.eval()
    actor_critic.compute_loss(batch)  # evaluation leaves it alone
    assert torch.isclose(actor_critic.return_scale, torch.tensor(202.5))


def greedy_returns(state, num_episodes):
    """The returns of the checkpoint's greedy policy on CartPole's held-out seeds 2**31 + i, replayed
    here: its tokenizer and actor-critic rebuilt from the checkpoint, each step's reward added up."""
    config = state["config"]
    tokenizer = VectorTokenizer(VectorTokenizerConfig(obs_dim=4, num_bins=config["num_bins"]))
    tokenizer.load_state_dict(state["tokenizer"])
    actor_critic = ActorCritic(ActorCriticConfig(width=config["ac_width"]), (4,), 2).eval()
    actor_critic.load_state_dict(state["actor_critic"])
    env, returns = gym.make("CartPole-v1"), []
    for i in range(num_episodes):
        obs, _ = env.reset(seed=2**31 + i)
        total, done = 0.0, False
        while not done:
            seen = tokenizer.decode(tokenizer.encode(torch.as_tensor(obs, dtype=torch.float32)[None]))  # (1, 4)
            obs, reward, terminated, truncated, _ = env.step(int(actor_critic.act(seen, should_sample=False)))
            total, done = total + reward, terminated or truncated
        returns.append(total)
    return returns


def test_bins_over_the_space_bounds_keep_the_cart_near_its_edge():
    env = make_env("CartPole-v1")  # bounds: cart +-4.8, pole +-0.42 rad; the velocities have none
    tokenizer = VectorTokenizer(VectorTokenizerConfig(obs_dim=4, num_bins=64))
    obs = collect(env, tokenizer, 1000, seed=0)["obs"]  # a random policy's: the cart stays within +-0.4
    sample = with_space_bounds(obs, env.observation_space)
    assert sample.shape == (2000, 4) and torch.equal(sample[:1000], obs)
    assert torch.allclose(sample[1000:, 0], torch.linspace(-4.8, 4.8, 1000), atol=1e-5)
    assert torch.equal(sample[1000:, 1], obs[:, 1]) and torch.equal(sample[1000:, 3], obs[:, 3])
    near_edge = torch.tensor([[-2.4, 0.0, 0.0, 0.0], [-1.0, 0.0, 0.0, 0.0], [2.0, 0.0, 0.0, 0.0], [2.4, 0.0, 0.0, 0.0]])
    tokenizer.fit(obs)
    assert tokenizer.decode(tokenizer.encode(near_edge))[:, 0].abs().max() < 0.5  # data only: all look central
    tokenizer.fit(sample)
    assert (tokenizer.decode(tokenizer.encode(near_edge))[:, 0] - near_edge[:, 0]).abs().max() < 0.35
    assert (tokenizer.edges[2].abs() < 0.21).sum() >= 40  # most pole-angle bins stay where episodes run
    largest = np.finfo(np.float32).max  # bounds some envs give for "unbounded": their range overflows float32
    box = gym.spaces.Box(np.array([-1.0, -largest], dtype=np.float32), np.array([1.0, largest], dtype=np.float32))
    sample = with_space_bounds(obs[:, :2], box)
    assert torch.equal(sample[1000:, 1], obs[:, 1]) and torch.isfinite(sample).all()  # the data's values again
    frames = torch.zeros(3, 64, 64, 3, dtype=torch.uint8)
    assert with_space_bounds(frames, gym.spaces.Box(0, 255, (210, 160, 3), dtype=np.uint8)) is frames


def test_the_loop_runs_and_reports_real_returns(capsys):
    metrics, lines = run_script(train_agent.main, QUICK + ["--max-iters", "2", "--eval-episodes", "3"], capsys)
    assert metrics["epoch"] == 2 and metrics["env_steps"] == 240 and metrics["imagined_steps_per_s"] > 0
    assert metrics["reward_threshold"] == 475.0
    assert sum(line.startswith("epoch ") for line in lines) == 2
    state = torch.load(os.path.join("out-agent", "ckpt.pt"), weights_only=True)
    assert state["kind"] == "agent" and len(state["history"]) == 2 and len(state["data"]["actions"]) == 240
    returns = greedy_returns(state, 3)
    assert metrics["eval_return"] == pytest.approx(sum(returns) / 3) and metrics["eval_return_min"] == min(returns)
    assert state["config"]["bin_range"] == "data" and state["tokenizer"]["centers"][0].abs().max() < 1.0


def test_the_loop_on_states_reads_them_one_hot(capsys):
    """FrozenLake-v1 (16 cells, reward 1 at the goal): a Discrete observation is one token a step, and the
    policy reads the cell one-hot, in the real env (through the tokenizer) and in imagination alike."""
    metrics, _ = run_script(train_agent.main, QUICK + ["--env", "FrozenLake-v1", "--max-iters", "1"], capsys)
    assert metrics["reward_threshold"] == 0.7
    state = torch.load(os.path.join("out-agent", "ckpt.pt"), weights_only=True)
    obs = state["data"]["obs"]
    assert obs.shape == (120, 16) and torch.equal(obs.sum(1), torch.ones(120))  # one cell a step
    assert state["actor_critic"]["actor.0.0.weight"].shape[1] == 16 and state["tokenizer"] == {}
    again, _ = run_script(train_agent.main, ["--resume", "out-agent", "--max-iters", "2", "--device", "cpu"], capsys)
    assert again["epoch"] == 2 and again["env_steps"] == 240  # resumed: nothing to load into the tokenizer


@pytest.mark.parametrize("state, policy_input", [("tokens", "obs"), ("latent", "obs"), ("latent", "latent")])
def test_the_loop_resumes_exactly(tmp_path, monkeypatch, capsys, state, policy_input):
    """--state latent: the agent practises in latent_wm.py's world model (LatentWorldModelEnv), same loop;
    --policy-input latent: its policy reads z, in imagination and in the real env (collect, evaluate)."""
    argv = QUICK + ["--max-iters", "3", "--state", state, "--policy-input", policy_input]
    straight, crashed = str(tmp_path / "straight"), str(tmp_path / "crashed")
    metrics, _ = run_script(train_agent.main, argv + ["--out-dir", straight], capsys)
    assert ("wm_train_next" in metrics) == (state == "latent")  # the latent world model's loss terms
    crash_at_step_2_then_resume(train_agent, argv, crashed, monkeypatch, capsys)
    a = torch.load(os.path.join(straight, "ckpt.pt"), weights_only=True)
    b = torch.load(os.path.join(crashed, "ckpt.pt"), weights_only=True)
    assert a["step"] == b["step"] == 3 and a["config"]["state"] == state
    assert a["config"]["policy_input"] == policy_input
    assert a["actor_critic"]["actor.0.0.weight"].shape[1] == (64 if policy_input == "latent" else 4)  # z or obs
    for part in ("world_model", "actor_critic", "data"):
        for name, tensor in a[part].items():
            assert torch.equal(tensor, b[part][name]), (part, name)
    assert [h["eval_return"] for h in a["history"]] == [h["eval_return"] for h in b["history"]]


def test_a_resumed_loop_takes_its_settings_from_the_checkpoint(tmp_path, capsys, monkeypatch):
    out = str(tmp_path / "run")
    run_script(train_agent.main, QUICK + ["--max-iters", "1", "--out-dir", out, "--bin-range", "space",
                                          "--end-share", "0.5"], capsys)
    metrics, _ = run_script(train_agent.main, ["--resume", out, "--max-iters", "2", "--device", "cpu"], capsys)
    assert metrics["epoch"] == 2 and metrics["env_steps"] == 240  # --collect-steps 120 came from the checkpoint
    state = torch.load(os.path.join(out, "ckpt.pt"), weights_only=True)
    assert state["config"]["bin_range"] == "space" and state["tokenizer"]["centers"][0].max() > 2.4
    assert state["config"]["end_share"] == 0.5
    err = run_script_error(train_agent.main, ["--resume", out, "--max-iters", "3", "--seed", "5"], capsys)
    assert "--seed 5" in err  # another seed would collect other data: refused, not mixed in
    again, _ = run_script(train_agent.main, ["--resume", out, "--eval-only", "--device", "cpu"], capsys)
    history = torch.load(os.path.join(out, "ckpt.pt"), weights_only=True)["history"]
    assert again["eval_return"] == history[-1]["eval_return"]
    assert again["eval_return_sampled"] == history[-1]["eval_return_sampled"]
    calls = []
    monkeypatch.setattr(train_agent, "play", lambda env, act, num, seed: calls.append(num) or [1.0] * num)
    run_script(train_agent.main, ["--resume", out, "--eval-only", "--eval-episodes", "7", "--device", "cpu"], capsys)
    assert calls == [7, 7]  # greedy and sampled: --eval-only plays what it is told, and saves nothing
    assert torch.load(os.path.join(out, "ckpt.pt"), weights_only=True)["config"]["eval_episodes"] == 2
    err = run_script_error(train_agent.main, ["--resume", out, "--max-iters", "3", "--eval-episodes", "7"], capsys)
    assert "--eval-episodes 7" in err  # a training run keeps the count its history was measured with
    state["config"].pop("end_share")  # a checkpoint from before --end-share: its draws were all uniform
    save_checkpoint(out, state)
    run_script(train_agent.main, ["--resume", out, "--max-iters", "3", "--device", "cpu"], capsys)
    assert torch.load(os.path.join(out, "ckpt.pt"), weights_only=True)["config"]["end_share"] == 0.0
    # the actor-critic's lr and clip may change on resume (what its divergence's message asks), as --lr may
    run_script(train_agent.main, ["--resume", out, "--max-iters", "4", "--ac-lr", "1e-4", "--ac-grad-clip", "3",
                                  "--device", "cpu"], capsys)
    config = torch.load(os.path.join(out, "ckpt.pt"), weights_only=True)["config"]
    assert (config["ac_lr"], config["ac_grad_clip"]) == (1e-4, 3.0)


def test_episodes_of_each_epoch_are_numbered_after_the_last_and_cut_ones_not_counted():
    def part(rewards, ends, episode, dones=None):
        return {"obs": torch.zeros(len(rewards), 4), "actions": torch.zeros(len(rewards), dtype=torch.long),
                "rewards": torch.tensor(rewards), "ends": torch.tensor(ends), "episode": torch.tensor(episode),
                "dones": torch.tensor(ends if dones is None else dones)}

    first = part([1.0, 1.0, 1.0, 1.0], [False, True, False, False], [0, 0, 1, 1])  # episode 1 is cut
    assert train_agent.finished_returns(first) == [2.0]
    second = part([1.0, 1.0], [False, True], [0, 0])  # it ends on the epoch's last step: it counts
    assert train_agent.finished_returns(second) == [2.0]
    timed_out = part([1.0, 1.0, 1.0], [False, False, False], [0, 0, 1], [False, True, True])  # the env's time limit
    assert train_agent.finished_returns(timed_out) == [2.0, 1.0]  # twice, the second on the last step: both count
    both = train_agent.append(first, second)
    assert both["episode"].tolist() == [0, 0, 1, 1, 2, 2] and len(both["obs"]) == 6


@pytest.mark.parametrize("dtype", [[], ["--dtype", "float16"], ["--backbone", "lm", "--dtype", "float16"]],
                         ids=["default", "float16", "lm-float16"])
def test_a_diverging_actor_critic_names_its_own_lr(tmp_path, capsys, dtype):
    """The actor-critic trains at --ac-lr: its divergence names that flag, not the world model's --lr;
    --dtype is an LM world model's, and the fp32 actor-critic reads decoded observations, so float16 is
    not blamed, with IRIS's transformer or an LM in float16."""
    err = run_script_error(train_agent.main, QUICK + dtype + ["--max-iters", "1", "--ac-lr", "1e30", "--ac-grad-clip",
                                                              "0", "--out-dir", str(tmp_path / "run")], capsys)
    assert "lower --ac-lr (now 1e+30)" in err and "float16" not in err
    assert not os.path.exists(tmp_path / "run" / "ckpt.pt")


@pytest.mark.parametrize("argv, says", [
    (["--env", "NoSuchEnv-v0"], "unknown Gymnasium env"),
    (["--lora-r", "4"], "--backbone lm"),
    (["--latent-size", "8"], "add --state latent"),
    (["--policy-input", "latent"], "--policy-input latent reads the latent world model's z: add --state latent"),
])
def test_bad_input_is_one_line(argv, says, capsys):
    err = run_script_error(train_agent.main, QUICK + argv, capsys)
    assert says in err
    assert not os.path.exists("out-agent")


@pytest.mark.parametrize("error, says", [
    (ModuleNotFoundError("No module named 'jax.numpy'", name="jax.numpy"),
     "phys2d/CartPole-v1 needs the Python module 'jax', which is not installed: install the package that provides it"),
    (ModuleNotFoundError("No module named 'mypkg'"), "phys2d/CartPole-v1: No module named 'mypkg'"),  # no name
])
def test_an_env_whose_module_is_missing_is_one_line(error, says, monkeypatch, capsys):
    """An env whose own code imports a module that is not installed (Gymnasium's phys2d/... envs need jax)."""
    def make(env_id, **kwargs):
        raise error
    monkeypatch.setattr(gym, "make", make)
    err = run_script_error(train_agent.main, QUICK + ["--env", "phys2d/CartPole-v1"], capsys)
    assert says in err and not os.path.exists("out-agent")


def test_the_loop_with_an_lm_world_model_saves_only_the_adapter(saved_model_dir, capsys):
    metrics, _ = run_script(train_agent.main, QUICK + ["--max-iters", "1", "--backbone", "lm", "--model",
                                                       saved_model_dir, "--lora-r", "2"], capsys)
    assert metrics["epoch"] == 1
    saved = torch.load(os.path.join("out-agent", "ckpt.pt"), weights_only=True)["world_model"]
    assert any("lora" in name for name in saved) and not any(name.startswith("backbone.lm.") and "lora" not in name
                                                             for name in saved)


class RecordedEpisodes(gym.Wrapper):
    """An env that notes each episode's reset seed, the rewards it gave and whether it ended."""

    def __init__(self, env, episodes):
        super().__init__(env)
        self.episodes = episodes

    def reset(self, *, seed=None, options=None):
        self.episodes.append({"seed": seed, "rewards": [], "done": False})
        return self.env.reset(seed=seed, options=options)

    def step(self, action):
        obs, reward, terminated, truncated, info = self.env.step(action)
        self.episodes[-1]["rewards"].append(float(reward))
        self.episodes[-1]["done"] = terminated or truncated
        return obs, reward, terminated, truncated, info


def test_the_loop_on_atari_frames(capsys, monkeypatch):
    # Pong: the frame tokenizer trains in the first epoch, the policy is the CNN, reading its reconstructions
    episodes, make = [], gym.make
    monkeypatch.setattr(gym, "make", lambda *args, **kwargs: RecordedEpisodes(make(*args, **kwargs), episodes))
    metrics, _ = run_script(train_agent.main, QUICK + [
        "--env", "ALE/Pong-v5", "--max-iters", "1", "--collect-steps", "60", "--tokenizer-iters", "2",
        "--tokenizer-batch-size", "4", "--segment-steps", "2", "--batch-size", "2", "--ac-batch-size", "2",
        "--horizon", "2", "--eval-episodes", "1"], capsys)
    assert metrics["env_steps"] == 60
    # the held-out episode (seed 2**31), played to its end greedily, then sampled: each return is its rewards' sum
    greedy, sampled = (e for e in episodes if e["seed"] == 2**31)
    assert greedy["done"] and sampled["done"]
    assert metrics["eval_return"] == sum(greedy["rewards"])
    assert metrics["eval_return_sampled"] == sum(sampled["rewards"])


def test_the_real_steps_to_a_return_are_those_of_its_first_evaluation(tmp_path):
    """agent.first_reaching, as train_agent.py and experiments/agent_curve.py read a run's history: the
    first evaluation at or above the return counts, a later drop does not undo it; never: None."""
    from experiments import agent_curve

    history = [{"env_steps": 1000, "eval_return": 20.0}, {"env_steps": 2000, "eval_return": 480.0},
               {"env_steps": 3000, "eval_return": 300.0}]
    assert [first_reaching(history, t) for t in (10, 300, 475, 500, None)] == [1000, 2000, 2000, None, None]
    run = str(tmp_path / "run")
    save_checkpoint(run, {"kind": "agent", "config": {"env": "CartPole-v1", "seed": 1}, "step": 3, "history": history})
    group = agent_curve.summarise("iris", [run], target=300)
    assert group["steps_to_threshold"] == [2000] and group["steps_to_target"] == [2000]  # CartPole-v1: 475
    with pytest.raises(UserError, match="is given twice"):
        agent_curve.summarise("iris", [run, run + "/"], target=None)
    other = str(tmp_path / "other")
    save_checkpoint(other, {"kind": "agent", "config": {"env": "Acrobot-v1", "seed": 2}, "step": 3, "history": history})
    with pytest.raises(UserError, match="not one env's distinct seeds"):
        agent_curve.summarise("iris", [run, other], target=None)


@pytest.mark.parametrize("value, says", [("nan", "it must be a number"), ("inf", "it must be finite")])
def test_agent_curve_refuses_a_target_no_return_can_reach(value, says, capsys):
    from experiments import agent_curve

    with pytest.raises(SystemExit) as exit_:
        agent_curve.parse_args(["--runs", "iris", "dir", "--target", value])
    assert exit_.value.code == 2 and says in capsys.readouterr().err


def test_the_paired_difference_is_taken_seed_by_seed(tmp_path):
    """experiments/agent_curve.py's paired comparison: B minus A over the seeds both ran (2 and 3),
    at the evaluations both made (A's two of B's three); seed 1 (A only) and seed 4 (B only) left out;
    one shared seed: None; runs evaluated at other real steps: an error before the picture is drawn."""
    from experiments import agent_curve

    def run(name, seed, returns, every=1000):
        history = [{"env_steps": every * (i + 1), "eval_return": r} for i, r in enumerate(returns)]
        save_checkpoint(str(tmp_path / name), {"kind": "agent", "config": {"env": "CartPole-v1", "seed": seed},
                                              "step": len(returns), "history": history})
        return str(tmp_path / name)

    a_dirs = [run("a1", 1, [10, 20]), run("a2", 2, [30, 40]), run("a3", 3, [50, 60])]
    a = agent_curve.summarise("a", a_dirs, None)
    b = agent_curve.summarise("b", [run("b3", 3, [55, 90, 1]), run("b2", 2, [40, 40, 1]), run("b4", 4, [0, 0, 1])],
                              None)
    d = agent_curve.paired(a, b)
    assert d["seeds"] == [2, 3] and [p["differences"] for p in d["points"]] == [[10, 5], [0, 30]]
    assert [p["mean"] for p in d["points"]] == [7.5, 15.0]
    assert d["points"][1]["ci95"] == pytest.approx(12.706 * 15.0)  # t(1) x sd (21.21) / sqrt(2)
    assert agent_curve.paired(a, agent_curve.summarise("c", [run("c3", 3, [1, 2])], None)) is None
    picture = tmp_path / "curve.png"
    late = ["--runs", "late", run("l2", 2, [1, 2], every=500), run("l3", 3, [1, 2], every=500)]
    with pytest.raises(UserError, match="evaluated at different real env steps"):
        agent_curve.main(["--runs", "a", *a_dirs, *late, "--out", str(picture)])
    assert not picture.exists()


def test_the_curve_s_interval_is_student_s_t():
    from experiments import agent_curve

    assert [agent_curve.t_975(df) for df in (1, 4, 10, 30)] == [12.706, 2.776, 2.228, 2.042]
    assert abs(agent_curve.t_975(31) - 2.040) < 1e-3 and abs(agent_curve.t_975(120) - 1.980) < 1e-3
    mean, half = agent_curve.interval([1.0, 2.0, 3.0, 4.0, 5.0])
    assert mean == 3.0 and half == pytest.approx(2.776 * 1.5811 / 5**0.5, rel=1e-4)
