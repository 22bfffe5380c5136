"""Unclean exits of a training run (issue 26): two runs into one --out-dir, Ctrl-C, SIGTERM and
SIGKILL, damaged and pickled checkpoints, misleading hints. Each ends in one line on stderr, exit
code 2 (130, 143 for the signals), no traceback, and leaves the last good checkpoint as it was.
The signal tests run pretrain_lm.py (the quickest script) as the command line does."""

import argparse
import os
import pickle
import queue
import re
import shlex
import signal
import struct
import subprocess
import sys
import threading
import time
import warnings
import zipfile

import pytest
import torch

import common
import pretrain_lm
import train_router
import checkpoint
from conftest import read_bytes, run_script, run_script_error

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMALL = ["--batch-size", "4", "--block-size", "16", "--eval-batches", "2", "--log-interval", "1", "--device", "cpu"]
WAIT = 300  # seconds: a bound on every wait for a process (imports alone take ~20 s on a busy machine)


@pytest.fixture
def start(tmp_path):
    """start(script, argv): run a script as the command line does, its stdout lines arriving in
    proc.lines (None at the end); any process still running is killed after the test."""
    procs = []

    def start(script, argv):
        proc = subprocess.Popen([sys.executable, os.path.join(ROOT, script), *argv], cwd=tmp_path,
                                env={**os.environ, "OMP_NUM_THREADS": "1"}, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True)
        proc.lines = queue.Queue()

        def read():
            for line in proc.stdout:
                proc.lines.put(line)
            proc.lines.put(None)

        threading.Thread(target=read, daemon=True).start()
        procs.append(proc)
        return proc

    yield start
    for proc in procs:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def wait_for(proc, pattern):
    """Read proc's stdout up to the first line that matches pattern; the match."""
    deadline = time.time() + WAIT
    while True:
        try:
            line = proc.lines.get(timeout=max(0.0, deadline - time.time()))
        except queue.Empty:
            pytest.fail(f"no line matching {pattern!r} in {WAIT} s")
        if line is None:
            pytest.fail(f"the run ended (exit {proc.wait()}) before a line matching {pattern!r}: {proc.stderr.read()}")
        match = re.search(pattern, line)
        if match:
            return match


def ended(proc):
    """(exit code, stderr) of a process that is ending."""
    return proc.wait(timeout=WAIT), proc.stderr.read()


def assert_one_line(err):
    assert err.count("\n") == 1 and "Traceback" not in err, err


def test_a_second_run_into_the_same_out_dir_is_refused_and_the_first_finishes(tmp_path, start, capsys, text_file):
    """Case 2: both used to pass the "already exists" check and share ckpt.pt.tmp. The first holds
    --out-dir (it is stopped mid-run to be sure the second comes while it runs)."""
    out = str(tmp_path / "lm")
    argv = SMALL + ["--data", text_file, "--out-dir", out, "--max-iters", "20", "--eval-interval", "20"]
    first = start("pretrain_lm.py", argv)
    wait_for(first, r"^step 1/20 \|")  # training: past every check, nothing saved yet
    first.send_signal(signal.SIGSTOP)
    try:
        err = run_script_error(pretrain_lm.main, argv, capsys)
    finally:
        first.send_signal(signal.SIGCONT)
    assert f"another run (PID {first.pid}) is writing to --out-dir {out}" in err
    code, err = ended(first)
    assert code == 0, err
    assert checkpoint.load_checkpoint(out, "lm")["step"] == 20  # whole, and its sha256 matches
    assert sorted(os.listdir(out)) == ["base", "ckpt.pt"]  # no temporary file, no lock left


