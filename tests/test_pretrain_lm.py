"""pretrain_lm.py: a plain next-token LM pretrained, saved where --model loads it, resumed
exactly, and bad input (offline, CPU)."""

import os

import pytest
import torch

import lm
import pretrain_lm
import train_vae
from common import UserError
from conftest import crash_at_step_2_then_resume, run_script, run_script_error

SMALL = ["--max-iters", "2", "--eval-interval", "2", "--batch-size", "4", "--block-size", "16", "--eval-batches", "2",
         "--log-interval", "1", "--device", "cpu"]


def test_saves_a_base_the_vae_loads_frozen(tmp_path, capsys, text_file):
    lm_dir, vae_dir = str(tmp_path / "lm"), str(tmp_path / "vae")
    metrics, lines = run_script(pretrain_lm.main, SMALL + ["--data", text_file, "--out-dir", lm_dir], capsys)
    assert any(line.startswith("step 2/2 | loss ") and "tok/s" in line and "eta" in line for line in lines)
    assert {"val_ce", "val_acc", "train_loss", "steps"} <= set(metrics)
    base, tokenizer = lm.load_base(os.path.join(lm_dir, "base"))
    assert isinstance(tokenizer, lm.ByteTokenizer) and base.config.n_layer == lm.TINY_CONFIG["n_layer"]
    state = torch.load(os.path.join(lm_dir, "ckpt.pt"), weights_only=True)
    assert state["kind"] == "lm" and state["step"] == 2
    torch.testing.assert_close(base.transformer.wte.weight, state["model"]["base.transformer.wte.weight"])
    assert sorted(os.listdir(lm_dir)) == ["base", "ckpt.pt"]  # no base.tmp / base.old left behind
    # --eval-only takes --block-size from the checkpoint and reproduces the held-out numbers
    again, _ = run_script(pretrain_lm.main, ["--eval-only", "--resume", lm_dir, "--data", text_file, "--batch-size",
                                             "4", "--eval-batches", "2", "--device", "cpu"], capsys)
    assert again["step"] == 2 and again["val_ce"] == pytest.approx(metrics["val_ce"], abs=1e-5)
    # the VAE on it: a pretrained base, so frozen, and not saved in the VAE's checkpoint
    run_script(train_vae.main, ["--model", os.path.join(lm_dir, "base"), "--data", text_file, "--out-dir", vae_dir,
                                "--context", "8", "--batch-size", "4", "--eval-batches", "1", "--latent-size", "16",
                                "--lora-r", "4", "--max-iters", "1", "--eval-interval", "1", "--device", "cpu"], capsys)
    state = torch.load(os.path.join(vae_dir, "ckpt.pt"), weights_only=True)
    assert not [k for k in state["model"] if k.startswith("base.") and ".lora_" not in k]


def test_resume_is_exact(tmp_path, capsys, monkeypatch, text_file):
    argv = SMALL[2:] + ["--max-iters", "4", "--data", text_file]
    straight, crashed = str(tmp_path / "straight"), str(tmp_path / "crashed")
    run_script(pretrain_lm.main, argv + ["--out-dir", straight], capsys)
    crash_at_step_2_then_resume(pretrain_lm, argv, crashed, monkeypatch, capsys)
    a, b = (lm.load_base(os.path.join(d, "base"))[0].state_dict() for d in (straight, crashed))
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_a_save_cut_short_after_its_first_half_resumes_exactly(tmp_path, capsys, monkeypatch, text_file):
    """The step-4 save fails writing base/ (a full disk): base/ and the checkpoint both stay at step 2,
    and the resumed run ends where a straight one does (a checkpoint written first would be at step 4
    beside a step-2 base/, and the resume would refuse to run a step)."""
    argv = SMALL[2:] + ["--max-iters", "4", "--data", text_file]
    straight, cut = str(tmp_path / "straight"), str(tmp_path / "cut")
    run_script(pretrain_lm.main, argv + ["--out-dir", straight], capsys)
    save, saves = pretrain_lm.save_base_dir, []

    def full_disk_at_step_4(base, tokenizer, out_dir):
        saves.append(out_dir)
        if len(saves) == 2:  # the step-4 save (evaluations at 2 and 4)
            raise UserError(f"cannot save {out_dir}/base (No space left on device)")
        save(base, tokenizer, out_dir)

    monkeypatch.setattr(pretrain_lm, "save_base_dir", full_disk_at_step_4)
    assert "No space left" in run_script_error(pretrain_lm.main, argv + ["--out-dir", cut], capsys)
    assert torch.load(os.path.join(cut, "ckpt.pt"), weights_only=True)["step"] == 2
    monkeypatch.setattr(pretrain_lm, "save_base_dir", save)
    run_script(pretrain_lm.main, ["--resume", cut, "--max-iters", "4", "--data", text_file], capsys)
    a, b = (lm.load_base(os.path.join(d, "base"))[0].state_dict() for d in (straight, cut))
    for k in a:
        assert torch.equal(a[k], b[k]), k


