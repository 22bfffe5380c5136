"""Tests for train_wm.py, wm_setup.py and data_wm.py: real Gymnasium envs (CartPole-v1, ALE/Pong-v5), a handful
of steps. Every test runs in its own tmp directory, so the default --out-dir out-wm lands there."""

import os
import re
import sys
from dataclasses import replace
from types import SimpleNamespace

import gymnasium as gym
import pytest
import torch

import common
import data_wm
import lm
import lora
import train_agent
import train_wm
import wm_setup
from conftest import crash_at_step_2_then_resume, run_script, run_script_error
from common import UserError, batch_seed, config_from
from eval_wm import imagination_starts
from obs_tokenizer import FrameTokenizer, FrameTokenizerConfig, VectorTokenizer, VectorTokenizerConfig
from trainer import Run, TrainConfig
from worldmodel import Transformer, TransformerConfig, WorldModel, WorldModelConfig

TINY = ["--width", "32", "--num-layers", "1", "--num-heads", "2", "--batch-size", "4", "--log-interval", "1",
        "--warmup-iters", "1", "--horizon", "5", "--num-imagine", "8", "--device", "cpu"]
CARTPOLE = TINY + ["--collect-steps", "600", "--segment-steps", "6"]
EVAL = ["--horizon", "5", "--num-imagine", "8", "--device", "cpu"]  # not settings a checkpoint keeps


@pytest.fixture(autouse=True)
def in_tmp_dir(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)


def run_main(argv, capsys):
    return run_script(train_wm.main, argv, capsys)


def run_error(argv, capsys):
    return run_script_error(train_wm.main, argv, capsys)


def ckpt_bytes(out):
    with open(os.path.join(out, "ckpt.pt"), "rb") as f:
        return f.read()


def finished_run(out, capsys, extra=()):
    """A one-step CartPole run into out; its checkpoint's bytes."""
    run_main(CARTPOLE + ["--max-iters", "1", "--eval-interval", "1", "--out-dir", out, *extra], capsys)
    return ckpt_bytes(out)


@torch.no_grad()
def recomputed_obs_acc(out):
    """val_obs_acc of a CartPole run's checkpoint, recomputed here: its tokenizer and IRIS world model
    rebuilt from it, the run's held-out episodes collected again (the same seed), and the share of
    their observation tokens the model predicts by argmax, over segments from each episode's start."""
    state = torch.load(os.path.join(out, "ckpt.pt"), weights_only=True)
    c = state["config"]
    tokenizer = VectorTokenizer(VectorTokenizerConfig(obs_dim=4, num_bins=c["num_bins"]))
    tokenizer.load_state_dict(state["tokenizer"])
    shapes = WorldModelConfig(tokens_per_obs=4, obs_vocab_size=tokenizer.vocab_size, num_actions=2,
                              max_steps=c["segment_steps"])
    world_model = WorldModel(shapes, Transformer(TransformerConfig(width=c["width"], num_layers=c["num_layers"],
                                                                   num_heads=c["num_heads"], dropout=c["dropout"])))
    world_model.load_state_dict(state["world_model"])
    world_model.eval()
    data = data_wm.collect(data_wm.make_env("CartPole-v1"), tokenizer, c["collect_steps"], c["seed"])
    _, val = data_wm.split(data, c["val_fraction"])
    val["obs_tokens"] = tokenizer.encode(val["obs"])  # (N, 4)
    data_wm.add_episode_bounds(val)
    right = total = 0
    for start in range(len(val["episode"])):
        if (start - val["episode_start"][start]) % c["segment_steps"] == 0:
            batch = data_wm.segments(val, torch.tensor([start]), c["segment_steps"])
            logits, labels = world_model.logits_and_labels(batch)["obs"]
            right += (logits.argmax(-1) == labels)[labels != -100].sum().item()
            total += (labels != -100).sum().item()
    return right / total


