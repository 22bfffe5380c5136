"""IRIS's agent: an actor-critic that learns to act only inside the world model's imagination.

Follows IRIS ("Transformers are Sample-Efficient World Models", Micheli et al. 2023,
github.com/eloialonso/iris, src/models/actor_critic.py) and Dreamer's lambda-returns
(Hafner et al. 2020). train_agent.py runs the loop around it; this file is the agent:

1. imagine: from real observations, WorldModelEnv (worldmodel.py) rolls H steps with actions
   sampled from the policy; the world model samples each next observation, reward and end.
   No gradient flows here: the world model is only a simulator to the agent.
2. lambda-returns over the imagined rewards, ends and the critic's values:
       G_t = r_t + gamma * (1 - d_t) * ((1 - lambda) * V(o_{t+1}) + lambda * G_{t+1}),   G_H = V(o_H)
3. the loss: REINFORCE with the critic as baseline, -log pi(a_t | o_t) * (G_t - V(o_t)) / max(1, S),
   the critic regressed on G_t, minus an entropy bonus; the mean is over the steps up to the
   first imagined end (IRIS averages over all H, including steps imagined past an end, which
   the world model never learned: training segments are padded there). S, a moving average of
   the range of the returns (their 5% to 95% quantiles), is DreamerV3's return normalisation
   (Hafner et al. 2023), which IRIS lacks: IRIS's clipped Atari rewards keep advantages near 1,
   while CartPole's returns reach 200 and would make the entropy bonus vanish beside them.

The policy reads what IRIS's reads: observations as the tokenizer reconstructs them (in the real
env too: `policy_view`, so it sees the same thing in both), through a small MLP for vectors or a
small CNN for 64x64 frames; the policy and the value each have their own (IRIS shares one
trunk: its clipped Atari rewards keep values small, while CartPole's reach 200, and a shared
trunk then follows the critic's large squared errors). Simplification against IRIS: no LSTM
and no burn-in. IRIS's policy is recurrent and warms its state on 20 real frames before
imagining; a feed-forward policy on one observation needs neither (CartPole's and Acrobot's vectors are the full state; for Pong
one frame hides the ball's direction, which a recurrent core would recover).
With --state latent --policy-input latent the policy reads the latent world model's z instead, as
Dreamer's actor does: the prior's mean in imagination (nothing is decoded), the encoder's mean
of the tokenized observation in the real env (policy_view).
Since the policy is feed-forward, imagination samples actions without gradient and
compute_loss recomputes logits and values on the whole trajectory in one batched pass.
"""

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

import lora


@dataclass
class ActorCriticConfig:
    width: int = 128  # hidden width of the policy's and the value's networks (IRIS: 512 + an LSTM)
    gamma: float = 0.995  # discount (IRIS: 0.995)
    lambda_: float = 0.95  # lambda of the lambda-returns (IRIS: 0.95)
    entropy_weight: float = 0.001  # weight of the entropy bonus (IRIS: 0.001)
    return_scale_decay: float = 0.99  # advantages / max(1, S), S a moving average of the returns' 5-95% range


def lambda_returns(rewards, values, ends, gamma, lambda_):
    """rewards, ends (B, H) and values (B, H + 1) -> lambda-returns (B, H); an end at step t
    stops the bootstrap from everything after it."""
    not_end = 1.0 - ends.float()
    G = values[:, -1]
    returns = []
    for t in reversed(range(rewards.shape[1])):
        G = rewards[:, t] + gamma * not_end[:, t] * ((1 - lambda_) * values[:, t + 1] + lambda_ * G)
        returns.append(G)
    return torch.stack(returns[::-1], dim=1)  # (B, H)


def still_running(ends):
    """ends (B, H) -> (B, H) 1.0 at the steps that come before or at the first end, else 0."""
    ones = torch.ones_like(ends[:, :1], dtype=torch.float32)
    return torch.cat([ones, (1.0 - ends[:, :-1].float()).cumprod(dim=1)], dim=1)


def obs_encoder(obs_shape, width):
    """Vectors (D,): a 2-layer MLP. Frames (64, 64, 3) uint8: four stride-2 convolutions
    to a 4x4 grid, then a linear layer."""
    if len(obs_shape) == 1:
        return nn.Sequential(nn.Linear(obs_shape[0], width), nn.Tanh(), nn.Linear(width, width), nn.Tanh())
    layers, channels = [], 3
    for out in (32, 64, 64, 64):  # 64 -> 32 -> 16 -> 8 -> 4
        layers += [nn.Conv2d(channels, out, 4, stride=2, padding=1), nn.ReLU()]
        channels = out
    return nn.Sequential(*layers, nn.Flatten(), nn.Linear(64 * 4 * 4, width), nn.ReLU())