def test_the_lock_names_its_holder_and_a_killed_holder_blocks_nothing(tmp_path):
    """A run killed with SIGKILL mid-save leaves its lock file and a temporary checkpoint: the next
    run takes the lock (the OS released it), removes the temporary file, and resumes."""
    checkpoint.save_checkpoint(tmp_path, {"kind": "lm", "config": {}, "step": 2})
    before = read_bytes(tmp_path / "ckpt.pt")
    holder = subprocess.Popen([sys.executable, "-c", "import common, sys; common.lock_out_dir(sys.argv[1]); "
                               "open(f'{sys.argv[1]}/ckpt.{__import__(\"os\").getpid()}.pt.tmp', 'wb'); "
                               "print('saving', flush=True); sys.stdin.read()", str(tmp_path)],
                              cwd=ROOT, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline() == "saving\n"
        with pytest.raises(common.UserError, match=rf"another run \(PID {holder.pid}\) is writing to --out-dir"):
            checkpoint.check_out_dir(str(tmp_path), str(tmp_path))
    finally:
        holder.kill()
        holder.wait()
    assert sorted(os.listdir(tmp_path)) == sorted(["ckpt.pt", f"ckpt.{holder.pid}.pt.tmp", "lock"])
    checkpoint.check_out_dir(str(tmp_path), str(tmp_path))
    assert sorted(os.listdir(tmp_path)) == ["ckpt.pt", "lock"] and (tmp_path / "lock").read_text() == f"{os.getpid()}\n"
    common.release_out_dir()
    assert sorted(os.listdir(tmp_path)) == ["ckpt.pt"] and read_bytes(tmp_path / "ckpt.pt") == before
    assert checkpoint.load_checkpoint(tmp_path, "lm")["step"] == 2


def test_ctrl_c_is_one_line_naming_the_checkpoint_and_the_command_that_resumes_it(tmp_path, start, capsys,
                                                                                   text_file):
    out = str(tmp_path / "lm")
    proc = start("pretrain_lm.py", SMALL + ["--data", text_file, "--out-dir", out, "--max-iters", "10000",
                                            "--eval-interval", "2"])
    wait_for(proc, r"^eval at step 2 \|")
    wait_for(proc, r"^step 3/10000 \|")
    proc.send_signal(signal.SIGINT)
    code, err = ended(proc)
    assert code == 130
    assert_one_line(err)
    match = re.fullmatch(r"interrupted by SIGINT at step (\d+): the last intact checkpoint is (.+) \(step (\d+)\); "
                         r"resume with: (.+)\n", err)
    assert match, err
    step, path, saved_step, command = int(match[1]), match[2], int(match[3]), match[4]
    assert path == os.path.join(out, "ckpt.pt") and saved_step % 2 == 0 and 2 <= saved_step <= step
    assert checkpoint.load_checkpoint(out, "lm")["step"] == saved_step
    assert sorted(os.listdir(out)) == ["base", "ckpt.pt"]  # no temporary file, no lock
    argv = shlex.split(command)
    assert argv[:2] == ["python", os.path.join(ROOT, "pretrain_lm.py")] and argv[-2:] == ["--resume", out]
    run_script(pretrain_lm.main, argv[2:] + ["--max-iters", str(saved_step + 1)], capsys)  # the command resumes it
    assert checkpoint.load_checkpoint(out, "lm")["step"] == saved_step + 1


def test_sigterm_saves_first_and_the_resumed_run_ends_as_a_straight_one(tmp_path, start, capsys, text_file):
    """A cluster preempts with SIGTERM: the steps since the last checkpoint (here: none) are saved
    before the run ends. --warmup-iters 1000: the learning rate does not depend on --max-iters, so a
    run to 10000 interrupted at step N, then resumed to N + 2, is a straight run to N + 2."""
    argv = SMALL + ["--data", text_file, "--eval-interval", "1000", "--warmup-iters", "1000"]
    interrupted, straight = str(tmp_path / "interrupted"), str(tmp_path / "straight")
    proc = start("pretrain_lm.py", argv + ["--out-dir", interrupted, "--max-iters", "10000"])
    wait_for(proc, r"^step 3/10000 \|")
    proc.send_signal(signal.SIGTERM)
    code, err = ended(proc)
    assert code == 143
    assert_one_line(err)
    match = re.match(r"interrupted by SIGTERM at step (\d+): the last intact checkpoint is .+ \(step (\d+)\); ", err)
    assert match and match[1] == match[2], err  # saved at the step it reached
    step = int(match[1])
    assert checkpoint.load_checkpoint(interrupted, "lm")["step"] == step >= 3
    assert sorted(os.listdir(interrupted)) == ["base", "ckpt.pt"]
    run_script(pretrain_lm.main, argv + ["--resume", interrupted, "--max-iters", str(step + 2)], capsys)
    run_script(pretrain_lm.main, argv + ["--out-dir", straight, "--max-iters", str(step + 2)], capsys)
    a, b = (checkpoint.load_checkpoint(d, "lm") for d in (interrupted, straight))
    assert a["step"] == b["step"] == step + 2
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k


def test_a_signal_during_a_save_waits_for_its_end(tmp_path, monkeypatch, capsys):
    """Ctrl-C in the middle of writing a checkpoint: the checkpoint is written whole, then the run
    ends; no temporary file (it used to leave ckpt.pt.tmp)."""
    real_save = torch.save

    def interrupted_save(obj, f):
        os.kill(os.getpid(), signal.SIGINT)  # its handler runs at once: in the middle of the save
        real_save(obj, f)

    def main():
        common.lock_out_dir(str(tmp_path))
        checkpoint.save_checkpoint(tmp_path, {"kind": "lm", "config": {}, "step": 1})
        monkeypatch.setattr(torch, "save", interrupted_save)
        checkpoint.save_checkpoint(tmp_path, {"kind": "lm", "config": {}, "step": 2, "w": torch.zeros(1000)})
        pytest.fail("the signal was lost")

    handlers = [signal.getsignal(s) for s in common.SIGNALS]
    with pytest.raises(SystemExit) as exit_info:
        common.run_cli(main)
    assert [signal.getsignal(s) for s in common.SIGNALS] == handlers  # run_cli gave the handlers back
    err = capsys.readouterr().err
    assert exit_info.value.code == 130
    assert_one_line(err)
    assert err.startswith(f"interrupted by SIGINT: the last intact checkpoint is {tmp_path}/ckpt.pt (step 2); ")
    monkeypatch.undo()
    assert checkpoint.load_checkpoint(tmp_path, "lm")["step"] == 2
    assert os.listdir(tmp_path) == ["ckpt.pt"]


def test_the_interrupted_line_and_its_resume_command(monkeypatch):
    monkeypatch.setattr(sys, "argv", ["train_vae.py", "--resume", "a", "--max-iters", "9", "--data", "my file.txt",
                                      "--resume=b", "--out-dir", "c"])
    monkeypatch.setattr(common, "standing", {"out_dir": "c", "step": 7, "saved_step": 5})
    assert common.interrupted_line(signal.SIGTERM) == (
        "interrupted by SIGTERM at step 7: the last intact checkpoint is c/ckpt.pt (step 5); resume with: "
        "python train_vae.py --max-iters 9 --data 'my file.txt' --out-dir c --resume c")
    common.standing.update(saved_step=None)
    assert common.interrupted_line(signal.SIGINT) == (
        "interrupted by SIGINT at step 7, before its first checkpoint: nothing is saved in c")
    common.standing.update(out_dir=None, step=None)
    assert common.interrupted_line(signal.SIGINT) == "interrupted by SIGINT; nothing was saved"


# ----------------------------------------------------------------------------- damaged checkpoints (case 9)


def flip_a_bit_of_a_tensor(path):
    """Flip one bit in the middle of the largest tensor's bytes (a bad disk, a bad copy)."""
    with zipfile.ZipFile(path) as z:
        info = max(z.infolist(), key=lambda i: i.file_size)
    with open(path, "r+b") as f:
        f.seek(info.header_offset + 26)  # the local file header: name and extra field lengths, then the data
        name_length, extra_length = struct.unpack("<HH", f.read(4))
        f.seek(info.header_offset + 30 + name_length + extra_length + info.file_size // 2)
        byte = f.read(1)[0]
        f.seek(-1, os.SEEK_CUR)
        f.write(bytes([byte ^ 0x10]))


@pytest.fixture(scope="module")
def lm_run(tmp_path_factory, text_file):
    """The --out-dir of a 2-step pretrain_lm.py run."""
    out = str(tmp_path_factory.mktemp("runs") / "lm")
    pretrain_lm.main(SMALL + ["--data", text_file, "--out-dir", out, "--max-iters", "2", "--eval-interval", "2"])
    return out


def test_a_checkpoint_with_a_flipped_bit_is_refused(lm_run, tmp_path, capsys, text_file):
    damaged = tmp_path / "damaged"
    damaged.mkdir()
    (damaged / "ckpt.pt").write_bytes(read_bytes(os.path.join(lm_run, "ckpt.pt")))
    flip_a_bit_of_a_tensor(damaged / "ckpt.pt")
    before = read_bytes(damaged / "ckpt.pt")
    for argv in (["--resume", str(damaged), "--max-iters", "4"], ["--eval-only", "--resume", str(damaged)]):
        err = run_script_error(pretrain_lm.main, SMALL + ["--data", text_file] + argv, capsys)
        assert f"{damaged}/ckpt.pt is damaged: its contents do not match the sha256 saved with them" in err
    assert read_bytes(damaged / "ckpt.pt") == before and os.listdir(damaged) == ["ckpt.pt"]


def test_a_checkpoint_from_before_the_sha256_loads_unchecked(lm_run, tmp_path):
    state = checkpoint.load_checkpoint(lm_run, "lm")
    torch.save(state, tmp_path / "ckpt.pt")  # as save_checkpoint wrote them before: no "sha256"
    assert checkpoint.load_checkpoint(tmp_path, "lm")["step"] == 2


@pytest.mark.parametrize("content", [{"kind": "lm", "config": {}, "step": 1},
                                     {"kind": "lm", "config": {}, "step": 1, "evil": argparse.Namespace(x=1)}])
def test_a_plain_pickle_is_refused_in_one_line_without_torchs_warning(tmp_path, capsys, text_file, content):
    (tmp_path / "ckpt.pt").write_bytes(pickle.dumps(content, protocol=4))
    before = read_bytes(tmp_path / "ckpt.pt")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        err = run_script_error(pretrain_lm.main, SMALL + ["--data", text_file, "--resume", str(tmp_path),
                                                          "--max-iters", "4"], capsys)
    assert "ckpt.pt (UnpicklingError); it is damaged or not a checkpoint" in err
    assert not [w for w in caught if "pickle" in str(w.message)]  # torch's three lines about the protocol
    assert read_bytes(tmp_path / "ckpt.pt") == before and os.listdir(tmp_path) == ["ckpt.pt"]


# ----------------------------------------------------------------------------- hints (case 10)


def test_an_empty_vae_dir_names_vae_and_a_refused_run_leaves_no_out_dir(tmp_path, capsys, text_file):
    (tmp_path / "empty").mkdir()
    out = tmp_path / "new" / "router"
    err = run_script_error(train_router.main, ["--vae", str(tmp_path / "empty"), "--data", text_file, "--out-dir",
                                               str(out), "--device", "cpu"], capsys)
    assert err == f"error: no checkpoint at {tmp_path}/empty/ckpt.pt; pass the --out-dir of an earlier train_vae.py " \
                  "run to --vae"
    assert sorted(os.listdir(tmp_path)) == ["empty"]  # new/router, made for the lock, is gone again


def test_a_run_refused_after_its_out_dir_was_made_removes_it(tmp_path, capsys, text_file):
    out = tmp_path / "lm"
    err = run_script_error(pretrain_lm.main, SMALL + ["--data", text_file, "--out-dir", str(out), "--block-size",
                                                      "600"], capsys)
    assert "more than the 512 positions of tiny" in err and not out.exists()
    out.mkdir()  # an out-dir that was there before stays, without the lock
    run_script_error(pretrain_lm.main, SMALL + ["--data", text_file, "--out-dir", str(out), "--block-size", "600"],
                     capsys)
    assert os.listdir(out) == []


def test_a_folder_save_killed_between_its_renames_keeps_the_previous_folder(tmp_path):
    """common.replace_folder renames final -> final.old, then final.tmp -> final: a kill between the two
    leaves no final, a whole final.old and a final.tmp that may be whole or not. The next save puts
    final.old back first, so a failed next write still leaves the previous folder."""
    final = str(tmp_path / "base")
    os.makedirs(final + ".old")
    (tmp_path / "base.old" / "weights").write_text("previous")
    os.makedirs(final + ".tmp")  # the killed save's new folder, maybe half-written

    def fail(path):
        os.makedirs(path)
        raise OSError(28, "No space left on device")

    with pytest.raises(common.UserError, match="the previous one is unchanged"):
        common.replace_folder(final, fail)
    assert (tmp_path / "base" / "weights").read_text() == "previous"
    assert sorted(os.listdir(tmp_path)) == ["base"]
