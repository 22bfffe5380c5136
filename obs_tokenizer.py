"""Observation tokenizers: one observation <-> K discrete tokens.

IRIS ("Transformers are Sample-Efficient World Models", Micheli et al. 2023,
github.com/eloialonso/iris) never shows its world model a pixel: a VQ-VAE first turns
each 64x64 frame into a 4x4 grid of codebook indices (16 tokens, vocabulary 512), and
the world model predicts those. The tokenizer is trained (or fitted) first, then frozen,
so it lives in its own file; worldmodel.py only sees `tokens_per_obs` and `vocab_size`.

The tokenizers share one interface:
    preprocess(raw_obs)   env observations (N, *env_shape) -> tensor (N, *obs_shape)
                          the form that is stored, encoded, decoded and compared
    fit(obs)              set what is read off the training data (before any training)
    encode(obs)           (N, *obs_shape) -> LongTensor (N, K)
    decode(tokens)        (N, K) -> (N, *obs_shape), same dtype as preprocess gives
    allowed_tokens()      (K, vocab_size) bool, the tokens that may stand at each position, or None: all
                          (imagination samples only these; a model's logits cover the whole vocabulary)
    tokens_per_obs, vocab_size

- VectorTokenizer (CartPole, Acrobot, MountainCar, ...): each of the D dimensions is
  cut into num_bins equal-mass bins whose edges are quantiles of the training data
  (`fit`), so the bins are fine where the data is dense. Dimension d's token is
  d * num_bins + bin: every dimension has its own vocabulary rows. Decoding gives each
  bin the mean of the training values that fell in it. Nothing is learned by gradient.
- FrameTokenizer (Atari): a small convolutional autoencoder with a finite scalar
  quantiser (FSQ, Mentzer et al. 2023, "Finite Scalar Quantization: VQ-VAE Made
  Simple"). Frames are resized to 64x64 RGB; four stride-2 convolutions bring them to a
  4x4 grid of 3 numbers each; each number is squashed into (-0.5, L - 0.5) and rounded
  to one of L = 8 levels (straight-through gradient), so a grid cell is one of
  8^3 = 512 tokens; transposed convolutions decode back to pixels. `fit` stores the
  per-pixel median of the training frames (the static background) and the autoencoder
  codes only the difference from it.
  Choices against IRIS's VQGAN-style VQ-VAE, each one a short CPU run needs to work: FSQ
  instead of a learned codebook (a VQ codebook with cosine codes and dead-code restarts
  still collapsed to 2-6 used codes on Pong); squared error instead of L1 (with mostly
  empty frames L1's best guess for each pixel is the background, the median, and the
  small objects never appear); the background removed (the paddles come out sharp in
  2000 steps, 100 codes used instead of 16); no residual/attention blocks and no
  perceptual loss. The 1-pixel Pong ball is still mostly lost.
- DiscreteTokenizer (FrozenLake, Taxi): the observation is one integer of n, a
  state's number; it is its own token (K = 1, vocabulary n), so nothing is fitted or lost. The
  stored form is the one-hot vector (n,), which the policy's MLP reads like any vector.
- TokenObservations: observations that already are K tokens; encode and decode pass them
  through. For the tests and bench.py's imagination timing, where the world model alone matters.
"""

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F


# ----------------------------------------------------------------------------- vectors

@dataclass
class VectorTokenizerConfig:
    obs_dim: int = 4  # D: numbers per observation (CartPole: 4); one token per number
    num_bins: int = 64  # bins per dimension; the vocabulary is obs_dim * num_bins


