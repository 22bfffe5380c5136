"""Tests for train_vae.py: data, training, checkpoints, modes, torchrun and bad input (offline, CPU)."""

import json
import os
import random
import subprocess
import sys

import pytest
import torch
from conftest import tiny_gpt2

import lm
import train_vae
from conftest import crash_at_step_2_then_resume, run_script, run_script_error

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


def run_main(argv, capsys):
    return run_script(train_vae.main, argv, capsys)


def run_error(argv, capsys):
    return run_script_error(train_vae.main, argv, capsys)


def test_documents_split_and_default_corpus(tmp_path):
    lines, paragraphs = tmp_path / "lines.txt", tmp_path / "paragraphs.txt"
    lines.write_text("one\ntwo\n\n")
    paragraphs.write_text("a b\nc\n\nd e\n \nf")
    assert train_vae.read_documents(str(lines)) == ["one", "two"]
    assert train_vae.read_documents(str(paragraphs)) == ["a b\nc", "d e", "f"]
    docs = [f"document {i}" for i in range(20)]
    train, val = train_vae.split_streams(docs, lm.ByteTokenizer(), 8, "test")
    assert bytes(val[val != 256].tolist()).decode() == "document 9document 19"  # every 10th, held out
    assert len(train) + len(val) == sum(len(d) + 1 for d in docs)
    corpus = train_vae.stdlib_docstrings()
    assert len(corpus) > 2000 and len("".join(corpus)) > 500_000 and len(set(corpus)) == len(corpus)


def test_batches_are_a_function_of_the_index_and_drop_the_prefix(text_file):
    stream = torch.arange(100)
    batch = train_vae.make_batch(stream, torch.tensor([0, 10]), 4, True, "vae")
    assert batch["prefix_ids"].tolist() == [[0, 1, 2, 3], [10, 11, 12, 13]]
    assert batch["input_ids"].tolist() == batch["target_ids"].tolist() == [[4, 5, 6, 7], [14, 15, 16, 17]]
    assert "prefix_ids" not in train_vae.make_batch(stream, torch.tensor([0]), 4, False, "vae")


def test_train_eval_only_and_modes_on_a_frozen_base(tmp_path, capsys, text_file, base_dir):
    out = str(tmp_path / "run")
    argv = SMALL + ["--model", base_dir, "--data", text_file, "--out-dir", out]
    metrics, lines = run_main(argv + ["--max-iters", "4", "--eval-interval", "2"], capsys)
    assert any(line.startswith("step 4/4 |") and "rec " in line and "kl " in line and "tok/s" in line
               and "eta" in line for line in lines)
    assert any(line.startswith("  original: ") for line in lines)
    for key in KEYS + ("train_loss", "train_rec", "train_kl", "minutes", "steps"):
        assert key in metrics, key
    state = torch.load(os.path.join(out, "ckpt.pt"), weights_only=True)
    base_keys = [k for k in state["model"] if k.startswith("base.") and ".lora_" not in k]
    assert state["step"] == 4 and not base_keys  # a pretrained base is not saved, only adapters + head
    assert any(".lora_A.encoder." in k for k in state["model"]) and "head.w_e.weight" in state["model"]
    again, _ = run_main(argv + ["--eval-only", "--resume", out], capsys)
    assert set(KEYS) <= set(again) and again["step"] == 4
    for key in ("val_ce", "val_acc", "val_kl"):  # the checkpoint round trip gives the same numbers
        assert again[key] == pytest.approx(metrics[key], abs=1e-5), key
    result, lines = run_main(argv + ["--resume", out, "--reconstruct", "the model reads", "a span"], capsys)
    assert len(result["reconstructions"]) == 2 and lines[0] == result["reconstructions"][0]
    result, _ = run_main(argv + ["--resume", out, "--interpolate", "the model", "a list", "--interp-steps", "3"],
                         capsys)
    assert len(result["interpolation"]) == 3
    result, _ = run_main(argv + ["--resume", out, "--sample", "2", "--temperature", "1.0"], capsys)
    assert len(result["samples"]) == 2


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


def test_lm_objective_saves_a_base_the_vae_loads_frozen(tmp_path, capsys, text_file):
    lm_dir, vae_dir = str(tmp_path / "lm"), str(tmp_path / "vae")
    metrics, _ = run_main(SMALL + ["--objective", "lm", "--data", text_file, "--out-dir", lm_dir, "--max-iters", "2",
                                   "--eval-interval", "2"], capsys)
    assert {"val_ce", "val_acc"} <= set(metrics)
    base, tokenizer = lm.load_base(os.path.join(lm_dir, "base"))
    assert isinstance(tokenizer, lm.ByteTokenizer) and base.config.n_layer == lm.TINY_CONFIG["n_layer"]
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


def test_bad_input_gives_one_line_errors(tmp_path, capsys, text_file, base_dir):
    empty, latin1 = tmp_path / "empty.txt", tmp_path / "latin1.txt"
    empty.write_text("\n \n")
    latin1.write_bytes("caf\xe9 cr\xe8me\n".encode("latin-1") * 20)
    assert "holds no text" in run_error(SMALL + ["--data", str(empty)], capsys)
    assert "not UTF-8" in run_error(SMALL + ["--data", str(latin1)], capsys)
    assert "cannot read" in run_error(SMALL + ["--data", str(tmp_path / "missing.txt")], capsys)
    assert "--resume" in run_error(SMALL + ["--eval-only"], capsys)
    out = str(tmp_path / "run")
    run_main(SMALL + ["--model", base_dir, "--data", text_file, "--out-dir", out, "--max-iters", "1",
                      "--eval-interval", "1"], capsys)
    before = open(os.path.join(out, "ckpt.pt"), "rb").read()
    assert "model" in run_error(SMALL + ["--data", text_file, "--resume", out, "--max-iters", "2"], capsys)
    err = run_error(SMALL + ["--model", base_dir, "--data", text_file, "--resume", out, "--latent-size", "8"],
                    capsys)
    assert "latent_size" in err and "--latent-size 16" in err
    assert "already exists" in run_error(SMALL + ["--model", base_dir, "--data", text_file, "--out-dir", out],
                                         capsys)
    assert "--freeze-base" in run_error(SMALL + ["--data", text_file, "--offload"], capsys)
    assert open(os.path.join(out, "ckpt.pt"), "rb").read() == before  # nothing overwritten


def test_torchrun_two_processes(tmp_path, text_file, base_dir):
    out = str(tmp_path / "ddp")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port=29517",
           os.path.join(ROOT, "train_vae.py")] + SMALL + ["--model", base_dir, "--data", text_file, "--out-dir", out,
                                                          "--max-iters", "2", "--eval-interval", "2"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    metrics = json.loads(done.stdout.strip().splitlines()[-1])
    assert metrics["steps"] == 2 and "val_acc" in metrics
    assert "2 process(es)" in done.stdout and done.stdout.count("step 2/2 |") == 1  # rank 0 logs alone
    assert torch.load(os.path.join(out, "ckpt.pt"), weights_only=True)["step"] == 2
