"""
The world model's data: transitions of a Gymnasium environment under a uniformly random
policy (seeded) or an agent's, split by episode into training and held-out parts, and cut into IRIS's
training segments (src/dataset.py there: segments from random starts, padded past an
episode's end with mask_padding). Everything is a flat tensor of steps:

    obs (N, *obs_shape)   as the tokenizer's preprocess gives it (frames: 64x64 uint8)
    actions, rewards, ends (terminated), episode (N,)
    obs_tokens (N, K)     added by wm_setup.tokenize once the tokenizer is ready
    episode_start, episode_end (N,)   added by add_episode_bounds
"""

import gymnasium as gym
import numpy as np
import torch

from common import UserError


def make_env(env_id):
    """gym.make(env_id), checked to be an env the world model can learn."""
    try:
        if env_id.startswith("ALE/"):  # Atari: ale-py registers its envs (and ships the ROMs)
            import ale_py

            gym.register_envs(ale_py)
        env = gym.make(env_id)
    except gym.error.DependencyNotInstalled as e:  # a known env whose package is missing, e.g. Box2D
        raise UserError(f"{env_id} needs a package that is not installed: {str(e).splitlines()[0]}") from e
    except ModuleNotFoundError as e:  # ale-py, or a module an env imports itself (phys2d/...: jax)
        if e.name is None:  # Gymnasium's own message, e.g. for "module:Env-v0" ids
            raise UserError(f"{env_id}: {str(e).splitlines()[0]}") from e
        module = e.name.split(".")[0]
        hint = "pip install ale-py" if module == "ale_py" else "install the package that provides it"
        raise UserError(f"{env_id} needs the Python module '{module}', which is not installed: {hint}") from e
    except gym.error.Error as e:
        raise UserError(f"unknown Gymnasium env {env_id!r} ({e}); try CartPole-v1, Acrobot-v1 or "
                        "ALE/Pong-v5") from e
    space = env.observation_space
    if not isinstance(env.action_space, gym.spaces.Discrete):
        raise UserError(f"{env_id} has actions {env.action_space}; the world model needs a Discrete "
                        "action space (e.g. CartPole-v1, ALE/Pong-v5)")
    if env.action_space.start != 0:  # actions index the embedding table and the policy's logits
        raise UserError(f"{env_id}'s actions are numbered from {env.action_space.start}; the world model numbers "
                        "them from 0: wrap the env so that they start at 0 (gymnasium.ActionWrapper)")
    is_vector = isinstance(space, gym.spaces.Box) and len(space.shape) == 1
    is_frame = (isinstance(space, gym.spaces.Box) and len(space.shape) == 3 and space.shape[2] == 3
                and space.dtype == np.uint8)
    if not (is_vector or is_frame or isinstance(space, gym.spaces.Discrete)):
        raise UserError(f"{env_id} has observations {space}; supported are vectors (a 1-D Box), RGB "
                        "frames (an (H, W, 3) uint8 Box) and states (Discrete, e.g. FrozenLake-v1)")
    if env.spec.max_episode_steps is None and not env_id.startswith("ALE/"):  # Atari ends games itself
        raise UserError(f"{env_id} sets no time limit, so a policy that never reaches an end would play one "
                        "episode forever; choose an env with one (e.g. FrozenLake-v1, Taxi-v4, CartPole-v1)")
    return env


def collect(env, tokenizer, num_steps, seed, act=None):
    """num_steps transitions of a seeded uniformly random policy, or of act(env observation) ->
    action (train_agent.py's policy), as flat tensors:
    obs (N, *obs_shape) preprocessed, actions, rewards, ends (terminated), dones (terminated or cut by the
    env's time limit) and episode (N,). The last episode is cut at num_steps (like a time limit: no end
    label) unless its last step is done."""
    env.action_space.seed(seed)
    obs, _ = env.reset(seed=seed)
    chunks, raw = [], []
    actions, rewards, ends, dones, episode = [], [], [], [], []
    num_episodes = 0
    for _ in range(num_steps):
        action = env.action_space.sample() if act is None else act(obs)
        raw.append(obs)
        obs, reward, terminated, truncated, _ = env.step(action)
        actions.append(action), rewards.append(reward), ends.append(terminated), episode.append(num_episodes)
        dones.append(terminated or truncated)
        if terminated or truncated:
            obs, _ = env.reset()
            num_episodes += 1
        if len(raw) == 100:  # preprocess as we go: raw Atari frames are 100 kB each (small pieces convert faster)
            chunks.append(tokenizer.preprocess(np.stack(raw)))
            raw = []
    if raw:
        chunks.append(tokenizer.preprocess(np.stack(raw)))
    return {"obs": torch.cat(chunks), "actions": torch.tensor(actions), "ends": torch.tensor(ends),
            "dones": torch.tensor(dones), "rewards": torch.tensor(rewards, dtype=torch.float32),
            "episode": torch.tensor(episode)}


def with_space_bounds(obs, space):
    """Vector observations obs (N, D) and N more rows spread evenly over the finite bounds of the
    Box space: what a vector tokenizer fits its bins to, so that states the first data never reached
    (CartPole's cart beyond +-0.3, where a drifting policy ends at +-2.4) keep bins of their own.
    A dimension without finite bounds takes obs's values again; frames and states come back unchanged."""
    if len(space.shape) != 1:
        return obs
    low, high = (torch.as_tensor(b, dtype=obs.dtype) for b in (space.low, space.high))
    finite = torch.isfinite(high - low)  # also False for bounds at float32's largest value, whose range overflows
    grid = low + torch.linspace(0, 1, len(obs)).unsqueeze(1) * (high - low)  # (N, D); inf or nan where not finite
    return torch.cat([obs, torch.where(finite, grid, obs)])


def split(data, val_fraction):
    """Split by episode: the last val_fraction of the episodes (at least one) are held out."""
    num_episodes = int(data["episode"][-1]) + 1
    if num_episodes < 2:
        raise UserError(f"only {num_episodes} episode collected: raise --collect-steps")
    num_val = min(num_episodes - 1, max(1, round(num_episodes * val_fraction)))
    first_val = int((data["episode"] < num_episodes - num_val).sum())
    return ({k: v[:first_val] for k, v in data.items()}, {k: v[first_val:] for k, v in data.items()})


def add_episode_bounds(data):
    """For each step, the index of its episode's first step and one past its last."""
    n = len(data["episode"])
    first = torch.nonzero(data["episode"][1:] != data["episode"][:-1]).squeeze(1) + 1
    bounds = torch.cat([torch.tensor([0]), first, torch.tensor([n])])
    which = torch.bucketize(torch.arange(n), bounds, right=True) - 1  # episode number within data
    data["episode_start"], data["episode_end"] = bounds[which], bounds[which + 1]


def segments(data, starts, num_steps):
    """IRIS's training segments: num_steps steps from each start, padded past the episode's end."""
    idx = starts.unsqueeze(1) + torch.arange(num_steps)  # (B, L)
    mask_padding = idx < data["episode_end"][starts].unsqueeze(1)
    idx = torch.where(mask_padding, idx, starts.unsqueeze(1))  # padded steps repeat the start; never labels
    return {"obs_tokens": data["obs_tokens"][idx], "actions": data["actions"][idx],
            "rewards": data["rewards"][idx], "ends": data["ends"][idx], "mask_padding": mask_padding}
