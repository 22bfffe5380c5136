"""compare_wm.py: every row runs on the same data, the time-matched rows get IRIS's time, and a
finished run is reused only when its log records the very same command."""

import argparse
import subprocess

import pytest

import compare_wm


def test_every_row_runs_and_a_second_call_reuses_them(tmp_path, monkeypatch):
    args = argparse.Namespace(max_iters=2, collect_steps=1500, lm_dir="tiny", out_dir=str(tmp_path), device="cpu")
    results = compare_wm.compare("CartPole-v1", 1, args)
    assert len(results) == 2 * len(compare_wm.rows("tiny")) - 1  # each LM row twice: same updates, same time
    iris = results["IRIS"]
    for name, m in results.items():
        assert m["tokenizer_err"] == iris["tokenizer_err"], name  # one tokenizer, one data set
        if name.endswith("(IRIS's time)"):
            twin = results[name.removesuffix(" (IRIS's time)")]
            assert m["steps"] == max(1, round(2 * twin["train_tokens_per_s"] / iris["train_tokens_per_s"]))
    table = compare_wm.table("CartPole-v1", {1: results, 2: results}).splitlines()
    assert len(table) == 4 + len(results) + 1 and "+- 0.000" in table[4]  # a row per run, then copy

    def no_runs(*a, **k):
        raise AssertionError("a finished run was run again")

    monkeypatch.setattr(subprocess, "run", no_runs)
    assert compare_wm.compare("CartPole-v1", 1, args) == results
    args.max_iters = 3  # another command: not reused
    with pytest.raises(AssertionError, match="run again"):
        compare_wm.compare("CartPole-v1", 1, args)