def test_segments_pad_past_the_episode_end():
    data = {"episode": torch.tensor([0, 0, 0, 1, 1]), "obs_tokens": torch.arange(10).view(5, 2),
            "actions": torch.arange(5), "rewards": torch.arange(5.0), "ends": torch.tensor([0, 0, 1, 0, 0])}
    data_wm.add_episode_bounds(data)
    assert data["episode_start"].tolist() == [0, 0, 0, 3, 3]
    assert data["episode_end"].tolist() == [3, 3, 3, 5, 5]
    batch = data_wm.segments(data, torch.tensor([1, 3]), num_steps=3)
    assert batch["mask_padding"].tolist() == [[True, True, False], [True, True, False]]
    assert batch["actions"][:, :2].tolist() == [[1, 2], [3, 4]]  # never crosses into the next episode


def end_data(lengths, ends):
    """Episodes of these lengths, each ending (a true end on its last step) or cut, tokenized for segments()."""
    episode = torch.cat([torch.full((n,), i) for i, n in enumerate(lengths)])
    is_end = torch.cat([torch.arange(n) == n - 1 if e else torch.zeros(n, dtype=torch.bool)
                        for n, e in zip(lengths, ends)])
    n = len(episode)
    data = {"episode": episode, "obs_tokens": torch.arange(4 * n).view(n, 4), "actions": torch.arange(n),
            "rewards": torch.zeros(n), "ends": is_end}
    data_wm.add_episode_bounds(data)
    return data


def test_segment_batches_oversample_episode_ends():
    """--end-share: that share of each batch holds a true end, unpadded, at every position of the segment
    across batches; the rest start uniformly. Episodes of 1 and 3 steps are shorter than the segment."""
    tokenizer = VectorTokenizer(VectorTokenizerConfig(obs_dim=4, num_bins=8))
    data = end_data([40, 1, 3, 60, 25, 30], [True, True, True, True, False, True])  # the 25-step one is cut
    get_batch = wm_setup.segment_batches(data, tokenizer, 6, 8, seed=3, device="cpu", end_share=0.5)
    positions = set()
    for index in range(30):
        batch = get_batch(index)
        assert batch["obs_tokens"].shape == (8, 6, 4) and batch["num_tokens"] == 8 * 6 * 5
        holds_end = batch["ends"] & batch["mask_padding"]  # (B, L)
        assert holds_end.any(1).sum() >= 4
        assert holds_end[4:].any(1).all()  # the drawn ones: after the uniform ones
        positions |= set(holds_end[4:].nonzero()[:, 1].tolist())
        assert torch.equal(batch["actions"], get_batch(index)["actions"])  # a pure function of (seed, index)
    assert positions == set(range(6))


def test_a_small_end_share_still_draws_one_end():
    """A share that rounds to no segment of the batch (0.01 of 8) still draws one: the flag is never a no-op."""
    tokenizer = VectorTokenizer(VectorTokenizerConfig(obs_dim=4, num_bins=8))
    data = end_data([40, 3, 60], [True, True, True])
    batch = wm_setup.segment_batches(data, tokenizer, 6, 8, seed=3, device="cpu", end_share=0.01)(0)
    assert (batch["ends"] & batch["mask_padding"])[7].any()  # the last segment is the drawn one


def test_segment_batches_without_end_share_draw_uniform_starts_as_before():
    tokenizer = VectorTokenizer(VectorTokenizerConfig(obs_dim=4, num_bins=8))
    data = end_data([40, 1, 3, 60, 25, 30], [True, True, True, True, False, True])
    get_batch = wm_setup.segment_batches(data, tokenizer, 6, 8, seed=3, device="cpu")
    for index in range(3):
        g = torch.Generator().manual_seed(batch_seed(3, index))
        expected = data_wm.segments(data, torch.randint(len(data["actions"]), (8,), generator=g), 6)  # the old draw
        batch = get_batch(index)
        for key, tensor in expected.items():
            assert torch.equal(batch[key], tensor), key
    # no end in the data: every segment starts uniformly, whatever the share
    no_ends = end_data([40, 30], [False, False])
    batch = wm_setup.segment_batches(no_ends, tokenizer, 6, 8, seed=3, device="cpu", end_share=1.0)(0)
    assert batch["obs_tokens"].shape == (8, 6, 4) and not batch["ends"].any()


