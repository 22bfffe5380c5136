"""trainer.py and common.py: the shared loop resumes exactly, runs data-parallel through DDP,
stops on a non-finite loss; checkpoints are atomic, checked and survive a full disk; errors exit 2."""

import argparse
import errno
import math
import os

import pytest
import torch
import torch.multiprocessing as mp

import checkpoint
import common
import lm
import trainer
from common import UserError


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


def make_args(tmp_path, argv=(), **overrides):
    parser = trainer.add_common_args(common.make_parser("test"), max_iters=6, eval_interval=3, log_interval=1,
                                     warmup_iters=1, lr=0.05)
    args = common.parse(parser, list(argv))
    args.out_dir = str(tmp_path)
    vars(args).update(overrides)
    return args


class Crash(Exception):
    pass


def fit(args, start_step=0, state=None, crash_at=None):
    run = trainer.setup(args.device, args.seed)
    model = Regression()
    optimizer = trainer.make_optimizer(model, args.lr, args.weight_decay)
    if state is not None:
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])

    def save(step):
        checkpoint.save_checkpoint(args.out_dir, {"kind": "vae", "config": {"width": 4}, "step": step,
                                               "model": model.state_dict(), "optimizer": optimizer.state_dict()})
        if step == crash_at:
            raise Crash

    def evaluate():
        return {"val_loss": model.compute_loss(get_batch(10_000), 0)["loss"].item()}

    config = common.config_from(trainer.TrainConfig, vars(args))
    metrics = trainer.train(model, optimizer, get_batch, evaluate, config, run, start_step, save)
    return model, metrics


def test_resume_is_exact(tmp_path, capsys):
    full, metrics = fit(make_args(tmp_path / "full"))
    out = capsys.readouterr().out
    assert "step 6/6 | loss" in out and "abs" in out and "tok/s" in out and "eta" in out
    assert {"val_loss", "train_loss", "train_abs", "train_seconds", "steps"} <= metrics.keys()

    with pytest.raises(Crash):
        fit(make_args(tmp_path / "half"), crash_at=3)  # killed right after the checkpoint at step 3
    state = checkpoint.load_checkpoint(tmp_path / "half", "vae")
    assert state["step"] == 3
    resumed, _ = fit(make_args(tmp_path / "half"), start_step=state["step"], state=state)
    for a, b in zip(full.parameters(), resumed.parameters()):
        assert torch.equal(a, b)


def ddp_worker(rank, out_dir, port):
    """One of two torchrun-like processes: fit with batch 8 each, then save the parameters."""
    os.environ.update(RANK=str(rank), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    model, _ = fit(make_args(out_dir, ["--device", "cpu"], eval_interval=100))
    torch.save({k: v.detach() for k, v in model.state_dict().items()}, os.path.join(out_dir, f"rank{rank}.pt"))
    torch.distributed.destroy_process_group()


def test_two_processes_through_ddp_equal_one_with_gradient_accumulation(tmp_path):
    """2 processes x micro-batch 8 (DDP averages their gradients) compute what 1 process computes
    with --grad-accum 2: the same micro-batches, the same dropout masks, the same updates."""
    mp.start_processes(ddp_worker, args=(str(tmp_path), 29400 + os.getpid() % 500), nprocs=2, start_method="spawn")
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2)]
    single, _ = fit(make_args(tmp_path / "single", ["--device", "cpu", "--grad-accum", "2"], eval_interval=100))
    for name, p in single.state_dict().items():
        assert torch.equal(ranks[0][name], ranks[1][name]), name  # every process applied the same update
        torch.testing.assert_close(ranks[0][name], p, rtol=1e-5, atol=1e-6)
    assert not torch.equal(single.linear.weight, Regression().linear.weight)  # it did train


def test_a_non_finite_loss_stops_before_anything_is_saved(tmp_path, capsys):
    fit(make_args(tmp_path))
    before = (tmp_path / "ckpt.pt").read_bytes()
    state = checkpoint.load_checkpoint(tmp_path, "vae")
    with pytest.raises(UserError, match=r"the loss is (nan|inf) and the gradient norm (nan|inf) at step [78] \(not "
                       r"finite: loss.*\); stopped before saving.*: lower --lr \(now 1e\+30\)"):
        fit(make_args(tmp_path, ["--max-iters", "12", "--lr", "1e30", "--grad-clip", "0"]), start_step=6, state=state)
    assert (tmp_path / "ckpt.pt").read_bytes() == before


