"""train_vae.py and textdata.py: data, training, checkpoints, torchrun, and bad input
(offline, CPU). sample.py and pretrain_lm.py have their own test files."""

import os
import statistics
import subprocess
import sys

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel

import checkpoint
import lm
import lora
import offload
import sample
import textdata
import train_vae
import vae
import vae_setup
from conftest import crash_at_step_2_then_resume, read_bytes, run_script, run_script_error, tiny_gpt2
from vae_eval import char_similarity

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMALL = ["--context", "8", "--batch-size", "4", "--eval-batches", "2", "--latent-size", "16", "--lora-r", "4",
         "--log-interval", "1", "--warmup-iters", "1", "--device", "cpu", "--iw-samples", "2"]
KEYS = ("val_ce", "val_acc", "val_ce_shuffled", "val_acc_shuffled", "val_exact", "val_exact_prefix", "val_kl", "val_active_units",
        "val_latent_rms", "val_char_similarity", "val_ppl", "val_ppl_shuffled")
# vae_eval.py's full set: the end of a run and --eval-only; val_ppl_lm only where the base is frozen
FULL_KEYS = ("val_paragraph_exact", "val_paragraph_char_similarity", "val_paragraph_exact_refined",
             "val_paragraph_char_similarity_refined", "val_acc_refined",
             "val_acc_refined_shuffled", "val_ce_refined", "val_exact_refined", "val_exact_prefix_refined",
             "val_char_similarity_refined", "val_iw_nll", "val_iw_ppl", "val_mi", "val_elbo", "val_elbo_per_token", "val_rec_per_token",
             "val_kl_per_token", "val_ppl_lm")


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


