"""train_vae.py, sample.py, pretrain_lm.py and textdata.py: data, training, checkpoints, using
a checkpoint, torchrun, and bad input (offline, CPU)."""

import json
import os
import random
import subprocess
import sys

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel

import lm
import pretrain_lm
import sample
import textdata
import train_vae
import trainer
from conftest import crash_at_step_2_then_resume, run_script, run_script_error, tiny_gpt2

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMALL = ["--context", "8", "--batch-size", "4", "--eval-batches", "2", "--latent-size", "16", "--lora-r", "4",
         "--log-interval", "1", "--warmup-iters", "1", "--device", "cpu"]
KEYS = ("val_ce", "val_acc", "val_ce_shuffled", "val_acc_shuffled", "val_exact", "val_kl", "val_active_units",
        "val_latent_rms")


@pytest.fixture(scope="module")
def text_file(tmp_path_factory):
    """40 made-up sentences, one per line."""
    rng = random.Random(0)
    words = "the a model reads writes each file line token span returns value list when if".split()
    path = tmp_path_factory.mktemp("data") / "text.txt"
    path.write_text("\n".join(" ".join(rng.choice(words) for _ in range(12)) + "." for _ in range(40)))
    return str(path)


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory):
    """A small GPT-2 saved with save_pretrained: loads as a pretrained (frozen) base."""
    path = tmp_path_factory.mktemp("base")
    lm.save_base(tiny_gpt2(), lm.ByteTokenizer(), path)
    return str(path)


@pytest.fixture(scope="module")
def trained(tmp_path_factory, text_file, base_dir):
    """The out-dir of a 4-step VAE run on the frozen small base."""
    out = str(tmp_path_factory.mktemp("runs") / "vae")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    train_vae.main(SMALL + ["--model", base_dir, "--data", text_file, "--out-dir", out, "--max-iters", "4",
                            "--eval-interval", "2"])
    torch.set_num_threads(threads)
    return out


def run_main(argv, capsys):
    return run_script(train_vae.main, argv, capsys)


def run_error(main, argv, capsys):
    return run_script_error(main, argv, capsys)


def test_documents_split_and_default_corpus(tmp_path):
    lines, paragraphs = tmp_path / "lines.txt", tmp_path / "paragraphs.txt"
    lines.write_text("one\ntwo\n\n")
    paragraphs.write_text("a b\nc\n\nd e\n \nf")
    assert textdata.read_documents(str(lines)) == ["one", "two"]
    assert textdata.read_documents(str(paragraphs)) == ["a b\nc", "d e", "f"]
    docs = [f"document {i}" for i in range(20)]
    train, val = textdata.split_streams(docs, lm.ByteTokenizer(), 8, "test")
    assert bytes(val[val != 256].tolist()).decode() == "document 9document 19"  # every 10th, held out
    assert len(train) + len(val) == sum(len(d) + 1 for d in docs)
    corpus = textdata.stdlib_docstrings()
    assert len(corpus) > 2000 and len("".join(corpus)) > 500_000 and len(set(corpus)) == len(corpus)


def test_batches_cut_windows_and_drop_the_prefix():
    stream = torch.arange(100)
    batch = textdata.vae_batch(stream, torch.tensor([0, 10]), 4, True)
    assert batch["prefix_ids"].tolist() == [[0, 1, 2, 3], [10, 11, 12, 13]]
    assert batch["input_ids"].tolist() == batch["target_ids"].tolist() == [[4, 5, 6, 7], [14, 15, 16, 17]]
    assert "prefix_ids" not in textdata.vae_batch(stream, torch.tensor([0]), 4, False)
    starts = textdata.spread_starts(stream, 8, 2, 3)
    assert starts.shape == (2, 3) and starts.min() == 0 and starts.max() == 92  # the last window ends the stream