def test_a_loss_not_finite_before_any_update_does_not_blame_the_lr(tmp_path, monkeypatch):
    def infinite_kl(self, batch, step):
        kl = torch.tensor(math.inf)
        return {"loss": self.linear(batch["x"]).mean() + kl, "kl": kl}  # as a KL that overflowed would make it

    monkeypatch.setattr(Regression, "compute_loss", infinite_kl)
    with pytest.raises(UserError, match=r"^the loss is inf and the gradient norm \S+ at step 1 \(not finite: loss, "
                       r"kl\); stopped before saving .*: it came before any update, so not from --lr: check the data "
                       r"and the model's flags$"):
        fit(make_args(tmp_path))


def test_the_stop_names_the_steps_own_loss_between_progress_lines(tmp_path, monkeypatch):
    """A finite loss of 2.5 with an infinite gradient at step 5, progress lines every 10 steps: the
    message gives that step's loss, not the sum of the steps since the last line."""
    def infinite_gradient_at_step_5(self, batch, step):
        w = self.linear.weight.sum()
        steep = (w - w.detach()).sqrt() if step == 4 else 0.0  # sqrt(0) = 0, its gradient inf
        return {"loss": 0.0 * w + 2.5 + steep}

    monkeypatch.setattr(Regression, "compute_loss", infinite_gradient_at_step_5)
    with pytest.raises(UserError, match=r"^the loss is 2.5 and the gradient norm inf at step 5 \(not finite: the "
                       r"gradient alone\)"):
        fit(make_args(tmp_path, ["--log-interval", "10"]))


def test_a_float16_run_that_diverges_names_float16(tmp_path):
    with pytest.raises(UserError, match=r"stopped before saving .*: float16 overflows on a CPU: use --dtype float32 "
                                        r"or bfloat16$"):
        fit(make_args(tmp_path, ["--dtype", "float16", "--lr", "1e30", "--grad-clip", "0"]))


