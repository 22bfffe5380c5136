"""experiments/compare_wm.py: every row runs on the same data, the time-matched rows get IRIS's time,
and a finished run is reused only when its log records the very same command. The runs are real
train_wm.py runs, tiny ones (flags after `--`), made in this process: the one thing replaced is
the process start (subprocess.run), which is checked to get the script and the environment."""

import argparse
import contextlib
import os
import subprocess
import sys

import pytest

import train_wm
from checkpoint import save_checkpoint
from common import UserError
from experiments import compare_wm

TINY = ["--width", "32", "--num-layers", "1", "--num-heads", "2", "--batch-size", "4", "--segment-steps", "6",
        "--horizon", "5", "--num-imagine", "8"]  # IRIS sizes, ignored by the LM rows


def run_here(command, stdout, env, **kwargs):
    """subprocess.run of `python REPO/train_wm.py flags`, as train_wm.main(flags) in this process."""
    assert command[:2] == [sys.executable, os.path.join(compare_wm.REPO, "train_wm.py")]
    assert env["OMP_NUM_THREADS"] == "1" and env["PATH"] == os.environ["PATH"]  # one thread, the parent's env
    with contextlib.redirect_stdout(stdout):
        train_wm.main(command[2:])
    return subprocess.CompletedProcess(command, 0)