def test_train_and_eval_only_on_a_frozen_base(tmp_path, capsys, text_file, base_dir):
    out = str(tmp_path / "run")
    argv = SMALL + ["--model", base_dir, "--data", text_file]
    metrics, lines = run_main(argv + ["--out-dir", out, "--max-iters", "4", "--eval-interval", "2"], capsys)
    assert any(line.startswith("step 4/4 |") and "rec " in line and "kl " in line and "tok/s" in line
               and "eta" in line for line in lines)
    assert any(line.startswith("  original: ") for line in lines)
    for key in KEYS + ("train_loss", "train_rec", "train_kl", "minutes", "steps"):
        assert key in metrics, key
    state = torch.load(os.path.join(out, "ckpt.pt"), weights_only=True)
    base_keys = [k for k in state["model"] if k.startswith("base.") and ".lora_" not in k]
    assert state["kind"] == "vae" and state["step"] == 4 and not base_keys  # only adapters + head, not the base
    assert any(".lora_A.encoder." in k for k in state["model"]) and "head.w_e.weight" in state["model"]
    # --eval-only takes every model setting from the checkpoint: no --latent-size, --context, ... given
    again, _ = run_main(["--eval-only", "--resume", out, "--data", text_file, "--device", "cpu", "--batch-size", "4",
                         "--eval-batches", "2"], capsys)
    assert set(KEYS) <= set(again) and again["step"] == 4
    for key in ("val_ce", "val_acc", "val_kl"):  # the checkpoint round trip gives the same numbers
        assert again[key] == pytest.approx(metrics[key], abs=1e-5), key


def test_resume_is_exact(tmp_path, capsys, monkeypatch, text_file, base_dir):
    straight, crashed = str(tmp_path / "straight"), str(tmp_path / "crashed")
    argv = SMALL + ["--model", base_dir, "--data", text_file, "--max-iters", "4", "--eval-interval", "2",
                    "--ae-iters", "1"]  # noise and KL on from step 1, so the random state matters
    run_main(argv + ["--out-dir", straight], capsys)

    crash_at_step_2_then_resume(train_vae, argv, crashed, monkeypatch, capsys)
    a = torch.load(os.path.join(straight, "ckpt.pt"), weights_only=True)
    b = torch.load(os.path.join(crashed, "ckpt.pt"), weights_only=True)
    assert a["step"] == b["step"] == 4
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k


def test_pretrain_lm_saves_a_base_the_vae_loads_frozen(tmp_path, capsys, text_file):
    lm_dir, vae_dir = str(tmp_path / "lm"), str(tmp_path / "vae")
    metrics, _ = run_script(pretrain_lm.main, ["--data", text_file, "--out-dir", lm_dir, "--max-iters", "2",
                                               "--eval-interval", "2", "--batch-size", "4", "--block-size", "16",
                                               "--eval-batches", "2", "--device", "cpu"], capsys)
    assert {"val_ce", "val_acc", "train_loss"} <= set(metrics)
    base, tokenizer = lm.load_base(os.path.join(lm_dir, "base"))
    assert isinstance(tokenizer, lm.ByteTokenizer) and base.config.n_layer == lm.TINY_CONFIG["n_layer"]
    state = torch.load(os.path.join(lm_dir, "ckpt.pt"), weights_only=True)
    torch.testing.assert_close(base.transformer.wte.weight, state["model"]["base.transformer.wte.weight"])
    assert sorted(os.listdir(lm_dir)) == ["base", "ckpt.pt"]  # no base.tmp / base.old left behind
    run_main(SMALL + ["--model", os.path.join(lm_dir, "base"), "--data", text_file, "--out-dir", vae_dir,
                      "--max-iters", "1", "--eval-interval", "1"], capsys)
    state = torch.load(os.path.join(vae_dir, "ckpt.pt"), weights_only=True)
    assert not [k for k in state["model"] if k.startswith("base.") and ".lora_" not in k]