def test_cartpole_trains_evaluates_and_draws(tmp_path, capsys):
    out = str(tmp_path / "run")
    # 8 bins a dimension: after 3 steps the model predicts some observation tokens (with 64, none)
    metrics, lines = run_main(CARTPOLE + ["--max-iters", "3", "--eval-interval", "3", "--num-bins", "8", "--out-dir",
                                          out], capsys)
    assert any(line.startswith("step 3/3 |") and "obs " in line and "eta" in line for line in lines)
    for key in ("val_obs_acc", "val_obs_ce", "val_reward_acc", "val_end_acc", "val_reward_event_acc",
                "val_end_event_acc", "tokenizer_err", "train_loss", "imag_err_h1", "copy_err_h1", "imag_acc_h5",
                "copy_acc_h5", "imag_beats_copy_up_to_h"):
        assert key in metrics, key
    assert metrics["copy_err_h5"] > metrics["copy_err_h1"] > 0
    assert metrics["val_obs_acc"] == pytest.approx(recomputed_obs_acc(out), abs=1e-6)
    state = torch.load(os.path.join(out, "ckpt.pt"), weights_only=True)
    assert state["kind"] == "wm" and state["step"] == 3 and state["config"]["tokenizer_iters"] == 0  # vectors
    with open(os.path.join(out, "imagination.png"), "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    # --eval-only on the checkpoint gives the same held-out numbers, its settings taken from the checkpoint
    again, _ = run_main(["--eval-only", "--resume", out, *EVAL], capsys)
    for key in ("val_obs_ce", "val_end_acc", "imag_err_h5", "copy_err_h5"):
        assert again[key] == pytest.approx(metrics[key], abs=1e-6), key
    assert not os.path.exists("out-wm")


def test_frozenlake_states_are_tokens_and_draw_one_plot(tmp_path, capsys):
    """A Discrete observation (FrozenLake's 16 cells) is its own token: nothing lost, one token a step."""
    out = str(tmp_path / "run")
    metrics, _ = run_main(TINY + ["--env", "FrozenLake-v1", "--collect-steps", "400", "--segment-steps", "6",
                                  "--max-iters", "2", "--eval-interval", "2", "--out-dir", out], capsys)
    assert metrics["tokenizer_err"] == 0.0
    assert 0 < metrics["copy_err_h1"] < metrics["copy_err_h5"] < 2.0  # finite: cells never visited count in units
    state = torch.load(os.path.join(out, "ckpt.pt"), weights_only=True)
    assert state["tokenizer"] == {} and state["world_model"]["embedder.tables.0.weight"].shape[0] == 16
    from PIL import Image
    with Image.open(os.path.join(out, "imagination.png")) as picture:
        assert picture.width == 2 * 300  # the cell's token, and the error per step: not 16 one-hot plots
    env = SimpleNamespace(observation_space=gym.spaces.Discrete(16, start=-2))  # states -2 .. 13
    offset = wm_setup.make_tokenizer(env, None)
    assert offset.encode(offset.preprocess([-2, 13])).tolist() == [[0], [15]]


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


def test_a_resumed_run_takes_its_settings_from_the_checkpoint(tmp_path, capsys):
    out = str(tmp_path / "run")
    finished_run(out, capsys, ["--backbone", "lm", "--num-bins", "16", "--lora-r", "4", "--dtype", "float32"])
    metrics, lines = run_main(["--resume", out, "--max-iters", "2", "--batch-size", "4", *EVAL], capsys)
    assert metrics["steps"] == 2 and any("lm backbone, tiny" in line for line in lines)
    config = torch.load(os.path.join(out, "ckpt.pt"), weights_only=True)["config"]
    assert config["num_bins"] == 16 and config["dtype"] == "float32"  # not --dtype's default, auto


@pytest.fixture
def model_only_dir(saved_model_dir, tmp_path):
    """saved_model_dir's weights and config, without anything that names a tokenizer: a directory
    that save_pretrained alone wrote (the world model reads no text, so needs no tokenizer)."""
    model, _ = lm.load_base(saved_model_dir)
    delattr(model.config, lm.TOKENIZER_KEY)
    path = tmp_path / "model-only"
    model.save_pretrained(path)
    assert sorted(os.listdir(path)) == ["config.json", "generation_config.json", "model.safetensors"]
    assert lm.TOKENIZER_KEY not in (path / "config.json").read_text()
    return str(path)


def test_lm_backbone_trains_saves_only_its_adapter_and_reloads(tmp_path, capsys, model_only_dir):
    """A saved tiny GPT-2 / Mistral (no tokenizer files) as the transformer, LM-table embeddings kept
    frozen: the base and the tables do not move, the checkpoint holds the adapter but not the base,
    and --eval-only rebuilds the same model from --model + checkpoint."""
    out = str(tmp_path / "run")
    argv = CARTPOLE + LM_BACKBONE + ["--model", model_only_dir, "--embeddings", "lm-frozen"]
    metrics, lines = run_main(argv + ["--max-iters", "3", "--eval-interval", "3", "--out-dir", out], capsys)
    assert any("lm backbone" in line and "M trainable of" in line for line in lines)
    assert metrics["train_tokens_per_s"] > 0 and metrics["imagined_steps_per_s"] > 0
    state = torch.load(os.path.join(out, "ckpt.pt"), weights_only=True)["world_model"]
    lm_keys = [k for k in state if k.startswith("backbone.lm.")]
    assert lm_keys and all(lora.is_lora_key(k, "dynamics") for k in lm_keys)
    lm_table = lm.load_base(model_only_dir, should_load_tokenizer=False)[0].get_input_embeddings().weight
    obs_table, act_table = state["embedder.tables.0.weight"], state["embedder.tables.1.weight"]
    assert torch.equal(torch.cat([obs_table, act_table]), lm_table[-(4 * 16 + 2):])  # the last rows, untouched
    assert any(v.abs().sum() > 0 for k, v in state.items() if ".lora_B." in k)  # the adapter trained
    again, _ = run_main(["--eval-only", "--resume", out, *EVAL], capsys)
    for key in ("val_obs_ce", "val_end_acc", "imag_err_h5"):
        assert again[key] == pytest.approx(metrics[key], abs=1e-6), key
    # the base is not in the checkpoint, its fingerprint is: a base replaced since is refused
    assert "base_fingerprint" in torch.load(os.path.join(out, "ckpt.pt"), weights_only=True)
    changed = lm.load_base(model_only_dir, should_load_tokenizer=False)[0]
    with torch.no_grad():
        changed.get_input_embeddings().weight.add_(1e-3)
    changed.save_pretrained(model_only_dir)
    assert f"the base {model_only_dir} is not the one the checkpoint in {out} was trained on" in run_error(
        ["--eval-only", "--resume", out, *EVAL], capsys)


@pytest.mark.parametrize("flag", ["--lm-init random", "--train-base"])
def test_lm_backbone_random_or_trained_base_is_saved(tmp_path, capsys, saved_model_dir, flag):
    """--lm-init random (frozen fresh weights) and --train-base (pretrained weights, trained): either
    way the base in the checkpoint is all there and differs from the saved pretrained one."""
    out = str(tmp_path / "run")
    run_main(CARTPOLE + LM_BACKBONE + ["--model", saved_model_dir, *flag.split(), "--max-iters", "2",
                                       "--eval-interval", "2", "--out-dir", out], capsys)
    saved = torch.load(os.path.join(out, "ckpt.pt"), weights_only=True)
    state = saved["world_model"]
    assert "base_fingerprint" not in saved  # the base is in the checkpoint itself
    pretrained = lm.load_base(saved_model_dir)[0].state_dict()
    base = {k.removeprefix("backbone.lm.").replace(".base.", "."): v for k, v in state.items()
            if k.startswith("backbone.lm.") and not lora.is_lora_key(k)}  # LoRA keeps a wrapped weight as .base
    assert base.keys() == pretrained.keys()
    matrices = [k for k in base if (".h." in k or ".layers." in k) and base[k].dim() == 2]  # the decoder layers
    assert matrices and not any(torch.equal(base[k], pretrained[k]) for k in matrices)


def test_lm_layers_trains_the_cut_lm_and_reloads_it_cut(tmp_path, capsys, saved_model_dir):
    """--lm-layers 1 of a saved 2-layer LM, frozen: the checkpoint holds adapters for layer 0 only, and
    --eval-only cuts the reloaded LM the same way (the same metrics)."""
    out = str(tmp_path / "run")
    argv = CARTPOLE + LM_BACKBONE + ["--model", saved_model_dir, "--lm-layers", "1"]
    metrics, _ = run_main(argv + ["--max-iters", "2", "--eval-interval", "2", "--out-dir", out], capsys)
    state = torch.load(os.path.join(out, "ckpt.pt"), weights_only=True)
    layers = {re.search(r"\.(?:h|layers)\.(\d+)\.", k).group(1) for k in state["world_model"] if ".lora_A." in k}
    assert layers == {"0"} and state["config"]["lm_layers"] == 1
    again, _ = run_main(["--eval-only", "--resume", out, *EVAL], capsys)
    for key in ("val_obs_ce", "imag_err_h5"):
        assert again[key] == pytest.approx(metrics[key], abs=1e-6), key
    err = run_error(argv[:-1] + ["5"] + ["--out-dir", str(tmp_path / "bad")], capsys)
    assert f"--lm-layers 5: --model {saved_model_dir} has 2 layers; give that many or fewer" in err
    assert not os.path.exists(tmp_path / "bad")  # refused before anything was written


def test_collection_is_a_function_of_the_seed():
    env = data_wm.make_env("CartPole-v1")
    tokenizer = wm_setup.make_tokenizer(env, wm_setup.TokenizerSettings())
    a, b = (data_wm.collect(env, tokenizer, 300, seed=3) for _ in range(2))
    c = data_wm.collect(env, tokenizer, 300, seed=4)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["obs"], c["obs"])
    assert a["ends"].sum() == a["episode"][-1]  # every episode but the cut last one ends terminated
    assert torch.equal(a["dones"][:-1], a["episode"][1:] != a["episode"][:-1]) and not a["dones"][-1]
    limited = data_wm.collect(gym.make("CartPole-v1", max_episode_steps=5), tokenizer, 10, seed=3)
    assert limited["dones"].tolist() == ([False] * 4 + [True]) * 2  # cut by the time limit (a pole falls later)
    assert not limited["ends"].any()