def test_every_row_runs_and_a_second_call_reuses_them(tmp_path, monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(subprocess, "run", run_here)
    args = argparse.Namespace(max_iters=1, collect_steps=600, lm_dir="tiny", out_dir=str(tmp_path), device="cpu",
                              train_wm_flags=TINY, rows=list(compare_wm.ROWS), lm_layers=None)
    results = compare_wm.compare("CartPole-v1", 1, args)
    assert len(results) == 2 * len(compare_wm.rows(args)) - 1  # each LM row twice: same updates, same time
    iris = results["IRIS"]
    for name, m in results.items():
        assert m["tokenizer_err"] == iris["tokenizer_err"], name  # one tokenizer, one data set
        if name.endswith("(IRIS's time)"):
            twin = results[name.removesuffix(" (IRIS's time)")]
            assert m["steps"] == max(1, round(twin["train_tokens_per_s"] / iris["train_tokens_per_s"]))
    table = compare_wm.table("CartPole-v1", {1: results, 2: results}).splitlines()
    assert len(table) == 4 + len(results) + 1 and "+- 0.000" in table[4]  # a row per run, then copy

    def no_runs(*a, **k):
        raise AssertionError("a finished run was run again")

    monkeypatch.setattr(subprocess, "run", no_runs)
    assert compare_wm.compare("CartPole-v1", 1, args) == results
    args.max_iters = 2  # another command in the same folders: refused, the finished runs kept
    def runs():  # each run's folder (its files) and log (its text)
        return {p.name: sorted(os.listdir(p)) if p.is_dir() else p.read_text()
                for p in (tmp_path / "CartPole-v1" / "seed1").iterdir()}

    before = runs()
    with pytest.raises(UserError, match="holds a run of another command"):
        compare_wm.compare("CartPole-v1", 1, args)
    assert runs() == before


def test_the_time_matched_rows_get_iris_time_in_updates(tmp_path, monkeypatch):
    """An LM row at half IRIS's tokens/s gets half its updates in the time-matched run (the last
    --max-iters of a command wins); the others keep --max-iters."""
    commands = {}

    def fake_train_wm(flags, slug, log):
        commands[os.path.basename(slug)] = flags
        return {"train_tokens_per_s": 100.0 if os.path.basename(slug) == "IRIS" else 50.0, "steps": 10}

    monkeypatch.setattr(compare_wm, "train_wm", fake_train_wm)
    args = argparse.Namespace(max_iters=10, collect_steps=None, lm_dir="tiny", out_dir=str(tmp_path), device="cpu",
                              train_wm_flags=[], rows=list(compare_wm.ROWS), lm_layers=None)
    compare_wm.compare("CartPole-v1", 1, args)

    def iters(flags):
        return flags[len(flags) - flags[::-1].index("--max-iters")]

    timed = {name: iters(f) for name, f in commands.items() if name.startswith("time")}
    assert len(timed) == len(commands) // 2 and set(timed.values()) == {"5"}
    assert {iters(f) for name, f in commands.items() if not name.startswith("time")} == {"10"}


def test_flags_after_a_double_dash_go_to_every_run(tmp_path, monkeypatch):
    seen = []
    monkeypatch.setattr(compare_wm, "compare", lambda env, seed, args: seen.append(args.train_wm_flags) or {})
    monkeypatch.setattr(compare_wm, "table", lambda env, runs: "")
    compare_wm.main(["--envs", "CartPole-v1", "--seeds", "1", "--lm-dir", "tiny", "--out-dir", str(tmp_path),
                     "--", "--batch-size", "4"])
    assert seen == [["--batch-size", "4"]]
    assert (tmp_path / "tables.md").read_text() == "\n"  # the (here empty) tables, written


def test_a_table_in_the_out_dir_that_does_not_exist_yet_is_written(tmp_path, monkeypatch):
    """The docstring's Pong command: --table inside the --out-dir that the runs make."""
    monkeypatch.setattr(compare_wm, "compare", lambda env, seed, args: {})
    monkeypatch.setattr(compare_wm, "table", lambda env, runs: "| a |")
    out = tmp_path / "out-compare"
    compare_wm.main(["--envs", "CartPole-v1", "--seeds", "1", "--lm-dir", "tiny", "--out-dir", str(out), "--table",
                     str(out / "pong.md")])
    assert (out / "pong.md").read_text() == "| a |\n"


@pytest.mark.parametrize("flag", ["--seed", "--max-iters", "--backbone", "--device=cpu", "--max-it"])
def test_flags_that_compare_sets_itself_are_refused_after_the_double_dash(flag, monkeypatch, capsys):
    """--seed 7 after -- would make every seed's runs the same; --max-iters would leave the time-matched
    rows sized by compare's own; and so on: refused before anything runs."""
    monkeypatch.setattr(compare_wm, "compare", lambda *a: pytest.fail("ran before checking the flags"))
    with pytest.raises(SystemExit) as exit_:
        compare_wm.main(["--envs", "CartPole-v1", "--", flag, *([] if "=" in flag else ["7"])])
    assert exit_.value.code == 2 and "after --: compare_wm sets these itself" in capsys.readouterr().err


def test_rows_and_lm_layers_pick_and_cut_the_lm_rows_only():
    args = argparse.Namespace(lm_dir="smollm2", rows=["pretrained", "scratch"], lm_layers=2)
    assert compare_wm.rows(args) == {
        "IRIS": ["--backbone", "iris"],
        "LM pretrained, IRIS tables": ["--backbone", "lm", "--model", "smollm2", "--lm-layers", "2"],
        "LM from scratch": ["--backbone", "lm", "--model", "smollm2", "--lm-layers", "2", "--lm-init", "random",
                            "--train-base"]}


@pytest.mark.parametrize("flag, value", [("--seeds", str(2**32)), ("--device", "gpu"),
                                         ("--table", "no-such-folder/tables.md"), ("--table", "/")])
def test_a_seed_or_device_train_wm_would_refuse_is_refused_first(flag, value, monkeypatch, capsys):
    monkeypatch.setattr(compare_wm, "run_script", lambda *a, **k: pytest.fail("ran before checking the flags"))
    with pytest.raises(SystemExit) as exit_:
        compare_wm.main([flag, value])
    assert exit_.value.code == 2 and (f"argument {flag}" if flag != "--table" else f"{flag} {value}: cannot write "
                                      "it") in capsys.readouterr().err


def test_a_failed_pretraining_exits_2_in_one_line(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)  # no out-lm/base here: compare_wm pretrains it first
    monkeypatch.setattr(compare_wm, "run_script", lambda *a, **k: subprocess.CompletedProcess(a, 2, "", "error: x\n"))
    monkeypatch.setattr(sys, "argv", ["compare_wm.py", "--envs", "CartPole-v1"])
    with pytest.raises(SystemExit) as exit_:
        compare_wm.run_cli(compare_wm.main)  # as `python experiments/compare_wm.py` runs it
    assert exit_.value.code == 2 and capsys.readouterr().err == "error: pretrain_lm.py failed (error: x)\n"


ON_TEXT = {"model": "tiny", "synthetic": None}  # what compare_wm's own pretraining records


@pytest.mark.parametrize("saved_step, config, has_base, expected", [
    (None, None, False, ["--out-dir", "out-lm"]),  # nothing there: pretrain
    (500, ON_TEXT, True, ["--resume", "out-lm"]),  # cut short after its first save: base/ is half-trained, resume it
    (compare_wm.PRETRAIN_ITERS, ON_TEXT, True, []),  # finished: used as it is
    (None, None, True, "has no out-lm/ckpt.pt beside it"),  # cut short before its first checkpoint, or the user's
    (compare_wm.PRETRAIN_ITERS, {**ON_TEXT, "synthetic": "markov"}, True, "holds another pretraining")])
def test_a_pretraining_cut_short_is_resumed_not_used(saved_step, config, has_base, expected, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    if saved_step is not None:
        save_checkpoint("out-lm", {"kind": "lm", "config": config, "step": saved_step})
    if has_base:
        os.makedirs("out-lm/base")
    calls = []
    monkeypatch.setattr(compare_wm, "run_script", lambda name, flags, **k: calls.append((name, flags))
                        or subprocess.CompletedProcess(flags, 0, "", ""))
    if isinstance(expected, str):  # refused: nothing run, nothing removed
        with pytest.raises(UserError, match=expected):
            compare_wm.pretrain_tiny_lm("cpu")
        assert calls == [] and os.path.isdir("out-lm/base")
        return
    compare_wm.pretrain_tiny_lm("cpu")
    flags = ["--max-iters", str(compare_wm.PRETRAIN_ITERS), "--device", "cpu"]
    assert calls == ([("pretrain_lm.py", flags + expected)] if expected else [])


def test_an_out_dir_that_cannot_be_made_is_refused_before_anything_runs(tmp_path, monkeypatch, capsys):
    """A file in its place (a read-only folder is refused the same way, by os.access)."""
    monkeypatch.setattr(compare_wm, "run_script", lambda *a, **k: pytest.fail("ran before checking --out-dir"))
    (tmp_path / "a-file").write_text("")
    with pytest.raises(SystemExit) as exit_:
        compare_wm.main(["--lm-dir", "tiny", "--out-dir", str(tmp_path / "a-file")])
    assert exit_.value.code == 2 and "--out-dir" in capsys.readouterr().err
    assert (tmp_path / "a-file").read_text() == ""
