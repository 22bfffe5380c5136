"""Bad input to the scripts (issue 26): a number out of its range, a checkpoint of another kind, a
batch that cannot fit in memory, decoding past the base's positions, --device cuda without a GPU, a
disk too full for imagination.png, eval_wm.py run alone, 8-bit GGUF weights. Each is one
`error: ...` line and exit code 2 (conftest.run_script_error), with nothing written and a
checkpoint that exists unchanged. The first two are one table each over every script."""

import errno
import os

import pytest
import torch
from PIL import Image

import bench
import bench_memory
import eval_wm
import lm
import lora
import offload
import pretrain_lm
import sample
import train_agent
import train_router
import textdata
import train_vae
import train_wm
import trainer
import wm_setup
from common import UserError, config_from
from conftest import read_bytes, run_script, run_script_error, tiny_gpt2
from trainer import Run


def out_of_range(script, flags, must_be):
    """A row of OUT_OF_RANGE: the flags' last value is refused, as out of the range it must be in."""
    return script, flags, f"{flags.split()[-1]} is out of range: it must be {must_be}"


INT_1, INT_2, NUM_0, FRACTION = "an integer >= 1", "an integer >= 2", "a number >= 0", "a number from 0 to 1"
# every script's flags that take a number (or a choice), each refused as it is parsed: (script, flags, why)
OUT_OF_RANGE = [
    *(out_of_range(train_vae, flags, INT_1) for flags in (
        "--batch-size 0", "--batch-size -3", "--context 0", "--lora-r 0", "--eval-batches 0", "--eval-interval 0",
        "--log-interval 0", "--max-iters -5", "--latent-size 0", "--grad-accum 0", "--soft-tokens 0")),
    out_of_range(train_vae, "--prefix-drop 1.5", FRACTION), out_of_range(train_vae, "--prefix-drop -0.1", FRACTION),
    out_of_range(train_vae, "--kl-max -1", NUM_0), out_of_range(train_vae, "--free-bits -0.1", NUM_0),
    out_of_range(train_vae, "--free-bits inf", "finite"), out_of_range(train_vae, "--lr nan", "a number > 0"),
    out_of_range(train_vae, "--lr 0", "a number > 0"), out_of_range(train_vae, "--head-lr-scale 0", "a number > 0"),
    out_of_range(train_vae, "--eval-paragraphs -1", "an integer >= 0"),
    out_of_range(train_vae, "--refine-steps -1", "an integer >= 0"),
    out_of_range(sample, "--refine-steps -2", "an integer >= 0"),
    out_of_range(train_router, "--sweep-pairs 1", INT_2),
    (train_vae, "--batch-size x", "'x' is not an integer"),
    (train_vae, "--posterior gaussian", "invalid choice: 'gaussian' (choose from 'bigvae', 'diagonal')"),
    *(out_of_range(pretrain_lm, flags, INT_1) for flags in (
        "--block-size 0", "--batch-size -3", "--eval-batches 0", "--max-iters -5")),
    *(out_of_range(train_wm, flags, INT_1) for flags in (
        "--collect-steps 0", "--horizon 0", "--width 0", "--num-layers 0", "--num-heads 0", "--num-imagine 0",
        "--batch-size 0", "--lora-r 0", "--latent-size 0")),
    *(out_of_range(train_wm, flags, INT_2) for flags in ("--segment-steps 0", "--num-bins 1", "--fsq-levels 8 1")),
    out_of_range(train_wm, "--tokenizer-iters -1", "an integer >= 0"),
    *(out_of_range(train_wm, flags, "a number between 0 and 1, both excluded")
      for flags in ("--val-fraction 0", "--val-fraction 1")),
    *(out_of_range(train_wm, flags, "a number from 0 up to, not including, 1")
      for flags in ("--dropout 1", "--dropout -0.1")),
    (train_wm, "--next-latent mse", "invalid choice: 'mse' (choose from 'kl', 'decode')"),
    out_of_range(train_agent, "--gamma 1.5", FRACTION), out_of_range(train_agent, "--segment-steps 1", INT_2),
    out_of_range(train_agent, "--end-share 1.5", FRACTION),
    out_of_range(train_router, "--scales -1", NUM_0),
    *(out_of_range(sample, flags, INT_1) for flags in ("--sample 0", "--sample -1", "--num-tokens 0")),
    *(out_of_range(sample, flags, INT_2) for flags in ("--interp-steps 1", "--interp-steps 0")),
    *(out_of_range(sample, flags, NUM_0) for flags in ("--temperature -1", "--temperature nan", "--scale -1")),
    out_of_range(sample, "--temperature inf", "finite"),
]


