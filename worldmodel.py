"""The IRIS world model: a transformer over observation and action tokens.

Follows IRIS ("Transformers are Sample-Efficient World Models", Micheli et al. 2023,
github.com/eloialonso/iris, src/models/world_model.py, transformer.py, slicer.py,
envs/world_model_env.py) and minGPT (Karpathy) for the transformer.

An observation is K tokens (obs_tokenizer.py makes them); a step is a block of K + 1
tokens, the observation then the action. A training segment of L steps is L blocks:

    position in block:  0    1   ...  K-1   K
    token:             o_1  o_2  ...  o_K   a        (o = obs token, a = action)
    obs head reads:     x    x   ...   .    x   -> next token: o_2 ... o_K, then the
                                                   next step's o_1 (from the action)
    reward head reads:  .    .   ...   .    x   -> sign(reward) + 1 (3 classes)
    end head reads:     .    .   ...   .    x   -> episode ended (2 classes)

Block masks say which positions of a block belong to what: the observation and action
masks partition the block and pick the embedding table of each position (Embedder);
each head has its own mask and reads the hidden states at those positions only (Head).
Both work on a window of tokens that starts after `prev_tokens` tokens already in the
KV cache (Slicer), which is how one token at a time goes through the same code as a
whole segment. A learned absolute position embedding is added at prev_tokens + t.

The transformer sits behind a small interface, so another (a pretrained LM, fed
`inputs_embeds`) can replace it without touching embedder, slicer or heads:
    backbone.width                             C, the width it reads and writes
    backbone(embeds (B, T, C), cache) -> hidden (B, T, C), causal; cache may be None
    backbone.new_cache(batch_size, max_tokens) -> cache with .length (tokens held)
    backbone.has_positions                     True if it adds its own position information
                                               (a pretrained LM does; IRIS's learned one is then left out)
Transformer below is IRIS's (minGPT, pre-LayerNorm, causal, preallocated KV cache).
lm_backbone.py is the other one, and can also supply the embedding tables.

Initialisation is IRIS's (`init_weights`, src/utils.py there): normal(0, 0.02) Linear and
Embedding weights, zero biases, LayerNorms at weight 1 and bias 0, without minGPT's smaller
init of the residual projections. IRIS applies it to its whole world model; here it is
applied to what this file creates (its transformer, its own tables, the position table, the
heads), so a pretrained LM and tables made of its rows keep their weights.

WorldModelEnv imagines with a trained world model behind the real environment's
interface: reset(obs) and step(action) -> (obs, reward, terminated, truncated, info).
"""

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F


# ----------------------------------------------------------------------------- transformer

def init_weights(module):
    """IRIS's initialisation of one module (use with module.apply)."""
    if isinstance(module, (nn.Linear, nn.Embedding)):
        nn.init.normal_(module.weight, mean=0.0, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.LayerNorm):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)


@dataclass
class TransformerConfig:
    width: int = 256  # C: embedding width (IRIS: 256)
    num_layers: int = 10  # (IRIS: 10)
    num_heads: int = 4  # (IRIS: 4)
    dropout: float = 0.1  # on embeddings, attention and residuals (IRIS: 0.1)


class KVCache:
    """Keys and values of every layer, preallocated for max_tokens; `length` are filled."""

    def __init__(self, num_layers, batch_size, num_heads, max_tokens, head_dim, device, dtype):
        shape = (num_layers, batch_size, num_heads, max_tokens, head_dim)
        self.keys = torch.zeros(shape, device=device, dtype=dtype)
        self.values = torch.zeros(shape, device=device, dtype=dtype)
        self.length = 0  # advanced by the transformer once all layers have written

    def write(self, layer: int, k: torch.Tensor, v: torch.Tensor):
        """Store k, v (B, H, T, D) after the cached tokens; return all keys and values so far."""
        end = self.length + k.shape[2]
        if end > self.keys.shape[3]:
            raise ValueError(f"KV cache full: {end} tokens > {self.keys.shape[3]}; rebuild it")
        self.keys[layer, :, :, self.length:end] = k
        self.values[layer, :, :, self.length:end] = v
        return self.keys[layer, :, :, :end], self.values[layer, :, :, :end]