@torch.no_grad()
def recomputed_metrics(out, data):
    """val_acc, val_acc_shuffled, val_acc_with_prefix, val_acc_without_prefix, val_char_similarity and the
    refined accuracies of out's checkpoint, recomputed here from its weights on SMALL's held-out windows of
    data (2 batches of 4 spans of 8 tokens, every other one after an 8-token prefix): teacher-forced argmax
    accuracy with each span's z = mu (over all spans, and apart for those with and without their prefix),
    and with the next span's; the same with z refined (vae.NUM_REFINE_STEPS); the median similarity of each
    span's greedy decoding to it, and of its decoding from the refined z, and the refined z's exact share."""
    model = vae_setup.load_vae(out, torch.device("cpu")).eval()
    _, val = textdata.split_streams(textdata.read_documents(data), model.tokenizer, 16, data)
    right, right_shuffled, right_refined, right_refined_shuffled, num_tokens = 0, 0, 0, 0, 0
    similarity, similarity_refined, exact_refined = [], [], []
    by_kind = {"with_prefix": [0, 0], "without_prefix": [0, 0]}  # right, tokens
    for i, starts in enumerate(textdata.spread_starts(val, 16, 2, 4)):
        batch = textdata.vae_batch(val, starts, 8, i % 2 == 0)
        target, prefix = batch["target_ids"], batch.get("prefix_ids")  # (4, 8) each
        mu, _ = model.encode(batch["input_ids"])
        right_here = (model(mu, target, prefix).argmax(-1) == target).sum().item()
        right += right_here
        counts = by_kind["with_prefix" if prefix is not None else "without_prefix"]
        counts[0] += right_here
        counts[1] += target.numel()
        right_shuffled += (model(mu.roll(1, 0), target, prefix).argmax(-1) == target).sum().item()
        z = model.refine(mu, target, prefix, vae.NUM_REFINE_STEPS)  # grads on inside, for z alone
        right_refined += (model(z, target, prefix).argmax(-1) == target).sum().item()
        right_refined_shuffled += (model(z.roll(1, 0), target, prefix).argmax(-1) == target).sum().item()
        num_tokens += target.numel()
        greedy = model.generate(mu, 8, prefix, should_stop_at_eos=False)
        similarity += map(char_similarity, model.detokenize(target), model.detokenize(greedy))
        greedy = model.generate(z, 8, prefix, should_stop_at_eos=False)
        similarity_refined += map(char_similarity, model.detokenize(target), model.detokenize(greedy))
        exact_refined += (greedy == target).all(1).tolist()
    return {"val_acc": right / num_tokens, "val_acc_shuffled": right_shuffled / num_tokens,
            "val_acc_refined": right_refined / num_tokens, "val_acc_refined_shuffled": right_refined_shuffled / num_tokens,
            "val_char_similarity": statistics.median(similarity),
            "val_char_similarity_refined": statistics.median(similarity_refined),
            "val_exact_refined": sum(exact_refined) / len(exact_refined),
            **{f"val_acc_{kind}": r / n for kind, (r, n) in by_kind.items()}}


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
    held_out = textdata.held_out_paragraphs(docs + ["a long held-out document"], lm.ByteTokenizer(), 5, 11)
    assert held_out == [list(b"document 9"), list(b"document 19")]  # held out and at most 11 tokens; the rest
    many = [f"doc {i}" for i in range(100)]  # 10 held out: doc 9, doc 19, ..., doc 99
    assert textdata.held_out_paragraphs(many, lm.ByteTokenizer(), 2, 99) == [list(b"doc 9"), list(b"doc 59")]
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
    argv = SMALL + ["--model", base_dir, "--data", text_file, "--lr", "3e-2"]  # 4 steps to accuracies above 0
    metrics, lines = run_main(argv + ["--out-dir", out, "--max-iters", "4", "--eval-interval", "2"], capsys)
    assert any(line.startswith("step 4/4 |") and "rec " in line and "kl " in line and "tok/s" in line
               and "eta" in line for line in lines)
    assert any(line.startswith("  original: ") for line in lines)
    assert any(line.startswith("  refined:  ") for line in lines)  # the end refines z (vae.NUM_REFINE_STEPS)
    for key in KEYS + FULL_KEYS + ("train_loss", "train_rec", "train_kl", "minutes", "steps"):
        assert key in metrics, key
    assert metrics["val_iw_samples"] == 2 and metrics["val_spans"] == 8
    recomputed = recomputed_metrics(out, text_file)
    assert {k: metrics[k] for k in recomputed} == pytest.approx(recomputed, abs=1e-6)
    state = torch.load(os.path.join(out, "ckpt.pt"), weights_only=True)
    base_keys = [k for k in state["model"] if k.startswith("base.") and ".lora_" not in k]
    assert state["kind"] == "vae" and state["step"] == 4 and not base_keys  # only adapters + head, not the base
    assert any(".lora_A.encoder." in k for k in state["model"]) and "head.w_e.weight" in state["model"]
    # --eval-only takes every model setting from the checkpoint: no --latent-size, --context, ... given
    again, _ = run_main(["--eval-only", "--resume", out, "--data", text_file, "--device", "cpu", "--batch-size", "4",
                         "--eval-batches", "2"], capsys)
    assert set(KEYS + FULL_KEYS) <= set(again) and again["step"] == 4
    plain, _ = run_main(["--eval-only", "--resume", out, "--data", text_file, "--device", "cpu", "--batch-size", "4",
                         "--eval-batches", "2", "--refine-steps", "0", "--iw-samples", "1"], capsys)
    assert not any("refine" in k for k in plain) and plain["val_acc"] == again["val_acc"]  # z = mu only
    for key in ("val_ce", "val_acc", "val_kl", "val_ppl_lm", "val_char_similarity"):  # the checkpoint round trip gives the same numbers
        assert again[key] == pytest.approx(metrics[key], abs=1e-5), key
    # so does a resumed training run: --latent-size 16, --lora-r 4, --context 8, --model from the checkpoint
    run_main(["--resume", out, "--data", text_file, "--max-iters", "5", "--batch-size", "4", "--eval-batches", "2",
              "--device", "cpu"], capsys)
    state = torch.load(os.path.join(out, "ckpt.pt"), weights_only=True)
    assert state["step"] == 5 and state["model"]["head.w_e.weight"].shape[0] == 16
    assert {k: state["config"][k] for k in ("model", "latent_size", "lora_r", "context")} == {
        "model": base_dir, "latent_size": 16, "lora_r": 4, "context": 8}