@pytest.mark.parametrize("script", [train_wm, train_agent], ids=["train_wm", "train_agent"])
def test_the_settings_default_to_the_flags_defaults(script):
    """WorldModelSettings() and TokenizerSettings() are the flags' defaults in both scripts, but for what
    each script settles after parsing: --tokenizer-iters (and --model, tiny with --backbone lm)."""
    flags = vars(script.parse_args([]))
    assert wm_setup.settings_from(flags) == wm_setup.WorldModelSettings()
    tokenizer = config_from(wm_setup.TokenizerSettings, {**flags, "tokenizer_iters": 0})
    assert replace(tokenizer, fsq_levels=tuple(tokenizer.fsq_levels)) == wm_setup.TokenizerSettings()


def test_pong_smoke(tmp_path, capsys):
    """Frames: the tokenizer trains first, for --max-iters steps when --tokenizer-iters is not given."""
    out = str(tmp_path / "pong")
    argv = TINY + ["--env", "ALE/Pong-v5", "--collect-steps", "1800", "--segment-steps", "3", "--horizon", "2",
                   "--tokenizer-batch-size", "8", "--max-iters", "2", "--eval-interval", "2", "--num-imagine", "4"]
    metrics, lines = run_main(argv + ["--out-dir", out], capsys)
    assert "training the frame tokenizer for 2 steps" in lines
    assert 0 < metrics["tokenizer_err"] < 1 and "imag_err_h2" in metrics
    state = torch.load(os.path.join(out, "ckpt.pt"), weights_only=True)
    assert state["tokenizer_step"] == state["config"]["tokenizer_iters"] == 2 and state["step"] == 2
    # another row of a comparison reuses that tokenizer instead of training its own; it must be made from
    # the same data (here --tokenizer-iters, which would follow this run's --max-iters 1), found at start
    other = str(tmp_path / "other")
    reuse = argv + ["--out-dir", other, "--tokenizer-from", out, "--backbone", "lm", "--max-iters", "1"]
    assert "--tokenizer-iters 2" in run_error(reuse, capsys) and not os.path.exists(other)
    _, lines = run_main(reuse + ["--tokenizer-iters", "2"], capsys)
    assert not any(line.startswith("training the frame tokenizer") for line in lines)
    theirs = torch.load(os.path.join(other, "ckpt.pt"), weights_only=True)["tokenizer"]
    assert all(torch.equal(theirs[k], v) for k, v in state["tokenizer"].items())