def test_checkpoint_is_atomic_and_checked(tmp_path, monkeypatch):
    checkpoint.save_checkpoint(tmp_path, {"kind": "wm", "step": 1, "config": {"width": 4}})

    def crash(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(os, "replace", crash)  # killed between writing and renaming
    with pytest.raises(KeyboardInterrupt):
        checkpoint.save_checkpoint(tmp_path, {"kind": "wm", "step": 2, "config": {"width": 4}})
    monkeypatch.undo()
    assert checkpoint.load_checkpoint(tmp_path, "wm")["step"] == 1
    with pytest.raises(UserError, match=r"written by train_wm.py \(a world model\), not by train_vae.py"):
        checkpoint.load_checkpoint(tmp_path, "vae")
    with pytest.raises(UserError, match="no checkpoint at"):
        checkpoint.load_checkpoint(tmp_path / "nowhere", "wm")


@pytest.mark.parametrize("content", [{"a": 1}, torch.zeros(3), {"config": {}, "step": 1}])
def test_a_torch_file_that_is_not_our_checkpoint_is_named(tmp_path, content):
    torch.save(content, tmp_path / "ckpt.pt")
    with pytest.raises(UserError, match="is a torch file but not a checkpoint of this project"):
        checkpoint.load_checkpoint(tmp_path, "vae")


def test_checkpoint_loading_refuses_pickled_objects(tmp_path):
    torch.save({"kind": "vae", "config": {}, "evil": argparse.Namespace(x=1)}, tmp_path / "ckpt.pt")
    with pytest.raises(UserError, match="damaged or not a checkpoint"):
        checkpoint.load_checkpoint(tmp_path, "vae")


def test_a_full_disk_is_one_line_and_loses_nothing(tmp_path, monkeypatch):
    checkpoint.save_checkpoint(tmp_path, {"kind": "vae", "step": 1, "config": {}})
    before = (tmp_path / "ckpt.pt").read_bytes()
    real_save = torch.save

    def save_until_the_disk_fills(obj, f, *args, **kwargs):
        class Full:  # a file whose writes fail after 100 bytes, as on a full disk
            def __init__(self):
                self.written = 0

            def write(self, data):
                self.written += len(data)
                if self.written > 100:
                    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
                return f.write(data)

            def flush(self):
                f.flush()

        real_save(obj, Full(), *args, **kwargs)

    monkeypatch.setattr(torch, "save", save_until_the_disk_fills)
    with pytest.raises(UserError, match="No space left on device.*previous checkpoint is unchanged"):
        checkpoint.save_checkpoint(tmp_path, {"kind": "vae", "step": 2, "config": {}, "w": torch.zeros(1000)})
    assert (tmp_path / "ckpt.pt").read_bytes() == before
    assert sorted(os.listdir(tmp_path)) == ["ckpt.pt"]  # no ckpt.pt.tmp left behind


def test_out_dir_of_another_run_is_not_overwritten_and_must_be_writable(tmp_path, monkeypatch):
    checkpoint.save_checkpoint(tmp_path, {"kind": "vae", "config": {}})
    with pytest.raises(UserError, match="already exists; pass --resume"):
        checkpoint.check_out_dir(str(tmp_path), None)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(UserError, match="already exists; pass --resume"):  # --out-dir . is the current directory
        checkpoint.check_out_dir(".", None)
    checkpoint.check_out_dir(str(tmp_path), str(tmp_path))  # continuing it is fine
    (tmp_path / "file").write_text("x")
    with pytest.raises(UserError, match="cannot write to --out-dir .*file/run"):
        checkpoint.check_out_dir(str(tmp_path / "file" / "run"), None)


def test_a_resumed_run_takes_its_config_and_lists_every_conflict(tmp_path):
    saved, keys = {"batch_size": 4, "lr": 0.5, "seed": 7}, ["batch_size", "lr", "seed"]
    args = make_args(tmp_path, ["--batch-size", "8", "--lr", "0.1"])
    with pytest.raises(UserError, match=r"--batch-size 8 \(saved: 4\), --lr 0.1 \(saved: 0.5\)"):
        checkpoint.adopt_config(vars(args), args.explicit, saved, keys, str(tmp_path))
    args = make_args(tmp_path, ["--batch-size", "4"])
    checkpoint.adopt_config(vars(args), args.explicit, saved, keys, str(tmp_path))
    assert (args.batch_size, args.lr, args.seed) == (4, 0.5, 7)  # not given: taken from the checkpoint


def test_one_weight_decay_rule():
    model = torch.nn.Sequential(torch.nn.Embedding(5, 4), torch.nn.LayerNorm(4), torch.nn.Linear(4, 3))
    groups = trainer.make_optimizer(model, 1e-3, 0.1).param_groups
    decayed = {id(p) for g in groups if g["weight_decay"] == 0.1 for p in g["params"]}
    assert decayed == {id(model[2].weight)}  # a linear layer's weight; not embeddings, norms or biases
    assert sum(len(g["params"]) for g in groups) == 5
    base, _ = lm.load_base("tiny")  # GPT-2's token table is also its output layer's weight (tied)
    assert base.lm_head.weight is base.transformer.wte.weight
    groups = trainer.make_optimizer(base, 1e-3, 0.1).param_groups
    decayed = {id(p) for g in groups if g["weight_decay"] == 0.1 for p in g["params"]}
    assert id(base.transformer.wte.weight) not in decayed and id(base.transformer.h[0].mlp.c_fc.weight) in decayed


def test_lr_scales_train_a_module_at_a_multiple_of_the_lr():
    """A module given a scale gets groups of its own whose lr train() sets to scale x the schedule's; without
    scales the optimizer has the two groups of old (no "lr_scale" in its saved state)."""
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 1))
    assert [set(g) - {"params"} for g in trainer.make_optimizer(model, 1e-3, 0.1).state_dict()["param_groups"]] == [
        set(torch.optim.AdamW(model.parameters()).defaults)] * 2
    optimizer = trainer.make_optimizer(model, 1e-3, 0.1, lr_scales=[(model[1], 10.0)])
    scaled = {id(p) for g in optimizer.param_groups if g.get("lr_scale") == 10.0 for p in g["params"]}
    assert scaled == {id(model[1].weight), id(model[1].bias)} and len(optimizer.param_groups) == 4
    model.compute_loss = lambda batch, step: {"loss": model(batch["x"]).pow(2).mean()}
    config = trainer.TrainConfig(max_iters=3, warmup_iters=10, eval_interval=100, log_interval=100, lr=1e-3)
    trainer.train(model, optimizer, lambda i: {"x": torch.randn(2, 4)}, None, config, trainer.Run(torch.device("cpu")))
    for g in optimizer.param_groups:
        assert g["lr"] == pytest.approx(trainer.lr_at(2, config) * g.get("lr_scale", 1.0))