@pytest.mark.parametrize("memory", [["--grad-checkpoint"], ["--offload"]])
def test_encoder_layers_trains_and_keeps_only_the_encoder_adapter_it_runs(tmp_path, capsys, text_file, base_dir,
                                                                           memory):
    """--encoder-layers 1 of a base's 3: the encoder adapter of layer 0 trains, those of layers 1 and 2 never run:
    frozen, they stay as they started (B zero); the checkpoint holds the setting, --eval-only rebuilds it from
    there, and a run that re-runs layers in the backward pass (checkpointing) or swaps the base's weights out
    (offload: at the save only the last layer is in, so layer 1 would be saved empty if taken for the base's)
    saves the same weights; refining z at the end (backward passes through those layers) gives the same numbers
    and moves z."""
    three = str(tmp_path / "three")
    lm.save_base(GPT2LMHeadModel(GPT2Config(n_layer=3, n_head=2, n_embd=32, n_positions=64, vocab_size=257,
                                            bos_token_id=256, eos_token_id=256)), lm.ByteTokenizer(), three)
    argv = SMALL + ["--model", three, "--data", text_file, "--lr", "3e-2", "--encoder-layers", "1", "--max-iters",
                    "2", "--eval-interval", "2"]
    plain, other = str(tmp_path / "plain"), str(tmp_path / "other")
    metrics, _ = run_main(argv + ["--out-dir", plain], capsys)
    metrics_other, _ = run_main(argv + ["--out-dir", other] + memory, capsys)
    # refining z at the end runs backward passes through the checkpointed or offloaded layers: the same numbers
    assert metrics_other["val_ce_refined"] == pytest.approx(metrics["val_ce_refined"], abs=1e-4)
    assert metrics["val_ce_refined"] < metrics["val_ce"] - 0.003, metrics  # and it does move z
    state, state_other = (torch.load(os.path.join(d, "ckpt.pt"), weights_only=True) for d in (plain, other))
    assert state["config"]["encoder_layers"] == state["vae_config"]["encoder_layers"] == 1
    for k, v in state["model"].items():
        torch.testing.assert_close(state_other["model"][k], v, rtol=1e-4, atol=1e-6, msg=k)
    b = {layer: [v for k, v in state["model"].items() if f".h.{layer}." in k and ".lora_B.encoder." in k]
         for layer in range(3)}
    assert [len(v) for v in b.values()] == [4, 4, 4] and all(v.abs().sum() > 0 for v in b[0])
    assert all(torch.equal(v, torch.zeros_like(v)) for v in b[1] + b[2])
    layers = offload.decoder_layers(vae_setup.load_vae(plain, torch.device("cpu")).base)
    assert [any(p.requires_grad for p in lora.lora_parameters(layer, "encoder")) for layer in layers] == [
        True, False, False]
    again, _ = run_main(["--eval-only", "--resume", plain, "--data", text_file, "--device", "cpu", "--batch-size", "4",
                         "--eval-batches", "2"], capsys)
    assert again["val_ce"] == pytest.approx(metrics["val_ce"], abs=1e-5)


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


@pytest.mark.parametrize("should_keep, flags", [(False, ["--prefix-drop", "0"]),
                                                (True, ["--prefix-drop", "0", "--ae-prefix"]),
                                                (False, ["--prefix-drop", "1", "--ae-prefix"])])
def test_the_autoencoder_phase_keeps_the_prefix_only_with_ae_prefix(tmp_path, capsys, monkeypatch, text_file,
                                                                     should_keep, flags):
    """Every training batch of a run that is all autoencoder phase (--ae-iters = --max-iters): with
    --prefix-drop 0, none has a prefix by default, all have one with --ae-prefix; --prefix-drop 1 drops
    it from every batch, --ae-prefix or not."""
    kept = []
    real_batch = textdata.vae_batch
    monkeypatch.setattr(textdata, "vae_batch", lambda stream, starts, context, should_keep_prefix: (
        kept.append(should_keep_prefix), real_batch(stream, starts, context, should_keep_prefix))[1])
    argv = SMALL + ["--data", text_file, "--out-dir", str(tmp_path / "run"), "--max-iters", "3", "--eval-interval",
                    "3", "--ae-iters", "3"] + flags
    run_main(argv, capsys)
    assert kept[:2] == [True, False]  # the 2 held-out batches, every other one with its prefix
    assert kept[2:] == [should_keep] * 3  # the 3 training batches


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
    argv = SMALL + ["--model", str(tmp_path / "gpt2"), "--data", str(data), "--lr", "3e-2"]  # a similarity above 0
    metrics, lines = run_main(argv + ["--out-dir", out, "--max-iters", "2", "--eval-interval", "2"], capsys)
    assert metrics["steps"] == 2
    recomputed = recomputed_metrics(out, str(data))
    assert {k: metrics[k] for k in recomputed} == pytest.approx(recomputed, abs=1e-6)
    train, val = textdata.split_streams(textdata.read_documents(str(data)), lm.TiktokenTokenizer(), 16, "")
    assert any(f"{len(train):,} training / {len(val):,} held-out tokens" in line for line in lines)  # GPT-2 BPE
    result, _ = run_script(sample.main, ["--resume", out, "--reconstruct", "Hello world", "--device", "cpu"], capsys)
    (text,) = result["reconstructions"]
    ids = lm.TiktokenTokenizer().encode(text)
    assert lm.TiktokenTokenizer().decode(ids) == text and len(ids) <= 2  # "Hello world" is 2 GPT-2 tokens