class SelfAttention(nn.Module):
    def __init__(self, config: TransformerConfig):
        super().__init__()
        self.num_heads = config.num_heads
        self.dropout = config.dropout
        self.qkv = nn.Linear(config.width, 3 * config.width)
        self.proj = nn.Linear(config.width, config.width)
        self.resid_dropout = nn.Dropout(config.dropout)

    def forward(self, x, cache: KVCache | None, layer: int):
        B, T, C = x.shape
        q, k, v = self.qkv(x).split(C, dim=2)
        q, k, v = (t.view(B, T, self.num_heads, C // self.num_heads).transpose(1, 2)
                   for t in (q, k, v))  # (B, H, T, D) each
        prev = 0
        if cache is not None:
            prev = cache.length
            k, v = cache.write(layer, k, v)  # (B, H, prev + T, D)
        # causal: the query at absolute position prev + i sees keys 0 .. prev + i
        mask = torch.ones(T, prev + T, dtype=torch.bool, device=x.device).tril(diagonal=prev)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask,
                                           dropout_p=self.dropout if self.training else 0.0)
        y = y.transpose(1, 2).reshape(B, T, C)  # (B, H, T, D) -> (B, T, C)
        return self.resid_dropout(self.proj(y))


class Block(nn.Module):
    def __init__(self, config: TransformerConfig):
        super().__init__()
        self.ln1 = nn.LayerNorm(config.width)
        self.attn = SelfAttention(config)
        self.ln2 = nn.LayerNorm(config.width)
        self.mlp = nn.Sequential(nn.Linear(config.width, 4 * config.width), nn.GELU(),
                                 nn.Linear(4 * config.width, config.width),
                                 nn.Dropout(config.dropout))

    def forward(self, x, cache, layer):
        x = x + self.attn(self.ln1(x), cache, layer)
        return x + self.mlp(self.ln2(x))