def test_a_resumed_optimizer_keeps_this_runs_weight_decay_and_lr_scales():
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 1))
    saved = trainer.make_optimizer(model, 1e-3, 0.1, lr_scales=[(model[1], 10.0)])
    model(torch.randn(2, 4)).sum().backward()
    saved.step()
    optimizer = trainer.make_optimizer(model, 1e-3, 0.0, lr_scales=[(model[1], 20.0)])
    checkpoint.load_optimizer(optimizer, saved.state_dict())
    assert [(g["weight_decay"], g.get("lr_scale")) for g in optimizer.param_groups] == [
        (0.0, None), (0.0, 20.0), (0.0, None), (0.0, 20.0)]
    assert len(optimizer.state) == 4  # the moments came back
    with pytest.raises(UserError, match="was turned on or off"):
        checkpoint.load_optimizer(trainer.make_optimizer(model, 1e-3, 0.1), saved.state_dict())


def test_lr_schedule():
    config = trainer.TrainConfig(lr=1.0, warmup_iters=10, max_iters=110)
    assert trainer.lr_at(0, config) == pytest.approx(0.1)
    assert trainer.lr_at(9, config) == pytest.approx(1.0)
    assert trainer.lr_at(60, config) == pytest.approx(0.55)
    assert trainer.lr_at(110, config) == pytest.approx(0.1)


def test_run_cli_turns_user_errors_into_exit_code_2(capsys):
    def main():
        raise UserError("data file x.txt is empty; give a UTF-8 text file")

    with pytest.raises(SystemExit) as e:
        common.run_cli(main)
    assert e.value.code == 2
    assert capsys.readouterr().err == "error: data file x.txt is empty; give a UTF-8 text file\n"


@pytest.mark.parametrize("argv, message", [
    (["--batch-size", "0"], "--batch-size: 0 is out of range: it must be an integer >= 1"),
    (["--batch-size", "-3"], "--batch-size: -3 is out of range"),
    (["--max-iters", "-5"], "--max-iters: -5 is out of range"),
    (["--grad-accum", "0"], "--grad-accum: 0 is out of range"),
    (["--eval-interval", "0"], "--eval-interval: 0 is out of range"),
    (["--log-interval", "0"], "--log-interval: 0 is out of range"),
    (["--lr", "nan"], "--lr: nan is out of range: it must be a number > 0"),
    (["--lr", "inf"], "--lr: inf is out of range: it must be finite"),
    (["--grad-clip", "inf"], "--grad-clip: inf is out of range: it must be finite"),
    (["--lr", "x"], "--lr: 'x' is not a number"),
    (["--weight-decay", "-1"], "--weight-decay: -1 is out of range"),
    (["--seed", str(2**32)], "--seed: 4294967296 is out of range: it must be an integer from 0 to 2**32 - 1"),
])
def test_numeric_flags_are_checked_at_parse_time(tmp_path, capsys, argv, message):
    with pytest.raises(SystemExit) as e:
        make_args(tmp_path, argv)
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.count("\n") == 1 and err.startswith("error: ") and message in err, err


def test_every_seed_the_flag_allows_is_one_torch_takes():
    """train_agent.py seeds each phase's micro-batches from a seed of seeds (stream_seed, then
    batch_seed again in train()): kept below torch's 2**64 for the largest --seed."""
    from train_agent import STREAMS, stream_seed

    for seed in (0, 2**32 - 1):
        for stream in STREAMS:
            torch.manual_seed(common.batch_seed(stream_seed(seed, stream, 10**6), 10**6))


def test_explicit_flags_are_the_ones_given():
    parser = trainer.add_common_args(common.make_parser("test"))
    assert common.parse(parser, ["--lr", "0.1", "--eval-only"]).explicit == {"lr", "eval_only"}
    assert common.parse(parser, []).explicit == set()
    seeds = {common.batch_seed(seed, index) for seed in range(20) for index in range(1000)}
    assert len(seeds) == 20 * 1000  # no two (seed, micro-batch) pairs share a random stream
