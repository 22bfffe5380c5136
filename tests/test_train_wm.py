"""Tests for train_wm.py: real Gymnasium envs (CartPole-v1, ALE/Pong-v5), a handful of steps."""

import os

import pytest
import torch

import train_wm
from conftest import crash_at_step_2_then_resume, run_script, run_script_error

TINY = ["--width", "32", "--num-layers", "1", "--num-heads", "2", "--batch-size", "4", "--log-interval", "1",
        "--warmup-iters", "1", "--horizon", "5", "--num-imagine", "8", "--device", "cpu"]
CARTPOLE = TINY + ["--collect-steps", "600", "--segment-steps", "6"]


def run_main(argv, capsys):
    return run_script(train_wm.main, argv, capsys)


def run_error(argv, capsys):
    return run_script_error(train_wm.main, argv, capsys)


def test_segments_pad_past_the_episode_end():
    data = {"episode": torch.tensor([0, 0, 0, 1, 1]), "obs_tokens": torch.arange(10).view(5, 2),
            "actions": torch.arange(5), "rewards": torch.arange(5.0), "ends": torch.tensor([0, 0, 1, 0, 0])}
    train_wm.add_episode_bounds(data)
    assert data["episode_start"].tolist() == [0, 0, 0, 3, 3]
    assert data["episode_end"].tolist() == [3, 3, 3, 5, 5]
    batch = train_wm.segments(data, torch.tensor([1, 3]), num_steps=3)
    assert batch["mask_padding"].tolist() == [[True, True, False], [True, True, False]]
    assert batch["actions"][:, :2].tolist() == [[1, 2], [3, 4]]  # never crosses into the next episode


def test_cartpole_trains_evaluates_and_draws(tmp_path, capsys):
    out = str(tmp_path / "run")
    metrics, lines = run_main(CARTPOLE + ["--max-iters", "3", "--eval-interval", "3", "--out-dir", out], capsys)
    assert any(line.startswith("step 3/3 |") and "obs " in line and "eta" in line for line in lines)
    for key in ("val_obs_acc", "val_obs_ce", "val_reward_acc", "val_end_acc", "val_reward_event_acc",
                "val_end_event_acc", "tokenizer_err", "train_loss", "imag_err_h1", "copy_err_h1", "imag_acc_h5",
                "copy_acc_h5", "imag_beats_copy_up_to_h"):
        assert key in metrics, key
    assert 0 <= metrics["val_obs_acc"] <= 1 and metrics["copy_err_h5"] > metrics["copy_err_h1"] > 0
    assert os.path.isfile(os.path.join(out, "ckpt.pt"))
    with open(os.path.join(out, "imagination.png"), "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    # --eval-only on the checkpoint gives the same held-out numbers
    again, _ = run_main(CARTPOLE + ["--eval-only", "--resume", out], capsys)
    for key in ("val_obs_ce", "val_end_acc", "imag_err_h5", "copy_err_h5"):
        assert again[key] == pytest.approx(metrics[key], abs=1e-6), key


def test_cartpole_resume_is_exact(tmp_path, capsys, monkeypatch):
    straight, crashed = str(tmp_path / "straight"), str(tmp_path / "crashed")
    argv = CARTPOLE + ["--max-iters", "4", "--eval-interval", "2"]
    run_main(argv + ["--out-dir", straight], capsys)

    crash_at_step_2_then_resume(train_wm, argv, crashed, monkeypatch, capsys)
    a = torch.load(os.path.join(straight, "ckpt.pt"), weights_only=True)
    b = torch.load(os.path.join(crashed, "ckpt.pt"), weights_only=True)
    assert a["step"] == b["step"] == 4
    for name, tensor in a["world_model"].items():
        assert torch.equal(tensor, b["world_model"][name]), name


def test_collection_is_a_function_of_the_seed():
    env = train_wm.make_env("CartPole-v1")
    tokenizer = train_wm.make_tokenizer(env, train_wm.parse_args([]))
    a, b = (train_wm.collect(env, tokenizer, 300, seed=3) for _ in range(2))
    c = train_wm.collect(env, tokenizer, 300, seed=4)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["obs"], c["obs"])
    assert a["ends"].sum() == a["episode"][-1]  # every episode but the cut last one ends terminated


def test_pong_smoke(tmp_path, capsys):
    out = str(tmp_path / "pong")
    argv = TINY + ["--env", "ALE/Pong-v5", "--collect-steps", "2500", "--segment-steps", "3", "--horizon", "2",
                   "--tokenizer-iters", "2", "--tokenizer-batch-size", "8", "--max-iters", "2",
                   "--eval-interval", "2", "--num-imagine", "4", "--out-dir", out]
    metrics, lines = run_main(argv, capsys)
    assert any(line.startswith("training the frame tokenizer") for line in lines)
    assert 0 < metrics["tokenizer_err"] < 1 and "imag_err_h2" in metrics
    state = torch.load(os.path.join(out, "ckpt.pt"), weights_only=True)
    assert state["tokenizer_step"] == 2 and state["step"] == 2


def test_bad_input_is_one_line_and_exit_2(tmp_path, capsys):
    assert "unknown Gymnasium env" in run_error(["--env", "NoSuchEnv-v0"], capsys)
    assert "Discrete action space" in run_error(["--env", "Pendulum-v1"], capsys)
    assert "observations" in run_error(["--env", "FrozenLake-v1"], capsys)
    assert "--backbone iris" in run_error(["--model", "gpt2"], capsys)
    assert "--resume" in run_error(["--eval-only"], capsys)
    out = str(tmp_path / "run")
    run_main(CARTPOLE + ["--max-iters", "1", "--eval-interval", "1", "--out-dir", out], capsys)
    assert "already exists" in run_error(CARTPOLE + ["--max-iters", "1", "--out-dir", out], capsys)
    assert "width" in run_error(CARTPOLE + ["--width", "64", "--max-iters", "2", "--resume", out], capsys)