@pytest.mark.parametrize("script, flags, why", OUT_OF_RANGE,
                         ids=[f"{script.__name__} {flags}" for script, flags, _ in OUT_OF_RANGE])
def test_a_number_out_of_range_is_refused_as_it_is_parsed(tmp_path, capsys, monkeypatch, script, flags, why):
    """argparse's own line (`argument FLAG: ...`) names the flag, so it came from parsing: before a
    device, a model or a default out-dir was made."""
    monkeypatch.chdir(tmp_path)
    err = run_script_error(script.main, flags.split(), capsys)
    assert err.startswith(f"error: argument {flags.split()[0]}: {why} (see ") and err.endswith(" --help)")
    assert os.listdir(tmp_path) == []


# what each kind of checkpoint is, as checkpoint.load_checkpoint names its writer
WRITTEN_BY = {"vae": "train_vae.py (a text VAE)", "lm": "pretrain_lm.py (a plain LM)",
              "wm": "train_wm.py (a world model)"}
# (script, its arguments with DIR for the directory given, what DIR's ckpt.pt holds, the run it wants instead)
WRONG_CHECKPOINT = [
    *((train_vae, argv, saved, "train_vae.py run to --resume") for argv, saved in (
        ("--resume DIR", "wm"), ("--resume DIR", "lm"), ("--eval-only --resume DIR", "wm"), ("--resume DIR", "dict"),
        ("--eval-only --resume DIR", "tensor"))),
    *((sample, "--resume DIR --sample 1", saved, "train_vae.py run to --resume")
      for saved in ("wm", "lm", "dict", "tensor", "nothing")),
    (pretrain_lm, "--resume DIR", "vae", "pretrain_lm.py run to --resume"),
    (train_wm, "--resume DIR", "vae", "train_wm.py run to --resume"),
    (train_wm, "--resume DIR", "dict", "train_wm.py run to --resume"),
    (train_wm, "--tokenizer-from DIR", "vae", "train_wm.py run to --tokenizer-from"),
    (train_agent, "--resume DIR", "wm", "train_agent.py run to --resume"),
    (train_agent, "--resume DIR", "nothing", "train_agent.py run to --resume"),
    (train_router, "--vae DIR", "wm", "train_vae.py run to --vae"),
    (train_router, "--vae DIR", "nothing", "train_vae.py run to --vae"),
]


@pytest.mark.parametrize("script, argv, saved, wants", WRONG_CHECKPOINT,
                         ids=[f"{script.__name__} {argv} {saved}" for script, argv, saved, _ in WRONG_CHECKPOINT])
def test_a_checkpoint_of_another_kind_is_named_with_the_script_that_reads_it(tmp_path, capsys, monkeypatch, script,
                                                                            argv, saved, wants):
    """Another script's checkpoint names the script that wrote it; another program's torch file, or
    none, names the run it wants. Nothing is written, and the file stays as it was."""
    monkeypatch.chdir(tmp_path)
    os.mkdir("ckpt")
    path = f"{tmp_path}/ckpt/ckpt.pt"
    if saved in WRITTEN_BY:
        torch.save({"kind": saved, "config": {}, "step": 1}, path)
        writer = WRITTEN_BY[saved]
        expected = (f"{path} was written by {writer}, not by {wants.split()[0]}; give it to {writer.split()[0]}, "
                    f"or pass the --out-dir of a {wants}")
    elif saved == "nothing":
        expected = f"no checkpoint at {path}; pass the --out-dir of an earlier {wants}"
    else:  # another program's torch file
        torch.save({"weights": torch.zeros(2)} if saved == "dict" else torch.zeros(3), path)
        expected = f"{path} is a torch file but not a checkpoint of this project; pass the --out-dir of a {wants}"
    before = [read_bytes(f"ckpt/{name}") for name in os.listdir("ckpt")]
    err = run_script_error(script.main, argv.replace("DIR", f"{tmp_path}/ckpt").split(), capsys)
    assert err == f"error: {expected}"
    assert [read_bytes(f"ckpt/{name}") for name in os.listdir("ckpt")] == before
    assert os.listdir(tmp_path) == ["ckpt"]  # no default out-dir made either


