"""Tests for train_wm.py: real Gymnasium envs (CartPole-v1, ALE/Pong-v5), a handful of steps."""

import os

import pytest
import torch

import lm
import lora
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


LM_BACKBONE = ["--backbone", "lm", "--num-bins", "16", "--lora-r", "4"]  # 4 x 16 + 2 tokens fit a 257-row vocabulary


@pytest.mark.parametrize("backbone", [[], LM_BACKBONE + ["--embeddings", "lm-trained"]], ids=["iris", "lm"])
def test_cartpole_resume_is_exact(tmp_path, capsys, monkeypatch, backbone):
    straight, crashed = str(tmp_path / "straight"), str(tmp_path / "crashed")
    argv = CARTPOLE + backbone + ["--max-iters", "4", "--eval-interval", "2"]
    run_main(argv + ["--out-dir", straight], capsys)

    crash_at_step_2_then_resume(train_wm, argv, crashed, monkeypatch, capsys)
    a = torch.load(os.path.join(straight, "ckpt.pt"), weights_only=True)
    b = torch.load(os.path.join(crashed, "ckpt.pt"), weights_only=True)
    assert a["step"] == b["step"] == 4
    for name, tensor in a["world_model"].items():
        assert torch.equal(tensor, b["world_model"][name]), name


def test_lm_backbone_trains_saves_only_its_adapter_and_reloads(tmp_path, capsys, saved_model_dir):
    """A saved tiny GPT-2 / Mistral as the transformer, LM-table embeddings kept frozen: the base
    and the tables do not move, the checkpoint holds the adapter but not the base, and
    --eval-only rebuilds the same model from --model + checkpoint."""
    out = str(tmp_path / "run")
    argv = CARTPOLE + LM_BACKBONE + ["--model", saved_model_dir, "--embeddings", "lm-frozen"]
    metrics, lines = run_main(argv + ["--max-iters", "3", "--eval-interval", "3", "--out-dir", out], capsys)
    assert any("lm backbone" in line and "M trainable of" in line for line in lines)
    assert metrics["train_tokens_per_s"] > 0 and metrics["imagined_steps_per_s"] > 0
    state = torch.load(os.path.join(out, "ckpt.pt"), weights_only=True)["world_model"]
    lm_keys = [k for k in state if k.startswith("backbone.lm.")]
    assert lm_keys and all(lora.is_lora_key(k, "dynamics") for k in lm_keys)
    lm_table = lm.load_base(saved_model_dir)[0].get_input_embeddings().weight
    obs_table, act_table = state["embedder.tables.0.weight"], state["embedder.tables.1.weight"]
    assert torch.equal(torch.cat([obs_table, act_table]), lm_table[-(4 * 16 + 2):])  # the last rows, untouched
    assert any(v.abs().sum() > 0 for k, v in state.items() if ".lora_B." in k)  # the adapter trained
    again, _ = run_main(argv + ["--eval-only", "--resume", out], capsys)
    for key in ("val_obs_ce", "val_end_acc", "imag_err_h5"):
        assert again[key] == pytest.approx(metrics[key], abs=1e-6), key


@pytest.mark.parametrize("flag", ["--lm-init random", "--train-base"])
def test_lm_backbone_random_or_trained_base_is_saved(tmp_path, capsys, saved_model_dir, flag):
    """--lm-init random (frozen fresh weights) and --train-base (pretrained weights, trained): either
    way the base in the checkpoint is all there and differs from the saved pretrained one."""
    out = str(tmp_path / "run")
    run_main(CARTPOLE + LM_BACKBONE + ["--model", saved_model_dir, *flag.split(), "--max-iters", "2",
                                       "--eval-interval", "2", "--out-dir", out], capsys)
    state = torch.load(os.path.join(out, "ckpt.pt"), weights_only=True)["world_model"]
    pretrained = lm.load_base(saved_model_dir)[0].state_dict()
    base = {k.removeprefix("backbone.lm.").replace(".base.", "."): v for k, v in state.items()
            if k.startswith("backbone.lm.") and not lora.is_lora_key(k)}  # LoRA keeps a wrapped weight as .base
    assert base.keys() == pretrained.keys()
    matrices = [k for k in base if (".h." in k or ".layers." in k) and base[k].dim() == 2]  # the decoder layers
    assert matrices and not any(torch.equal(base[k], pretrained[k]) for k in matrices)


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
    # another row of a comparison reuses that tokenizer instead of training its own
    other = str(tmp_path / "other")
    _, lines = run_main(argv[:-1] + [other, "--tokenizer-from", out, "--backbone", "lm", "--max-iters", "1"], capsys)
    assert not any(line.startswith("training the frame tokenizer") for line in lines)
    theirs = torch.load(os.path.join(other, "ckpt.pt"), weights_only=True)["tokenizer"]
    assert all(torch.equal(theirs[k], v) for k, v in state["tokenizer"].items())


def test_bad_input_is_one_line_and_exit_2(tmp_path, capsys):
    assert "unknown Gymnasium env" in run_error(["--env", "NoSuchEnv-v0"], capsys)
    assert "Discrete action space" in run_error(["--env", "Pendulum-v1"], capsys)
    assert "observations" in run_error(["--env", "FrozenLake-v1"], capsys)
    assert "--backbone lm" in run_error(["--model", "gpt2"], capsys)
    assert "--backbone lm" in run_error(["--embeddings", "lm-frozen"], capsys)
    assert "--num-bins" in run_error(CARTPOLE + ["--backbone", "lm", "--embeddings", "lm-frozen"], capsys)
    assert "--segment-steps" in run_error(CARTPOLE + ["--backbone", "lm", "--segment-steps", "200"], capsys)
    assert "cannot quantize" in run_error(["--backbone", "lm", "--lm-init", "random", "--load-8bit"], capsys)
    assert "drop --train-base" in run_error(["--backbone", "lm", "--train-base", "--offload"], capsys)
    assert "--resume" in run_error(["--eval-only"], capsys)
    out = str(tmp_path / "run")
    run_main(CARTPOLE + ["--max-iters", "1", "--eval-interval", "1", "--out-dir", out], capsys)
    assert "already exists" in run_error(CARTPOLE + ["--max-iters", "1", "--out-dir", out], capsys)
    assert "width" in run_error(CARTPOLE + ["--width", "64", "--max-iters", "2", "--resume", out], capsys)