def test_tiny_trains_its_base_by_default(tmp_path, capsys, text_file):
    out = str(tmp_path / "tiny")
    run_main(SMALL + ["--data", text_file, "--out-dir", out, "--max-iters", "1", "--eval-interval", "1"], capsys)
    state = torch.load(os.path.join(out, "ckpt.pt"), weights_only=True)
    torch.manual_seed(1337)  # the run's --seed: the same initial base
    initial = lm.load_base("tiny")[0].transformer.wte.weight
    assert initial.shape == state["model"]["base.transformer.wte.weight"].shape
    assert not torch.equal(initial, state["model"]["base.transformer.wte.weight"])  # trained and saved


def test_grad_checkpoint_keeps_z_memory_and_the_numbers(tmp_path, capsys, text_file, base_dir):
    argv = SMALL + ["--model", base_dir, "--data", text_file, "--max-iters", "2", "--eval-interval", "2"]
    plain, _ = run_main(argv + ["--out-dir", str(tmp_path / "plain")], capsys)
    checkpointed, _ = run_main(argv + ["--out-dir", str(tmp_path / "ckpt"), "--grad-checkpoint"], capsys)
    for key in ("train_loss", "val_ce", "val_ce_shuffled"):
        assert checkpointed[key] == pytest.approx(plain[key], rel=1e-5), key


def test_a_gpt2_shaped_model_with_tiktoken_end_to_end(tmp_path, capsys):
    """GPT-2's 50257-row vocabulary through tiktoken (offline cache), from a save_pretrained directory."""
    torch.manual_seed(0)
    config = GPT2Config(n_layer=1, n_head=2, n_embd=16, n_positions=64)  # vocab_size 50257, GPT-2's
    GPT2LMHeadModel(config).save_pretrained(tmp_path / "gpt2")
    data = tmp_path / "text.txt"
    data.write_text("\n".join(f"Sentence number {i} is about the weather in town {i % 7}." for i in range(30)))
    out = str(tmp_path / "vae")
    argv = SMALL + ["--model", str(tmp_path / "gpt2"), "--data", str(data)]
    metrics, _ = run_main(argv + ["--out-dir", out, "--max-iters", "2", "--eval-interval", "2"], capsys)
    assert metrics["steps"] == 2 and 0.0 <= metrics["val_acc"] <= 1.0
    result, _ = run_script(sample.main, ["--resume", out, "--reconstruct", "Hello world", "--device", "cpu"], capsys)
    (text,) = result["reconstructions"]
    ids = lm.TiktokenTokenizer().encode(text)
    assert lm.TiktokenTokenizer().decode(ids) == text and len(ids) <= 2  # "Hello world" is 2 GPT-2 tokens


def test_sample_modes_decode_from_the_checkpoint(tmp_path, capsys, text_file):
    out = str(tmp_path / "overfit")
    run_main(["--data", text_file, "--out-dir", out, "--context", "16", "--batch-size", "16", "--latent-size", "32",
              "--max-iters", "150", "--eval-interval", "150", "--eval-batches", "1", "--ae-iters", "150",
              "--lr", "3e-3", "--device", "cpu", "--log-interval", "150"], capsys)
    texts = ["the model reads.", "a list when if"]
    result, lines = run_script(sample.main, ["--resume", out, "--reconstruct", *texts, "--device", "cpu"], capsys)
    recon = result["reconstructions"]
    assert lines[:2] == recon and len(recon) == 2 and recon[0] != recon[1]  # one text per input, z tells them apart
    result, _ = run_script(sample.main, ["--resume", out, "--interpolate", *texts, "--interp-steps", "3",
                                         "--device", "cpu"], capsys)
    path = result["interpolation"]
    assert len(path) == 3 and path[0] == recon[0] and path[-1] == recon[1]  # the ends are the texts' own latents
    first, _ = run_script(sample.main, ["--resume", out, "--sample", "3", "--temperature", "1", "--device", "cpu"],
                          capsys)
    again, _ = run_script(sample.main, ["--resume", out, "--sample", "3", "--temperature", "1", "--device", "cpu"],
                          capsys)
    assert first == again and len(set(first["samples"])) == 3  # seeded: repeatable; random: all different


