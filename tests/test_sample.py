"""sample.py: reconstruct, interpolate and prior samples from a train_vae.py checkpoint, and
bad input (offline, CPU)."""

import json
import types

import pytest
import torch

import lm
import offload
import sample
import textdata
import train_vae
from common import UserError
from conftest import read_bytes, run_script_error
from vae import VAE

CONTEXT = 8


@pytest.fixture(scope="module")
def overfit(tmp_path_factory, text_file):
    """A tiny VAE trained on the same 4 spans of text_file until it reconstructs them:
    (its out-dir, the 4 texts). Training draws its windows with textdata.random_starts;
    here that returns the same 4 windows every time."""
    spans = []

    def the_same_four_windows(stream, length, batch_size, generator):
        if not spans:  # the first 4 windows of the stream without an end-of-text token
            spans.extend(s for s in range(0, len(stream) - length, length) if lm.ByteTokenizer.eos_id not in
                         stream[s:s + length])
            del spans[4:]
            texts.extend(lm.ByteTokenizer().decode(stream[s + CONTEXT:s + length].tolist()) for s in spans)
        return torch.tensor(spans)

    texts, out = [], str(tmp_path_factory.mktemp("runs") / "overfit")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(textdata, "random_starts", the_same_four_windows)
        train_vae.main(["--data", text_file, "--out-dir", out, "--context", str(CONTEXT), "--batch-size", "4",
                        "--latent-size", "16", "--lora-r", "4", "--max-iters", "120", "--ae-iters", "120",
                        "--eval-interval", "120", "--eval-batches", "1", "--lr", "3e-3", "--warmup-iters", "1",
                        "--log-interval", "120", "--device", "cpu"])
    torch.set_num_threads(threads)
    return out, texts


def decode(argv, capsys):
    """Run sample.py; (its JSON, the lines printed before it)."""
    sample.main(argv + ["--device", "cpu"])
    lines = capsys.readouterr().out.splitlines()
    return json.loads(lines[-1]), lines[:-1]


def test_reconstruct_returns_the_trained_texts(capsys, overfit):
    out, texts = overfit
    assert len(texts) == 4 and len(set(texts)) == 4
    result, printed = decode(["--resume", out, "--reconstruct", *texts], capsys)
    assert result == {"reconstructions": texts} and printed == texts


def test_interpolation_ends_at_the_two_texts(capsys, overfit):
    out, (a, b, *_) = overfit
    for mode in ("slerp", "lerp"):
        result, printed = decode(["--resume", out, "--interpolate", a, b, "--interp-steps", "4", "--interp-mode",
                                  mode], capsys)
        path = result["interpolation"]
        assert len(path) == 4 and path[0] == a and path[-1] == b and printed == path
    argv = ["--resume", out, "--interpolate", a, b, "--temperature", "5"]
    assert decode(argv, capsys)[0] != decode(argv + ["--seed", "1"], capsys)[0]  # sampled, not greedy


def test_prior_samples_are_random_and_seeded(capsys, overfit):
    out, _ = overfit
    argv = ["--resume", out, "--sample", "3", "--temperature", "1", "--num-tokens", "6"]
    first, _ = decode(argv, capsys)
    again, _ = decode(argv, capsys)
    other, _ = decode(argv + ["--seed", "1"], capsys)
    assert first == again and first != other  # the same seed draws the same, another seed others
    assert len(set(first["samples"])) == 3 and all(len(t) <= 6 for t in first["samples"])


def test_a_long_text_comes_back_in_chained_spans_and_is_cut_to_interpolate(capsys, monkeypatch, overfit):
    out, texts = overfit
    decoded, generate = [], VAE.generate
    monkeypatch.setattr(VAE, "generate", lambda self, z, n, prefix_ids=None, *a: decoded.append(
        (prefix_ids, generate(self, z, n, prefix_ids, *a))) or decoded[-1][1])
    sample.main(["--resume", out, "--reconstruct", texts[0] + texts[1], "--device", "cpu"])
    out_text, err = capsys.readouterr()
    assert err == ""  # no warning: nothing is cut
    result = json.loads(out_text.splitlines()[-1])
    assert result["reconstructions"][0].startswith(texts[0])  # the first span, decoded with no prefix, exactly
    (no_prefix, first), (prefix, second) = decoded  # two spans of CONTEXT tokens, chained
    assert no_prefix is None and torch.equal(prefix, first)  # the second decoded after the first's output
    monkeypatch.undo()
    sample.main(["--resume", out, "--interpolate", texts[0] + "x" * 613, texts[1], "--interp-steps", "2",
                 "--device", "cpu"])
    out_text, err = capsys.readouterr()
    assert err == f"warning: text 1 has 621 tokens; cut to the checkpoint's --context {CONTEXT}\n"
    assert json.loads(out_text.splitlines()[-1])["interpolation"] == texts[:2]  # the first 8 tokens: texts[0]