HUGE = ["--batch-size", "100000"]
WM = ["--width", "32", "--num-layers", "1", "--num-heads", "2", "--batch-size", "4", "--log-interval", "1",
      "--warmup-iters", "1", "--horizon", "5", "--num-imagine", "8", "--device", "cpu", "--collect-steps", "600",
      "--segment-steps", "6"]
EVAL = ["--horizon", "5", "--num-imagine", "8", "--device", "cpu"]
VAE_SMALL = ["--context", "8", "--batch-size", "4", "--eval-batches", "1", "--latent-size", "16", "--lora-r", "4",
             "--device", "cpu", "--iw-samples", "2", "--max-iters", "1", "--eval-interval", "1"]


@pytest.mark.parametrize("script, argv", [
    (train_vae, []), (pretrain_lm, []), (train_wm, []), (train_wm, ["--backbone", "lm", "--num-bins", "16"]),
    (train_wm, ["--state", "latent"]), (train_agent, [])],
    ids=["train_vae", "pretrain_lm", "train_wm", "train_wm-lm", "train_wm-latent", "train_agent"])
def test_a_batch_that_cannot_fit_is_refused_before_anything_is_written(tmp_path, capsys, script, argv):
    """Each script's default model with --batch-size 100000 (hundreds of GiB of activations): refused
    from the memory estimate before data, a tokenizer or a checkpoint is made."""
    out = tmp_path / "out"
    err = run_script_error(script.main, argv + HUGE + ["--device", "cpu", "--out-dir", str(out)], capsys)
    assert "GiB is free: lower --batch-size (now 100000)" in err
    assert not out.exists()  # the refused run removes the out-dir it made


@pytest.mark.parametrize("script, argv", [(train_vae, VAE_SMALL), (train_wm, WM + ["--max-iters", "1"])],
                         ids=["train_vae", "train_wm"])
def test_resuming_with_a_batch_that_cannot_fit_leaves_the_checkpoint(tmp_path, capsys, script, argv, text_file):
    out = str(tmp_path / "run")
    argv = argv + (["--data", text_file] if script is train_vae else [])
    run_script(script.main, argv + ["--out-dir", out], capsys)
    before = read_bytes(f"{out}/ckpt.pt")
    assert "lower --batch-size (now 100000)" in run_script_error(
        script.main, argv + ["--resume", out, "--max-iters", "2"] + HUGE, capsys)
    assert read_bytes(f"{out}/ckpt.pt") == before


def test_the_default_runs_fit_in_a_gib(monkeypatch, tmp_path):
    """train_vae.py's and train_wm.py's default models at their default batch size pass the check with
    1 GiB free; so does the Mistral-shaped VAE of bench_memory.py mistral-memory --scaled-down."""
    monkeypatch.setattr(offload, "free_memory", lambda device: 2**30)
    run = Run(torch.device("cpu"))

    class Built(Exception):
        pass

    def built():  # the default corpus comes after the model: train_vae.py has built it and passed the check
        raise Built

    monkeypatch.setattr(textdata, "stdlib_docstrings", built)
    with pytest.raises(Built):
        train_vae.main(["--device", "cpu", "--out-dir", str(tmp_path / "vae")])
    args = train_wm.parse_args([])
    args.model = wm_setup.check_model_flags(vars(args), args.explicit)
    env = train_wm.make_env(args.env)
    tokenizer = wm_setup.make_tokenizer(env, config_from(wm_setup.TokenizerSettings, vars(args)))
    wm_setup.build_world_model(wm_setup.settings_from(vars(args)), tokenizer, int(env.action_space.n), run.device,
                               args.batch_size, run.is_main)
    scaled_down = bench_memory.mistral_vae(bench_memory.MISTRAL_SCALED_DOWN, torch.float32, "meta")
    offload.check_memory(scaled_down.base, run.device, 4 * 128 * 2, "--batch-size",
                         others=offload.outside(scaled_down, scaled_down.base))