def test_torchrun_two_processes_equal_one_with_gradient_accumulation(tmp_path, text_file, base_dir):
    """DDP: 2 processes x batch 4 make the very updates of 1 process with --grad-accum 2."""
    argv = SMALL + ["--model", base_dir, "--data", text_file, "--max-iters", "2", "--eval-interval", "2",
                    "--ae-iters", "0"]  # noise on from the first step: both ranks must draw what one process draws
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    ddp, single = str(tmp_path / "ddp"), str(tmp_path / "single")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
           f"--master_port={29500 + os.getpid() % 400}", os.path.join(ROOT, "train_vae.py")] + argv + ["--out-dir", ddp]
    done = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "2 process(es)" in done.stdout and done.stdout.count("step 2/2 |") == 1  # rank 0 logs alone
    train_vae.main(argv + ["--out-dir", single, "--grad-accum", "2"])
    a, b = (torch.load(os.path.join(d, "ckpt.pt"), weights_only=True)["model"] for d in (ddp, single))
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-6, msg=k)


# ----------------------------------------------------------------------------- bad input


@pytest.mark.parametrize("flags, message", [  # {name}: a path the test makes
    (["--data", "{empty}"], "holds no text"),
    (["--data", "{latin1}"], "is not UTF-8 (bad byte at offset 3)"),
    (["--data", "{missing}"], "cannot read --data"),
    (["--data", "{one_line}"], "has 1 document(s); it needs at least 10 (every 10th is held out)"),
    (["--eval-only"], "pass --resume DIR too"),
    (["--context", "256"], "positions, more than the 512 of tiny: use --context 255 or less"),
    (["--context", "2", "--soft-tokens", "600"], "positions, more than the 512 of tiny: lower --soft-tokens"),
    (["--out-dir", "{file}/run"], "cannot write to --out-dir"),
    (["--offload"], "this base trains: freeze it (train_vae.py: add --freeze-base"),
    (["--offload", "--freeze-base"], "tiny's weights here are random and saved in the checkpoint"),
    (["--load-8bit"], "--load-8bit quantizes a frozen base, but this base trains"),
    (["--encoder-layers", "99"], "--encoder-layers 99: tiny has 2 layers; give at most that, or 0 for all of them"),
    (["--edge-weights"], "first 8 and last 8 tokens apart, which --context 8 cannot hold both of: use --context 16"),
    (["--lr", "1e6", "--grad-clip", "0"], "stopped before saving")])  # a fresh run that diverges
def test_bad_input_is_one_line_and_writes_nothing(tmp_path, capsys, text_file, flags, message):
    paths = {name: str(tmp_path / name) for name in ("empty", "latin1", "missing", "one_line", "file")}
    (tmp_path / "empty").write_text("\n \n")
    (tmp_path / "latin1").write_bytes("caf\xe9 cr\xe8me\n".encode("latin-1") * 20)
    (tmp_path / "one_line").write_text("word " * 200_000)  # 1 MB, one document
    (tmp_path / "file").write_text("x")
    out = tmp_path / "run"
    argv = SMALL + ["--data", text_file, "--out-dir", str(out), "--max-iters", "40", "--eval-interval", "40"]
    assert message in run_error(train_vae.main, argv + [f.format(**paths) for f in flags], capsys)
    assert not os.path.exists(out / "ckpt.pt")