def test_torchrun_two_processes_equal_one_with_gradient_accumulation(tmp_path, text_file, base_dir):
    """DDP: 2 processes x batch 4 make the very updates of 1 process with --grad-accum 2."""
    argv = SMALL + ["--model", base_dir, "--data", text_file, "--max-iters", "2", "--eval-interval", "2",
                    "--ae-iters", "0"]  # noise on from the first step: both ranks must draw what one process draws
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    ddp, single = str(tmp_path / "ddp"), str(tmp_path / "single")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={29500 + os.getpid() % 400}",
           os.path.join(ROOT, "train_vae.py")] + argv + ["--out-dir", ddp]
    done = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "2 process(es)" in done.stdout and done.stdout.count("step 2/2 |") == 1  # rank 0 logs alone
    train_vae.main(argv + ["--out-dir", single, "--grad-accum", "2"])
    a, b = (torch.load(os.path.join(d, "ckpt.pt"), weights_only=True)["model"] for d in (ddp, single))
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-6, msg=k)


# ----------------------------------------------------------------------------- bad input


@pytest.mark.parametrize("flags", [["--batch-size", "0"], ["--batch-size", "-3"], ["--context", "0"],
                                   ["--lora-r", "0"], ["--eval-batches", "0"], ["--eval-interval", "0"],
                                   ["--log-interval", "0"], ["--max-iters", "-5"], ["--latent-size", "0"],
                                   ["--grad-accum", "0"], ["--prefix-drop", "1.5"], ["--kl-max", "-1"],
                                   ["--free-bits", "-0.1"], ["--lr", "nan"], ["--posterior", "gaussian"]])
def test_flags_out_of_range_are_refused_at_parse_time(tmp_path, capsys, flags):
    run_error(train_vae.main, ["--out-dir", str(tmp_path / "x")] + flags, capsys)
    assert not os.path.exists(tmp_path / "x")  # refused before anything was made


@pytest.mark.parametrize("flags, message", [
    (["--sample", "0"], "--sample: 0 is out of range"), (["--sample", "-1"], "--sample: -1 is out of range"),
    (["--interpolate", "a", "b", "--interp-steps", "1"], "--interp-steps: 1 is out of range"),
    (["--sample", "2", "--temperature", "-1"], "--temperature: -1 is out of range"),
    (["--sample", "1", "--reconstruct", "a"], "not allowed with argument"),
    (["--reconstruct", ""], "text 1 is empty"), (["--interpolate", "", "a"], "text 1 is empty")])
def test_sample_refuses_bad_input_and_never_trains(tmp_path, capsys, trained, flags, message):
    before = open(os.path.join(trained, "ckpt.pt"), "rb").read()
    assert message in run_error(sample.main, ["--resume", trained, "--device", "cpu"] + flags, capsys)
    assert open(os.path.join(trained, "ckpt.pt"), "rb").read() == before


def test_sample_cuts_a_text_longer_than_the_context(capsys, trained):
    sample.main(["--resume", trained, "--device", "cpu", "--reconstruct", "x" * 621])
    out, err = capsys.readouterr()
    assert err == "warning: text 1 has 621 tokens; cut to the checkpoint's --context 8\n"
    assert len(json.loads(out.strip().splitlines()[-1])["reconstructions"]) == 1