@pytest.mark.parametrize("argv, message", [
    (["--width", "30"], "--width 30 is not a multiple of --num-heads 4"),
    (["--eval-only"], "pass --resume DIR"),
], ids=lambda v: v if isinstance(v, str) else " ".join(v))
def test_numbers_are_checked_at_parse_time(argv, message, capsys, monkeypatch):
    monkeypatch.setattr(train_wm, "setup", lambda *a: pytest.fail("the flags were not checked at parse time"))
    assert message in run_error(argv, capsys)


def test_an_lm_backbone_does_not_check_iris_sizes():
    """--width and --num-heads size IRIS's transformer only: with --backbone lm (compare_wm passes the same
    flags to every row) a width that heads do not divide is no error."""
    args = train_wm.parse_args(["--backbone", "lm", "--width", "30"])
    assert args.backbone == "lm" and args.width == 30


def test_a_resumed_run_s_shape_is_checked_with_its_saved_width(tmp_path, capsys):
    """A resumed run's width is the checkpoint's, not --width's default (128, which 3 heads do not divide)."""
    out = str(tmp_path / "run")
    finished_run(out, capsys, ["--width", "24", "--num-heads", "3"])
    metrics, _ = run_main(["--resume", out, "--num-heads", "3", "--max-iters", "2", "--eval-interval", "2", *EVAL],
                          capsys)
    assert metrics["steps"] == 2