@pytest.mark.parametrize("flags, message", [
    (["--latent-size", "8", "--lora-r", "2", "--model", "tiny"],  # every conflict at once
     "with other settings: --model 'tiny' (saved: '{base}'), --latent-size 8 (saved: 16), --lora-r 2 (saved: 4); "
     "drop these flags"),
    (["--lr", "1e6", "--grad-clip", "0", "--max-iters", "40", "--eval-interval", "40"], "stopped before saving")])
def test_a_bad_resume_leaves_the_checkpoint_as_it_was(capsys, text_file, base_dir, trained, flags, message):
    before = read_bytes(os.path.join(trained, "ckpt.pt"))
    argv = SMALL + ["--data", text_file, "--resume", trained] + flags
    assert message.format(base=base_dir) in run_error(train_vae.main, argv, capsys)
    fresh = SMALL + ["--model", base_dir, "--data", text_file, "--out-dir", trained]  # no --resume
    assert "already exists; pass --resume" in run_error(train_vae.main, fresh, capsys)
    assert read_bytes(os.path.join(trained, "ckpt.pt")) == before
    assert sorted(os.listdir(trained)) == ["ckpt.pt", "peft"]  # no ckpt.pt.tmp, no peft.tmp


def test_the_checkpoint_kinds():
    assert checkpoint.KINDS.keys() == {"vae", "lm", "router", "wm", "agent"}


def test_history_and_its_curve(trained, tmp_path, capsys, monkeypatch, text_file):
    """Every evaluation is kept in the checkpoint; experiments/vae_curve.py draws it and prints its points."""
    from experiments import vae_curve

    history = checkpoint.load_checkpoint(trained, "vae")["history"]
    assert [h["step"] for h in history] == [2, 4]
    assert history[0]["minutes"] <= history[1]["minutes"]
    recomputed = recomputed_metrics(trained, text_file)  # the checkpoint is the last evaluation's
    recomputed = {k: v for k, v in recomputed.items() if "refined" not in k}  # the end's alone refines z
    assert {k: history[1][k] for k in recomputed} == pytest.approx(recomputed, abs=1e-6)
    assert not any("refined" in k for h in history for k in h)
    picture = tmp_path / "curve.png"
    out, _ = run_script(vae_curve.main, [trained, "--out", str(picture)], capsys)
    assert [p["val_acc_shuffled"] for p in out["points"][trained]] == [h["val_acc_shuffled"] for h in history]
    from PIL import Image
    assert Image.open(picture).size == (640, 400)
    for bad in (tmp_path / "no-folder" / "curve.png", tmp_path / "curve"):  # one line each, exit 2
        assert f"cannot write the picture to {bad}" in run_error(vae_curve.main, [trained, "--out", str(bad)], capsys)
    drawn = []
    monkeypatch.setattr(vae_curve, "draw", lambda series, path, x_label, *a, **k: drawn.append((series, x_label)))
    out, _ = run_script(vae_curve.main, [f"a={trained}", f"b={trained}", "--x", "step"], capsys)  # equal steps
    series, x_label = drawn[0]
    assert list(out["points"]) == ["a", "b"] and x_label == "optimizer steps"
    assert [s["label"].split(":")[0] for s in series] == ["a", "a", "b", "b"]
    assert all([x for x, _, _ in s["points"]] == [2, 4] for s in series)
    assert "two runs are named a" in run_error(vae_curve.main, [f"a={trained}", f"a={trained}"], capsys)
    state = checkpoint.load_checkpoint(trained, "vae")  # a checkpoint without history: one line
    del state["history"]
    os.makedirs(tmp_path / "old")
    torch.save(state, tmp_path / "old" / "ckpt.pt")
    assert "no evaluation history" in run_error(vae_curve.main, [str(tmp_path / "old")], capsys)


