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
