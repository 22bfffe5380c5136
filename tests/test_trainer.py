"""trainer.py: the shared loop resumes exactly, checkpoints are atomic and checked, errors exit 2."""

import argparse
import os

import pytest
import torch

import trainer
from trainer import UserError


class Regression(torch.nn.Module):
    """A toy model with the loss contract: compute_loss(batch, step) -> named terms."""

    def __init__(self):
        super().__init__()
        self.linear = torch.nn.Linear(4, 1)
        self.dropout = torch.nn.Dropout(0.5)  # random: exact resume must reproduce its masks

    def compute_loss(self, batch, step):
        error = self.linear(self.dropout(batch["x"])).squeeze(-1) - batch["y"]
        return {"loss": error.pow(2).mean(), "abs": error.abs().mean()}


def get_batch(index):
    g = torch.Generator().manual_seed(index)
    x = torch.randn(8, 4, generator=g)
    return {"x": x, "y": x.sum(-1), "num_tokens": 8}


def make_args(tmp_path, **overrides):
    args = trainer.add_common_args(argparse.ArgumentParser(), max_iters=6, eval_interval=3, log_interval=1,
                                   warmup_iters=1, lr=0.05).parse_args([])
    args.out_dir = str(tmp_path)
    vars(args).update(overrides)
    return args


class Crash(Exception):
    pass


def fit(args, start_step=0, state=None, crash_at=None):
    run = trainer.setup(args)
    model = Regression()
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr)
    if state is not None:
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])

    def save(step):
        trainer.save_checkpoint(args.out_dir, {"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                                               "step": step, "config": {"width": 4}})
        if step == crash_at:
            raise Crash

    def evaluate():
        return {"val_loss": model.compute_loss(get_batch(10_000), 0)["loss"].item()}

    metrics = trainer.train(model, optimizer, get_batch, evaluate, args, run, start_step, save)
    return model, metrics


def test_resume_is_exact(tmp_path, capsys):
    full, metrics = fit(make_args(tmp_path / "full"))
    out = capsys.readouterr().out
    assert "step 6/6 | loss" in out and "abs" in out and "tok/s" in out and "eta" in out
    assert {"val_loss", "train_loss", "train_abs", "train_seconds", "steps"} <= metrics.keys()

    with pytest.raises(Crash):
        fit(make_args(tmp_path / "half"), crash_at=3)  # killed right after the checkpoint at step 3
    state = trainer.load_checkpoint(tmp_path / "half", {"width": 4}, ["width"])
    assert state["step"] == 3
    resumed, _ = fit(make_args(tmp_path / "half"), start_step=state["step"], state=state)
    for a, b in zip(full.parameters(), resumed.parameters()):
        assert torch.equal(a, b)


def test_checkpoint_is_atomic_and_checked(tmp_path, monkeypatch):
    trainer.save_checkpoint(tmp_path, {"step": 1, "config": {"width": 4}})

    def crash(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(os, "replace", crash)  # killed between writing and renaming
    with pytest.raises(KeyboardInterrupt):
        trainer.save_checkpoint(tmp_path, {"step": 2, "config": {"width": 4}})
    monkeypatch.undo()
    assert trainer.load_checkpoint(tmp_path, {"width": 4}, ["width"])["step"] == 1
    with pytest.raises(UserError, match="has width=4 but this run has width=8; pass --width 4"):
        trainer.load_checkpoint(tmp_path, {"width": 8}, ["width"])
    with pytest.raises(UserError, match="no checkpoint at"):
        trainer.load_checkpoint(tmp_path / "nowhere", {}, [])


def test_checkpoint_loading_refuses_pickled_objects(tmp_path):
    torch.save({"config": {}, "evil": argparse.Namespace(x=1)}, tmp_path / "ckpt.pt")
    with pytest.raises(UserError, match="damaged or not a checkpoint"):
        trainer.load_checkpoint(tmp_path, {}, [])


def test_out_dir_of_another_run_is_not_overwritten(tmp_path):
    trainer.save_checkpoint(tmp_path, {"config": {}})
    with pytest.raises(UserError, match="already exists; pass --resume"):
        trainer.check_out_dir(make_args(tmp_path, resume=None))
    trainer.check_out_dir(make_args(tmp_path, resume=str(tmp_path)))  # continuing it is fine


def test_lr_schedule():
    args = argparse.Namespace(lr=1.0, warmup_iters=10, max_iters=110)
    assert trainer.lr_at(0, args) == pytest.approx(0.1)
    assert trainer.lr_at(9, args) == pytest.approx(1.0)
    assert trainer.lr_at(60, args) == pytest.approx(0.55)
    assert trainer.lr_at(110, args) == pytest.approx(0.1)


def test_run_cli_turns_user_errors_into_exit_code_2(capsys):
    def main():
        raise UserError("data file x.txt is empty; give a UTF-8 text file")

    with pytest.raises(SystemExit) as e:
        trainer.run_cli(main)
    assert e.value.code == 2
    assert capsys.readouterr().err == "error: data file x.txt is empty; give a UTF-8 text file\n"