def test_the_head_trains_at_its_own_lr_and_a_resumed_run_keeps_it(tmp_path, capsys, text_file, base_dir):
    """--head-lr-scale: the head's parameters (f, w_e, w_d, z's keys/values) in groups at that multiple of the
    adapters' lr, in the checkpoint's optimizer state; a resumed run takes the scale from the checkpoint."""
    out = str(tmp_path / "run")
    argv = SMALL + ["--model", base_dir, "--data", text_file, "--eval-paragraphs", "0", "--eval-interval", "2"]
    run_main(argv + ["--out-dir", out, "--max-iters", "2", "--head-lr-scale", "10"], capsys)
    run_main(["--resume", out, "--data", text_file, "--max-iters", "3", "--device", "cpu"], capsys)
    state = torch.load(os.path.join(out, "ckpt.pt"), weights_only=True)
    assert state["step"] == 3 and state["config"]["head_lr_scale"] == 10.0
    groups = state["optimizer"]["param_groups"]
    scaled, plain = [g for g in groups if "lr_scale" in g], [g for g in groups if "lr_scale" not in g]
    head_params = {"f", "w_e", "w_d", "w_memory"}
    assert sum(len(g["params"]) for g in scaled) == 2 * len(head_params)  # a weight and a bias each
    assert len({g["lr"] for g in plain}) == 1
    assert [g["lr"] for g in scaled] == pytest.approx([10 * plain[0]["lr"]] * len(scaled))
    # the optimizer's groups change with the scale turned off: refused in one line, the checkpoint unchanged
    before = read_bytes(os.path.join(out, "ckpt.pt"))
    err = run_error(train_vae.main, ["--resume", out, "--data", text_file, "--max-iters", "4", "--device", "cpu",
                                     "--head-lr-scale", "1"], capsys)
    assert "a learning-rate scale (train_vae's --head-lr-scale) was turned on or off (resume without it)" in err
    assert read_bytes(os.path.join(out, "ckpt.pt")) == before


def test_a_checkpoint_from_before_head_lr_scale_resumes_with_one_lr(trained, tmp_path, capsys, text_file):
    """A config saved without the key had one lr: a resumed run keeps its two optimizer groups, unscaled."""
    state = checkpoint.load_checkpoint(trained, "vae")
    del state["config"]["head_lr_scale"]
    checkpoint.save_checkpoint(str(tmp_path), state)
    run_main(["--resume", str(tmp_path), "--data", text_file, "--max-iters", "5", "--device", "cpu",
              "--eval-paragraphs", "0"], capsys)
    state = torch.load(tmp_path / "ckpt.pt", weights_only=True)
    assert state["step"] == 5 and state["config"]["head_lr_scale"] == 1.0
    assert len(state["optimizer"]["param_groups"]) == 2
    assert not any("lr_scale" in g for g in state["optimizer"]["param_groups"])


@pytest.mark.parametrize("saved_minutes", [100.0, None], ids=["saved", "from-before"])
def test_a_resumed_run_s_clock_goes_on_from_its_last_save(trained, tmp_path, capsys, text_file, saved_minutes):
    """The checkpoint keeps the run's minutes at every save (SIGTERM's between evaluations too): a
    resumed run's evaluations count on from there; a checkpoint from before counts on from its last
    evaluation's."""
    state = checkpoint.load_checkpoint(trained, "vae")
    assert state["minutes"] >= state["history"][-1]["minutes"]  # saved after the evaluation
    if saved_minutes is None:
        del state["minutes"]
    else:
        state["minutes"] = saved_minutes  # as if SIGTERM had saved it long after the last evaluation
    checkpoint.save_checkpoint(str(tmp_path), state)
    run_main(["--resume", str(tmp_path), "--data", text_file, "--max-iters", "5", "--device", "cpu",
              "--eval-paragraphs", "0"], capsys)
    state = torch.load(tmp_path / "ckpt.pt", weights_only=True)
    start = saved_minutes if saved_minutes is not None else state["history"][-2]["minutes"]
    assert start <= state["history"][-1]["minutes"] < start + 5  # this resumed run took far less than 5 minutes
    assert state["history"][-1]["minutes"] <= state["minutes"]