class VectorTokenizer(nn.Module):
    def __init__(self, config: VectorTokenizerConfig):
        super().__init__()
        self.config = config
        self.tokens_per_obs = config.obs_dim
        self.vocab_size = config.obs_dim * config.num_bins
        # buffers, so they travel in the checkpoint; filled by fit()
        self.register_buffer("edges", torch.zeros(config.obs_dim, config.num_bins - 1))
        self.register_buffer("centers", torch.zeros(config.obs_dim, config.num_bins))

    def preprocess(self, raw_obs) -> torch.Tensor:
        return torch.as_tensor(raw_obs, dtype=torch.float32)

    @torch.no_grad()
    def fit(self, obs: torch.Tensor):
        """Set the bin edges to quantiles of obs (N, D) and the centres to bin means."""
        num_bins = self.config.num_bins
        quantiles = torch.linspace(0, 1, num_bins + 1, device=obs.device)[1:-1]
        self.edges.copy_(torch.quantile(obs, quantiles, dim=0).T)  # (D, num_bins - 1)
        bins = self._bins(obs)  # (N, D)
        sums = torch.zeros_like(self.centers).scatter_add_(1, bins.T, obs.T)
        counts = torch.zeros_like(self.centers).scatter_add_(1, bins.T, torch.ones_like(obs.T))
        # an empty bin (repeated quantiles, e.g. a dimension that takes few values)
        # decodes to its left edge; such a bin is never produced by encode on this data
        left = torch.cat([self.edges[:, :1], self.edges], dim=1)
        self.centers.copy_(torch.where(counts > 0, sums / counts.clamp(min=1), left))

    def _bins(self, obs: torch.Tensor) -> torch.Tensor:
        # bin = number of edges strictly below the value: 0 .. num_bins - 1
        return (obs.unsqueeze(-1) > self.edges).sum(-1)  # (N, D, num_bins - 1) -> (N, D)

    def encode(self, obs: torch.Tensor) -> torch.Tensor:
        offsets = torch.arange(self.config.obs_dim, device=obs.device) * self.config.num_bins
        return self._bins(obs) + offsets  # (N, D)

    def decode(self, tokens: torch.Tensor) -> torch.Tensor:
        # a token t of dimension d sits at row d of centers, column t - d * num_bins;
        # centers.flatten() is laid out exactly like the vocabulary
        return self.centers.flatten()[tokens]  # (N, D)

    def allowed_tokens(self) -> torch.Tensor:
        """Position d holds one of dimension d's tokens: another dimension's would decode to its value."""
        dims = torch.arange(self.vocab_size, device=self.centers.device) // self.config.num_bins  # (V,)
        return dims == torch.arange(self.config.obs_dim, device=self.centers.device)[:, None]  # (D, V)


# ----------------------------------------------------------------------------- states


class DiscreteTokenizer(nn.Module):
    """A Discrete(num_states, start) observation: state s is token s - start, stored one-hot."""

    def __init__(self, num_states: int, start: int = 0):
        super().__init__()
        self.num_states, self.start = num_states, start
        self.tokens_per_obs = 1
        self.vocab_size = num_states

    def preprocess(self, raw_obs) -> torch.Tensor:
        """States (N,) -> one-hot float (N, num_states)."""
        states = torch.as_tensor(raw_obs, dtype=torch.long) - self.start  # (N,)
        return F.one_hot(states, self.num_states).float()  # (N, num_states)

    def fit(self, obs: torch.Tensor):
        """Nothing to read off the data: every state has its token."""

    def encode(self, obs: torch.Tensor) -> torch.Tensor:
        return obs.argmax(-1, keepdim=True)  # (N, num_states) -> (N, 1)

    def decode(self, tokens: torch.Tensor) -> torch.Tensor:
        return F.one_hot(tokens[:, 0], self.num_states).float()  # (N, 1) -> (N, num_states)

    def allowed_tokens(self):
        return None  # every state


# ----------------------------------------------------------------------------- tokens


class TokenObservations:
    """Observations that already are K tokens (N, K): encode and decode pass them through."""

    def encode(self, obs: torch.Tensor) -> torch.Tensor:
        return obs.long()

    def decode(self, tokens: torch.Tensor) -> torch.Tensor:
        return tokens

    def allowed_tokens(self):
        return None


# ----------------------------------------------------------------------------- frames

@dataclass
class FrameTokenizerConfig:
    frame_size: int = 64  # frames are resized to frame_size x frame_size RGB (IRIS: 64)
    channels: tuple = (16, 32, 64, 64)  # one stride-2 convolution each: 64 -> 4x4 grid = 16 tokens
    levels: tuple = (8, 8, 8)  # FSQ levels of each latent number; vocabulary = product = 512 (IRIS: 512)


