"""Shared test fixtures: small models saved with save_pretrained, so every test loads
them through the real `from_pretrained` path, offline."""

import json
import os
import random

os.environ["HF_HUB_OFFLINE"] = "1"  # before transformers is imported: tests never reach the hub, whatever is set
# GPT-2's BPE files for tiktoken: the copy beside the repository when there is one (as in CI), else
# tiktoken's own cache (it downloads them once, on a machine with network)
_CACHE = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "tiktoken_cache")
if os.path.isdir(_CACHE) and not os.environ.get("TIKTOKEN_CACHE_DIR"):  # an empty one would turn tiktoken's cache off
    os.environ["TIKTOKEN_CACHE_DIR"] = os.path.abspath(_CACHE)

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel, MistralConfig, MistralForCausalLM

import lm
from common import run_cli
from router import Router


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models run fastest on one thread, and on a busy machine two threads that wait
    for each other at every small op run ten times slower. Restored afterwards."""
    num_threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(num_threads)


def pytest_terminal_summary(terminalreporter, config):
    """pytest-randomly's seed, which -q leaves out of the header: a failure that depends on the
    test order repeats with it."""
    seed = getattr(config.option, "randomly_seed", None)  # None: the plugin is not installed or is off
    if seed is not None:
        terminalreporter.write_line(f"test order: --randomly-seed={seed} repeats it")


def run_script(main, argv, capsys):
    """Run a training script's main(argv): (its last stdout line as JSON, all its lines)."""
    main(argv)
    lines = capsys.readouterr().out.strip().splitlines()
    return json.loads(lines[-1]), lines


def run_script_error(main, argv, capsys):
    """Run main(argv) as the command line does; it must exit 2 with one `error: ...` line."""
    with pytest.raises(SystemExit) as exit_info:
        run_cli(lambda: main(argv))
    err = capsys.readouterr().err.strip()
    assert exit_info.value.code == 2 and err.startswith("error: ") and "\n" not in err, err
    return err


def tiny_gpt2():
    torch.manual_seed(0)
    config = GPT2Config(n_layer=2, n_head=2, n_embd=32, n_positions=64, vocab_size=257, bos_token_id=256,
                        eos_token_id=256)
    return GPT2LMHeadModel(config).eval()


def tiny_mistral():
    torch.manual_seed(0)
    config = MistralConfig(num_hidden_layers=2, hidden_size=32, intermediate_size=64, num_attention_heads=4,
                           num_key_value_heads=2, vocab_size=257, max_position_embeddings=64)
    return MistralForCausalLM(config).eval()


@pytest.fixture(scope="session", params=["gpt2", "mistral"])
def saved_model_dir(request, tmp_path_factory):
    """A directory holding a tiny GPT-2 or Mistral (byte vocabulary) saved with save_pretrained."""
    path = tmp_path_factory.mktemp(request.param)
    model = (tiny_gpt2 if request.param == "gpt2" else tiny_mistral)()
    lm.save_base(model, lm.ByteTokenizer(), path)
    return str(path)


def crash_at_step_2_then_resume(script, argv, out_dir, monkeypatch, capsys):
    """Run script.main(argv) into out_dir, kill it right after its step-2 checkpoint, then
    resume it from there to the end (the exact-resume tests compare it with a straight run)."""
    class Crash(Exception):
        pass

    save = script.save_checkpoint

    def save_then_crash_at_step_2(out_dir, state):
        save(out_dir, state)
        if state.get("step") == 2:
            raise Crash

    monkeypatch.setattr(script, "save_checkpoint", save_then_crash_at_step_2)
    with pytest.raises(Crash):
        script.main(argv + ["--out-dir", out_dir])
    monkeypatch.setattr(script, "save_checkpoint", save)  # only this patch: a test's own ones stay
    run_script(script.main, argv + ["--resume", out_dir], capsys)


@pytest.fixture(scope="session")
def text_file(tmp_path_factory):
    """A --data file for the text scripts: 40 made-up sentences, one per line."""
    rng = random.Random(0)
    words = "the a model reads writes each file line token span returns value list when if".split()
    path = tmp_path_factory.mktemp("data") / "text.txt"
    path.write_text("\n".join(" ".join(rng.choice(words) for _ in range(12)) + "." for _ in range(40)))
    return str(path)


@pytest.fixture
def guided_ids(monkeypatch):
    """The ids (B, num_spans * span_tokens) of each Router.generate call, in order: what sample.py
    --guide generated, before it turned them into text."""
    generate, calls = Router.generate, []

    def noted(self, *args, **kwargs):
        calls.append(generate(self, *args, **kwargs))
        return calls[-1]

    monkeypatch.setattr(Router, "generate", noted)
    return calls


def read_bytes(path):
    """A file's bytes, to show that a refused command left it as it was."""
    with open(path, "rb") as f:
        return f.read()


def assert_greedy(logits, tokens, tolerance=1e-4):
    """tokens (B, T) are the argmax of logits (B, T, V), up to a near-tie: logits computed in another
    order (a KV cache, another batch size) round differently, and a tie within rounding may go either way."""
    chosen = logits.gather(-1, tokens[..., None])[..., 0]  # (B, T)
    assert (logits.max(-1).values - chosen <= tolerance).all(), (logits.max(-1).values - chosen).max()