def test_a_base_that_changed_since_is_refused(trained, tmp_path, capsys, text_file, base_dir):
    """The frozen base loads by name: a checkpoint keeps a fingerprint of it (lm.fingerprint, which bf16
    rounding leaves within its tolerance), so a base directory replaced since (pretrain_lm.py --resume
    does that) is refused on resume and by sample.py, not silently run under the old adapters."""
    base = lm.load_base(base_dir)[0]
    saved = lm.fingerprint(base)
    assert lm.check_fingerprint(saved, lm.fingerprint(base.to(torch.bfloat16)), "b", "c") is saved  # to(): in place
    state = checkpoint.load_checkpoint(trained, "vae")
    assert torch.equal(state["base_fingerprint"], saved)
    first = state["base_fingerprint"] * (1 + 1e-3)  # as if saved from a bf16 copy: within the tolerance
    checkpoint.save_checkpoint(str(tmp_path / "same"), {**state, "base_fingerprint": first})
    run_main(["--resume", str(tmp_path / "same"), "--data", text_file, "--max-iters", "5", "--device", "cpu",
              "--eval-paragraphs", "0"], capsys)
    assert torch.equal(torch.load(tmp_path / "same" / "ckpt.pt", weights_only=True)["base_fingerprint"], first)
    other = tmp_path / "base"
    changed = tiny_gpt2()
    with torch.no_grad():
        changed.transformer.wte.weight.add_(1e-3)  # about as far as one more AdamW step at lr 1e-3 moves it
    lm.save_base(changed, lm.ByteTokenizer(), other)
    state["base"] = state["config"]["model"] = str(other)
    checkpoint.save_checkpoint(str(tmp_path / "run"), state)
    before = read_bytes(tmp_path / "run" / "ckpt.pt")
    message = f"the base {other} is not the one the checkpoint in {tmp_path / 'run'} was trained on"
    assert message in run_error(train_vae.main, ["--resume", str(tmp_path / "run"), "--data", text_file,
                                                 "--max-iters", "5", "--device", "cpu"], capsys)
    assert message in run_error(sample.main, ["--resume", str(tmp_path / "run"), "--reconstruct", "a", "--device",
                                              "cpu"], capsys)
    assert read_bytes(tmp_path / "run" / "ckpt.pt") == before


@pytest.mark.parametrize("flags, advice", [([], "what the base takes: add --load-8bit"),
                                           (["--load-8bit"], "what else uses the device's memory")])
def test_a_frozen_base_too_big_to_load_names_the_flags_that_load_it_smaller(trained, capsys, monkeypatch, flags,
                                                                               advice):
    """sample.py (no --batch-size) on a VAE whose frozen base does not fit: the memory flags not given yet
    (on the CPU not --offload, which keeps the layers in CPU memory anyway)."""
    monkeypatch.setattr(offload, "free_memory", lambda device: 0)
    monkeypatch.setattr(offload, "load_with_memory", lambda name, *a, **k: lm.load_base(name))  # no bitsandbytes here
    err = run_error(sample.main, ["--resume", trained, "--sample", "1", "--device", "cpu"] + flags, capsys)
    assert err.endswith(f"GiB is free: lower {advice}"), err


def test_the_fingerprint_reaches_the_last_value_of_a_table_past_float32_s_integers():
    """A table of more than 2**24 numbers (SmolLM2's embedding has 28M): its last value is sampled, exactly
    (float32 cannot hold the index 2**24 + 1; other sizes round past the end)."""
    table = torch.nn.Embedding(2**24 + 2, 1)
    values = lm.fingerprint(torch.nn.ModuleList([table]))
    assert values.shape == (64,) and values[-1] == table.weight[-1, 0] and values[0] == table.weight[0, 0]


def test_defaults_per_base(base_dir):
    """tiny's CPU values for tiny models, BigVAE's (lr 1e-4, 64-token spans, no word dropout) for any
    pretrained base; a given flag wins."""
    keys = ("lr", "context", "word_dropout")
    for argv in ([], ["--model", "tiny-bpe"]):
        args = train_vae.parse_args(argv)
        assert {k: getattr(args, k) for k in keys} == train_vae.TINY_DEFAULTS
    args = train_vae.parse_args(["--model", base_dir])
    assert {k: getattr(args, k) for k in keys} == train_vae.PRETRAINED_DEFAULTS == dict(lr=1e-4, context=64,
                                                                                          word_dropout=0.0)
    args = train_vae.parse_args(["--model", base_dir, "--lr", "3e-4", "--context", "8", "--word-dropout", "0.5"])
    assert (args.lr, args.context, args.word_dropout) == (3e-4, 8, 0.5)