class ActorCritic(nn.Module):
    def __init__(self, config: ActorCriticConfig, obs_shape, num_actions):
        super().__init__()
        self.config = config
        self.obs_shape = tuple(obs_shape)
        self.actor = nn.Sequential(obs_encoder(self.obs_shape, config.width), nn.Linear(config.width, num_actions))
        self.critic = nn.Sequential(obs_encoder(self.obs_shape, config.width), nn.Linear(config.width, 1))
        self.register_buffer("return_scale", torch.zeros(()))  # S; a buffer, so the checkpoint keeps it

    def forward(self, obs):
        """obs (..., *obs_shape) -> action logits (..., A), values (...)."""
        lead = obs.shape[:obs.dim() - len(self.obs_shape)]
        x = obs.reshape(-1, *self.obs_shape).float()  # (N, *obs_shape)
        if len(self.obs_shape) == 3:
            x = x.permute(0, 3, 1, 2) / 255  # (N, 64, 64, 3) -> (N, 3, 64, 64) in [0, 1]
        with torch.autocast(x.device.type, enabled=False):  # values in fp32: bf16 has 8 bits, and V reaches
            values = self.critic(x)                        # 200 on CartPole (a step's reward is 1)
        return self.actor(x).reshape(*lead, -1), values.reshape(lead)  # (..., A), (...)

    @torch.no_grad()
    def act(self, obs, should_sample=True, generator=None):
        """obs (..., *obs_shape) -> actions (...): sampled from the policy, or its most likely."""
        logits, _ = self(obs)  # (..., A)
        if not should_sample:
            return logits.argmax(-1)
        probs = F.softmax(logits.float(), -1).reshape(-1, logits.shape[-1])  # (N, A)
        return torch.multinomial(probs, 1, generator=generator).reshape(logits.shape[:-1])

    def compute_loss(self, batch, step=0):
        """batch: an imagined trajectory (imagine()); the named terms of the actor-critic loss."""
        c = self.config
        logits, values = self(batch["obs"])  # (B, H + 1, A), (B, H + 1)
        logits, bootstrap = logits[:, :-1], values.detach()
        returns = lambda_returns(batch["rewards"], bootstrap, batch["ends"], c.gamma, c.lambda_)  # (B, H)
        running = still_running(batch["ends"])  # (B, H)
        weight = running / running.sum()  # a mean over the steps that happened
        if self.training:
            low, high = torch.quantile(returns[running > 0], torch.tensor([0.05, 0.95], device=returns.device))
            self.return_scale.lerp_(high - low, 1 - c.return_scale_decay)
        advantages = (returns - bootstrap[:, :-1]) / self.return_scale.clamp(min=1.0)  # (B, H)
        log_probs = F.log_softmax(logits.float(), -1)  # (B, H, A)
        chosen = log_probs.gather(-1, batch["actions"].unsqueeze(-1)).squeeze(-1)  # (B, H)
        entropy = -(log_probs.exp() * log_probs).sum(-1)  # (B, H)
        actor = -(weight * chosen * advantages).sum()
        critic = (weight * (values[:, :-1] - returns) ** 2).sum()
        entropy = (weight * entropy).sum()
        imagined_return = (batch["rewards"] * running).sum(1).mean()  # logged only
        return {"loss": actor + critic - c.entropy_weight * entropy, "actor": actor, "critic": critic,
                "entropy": entropy, "imagined_return": imagined_return, "return_scale": self.return_scale.clone()}


@torch.no_grad()
def policy_view(tokenizer, obs, world_model=None):
    """What the policy sees of a real observation (N, *obs_shape), as in imagination: the tokenizer's
    reconstruction; with a latent world model given (--policy-input latent), its encoder's z = mu (N, D)."""
    obs_tokens = tokenizer.encode(obs)  # (N, K)
    if world_model is not None:
        return world_model.encode(obs_tokens)
    return tokenizer.decode(obs_tokens)


@torch.no_grad()
def imagine(actor_critic, wm_env, start_obs, horizon, policy_input="obs"):
    """From real observations start_obs (B, *obs_shape), horizon steps in the world model with
    actions sampled from the policy, which reads policy_input: "obs", each observation as decoded,
    or "latent", the latent world model's z (LatentWorldModelEnv's info["latent"], (B, D)) ->
    {"obs": (B, H + 1, ...) what the policy read, "actions", "rewards", "ends": (B, H)}.
    Random draws come from torch's global generator. The world model's LoRA adapters (an LM inside)
    run folded into copies of their base weights (lora.folded): the world model does not train in here."""
    def seen(obs, info):
        return obs if policy_input == "obs" else info["latent"]

    with lora.folded(wm_env.world_model):
        obs, info = wm_env.reset(start_obs)
        trajectory = {"obs": [seen(obs, info)], "actions": [], "rewards": [], "ends": []}
        for _ in range(horizon):
            action = actor_critic.act(trajectory["obs"][-1])
            obs, reward, end, _, info = wm_env.step(action)
            for key, value in zip(("obs", "actions", "rewards", "ends"), (seen(obs, info), action, reward, end)):
                trajectory[key].append(value)
    return {key: torch.stack(values, dim=1) for key, values in trajectory.items()}


@torch.no_grad()
def play(env, act, num_episodes, first_seed):
    """Returns of num_episodes whole episodes in the real env, episode i reset with seed
    first_seed + i; act(env observation) -> action, as data_wm.collect's."""
    returns = []
    for i in range(num_episodes):
        obs, _ = env.reset(seed=first_seed + i)
        total, done = 0.0, False
        while not done:
            obs, reward, terminated, truncated, _ = env.step(act(obs))
            total += float(reward)
            done = terminated or truncated
        returns.append(total)
    return returns


def first_reaching(history, target):
    """Real env steps at the first evaluation in history (train_agent.py's, one dict per evaluated epoch)
    whose greedy return reached target (None: never, or no target); experiments/agent_curve.py reads it too."""
    reached = [h["env_steps"] for h in history if target is not None and h["eval_return"] >= target]
    return reached[0] if reached else None