def test_bad_input_gives_one_line_errors_and_loses_nothing(tmp_path, capsys, text_file, base_dir, trained):
    empty, latin1, one_line = tmp_path / "empty.txt", tmp_path / "latin1.txt", tmp_path / "one.txt"
    empty.write_text("\n \n")
    latin1.write_bytes("caf\xe9 cr\xe8me\n".encode("latin-1") * 20)
    one_line.write_text("word " * 200_000)
    out = ["--out-dir", str(tmp_path / "new")]
    assert "holds no text" in run_error(train_vae.main, SMALL + out + ["--data", str(empty)], capsys)
    assert "not UTF-8" in run_error(train_vae.main, SMALL + out + ["--data", str(latin1)], capsys)
    assert "cannot read" in run_error(train_vae.main, SMALL + out + ["--data", str(tmp_path / "missing.txt")], capsys)
    assert "has 1 document(s); it needs at least 10" in run_error(train_vae.main, SMALL + out + ["--data",
                                                                                                 str(one_line)], capsys)
    assert "--resume" in run_error(train_vae.main, SMALL + ["--eval-only"], capsys)
    assert "needs 514 positions, more than the 512 of tiny: use --context 255" in run_error(
        train_vae.main, out + ["--context", "256", "--data", text_file], capsys)
    (tmp_path / "file").write_text("x")
    assert "cannot write to --out-dir" in run_error(train_vae.main, SMALL + ["--data", text_file, "--out-dir",
                                                                             str(tmp_path / "file" / "run")], capsys)

    before = open(os.path.join(trained, "ckpt.pt"), "rb").read()
    err = run_error(train_vae.main, SMALL + ["--data", text_file, "--resume", trained, "--latent-size", "8",
                                             "--lora-r", "2"], capsys)
    assert "--latent-size 8 (saved: 16), --lora-r 2 (saved: 4)" in err  # every conflict at once
    assert "already exists" in run_error(train_vae.main, SMALL + ["--model", base_dir, "--data", text_file,
                                                                  "--out-dir", trained], capsys)
    assert "--freeze-base" in run_error(train_vae.main, SMALL + ["--data", text_file, "--offload"] + out, capsys)
    err = run_error(train_vae.main, ["--data", text_file, "--resume", trained, "--lr", "1e6", "--grad-clip", "0",
                                     "--max-iters", "40", "--eval-interval", "2", "--batch-size", "4",
                                     "--eval-batches", "2", "--device", "cpu"], capsys)
    assert "stopped before saving" in err  # a diverging run stops; the good checkpoint stays
    assert open(os.path.join(trained, "ckpt.pt"), "rb").read() == before
    assert not os.path.exists(os.path.join(trained, "ckpt.pt.tmp"))


@pytest.mark.parametrize("content, message", [
    ({"a": 1}, "not a checkpoint of this project"), (torch.zeros(3), "not a checkpoint of this project"),
    ({"kind": "wm", "config": {}, "step": 1}, "written by train_wm.py (a world model)"),
    ({"kind": "lm", "config": {}, "step": 1}, "written by pretrain_lm.py (a plain LM)")])
def test_a_checkpoint_of_something_else_is_named(tmp_path, capsys, text_file, content, message):
    torch.save(content, tmp_path / "ckpt.pt")
    before = (tmp_path / "ckpt.pt").read_bytes()
    assert message in run_error(train_vae.main, SMALL + ["--data", text_file, "--resume", str(tmp_path)], capsys)
    assert message in run_error(sample.main, ["--resume", str(tmp_path), "--sample", "1"], capsys)
    assert (tmp_path / "ckpt.pt").read_bytes() == before


def test_pretrain_lm_refuses_a_vae_checkpoint_and_a_block_too_long(tmp_path, capsys, trained, text_file):
    assert "written by train_vae.py" in run_error(pretrain_lm.main, ["--resume", trained], capsys)
    assert "--block-size 600 is more than the 512 positions of tiny" in run_error(
        pretrain_lm.main, ["--block-size", "600", "--data", text_file, "--out-dir", str(tmp_path / "lm")], capsys)


def test_the_scripts_answer_help_without_loading_transformers():
    """--help parses the flags before the heavy imports (transformers' alone takes ~2 s)."""
    code = ("import runpy, sys\n"
            "for script in ('train_vae.py', 'sample.py', 'pretrain_lm.py', 'train_wm.py'):\n"
            "    sys.argv = [script, '--help']\n"
            "    try:\n"
            "        runpy.run_path(script, run_name='__main__')\n"
            "    except SystemExit:\n"
            "        pass\n"
            "    assert 'transformers' not in sys.modules, script + ' imported transformers before --help'\n")
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0 and done.stdout.count("show this help message") == 4, done.stderr[-500:]
    assert trainer.KINDS.keys() == {"vae", "lm", "wm"}