def test_a_cuda_number_past_the_gpus_is_refused(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # a machine with one GPU
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    assert trainer.pick_device("cuda:0") == "cuda:0"
    with pytest.raises(UserError, match=r"^--device cuda:1 asked for, but this machine has 1 CUDA GPU\(s\), numbered "
                       r"from cuda:0$"):
        trainer.pick_device("cuda:1")


def test_bench_refuses_a_device_it_does_not_have_and_a_model_that_cannot_fit(capsys, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert "no CUDA GPU; use --device cpu" in run_script_error(bench.main, ["imagine", "--device", "cuda"], capsys)
    assert "invalid choice: 'mps'" in run_script_error(bench.main, ["imagine", "--device", "mps"], capsys)
    assert "smollm2's shape is for vae-step" in run_script_error(bench.main, ["agent", "--lm", "smollm2"], capsys)
    for name in ("vae", "vae-step"):  # tiny's 512 positions cannot hold the decoder's inputs and 512 targets
        assert "lower --block-size" in run_script_error(bench.main, [name, "--block-size", "512", "--device", "cpu",
                                                                     "--steps", "1"], capsys)
    # Mistral-7B in fp32 on a CPU: ~27 GiB of weights alone, refused before it is built
    monkeypatch.setattr(offload, "free_memory", lambda device: 16 * 2**30)
    err = run_script_error(bench_memory.main, ["mistral-memory", "--device", "cpu", "--steps", "1"], capsys)
    assert "16.0 GiB is free: lower --batch-size (now 4), or add --scaled-down" in err
    assert "invalid choice: 'mps'" in run_script_error(bench_memory.main, ["mistral-memory", "--device", "mps"],
                                                       capsys)


@pytest.fixture
def finished_wm(tmp_path, capsys):
    """A one-step CartPole world model: its out-dir."""
    out = str(tmp_path / "wm")
    run_script(train_wm.main, WM + ["--max-iters", "1", "--eval-interval", "1", "--out-dir", out], capsys)
    return out


def test_eval_wm_run_alone_points_to_train_wm_in_one_line(capsys):
    """`python eval_wm.py ...`, whatever its arguments: one line naming the command that evaluates."""
    err = run_script_error(lambda argv: eval_wm.main(), ["--help"], capsys)
    assert err.endswith("run python train_wm.py --eval-only --resume DIR")


def test_a_disk_too_full_for_the_picture_stops_the_run_with_the_checkpoint_as_it_was(finished_wm, capsys,
                                                                                      monkeypatch):
    before = {name: read_bytes(f"{finished_wm}/{name}") for name in ("ckpt.pt", "imagination.png")}

    def disk_full(image, path, *args, **kwargs):
        with open(path, "wb") as f:  # a first part written, then the disk is full
            f.write(b"\x89PNG")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(Image.Image, "save", disk_full)
    err = run_script_error(train_wm.main, ["--resume", finished_wm, "--max-iters", "2", *EVAL], capsys)
    assert f"cannot save {finished_wm}/imagination.png (No space left on device)" in err
    assert sorted(os.listdir(finished_wm)) == ["ckpt.pt", "imagination.png"]  # no half-written file left
    assert {name: read_bytes(f"{finished_wm}/{name}") for name in before} == before


@pytest.mark.parametrize("model", ["smollm2", "weights.gguf"])
def test_8bit_gguf_weights_are_refused_before_loading(tmp_path, capsys, monkeypatch, model):
    """transformers cannot quantize a GGUF file's weights with bitsandbytes: one line, nothing read."""
    monkeypatch.setattr(lm, "load_config", lambda name: pytest.fail("the model was read"))
    err = run_script_error(train_vae.main, ["--model", model, "--load-8bit", "--out-dir", str(tmp_path / "out"),
                                            "--device", "cpu"], capsys)
    assert err == (f"error: --load-8bit: transformers cannot quantize the weights of a GGUF file with bitsandbytes "
                   f"({model}'s are one, dequantised as they load): drop --load-8bit, or give a Hugging Face id or "
                   "a directory saved with save_pretrained")


@pytest.mark.parametrize("script, argv", [(train_vae, []), (train_wm, ["--backbone", "lm"])], ids=["vae", "wm"])
def test_an_architecture_without_lora_targets_is_refused_before_its_weights_load(tmp_path, capsys, script, argv):
    """lora.py knows where adapters go in GPT-2 and Llama-like models: another architecture (here a
    GPT-NeoX config, no weights saved at all) is one line naming those it knows, nothing written."""
    from transformers import GPTNeoXConfig

    model_dir, out = tmp_path / "neox", tmp_path / "out"
    GPTNeoXConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64).save_pretrained(model_dir)
    err = run_script_error(script.main, argv + ["--model", str(model_dir), "--out-dir", str(out)], capsys)
    assert err == (f"error: --model {model_dir} is a 'gpt_neox' model; the LoRA adapters here know where to go in "
                   f"{', '.join(lora.DEFAULT_TARGETS)} models only: pick one of those")
    assert not out.exists()


@pytest.mark.parametrize("script", [train_vae, pretrain_lm, train_router])
def test_bad_data_is_refused_before_any_base_loads(tmp_path, capsys, monkeypatch, script):
    """An empty or non-UTF-8 --data file is refused before minutes of loading a big base."""
    monkeypatch.setattr(lm, "load_base", lambda *a, **k: pytest.fail("the base loaded before --data was read"))
    empty = tmp_path / "empty.txt"
    empty.write_text("\n \n")
    argv = ["--data", str(empty), "--out-dir", str(tmp_path / "out"), "--device", "cpu"]
    argv += ["--vae", str(tmp_path / "no-vae")] if script is train_router else []
    assert "holds no text" in run_script_error(script.main, argv, capsys)


def test_a_resume_conflict_names_each_flag_as_it_is_typed():
    """A dest with argparse's trailing underscore (--lambda's lambda_) is named by its flag."""
    from checkpoint import adopt_config

    with pytest.raises(UserError, match=r"settings: --lambda 0.9 \(saved: 0.95\), --eval-only True \(saved: False\);"):
        adopt_config({"lambda_": 0.9, "eval_only": True}, {"lambda_", "eval_only"}, {"lambda_": 0.95, "eval_only": False},
                     ("lambda_", "eval_only"), "out")


def test_guided_spans_decode_up_to_the_last_position(tmp_path, capsys, text_file, guided_ids):
    """A router on a VAE over a 64-position base: z's memory slot, an 8-token window and the soft token
    leave 54 positions, room for a span of 55 tokens (its last token needs none); 56 is refused in one line."""
    base, vae_dir, router_dir = (str(tmp_path / name) for name in ("base", "vae", "router"))
    lm.save_base(tiny_gpt2(), lm.ByteTokenizer(), base)
    run_script(train_vae.main, VAE_SMALL + ["--model", base, "--data", text_file, "--out-dir", vae_dir], capsys)
    run_script(train_router.main, ["--vae", vae_dir, "--data", text_file, "--out-dir", router_dir, "--max-iters", "1",
                                   "--batch-size", "4", "--eval-batches", "1", "--sweep-pairs", "2", "--scales", "1",
                                   "--device", "cpu"], capsys)
    argv = ["--resume", vae_dir, "--router", router_dir, "--guide", "the model reads", "--target", "a line.",
            "--num-spans", "1", "--device", "cpu", "--span-tokens"]
    err = run_script_error(sample.main, argv + ["56"], capsys)
    assert "--span-tokens 56 goes past the base's last position: it has room for 55 tokens" in err
    guided_ids.clear()  # train_router.py's sweep generated too
    guided, _ = run_script(sample.main, argv + ["55"], capsys)
    (ids,) = guided_ids  # sample.py's: all 55 tokens, and the text is theirs
    assert ids.shape == (1, 55) and guided["guided"] == [lm.ByteTokenizer().decode(ids[0].tolist())]


def test_a_training_script_refuses_mps_without_an_apple_gpu(capsys, monkeypatch, tmp_path):
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    err = run_script_error(train_vae.main, ["--device", "mps", "--out-dir", str(tmp_path / "run")], capsys)
    assert "no Apple GPU (MPS); use --device cpu" in err and not (tmp_path / "run").exists()