class Transformer(nn.Module):
    """IRIS's backbone: minGPT, pre-LN, causal; hidden states in, hidden states out."""

    has_positions = False  # the world model adds IRIS's learned position embedding

    def __init__(self, config: TransformerConfig):
        super().__init__()
        self.config = config
        self.width = config.width
        self.drop = nn.Dropout(config.dropout)
        self.blocks = nn.ModuleList(Block(config) for _ in range(config.num_layers))
        self.ln_f = nn.LayerNorm(config.width)
        self.apply(init_weights)

    def new_cache(self, batch_size: int, max_tokens: int) -> KVCache:
        p = self.ln_f.weight
        return KVCache(self.config.num_layers, batch_size, self.config.num_heads, max_tokens,
                       self.width // self.config.num_heads, p.device, p.dtype)

    def forward(self, embeds: torch.Tensor, cache: KVCache | None = None) -> torch.Tensor:
        x = self.drop(embeds)  # (B, T, C)
        for layer, block in enumerate(self.blocks):
            x = block(x, cache, layer)
        if cache is not None:
            cache.length += embeds.shape[1]
        return self.ln_f(x)


# ----------------------------------------------------------------------------- embedder, slicer, heads

class Slicer(nn.Module):
    """The positions of one block mask inside a window of tokens."""

    def __init__(self, block_mask: torch.Tensor):
        super().__init__()
        self.register_buffer("block_mask", block_mask.bool(), persistent=False)

    def positions(self, num_tokens: int, prev_tokens: int = 0) -> torch.Tensor:
        """Indices into a window of num_tokens that starts at absolute position prev_tokens."""
        absolute = torch.arange(prev_tokens, prev_tokens + num_tokens, device=self.block_mask.device)
        return absolute[self.block_mask[absolute % len(self.block_mask)]] - prev_tokens


class Embedder(nn.Module):
    """Embeds each position with the table its block mask picks."""

    def __init__(self, block_masks: list[torch.Tensor], tables: list[nn.Embedding]):
        super().__init__()
        if not torch.equal(torch.stack(block_masks).sum(0), torch.ones_like(block_masks[0])):
            raise ValueError("embedder block masks must partition the block")
        self.slicers = nn.ModuleList(Slicer(m) for m in block_masks)
        self.tables = nn.ModuleList(tables)

    def forward(self, tokens: torch.Tensor, prev_tokens: int = 0) -> torch.Tensor:
        B, T = tokens.shape
        x = torch.zeros(B, T, self.tables[0].embedding_dim, device=tokens.device,
                        dtype=self.tables[0].weight.dtype)
        for slicer, table in zip(self.slicers, self.tables):
            s = slicer.positions(T, prev_tokens)
            x[:, s] = table(tokens[:, s])  # (B, T_s, C)
        return x  # (B, T, C)


class Head(nn.Module):
    """Linear-ReLU-Linear on the hidden states at one block mask's positions only."""

    def __init__(self, block_mask: torch.Tensor, width: int, num_outputs: int):
        super().__init__()
        self.slicer = Slicer(block_mask)
        self.mlp = nn.Sequential(nn.Linear(width, width), nn.ReLU(), nn.Linear(width, num_outputs))

    def forward(self, hidden: torch.Tensor, prev_tokens: int = 0) -> torch.Tensor:
        return self.mlp(hidden[:, self.slicer.positions(hidden.shape[1], prev_tokens)])


# ----------------------------------------------------------------------------- world model

@dataclass
class WorldModelConfig:
    tokens_per_obs: int = 16  # K: tokens per observation (IRIS: 4x4 = 16)
    obs_vocab_size: int = 512  # observation token vocabulary (IRIS: 512)
    num_actions: int = 6  # action vocabulary: the size of the env's Discrete action space
    max_steps: int = 20  # steps per training segment, and the context length in steps (IRIS: 20)

    @property
    def block_size(self) -> int:
        return self.tokens_per_obs + 1

    @property
    def max_tokens(self) -> int:
        return self.max_steps * self.block_size


def interleave(obs_tokens: torch.Tensor, actions: torch.Tensor) -> torch.Tensor:
    """obs tokens (B, L, K) and actions (B, L) -> one token row (B, L * (K + 1))."""
    return torch.cat([obs_tokens, actions.unsqueeze(-1)], dim=2).flatten(1)


def compute_labels(obs_tokens, rewards, ends, mask_padding):
    """IRIS's labels: padded steps -> -100; obs tokens flattened over time and shifted by
    one (the first token has no predictor); reward -> sign + 1 in {0, 1, 2}."""
    padding = ~mask_padding  # (B, L)
    obs = obs_tokens.masked_fill(padding.unsqueeze(-1), -100).flatten(1)[:, 1:]  # (B, L*K - 1)
    reward = (rewards.sign() + 1).long().masked_fill(padding, -100)  # (B, L)
    end = ends.long().masked_fill(padding, -100)  # (B, L)
    return {"obs": obs, "reward": reward, "end": end}


def mean_cross_entropy(logits, labels):
    """Cross-entropy (N, classes), (N,) averaged over the labels that are not -100; 0, not NaN, where none
    is (one token per observation: a segment that starts on its episode's last step has no obs label)."""
    total = F.cross_entropy(logits, labels, ignore_index=-100, reduction="sum")
    return total / (labels != -100).sum().clamp(min=1)


class WorldModel(nn.Module):
    """tables: (observation table, action table) of the backbone's width; by default IRIS's,
    learned from scratch (lm_backbone.lm_token_tables gives rows of an LM's own table, which
    keep their values). The backbone comes initialised (Transformer) or pretrained."""

    def __init__(self, config: WorldModelConfig, backbone: nn.Module, tables=None):
        super().__init__()
        self.config = config
        K, C = config.tokens_per_obs, backbone.width
        obs_mask = torch.tensor([1] * K + [0])
        act_mask = torch.tensor([0] * K + [1])
        all_but_last_obs_mask = torch.tensor([1] * (K - 1) + [0, 1])
        new = []  # the modules made here, which get IRIS's initialisation
        if tables is None:
            tables = (nn.Embedding(config.obs_vocab_size, C), nn.Embedding(config.num_actions, C))
            new += tables
        self.embedder = Embedder([obs_mask, act_mask], list(tables))
        self.pos_emb = None if backbone.has_positions else nn.Embedding(config.max_tokens, C)
        self.backbone = backbone
        self.heads = nn.ModuleDict({
            "obs": Head(all_but_last_obs_mask, C, config.obs_vocab_size),
            "reward": Head(act_mask, C, 3),
            "end": Head(act_mask, C, 2),
        })
        new += [self.heads] + ([self.pos_emb] if self.pos_emb is not None else [])
        for module in new:
            module.apply(init_weights)

    def forward(self, tokens: torch.Tensor, cache=None, keep_last: int | None = None) -> dict:
        """tokens (B, T) that follow the cache's content -> logits of each head at its
        positions in this window: {"obs": (B, T_obs, V), "reward": (B, T_a, 3), "end": (B, T_a, 2)}.
        keep_last=n: the heads read the window's last n positions only (imagining without a cache)."""
        prev = 0 if cache is None else cache.length
        T = tokens.shape[1]
        if prev + T > self.config.max_tokens:
            raise ValueError(f"{prev + T} tokens > max_tokens {self.config.max_tokens}")
        x = self.embedder(tokens, prev)  # (B, T, C)
        if self.pos_emb is not None:
            x = x + self.pos_emb(torch.arange(prev, prev + T, device=tokens.device))
        hidden = self.backbone(x, cache)  # (B, T, C)
        if keep_last is not None:
            hidden, prev = hidden[:, T - keep_last:], prev + T - keep_last
        return {name: head(hidden, prev) for name, head in self.heads.items()}

    def logits_and_labels(self, batch: dict) -> dict:
        """name -> (logits (N, classes), labels (N,)) over a batch of segments:
        obs_tokens (B, L, K), actions (B, L), rewards (B, L), ends (B, L), mask_padding (B, L)."""
        logits = self(interleave(batch["obs_tokens"], batch["actions"]))
        labels = compute_labels(batch["obs_tokens"], batch["rewards"], batch["ends"],
                                batch["mask_padding"])
        logits["obs"] = logits["obs"][:, :-1]  # the last step's action predicts an unseen frame
        return {name: (logits[name].flatten(0, 1), labels[name].flatten()) for name in logits}

    def compute_loss(self, batch: dict, step: int = 0) -> dict:
        """The three cross-entropies and their sum (IRIS weighs them equally)."""
        terms = {name: mean_cross_entropy(logits, labels)
                 for name, (logits, labels) in self.logits_and_labels(batch).items()}
        return {"loss": sum(terms.values()), **terms}


# ----------------------------------------------------------------------------- imagination

class WorldModelEnv:
    """Imagined environment, batched like a Gymnasium vector env; torch tensors throughout.

    reset(obs (B, *obs_shape)) -> (obs, info)       obs as the tokenizer decodes it
    step(action (B,)) -> (obs (B, *obs_shape), reward float (B,) in {-1, 0, 1},
                          terminated bool (B,), truncated bool (B,) always False
                          (imagination has no time limit), info {"obs_tokens": (B, K)})
    A step runs K + 1 single-token passes as IRIS does: the action (reward and end are
    sampled there, with the first obs token), then each sampled obs token in turn.
    When the context is full it is cut to its last `keep_steps` steps (default: half the
    context, at most max_steps - 2) and the cache is rebuilt from them (IRIS keeps only the current observation; more context keeps
    motion that one frame cannot show). should_use_cache=False recomputes the whole
    context for every token instead, which gives the same logits, slowly (for bench.py).
    """

    def __init__(self, world_model: WorldModel, tokenizer, should_use_cache: bool = True,
                 temperature: float = 1.0, keep_steps: int | None = None, generator=None):
        self.world_model, self.tokenizer = world_model, tokenizer
        self.should_use_cache = should_use_cache
        self.temperature = temperature  # softmax temperature of every sample (IRIS: 1)
        max_steps = world_model.config.max_steps
        self.keep_steps = min(max_steps // 2, max_steps - 2) if keep_steps is None else keep_steps
        if not 0 <= self.keep_steps <= max_steps - 2:  # kept steps + the current obs + one new step must fit
            raise ValueError(f"keep_steps {self.keep_steps} must be from 0 to max_steps - 2 = {max_steps - 2}")
        self.generator = generator
        self.allowed = tokenizer.allowed_tokens()  # (K, V) bool or None

    def _sample(self, logits: torch.Tensor, allowed: torch.Tensor | None = None) -> torch.Tensor:
        """A sample of each row of logits (B, classes) at the temperature; allowed (classes,): only those.
        On the CPU torch.multinomial races exponential draws: a mask changes only the draws it forbids."""
        if allowed is not None:
            logits = logits.masked_fill(~allowed, float("-inf"))
        probs = F.softmax(logits / self.temperature, dim=-1)  # (B, classes)
        return torch.multinomial(probs, 1, generator=self.generator).squeeze(1)  # (B,)

    def _sample_obs(self, logits: torch.Tensor, k: int) -> torch.Tensor:
        """Observation token k from the obs head's logits (B, V): one the tokenizer allows there."""
        return self._sample(logits, None if self.allowed is None else self.allowed[k])

    def _feed(self, tokens: torch.Tensor) -> dict:
        """Append tokens (B, T) to the context; logits of the last position's heads."""
        self.context = torch.cat([self.context, tokens], dim=1)
        if self.should_use_cache:
            out = self.world_model(tokens, self.cache)
        else:
            out = self.world_model(self.context, keep_last=tokens.shape[1])
        return {name: logits[:, -1] for name, logits in out.items() if logits.shape[1] > 0}

    @torch.no_grad()
    def reset(self, obs: torch.Tensor):
        obs_tokens = self.tokenizer.encode(obs)  # (B, K)
        self._rebuild(obs_tokens)
        return self.tokenizer.decode(obs_tokens), {"obs_tokens": obs_tokens}

    def _rebuild(self, tokens: torch.Tensor):
        self.context = tokens[:, :0]
        if self.should_use_cache:
            self.cache = self.world_model.backbone.new_cache(len(tokens), self.world_model.config.max_tokens)
        self._feed(tokens)

    @torch.no_grad()
    def step(self, action):
        config = self.world_model.config
        K = config.tokens_per_obs
        if self.context.shape[1] + K + 1 > config.max_tokens:
            self._rebuild(self.context[:, -(self.keep_steps * config.block_size + K):])
        action = torch.as_tensor(action, device=self.context.device).long()
        out = self._feed(action.unsqueeze(1))
        reward = self._sample(out["reward"]).float() - 1
        terminated = self._sample(out["end"]).bool()
        obs_tokens = []
        for k in range(K):
            obs_tokens.append(self._sample_obs(out["obs"], k))
            out = self._feed(obs_tokens[-1].unsqueeze(1))  # the last one only fills the cache
        obs_tokens = torch.stack(obs_tokens, dim=1)  # (B, K)
        truncated = torch.zeros_like(terminated)
        return self.tokenizer.decode(obs_tokens), reward, terminated, truncated, {"obs_tokens": obs_tokens}
