"""
A pretrained causal LM as the world model's transformer: IRIS with an LM inside, built so
that the LM keeps what it learned and the world model stays causal.

worldmodel.py's WorldModel talks to its transformer through four things (see its
docstring): `width`, `has_positions`, `new_cache(batch_size, max_tokens)` and
`backbone(embeds (B, T, C), cache) -> hidden (B, T, C)`. LMBackbone gives a Hugging Face
causal LM (tiny, GPT-2, Mistral, a local directory: anything lm.load_base returns) that
interface:
- it is fed `inputs_embeds`, so the world model's embeddings stay differentiable and the
  LM's token lookup is bypassed;
- the dynamics pass stays **causal** (`forward` passes no attention mask, so the LM applies its
  own causal mask): a world model that sees the future while training copies it and then
  fails when imagining (`run` with a mask is the latent model's bidirectional encoder);
- imagination uses the LM's **real KV cache** (`past_key_values`, or `cache` in newer
  transformers), so each imagined token costs one token's forward pass, not a pass over
  the whole context;
- the heads read the LM's **last hidden state** (the transformer body's output, the LM
  head is never run): no vocabulary-wide logits to map back;
- the LM adds its own position information (GPT-2's learned table, Mistral's rotary), so
  the world model adds none;
- the LM is frozen and learns through a LoRA adapter named "dynamics" (lora.py); other
  adapters, e.g. the VAE's "encoder" and "decoder", may live in the same layers.

The world model's embedding tables then have the LM's width. They can be IRIS's own
tables, learned from scratch, or rows of the LM's own token-embedding table
(`lm_token_tables`), frozen or trained. `randomized` gives the control for "does
pretraining help": the same architecture with random weights.
wm_setup.lm_world_model builds all of this from the world model's settings (the LM backbone
group of train_wm.py's --help); experiments/compare_wm.py runs the comparison.
"""

import torch.nn as nn

import lora
import offload
from common import UserError
from lm import cache_kwarg, hidden_size
from vae_math import bidirectional_mask


class LMCache:
    """The LM's own KV cache with the `length` the world model reads (tokens held)."""

    def __init__(self):
        from transformers import DynamicCache  # not at the top: see lm.import_transformers

        self.past = DynamicCache()

    @property
    def length(self):
        return self.past.get_seq_length()


class LMBackbone(nn.Module):
    has_positions = True  # the LM adds its own (GPT-2's learned table, Mistral's rotary): no second one

    def __init__(self, lm, r=16, alpha=32, dropout=0.0, should_train_base=False):
        super().__init__()
        self.lm = lm
        self.width = hidden_size(lm)
        lora.add_adapter(lm, "dynamics", r=r, alpha=alpha, dropout=dropout)
        self.lora_layers = lora.lora_layers(lm)  # every target wrapped now; adapters added later with the default targets reuse them
        for name, p in lm.named_parameters():  # only the dynamics adapter (and the base, if asked) trains
            p.requires_grad = lora.is_lora_key(name, "dynamics") or (should_train_base and not lora.is_lora_key(name))
        for table in (lm.get_input_embeddings(), lm.get_output_embeddings()):  # never run: the world model
            table.requires_grad_(False)  # feeds inputs_embeds and reads the body (DDP needs every trained weight used)

    @property
    def body(self):  # the transformer without its LM head (GPT2Model, MistralModel, ...); not a second
        return self.lm.base_model  # registered module, so state_dict names each weight once

    def new_cache(self, batch_size, max_tokens):
        return LMCache()  # grows as needed; the world model rebuilds it when its context is full

    def run(self, adapter, embeds, cache=None, mask=None):
        """The body with one adapter on: embeds (B, T, C) -> hidden (B, T, C), in the LM's dtype inside.
        cache: an LMCache to extend; mask (B, T): bidirectional over those positions (None: causal)."""
        dtype = self.lm.get_input_embeddings().weight.dtype
        extra = {} if mask is None else {"attention_mask": bidirectional_mask(mask, dtype)}
        with lora.use_adapter(self.lm, adapter, self.lora_layers):
            out = self.body(inputs_embeds=embeds.to(dtype), use_cache=cache is not None, **extra,
                            **cache_kwarg(self.body, None if cache is None else cache.past))
        return out.last_hidden_state.to(embeds.dtype)

    def forward(self, embeds, cache=None):
        return self.run("dynamics", embeds, cache)  # (B, T, C)


def lm_token_tables(lm, obs_vocab_size, num_actions, should_train=False):
    """Observation and action tables made of rows of the LM's own token-embedding table:
    the last obs_vocab_size + num_actions rows of its vocabulary (in GPT-2 these are rare
    tokens, so no common word's meaning is borrowed). They are copies: training them
    (should_train) leaves the LM's table, which other adapters rely on, untouched; frozen,
    a copy computes exactly what a lookup in the LM's table would."""
    table = lm.get_input_embeddings().weight.detach().float()
    vocab_size, needed = table.shape[0], obs_vocab_size + num_actions
    if needed > vocab_size:
        raise UserError(f"the LM's vocabulary has {vocab_size} rows, fewer than the {obs_vocab_size} observation "
                        f"+ {num_actions} action tokens: use --embeddings iris, or fewer observation tokens "
                        "(--num-bins, for vectors; a Discrete env has a token per state)")
    rows = table[vocab_size - needed:]
    obs = nn.Embedding.from_pretrained(rows[:obs_vocab_size].clone(), freeze=not should_train)
    act = nn.Embedding.from_pretrained(rows[obs_vocab_size:].clone(), freeze=not should_train)
    return obs, act


def randomized(lm):
    """The same architecture with fresh weights from the model's own initialisation: the
    control that tells what pretraining adds (seed torch first for a repeatable draw)."""
    from transformers import AutoModelForCausalLM  # not at the top: see lm.import_transformers

    dtype, device = lm.get_input_embeddings().weight.dtype, lm.get_input_embeddings().weight.device
    return AutoModelForCausalLM.from_config(lm.config, dtype=dtype).to(device).eval()


def first_layers(lm, num_layers):
    """The LM cut to its first num_layers transformer layers, in place; the final norm stays, so the
    body's output is the norm of what the full LM's layer num_layers gives. A CPU-sized pretrained
    transformer: its lower layers with everything they learned, not a smaller model trained apart.
    (wm_setup.check_model_flags has checked num_layers against the LM's config.)"""
    del offload.decoder_layers(lm)[num_layers:]
    # the config follows, so that --lm-init random draws the cut shape and offload.py finds the layers
    lm.config.num_hidden_layers = num_layers
    return lm