class FrameTokenizer(nn.Module):
    def __init__(self, config: FrameTokenizerConfig):
        super().__init__()
        self.config = config
        self.grid = config.frame_size // 2 ** len(config.channels)
        self.tokens_per_obs = self.grid * self.grid
        widths = [3, *config.channels]
        encoder, decoder = [], []
        for c_in, c_out in zip(widths[:-1], widths[1:]):
            encoder += [nn.Conv2d(c_in, c_out, 4, stride=2, padding=1), nn.ReLU()]
            decoder = [nn.ReLU(), nn.ConvTranspose2d(c_out, c_in, 4, stride=2, padding=1)] + decoder
        d = len(config.levels)
        self.encoder = nn.Sequential(*encoder, nn.Conv2d(widths[-1], d, 1))
        self.decoder = nn.Sequential(nn.Conv2d(d, widths[-1], 1), *decoder)
        levels = torch.tensor(config.levels)
        self.vocab_size = int(levels.prod())
        self.register_buffer("levels", levels, persistent=False)
        self.register_buffer("background", torch.zeros(3, config.frame_size, config.frame_size))  # set by fit()
        # token = q_0 + L_0 * (q_1 + L_1 * q_2): mixed radix, digit i has weight L_0 * ... * L_{i-1}
        self.register_buffer("radix", torch.cumprod(torch.cat([levels.new_ones(1), levels[:-1]]), 0),
                             persistent=False)

    def preprocess(self, raw_obs) -> torch.Tensor:
        """uint8 frames (N, H, W, 3) of any size -> uint8 (N, 64, 64, 3)."""
        x = torch.as_tensor(raw_obs).permute(0, 3, 1, 2).float()  # (N, 3, H, W)
        size = (self.config.frame_size, self.config.frame_size)
        x = F.interpolate(x, size=size, mode="area")  # averages pixels: a small ball dims, never vanishes
        return x.round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1)

    @torch.no_grad()
    def fit(self, obs: torch.Tensor, max_frames: int = 1000):
        """Set the background to the per-pixel median of obs (N, 64, 64, 3) taken every N // max_frames
        frames (between max_frames and 2 * max_frames - 1 of them when N >= max_frames)."""
        sample = obs[:: max(1, len(obs) // max_frames)].float() / 255
        self.background.copy_(sample.median(0).values.permute(2, 0, 1))  # (3, 64, 64)

    def _digits(self, obs: torch.Tensor) -> torch.Tensor:
        """uint8 frames -> FSQ digits (N, K, d), floats holding integers 0 .. L - 1, with a
        straight-through gradient (rounding acts as the identity backwards)."""
        x = obs.permute(0, 3, 1, 2).float() / 255 - self.background  # (N, 3, 64, 64)
        z = self.encoder(x).flatten(2).transpose(1, 2)  # (N, d, 4, 4) -> (N, K, d)
        z = torch.sigmoid(z) * self.levels - 0.5  # digit i lives in (-0.5, L_i - 0.5)
        q = z.round().clamp(min=0).minimum(self.levels - 1)  # each of 0 .. L_i - 1 gets width 1
        return z + (q - z).detach()

    def _pixels(self, digits: torch.Tensor) -> torch.Tensor:
        z = digits / (self.levels - 1) * 2 - 1  # (N, K, d) in [-1, 1]
        z = z.transpose(1, 2).unflatten(2, (self.grid, self.grid))  # (N, d, 4, 4)
        return self.decoder(z) + self.background  # (N, 3, 64, 64), about [0, 1]

    @torch.no_grad()
    def encode(self, obs: torch.Tensor) -> torch.Tensor:
        return (self._digits(obs).round().long() * self.radix).sum(-1)  # (N, K)

    @torch.no_grad()
    def decode(self, tokens: torch.Tensor) -> torch.Tensor:
        digits = (tokens.unsqueeze(-1) // self.radix) % self.levels  # (N, K, d)
        x = self._pixels(digits.float())
        return (x.clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1)

    def allowed_tokens(self):
        return None  # every code may stand in every grid cell

    def compute_loss(self, batch: dict, step: int = 0) -> dict:
        """Mean squared reconstruction error of batch["frames"] (B, 64, 64, 3) uint8 through
        the quantiser (squared, not IRIS's L1: see the module docstring)."""
        frames = batch["frames"]
        target = frames.permute(0, 3, 1, 2).float() / 255
        recon = (self._pixels(self._digits(frames)) - target).pow(2).mean()
        return {"loss": recon, "recon": recon}