@pytest.mark.parametrize("flags, message", [
    (["--block-size", "600"], "--block-size 600 is more than the 512 positions of tiny: use --block-size 512"),
    (["--block-size", "500"], "fewer than one window of 500; give more text or a smaller --block-size"),
    (["--lr", "1e6", "--grad-clip", "0", "--max-iters", "40"], "stopped before saving"),  # diverges, saves nothing
    (["--eval-only"], "pass --resume DIR too")])
def test_bad_flags_are_one_line_errors_that_write_nothing(tmp_path, capsys, text_file, flags, message):
    out = tmp_path / "lm"
    assert message in run_script_error(pretrain_lm.main, SMALL + ["--data", text_file, "--out-dir", str(out)] + flags,
                                       capsys)
    assert not os.path.exists(out / "ckpt.pt") and not os.path.exists(out / "base")


def test_refuses_an_unwritable_out_dir(tmp_path, capsys, text_file):
    (tmp_path / "file").write_text("x")
    assert "cannot write to --out-dir" in run_script_error(
        pretrain_lm.main, SMALL + ["--data", text_file, "--out-dir", str(tmp_path / "file" / "lm")], capsys)


def test_markov_streams_are_one_seeded_chain_with_structure():
    train, val = pretrain_lm.markov_streams(8, seed=3, num_chains=50, train_steps=400, val_steps=40)
    assert train.shape == (50 * 400,) and val.shape == (50 * 40,) and 0 <= int(train.min()) and int(train.max()) < 8
    again, _ = pretrain_lm.markov_streams(8, seed=3, num_chains=50, train_steps=400, val_steps=40)
    other, _ = pretrain_lm.markov_streams(8, seed=4, num_chains=50, train_steps=400, val_steps=40)
    assert torch.equal(train, again) and not torch.equal(train, other)
    # a next token depends on the one before: the conditional entropy is well below log(8)
    walks = train.view(50, 400)
    pairs = torch.zeros(8, 8).index_put_((walks[:, :-1].flatten(), walks[:, 1:].flatten()), torch.ones(50 * 399),
                                         accumulate=True)
    p = pairs / pairs.sum(1, keepdim=True)
    conditional = -(pairs / pairs.sum() * p.clamp(min=1e-12).log()).sum()
    assert conditional < 0.9 * torch.log(torch.tensor(8.0))


def test_synthetic_pretraining_runs_and_refuses_data_too(tmp_path, capsys, text_file):
    metrics, _ = run_script(pretrain_lm.main, SMALL + ["--synthetic", "markov", "--out-dir", str(tmp_path / "m")],
                            capsys)
    assert metrics["steps"] == 2 and os.path.isdir(tmp_path / "m" / "base")
    err = run_script_error(pretrain_lm.main, SMALL + ["--synthetic", "markov", "--data", text_file, "--out-dir",
                                                      str(tmp_path / "n")], capsys)
    assert "--synthetic" in err and not os.path.exists(tmp_path / "n")
    # resumed: the checkpoint's --synthetic refuses --data too, and its chain's --seed stays
    resume = SMALL + ["--resume", str(tmp_path / "m"), "--out-dir", str(tmp_path / "m"), "--max-iters", "3"]
    err = run_script_error(pretrain_lm.main, resume + ["--data", text_file], capsys)
    assert "--synthetic makes its own tokens" in err
    assert "--seed 7 (saved: 1337)" in run_script_error(pretrain_lm.main, resume + ["--seed", "7"], capsys)