def test_a_cut_inside_a_character_still_fits_the_context(capsys):
    """Bytes: 8 of "abcdefgé" end inside é, which decodes to U+FFFD (3 bytes); the text given back fits."""
    vae = types.SimpleNamespace(tokenizer=lm.ByteTokenizer())
    assert sample.checked_texts(["abcdefg\u00e9"], vae, 8) == ["abcdefg"]
    assert "text 1 has 9 tokens; cut to the checkpoint's --context 8" in capsys.readouterr().err
    with pytest.raises(UserError, match="its first character takes more than the checkpoint's --context 1 tokens"):
        sample.checked_texts(["\u00e9t\u00e9"], vae, 1)  # é is 2 bytes: nothing of it fits


@pytest.mark.parametrize("flags, message", [
    (["--sample", "1", "--target", "x"], "--target only apply to --guide: add --guide"),
    (["--reconstruct", "a", "--router", "r", "--scale", "2"], "--router, --scale only apply to --guide"),
    (["--reconstruct", "a", "--num-tokens", "5"], "--num-tokens only apply to --sample"),
    (["--sample", "1", "--interp-steps", "3"], "--interp-steps only apply to --interpolate"),
    (["--sample", "1", "--refine-steps", "3"], "--refine-steps only apply to --reconstruct"),
    # z's memory slot, the CONTEXT prefix slots and the soft token come first: 512 - 10 positions, room for 503
    # tokens (the last one needs none)
    (["--sample", "1", "--num-tokens", "504"], "--num-tokens 504 goes past the base's last position: it has room "
                                               "for 503 tokens"),
    (["--sample", str(10**8)], "GiB is free: lower --sample (now 100000000)"),
    (["--interpolate", "a", "b", "--interp-steps", str(10**8)], "GiB is free: lower --interp-steps (now 100000000)"),
    (["--sample", "1", "--reconstruct", "a"], "not allowed with argument"),
    ([], "one of the arguments --reconstruct --interpolate --sample --guide is required"),
    (["--reconstruct", ""], "text 1 is empty"), (["--reconstruct", "a", " "], "text 2 is empty"),
    (["--interpolate", "", "a"], "text 1 is empty")])
def test_bad_input_is_one_line_and_never_trains(capsys, overfit, flags, message):
    out, _ = overfit
    before = read_bytes(f"{out}/ckpt.pt")
    assert message in run_script_error(sample.main, ["--resume", out, "--device", "cpu"] + flags, capsys)
    assert read_bytes(f"{out}/ckpt.pt") == before


def test_a_vae_too_big_to_load_names_no_batch_size(capsys, overfit, monkeypatch):
    """sample.py trains nothing and has no --batch-size: loading a VAE that does not fit says what
    can be lowered; tiny's base trained with the VAE, so no flag loads it smaller
    (tests/test_train_vae.py: a frozen base's flags)."""
    monkeypatch.setattr(offload, "free_memory", lambda device: 0)
    err = run_script_error(sample.main, ["--resume", overfit[0], "--device", "cpu", "--sample", "1"], capsys)
    assert err.endswith("GiB is free: lower what else uses the device's memory"), err


def test_prior_samples_decode_up_to_the_last_position(capsys, overfit, monkeypatch):
    """--num-tokens at its limit (the refused 504 less one) decodes that many tokens, the last at the
    base's last position; end-of-text does not stop the rows early here, so every position is used."""
    out, _ = overfit
    generate, shapes = VAE.generate, []

    def generate_to_the_end(self, z, num_tokens, **kwargs):
        ids = generate(self, z, num_tokens, **{**kwargs, "should_stop_at_eos": False})
        shapes.append(tuple(ids.shape))
        return ids

    monkeypatch.setattr(VAE, "generate", generate_to_the_end)
    decode(["--resume", out, "--sample", "1", "--num-tokens", "503"], capsys)
    assert shapes == [(1, 503)]