def test_a_checkpoint_from_before_word_dropout_resumes_without_it(trained, tmp_path, monkeypatch):
    """A config saved without the key had no word dropout: a resumed run keeps none (the per-base
    default, 0.3 for tiny, would change the run), unless the flag is given."""
    state = checkpoint.load_checkpoint(trained, "vae")
    for key in ("vae_config", "base"):  # written before checkpoints held these too
        del state[key]
    del state["config"]["word_dropout"]
    checkpoint.save_checkpoint(str(tmp_path), state)

    class Built(Exception):
        pass

    def build_vae(base_name, cfg, *rest):  # the run stops as the model is built
        built.append(cfg)
        raise Built

    monkeypatch.setattr(train_vae, "build_vae", build_vae)
    for argv, expected in (([], 0.0), (["--word-dropout", "0.2"], 0.2)):
        built = []
        with pytest.raises(Built):
            train_vae.main(["--eval-only", "--resume", str(tmp_path), "--device", "cpu"] + argv)
        assert built[0].word_dropout == expected


def test_a_checkpoint_from_before_a_model_flag_refuses_it(trained, tmp_path, capsys, text_file):
    """A model key the saved config lacks came later: that run had VAEConfig's default (here one soft
    token, no lead token), so resuming with another value is the same conflict as with a saved one;
    so are --ae-prefix, whose phase had no prefix before the flag, and --own-tokens (none before it).
    --prefix-drop, saved since, is another's: a checkpoint without it may have run at any value."""
    state = checkpoint.load_checkpoint(trained, "vae")
    for key in ("soft_tokens", "lead_token", "ae_prefix", "own_tokens", "prefix_drop"):
        del state["config"][key]
    checkpoint.save_checkpoint(str(tmp_path), state)
    argv = SMALL + ["--data", text_file, "--resume", str(tmp_path), "--lead-token", "--soft-tokens", "2", "--ae-prefix",
                    "--own-tokens", "0.5", "--prefix-drop", "0.2"]
    err = run_error(train_vae.main, argv, capsys)
    assert ("with other settings: --soft-tokens 2 (saved: 1), --lead-token True (saved: False), --ae-prefix True "
            "(saved: False), --own-tokens 0.5 (saved: 0.0)" in err and "prefix-drop" not in err)
    argv = SMALL + ["--data", text_file, "--resume", trained, "--out-dir", str(tmp_path / "again"), "--prefix-drop",
                    "0.2"]
    assert "--prefix-drop 0.2 (saved: 0.5)" in run_error(train_vae.main, argv, capsys)  # saved now: a resume keeps it


def test_load_vae_reads_a_checkpoint_from_before_vae_config_as_the_new_one(trained, tmp_path):
    """A checkpoint holds the VAEConfig and the base's name; one saved before it did (flags only, and
    none for --word-dropout) loads to the same model: the same config (--context as prefix_slots, no
    word dropout), the same weights, the same logits after a prefix."""
    state = checkpoint.load_checkpoint(trained, "vae")
    assert state["base"] == state["config"]["model"]
    assert state["vae_config"]["prefix_slots"] == state["config"]["context"] == 8
    for key in ("vae_config", "base"):
        del state[key]
    del state["config"]["word_dropout"]
    checkpoint.save_checkpoint(str(tmp_path), state)
    # each build draws other random weights: equal outputs mean the checkpoint's weights loaded
    new = vae_setup.load_vae(trained, torch.device("cpu")).eval()
    old = vae_setup.load_vae(str(tmp_path), torch.device("cpu")).eval()
    assert old.cfg == new.cfg and new.cfg.word_dropout == 0.0 and new.cfg.latent_size == 16
    ids, prefix = torch.randint(0, 256, (2, 8)), torch.randint(0, 256, (2, 3))
    with torch.no_grad():
        mu = new.encode(ids)[0]
        assert torch.equal(old.encode(ids)[0], mu)
        assert torch.equal(old(mu, ids, prefix), new(mu, ids, prefix))
        assert not torch.equal(new(mu, ids, prefix), new(mu, ids))  # the prefix is read


def test_load_vae_reads_a_vae_config_from_before_a_field(trained, tmp_path):
    """A saved VAEConfig without a field added later (own_tokens) loads with that field's default."""
    state = checkpoint.load_checkpoint(trained, "vae")
    del state["vae_config"]["own_tokens"]
    checkpoint.save_checkpoint(str(tmp_path), state)
    assert vae_setup.load_vae(str(tmp_path), torch.device("cpu")).cfg == vae_setup.load_vae(trained, torch.device("cpu")).cfg