@pytest.mark.parametrize("before", [None, 0], ids=["train_wm", "train_agent-epoch-0"])
def test_after_the_frame_tokenizer_an_interruption_names_none_of_its_steps(tmp_path, monkeypatch, before):
    """The tokenizer's phase saves its own steps; once it ends, an interrupted run must not report them
    as the world model's (common.standing, which the interruption line reads), and names again what it
    named before: nothing in train_wm.py, train_agent.py's epoch."""
    monkeypatch.setitem(common.standing, "step", before)
    tokenizer = FrameTokenizer(FrameTokenizerConfig())
    frames = torch.randint(0, 256, (4, 64, 64, 3), dtype=torch.uint8)
    settings = wm_setup.TokenizerSettings(tokenizer_iters=2, tokenizer_lr=1e-3, tokenizer_batch_size=2)
    config = TrainConfig(out_dir=str(tmp_path), warmup_iters=1, log_interval=1)
    seen = []
    monkeypatch.setattr(wm_setup, "save_checkpoint", lambda path, state: seen.append(common.standing["step"]))
    wm_setup.train_frame_tokenizer(tokenizer, {"obs": frames}, frames[:2], 255.0, settings, config,
                                   Run(torch.device("cpu")), {})
    assert seen == [2] and common.standing["step"] == before  # its step while it saved, the one before after


def test_a_diverging_frame_tokenizer_names_its_own_lr(tmp_path):
    """The tokenizer's phase trains at --tokenizer-lr, so its divergence names that flag, not --lr."""
    torch.manual_seed(0)
    tokenizer = FrameTokenizer(FrameTokenizerConfig())
    frames = torch.randint(0, 256, (8, 64, 64, 3), dtype=torch.uint8)  # preprocessed frames
    settings = wm_setup.TokenizerSettings(tokenizer_iters=3, tokenizer_lr=1e30, tokenizer_batch_size=2)
    config = TrainConfig(out_dir=str(tmp_path), grad_clip=0.0, warmup_iters=1, log_interval=1)
    with pytest.raises(UserError, match=r"lower --tokenizer-lr \(now 1e\+30\)"):
        wm_setup.train_frame_tokenizer(tokenizer, {"obs": frames}, frames[:2], 255.0, settings, config,
                                       Run(torch.device("cpu")), {})
    assert not os.listdir(tmp_path)  # stopped before saving


def test_imagination_starts_have_the_horizon_left_in_their_episode():
    episode = torch.tensor([0, 0, 0, 1, 1, 1, 1, 2])  # the last episode is cut: its steps count as the data's end
    assert imagination_starts(episode, 2, 8).tolist() == [0, 3, 4]
    assert imagination_starts(episode, 2, 2).tolist() == [0, 4]  # evenly spread over the valid ones
    assert imagination_starts(episode, 3, 8).tolist() == [3]
    with pytest.raises(UserError, match="--horizon 4"):
        imagination_starts(episode, 4, 8)


def test_bad_input_is_one_line_and_exit_2(tmp_path, capsys, monkeypatch):
    assert "unknown Gymnasium env" in run_error(["--env", "NoSuchEnv-v0"], capsys)
    assert "Discrete action space" in run_error(["--env", "Pendulum-v1"], capsys)
    assert "observations Tuple" in run_error(["--env", "Blackjack-v1"], capsys)
    assert "sets no time limit" in run_error(["--env", "CliffWalking-v1"], capsys)  # a Discrete state, no end

    class FromOne(gym.ActionWrapper):  # CartPole with its actions numbered 1 and 2
        def __init__(self, env):
            super().__init__(env)
            self.action_space = gym.spaces.Discrete(2, start=1)

        def action(self, action):
            return action - 1

    spec = gym.envs.registration.EnvSpec("FromOne-v0", lambda: FromOne(gym.make("CartPole-v1")), max_episode_steps=500)
    monkeypatch.setitem(gym.envs.registration.registry, "FromOne-v0", spec)
    assert "actions are numbered from 1; the world model numbers them from 0" in run_error(["--env", "FromOne-v0"], capsys)
    assert not os.path.exists("out-wm")  # nothing was made for a run that could not start
    monkeypatch.setitem(sys.modules, "Box2D", None)  # as on a machine without it (import Box2D fails)
    for name in [m for m in sys.modules if m.startswith("gymnasium.envs.box2d")]:
        monkeypatch.delitem(sys.modules, name)
    err = run_error(["--env", "LunarLander-v3"], capsys)
    assert "not installed" in err and 'pip install "gymnasium[box2d]"' in err and "unknown" not in err
    assert "--model, --offload configure(s) the LM backbone" in run_error(["--model", "gpt2", "--offload"], capsys)
    assert "--backbone lm" in run_error(["--embeddings", "lm-frozen"], capsys)
    assert "--num-bins" in run_error(CARTPOLE + ["--backbone", "lm", "--embeddings", "lm-frozen"], capsys)
    assert "--segment-steps" in run_error(CARTPOLE + ["--backbone", "lm", "--segment-steps", "200"], capsys)
    assert "cannot quantize" in run_error(["--backbone", "lm", "--lm-init", "random", "--load-8bit"], capsys)
    assert "drop --train-base" in run_error(["--backbone", "lm", "--train-base", "--offload"], capsys)
    # a random LM is saved whole, which an offloaded one cannot be (its layers' weights are placeholders)
    assert "are random and saved in the checkpoint" in run_error(["--backbone", "lm", "--offload"], capsys)
    assert "--load-4bit quantizes a frozen base, but this base trains" in run_error(
        ["--backbone", "lm", "--train-base", "--load-4bit"], capsys)
    with monkeypatch.context() as m:  # a --horizon no held-out episode is long enough for is refused before training
        m.setattr(train_wm, "train", lambda *a: pytest.fail("trained before checking --horizon"))
        assert "--horizon 50" in run_error(CARTPOLE + ["--horizon", "50"], capsys)
    # an unwritable --out-dir is found before any data is collected
    (tmp_path / "a-file").write_text("")
    monkeypatch.setattr(train_wm, "collect", lambda *a: pytest.fail("collected before checking --out-dir"))
    assert "cannot write to --out-dir" in run_error(CARTPOLE + ["--out-dir", str(tmp_path / "a-file" / "run")], capsys)


def test_checkpoint_errors_leave_the_checkpoint_unchanged(tmp_path, capsys):
    out = str(tmp_path / "run")
    saved = finished_run(out, capsys)
    assert "already exists" in run_error(CARTPOLE + ["--max-iters", "1", "--out-dir", out], capsys)
    err = run_error(["--width", "64", "--num-layers", "2", "--max-iters", "2", "--resume", out], capsys)
    assert "--width 64 (saved: 32)" in err and "--num-layers 2 (saved: 1)" in err  # every conflict, one line
    # a run that diverges stops before it saves: the last good checkpoint stays
    err = run_error(["--resume", out, "--max-iters", "6", "--eval-interval", "6", "--lr", "1e6", "--dtype",
                     "float16", *EVAL], capsys)
    assert "stopped before saving" in err and "lower --lr (now 1e+06)" in err  # IRIS's transformer is fp32 anyway
    assert ckpt_bytes(out) == saved
