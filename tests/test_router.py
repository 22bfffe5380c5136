"""router.py and train_router.py: the router starts as the decoder, guidance mixes logits as
stated, cached generation equals recomputation, only the router trains, bad inputs are one line."""

import os

import pytest
import torch

import checkpoint
import lm
import lora
import sample
import train_router
import train_vae
from conftest import assert_greedy, crash_at_step_2_then_resume, run_script, run_script_error, tiny_gpt2
from common import UserError
from router import Router, guided_logits, load_router
from vae import VAE, VAEConfig

SMALL = ["--batch-size", "4", "--eval-batches", "2", "--log-interval", "1", "--warmup-iters", "1", "--device", "cpu",
         "--sweep-pairs", "4", "--scales", "0", "1.25"]
VAE_SMALL = ["--context", "8", "--batch-size", "4", "--eval-batches", "2", "--latent-size", "16", "--lora-r", "4",
             "--device", "cpu", "--iw-samples", "2", "--max-iters", "2", "--eval-interval", "2"]


def make_router(z_memory=1, soft_tokens=1, lead_token=False):
    vae = VAE(tiny_gpt2(), VAEConfig(latent_size=8, lora_r=4, z_memory=z_memory, prefix_slots=6, soft_tokens=soft_tokens,
                                     lead_token=lead_token), lm.ByteTokenizer()).eval()
    torch.manual_seed(1)
    for layer in lora.lora_layers(vae.base):  # a decoder that is not zero, so "equal" means something
        for p in layer.lora_B["decoder"].parameters():
            torch.nn.init.normal_(p, std=0.1)
    return Router(vae).eval()


@pytest.fixture(scope="module")
def vae_dirs(tmp_path_factory, text_file):
    """A VAE on a frozen pretrained-like base, and one on two bases: {name: out-dir}."""
    root = tmp_path_factory.mktemp("router")
    dirs = {}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    for name, seed in (("a", 0), ("b", 1)):
        base = root / f"base-{name}"
        torch.manual_seed(seed)
        lm.save_base(tiny_gpt2() if seed == 0 else lm.load_base("tiny")[0], lm.ByteTokenizer(), base)
        dirs[name] = str(root / f"vae-{name}")
        train_vae.main(VAE_SMALL + ["--model", str(base), "--data", text_file, "--out-dir", dirs[name]])
    dirs["tiny"] = str(root / "vae-tiny")  # tiny trained fully: no pretrained LM to guide against
    train_vae.main(VAE_SMALL + ["--data", text_file, "--out-dir", dirs["tiny"]])
    dirs["tiny-frozen"] = str(root / "vae-tiny-frozen")  # nor frozen: its weights are random
    train_vae.main(VAE_SMALL + ["--data", text_file, "--out-dir", dirs["tiny-frozen"], "--freeze-base"])
    torch.set_num_threads(threads)
    return dirs


def test_the_router_starts_as_the_decoder():
    router = make_router()
    base = router.vae.base
    decoder, routed = lora.adapter_state_dict(base, "decoder"), lora.adapter_state_dict(base, "router")
    assert decoder.keys() == routed.keys() and all(torch.equal(decoder[k], routed[k]) for k in decoder)
    assert torch.equal(router.w_d.weight, router.vae.head.w_d.weight)
    assert torch.equal(router.w_memory.weight, router.vae.head.w_memory.weight)
    assert router.w_d.weight.data_ptr() != router.vae.head.w_d.weight.data_ptr()  # a copy: the VAE stays as it was


def test_guidance_scale_0_is_the_base_and_1_the_router():
    base, routed = torch.randn(3, 10), torch.randn(3, 10)
    assert torch.equal(guided_logits(base, routed, 0.0), base)
    assert torch.allclose(guided_logits(base, routed, 1.0), routed)
    assert torch.allclose(guided_logits(base, routed, 2.0), 2 * routed - base)


@torch.no_grad()
def recomputed_logits(router, context, z, generated, span_tokens, scale):
    """The guided logits (B, N, V) at each of the N generated tokens (B, N), by full forward passes
    (no cache), teacher-forced: each span after the last len(context) tokens before it."""
    text, logits = context, []
    for span in generated.split(span_tokens, 1):
        seen = text[:, text.shape[1] - context.shape[1]:]
        logits.append(guided_logits(router.vae.base_logits(span, seen), router(z, span, seen), scale))
        text = torch.cat([text, span], 1)
    return torch.cat(logits, 1)


@pytest.mark.parametrize("z_memory, soft_tokens, lead_token", [(1, 1, False), (0, 1, False), (1, 3, True)])
def test_cached_generation_equals_recomputation(z_memory, soft_tokens, lead_token):
    router = make_router(z_memory, soft_tokens, lead_token)
    torch.manual_seed(2)
    context, z = torch.randint(0, 256, (2, 6)), torch.randn(2, 8)
    for scale in (0.0, 1.0, 1.25):  # at 0, the base LM's own greedy continuation
        cached = router.generate(context, z, num_spans=2, span_tokens=5, scale=scale)
        assert cached.shape == (2, 10)
        assert_greedy(recomputed_logits(router, context, z, cached, 5, scale), cached)
    with torch.no_grad():  # and Hugging Face's greedy generate picks the base's argmax as well
        expected = router.vae.base.generate(context, max_new_tokens=5, do_sample=False, pad_token_id=256)
        assert_greedy(router.vae.base_logits(expected[:, 6:], context), expected[:, 6:])


def test_a_short_context_ends_where_a_full_one_would():
    """The router trains on contexts of the VAE's --context (prefix_slots 6 here): a shorter one (a short
    --guide) is right-aligned, so z's soft tokens and the text keep their positions; cached generation
    after it still equals recomputation."""
    router = make_router()  # z's memory at position 0
    torch.manual_seed(3)
    full, z, span = torch.randint(0, 256, (2, 6)), torch.randn(2, 8), torch.randint(0, 256, (2, 4))
    (_, at_full), (_, at_short) = router.inputs(z, full, span), router.inputs(z, full[:, 4:], span)
    assert at_full[0].tolist() == list(range(1, 1 + 6 + 1 + 4)) and at_short[0].tolist() == at_full[0, 4:].tolist()
    assert router.text_start(2) == router.text_start(6) == 1 + 6 + 1
    cached = router.generate(full[:, 4:], z, num_spans=2, span_tokens=5, scale=1.25)
    assert_greedy(recomputed_logits(router, full[:, 4:], z, cached, 5, 1.25), cached)


def test_scale_0_never_runs_the_router(monkeypatch):
    router, runs = make_router(), []
    inputs = Router.inputs  # the router's input, made once per span it runs
    monkeypatch.setattr(Router, "inputs", lambda self, *a: runs.append(1) or inputs(self, *a))
    context, z = torch.randint(0, 256, (2, 6)), torch.randn(2, 8)
    router.generate(context, z, num_spans=2, span_tokens=3, scale=0.0)
    assert runs == []
    router.generate(context, z, num_spans=2, span_tokens=3, scale=1.0)
    assert len(runs) == 2


def test_only_the_router_and_its_z_projections_get_gradients():
    router = make_router().train()
    batch = {"input_ids": torch.randint(0, 256, (2, 5)), "prefix_ids": torch.randint(0, 256, (2, 6))}
    batch["target_ids"] = batch["input_ids"]
    router.compute_loss(batch, 0)["loss"].backward()
    trained = {id(p) for p in router.trained_parameters()}
    for name, p in router.named_parameters():
        assert (p.grad is not None) == (id(p) in trained), name
    assert any(p.grad.abs().sum() > 0 for p in router.trained_parameters())
    names = {n for n, p in router.named_parameters() if id(p) in trained}
    assert all(".lora_" in n and ".router." in n or n.startswith(("w_d.", "w_memory.")) for n in names)


def test_train_eval_resume_and_guide(tmp_path, capsys, monkeypatch, text_file, vae_dirs, guided_ids):
    argv = SMALL + ["--vae", vae_dirs["a"], "--data", text_file, "--max-iters", "4", "--eval-interval", "2"]
    straight, crashed = str(tmp_path / "straight"), str(tmp_path / "crashed")
    intervals, mean_interval = [], train_router.mean_interval  # the sweep's per-pair lists
    monkeypatch.setattr(train_router, "mean_interval", lambda values: intervals.append(values) or mean_interval(values))
    metrics, lines = run_script(train_router.main, argv + ["--out-dir", straight], capsys)
    num_scales = sum(k.startswith("sweep_cosine_s") and k[14:].replace(".", "").isdigit() for k in metrics)
    n = 3 * num_scales - 1  # per scale: cosine, base NLL, and its gap to the first scale (none for the first)
    assert num_scales > 1 and "sweep_cosine_gap_s0" not in metrics and len(intervals) % n == 0
    for sweep in range(0, len(intervals), n):
        first, rest = intervals[sweep], intervals[sweep + 2:sweep + n]  # rest: (cosine, base NLL, gap) per scale
        cosines, gaps = rest[0::3], rest[2::3]
        assert len(first) == 4 and all(gap == [a - b for a, b in zip(cos, first)]
                                       for cos, gap in zip(cosines, gaps))  # paired: per pair, then the mean
    assert any(line.startswith("step 4/4 |") and "eta" in line for line in lines)
    for key in ("val_acc_router", "val_acc_base", "val_acc_shuffled", "sweep_cosine_s0", "sweep_cosine_s1.25",
                "sweep_cosine_gap_s1.25", "sweep_cosine_gap_s1.25_ci95", "sweep_base_nll_s1.25", "steps"):
        assert key in metrics, key
    assert metrics["sweep_pairs"] == 4 and intervals
    state = torch.load(os.path.join(straight, "ckpt.pt"), weights_only=True)
    assert state["kind"] == "router" and all(".router." in k or k.startswith(("w_d.", "w_memory.")) for k in state["model"])
    crash_at_step_2_then_resume(train_router, argv, crashed, monkeypatch, capsys)
    b = torch.load(os.path.join(crashed, "ckpt.pt"), weights_only=True)
    for k in state["model"]:
        assert torch.equal(state["model"][k], b["model"][k]), k
    again, _ = run_script(train_router.main, ["--vae", vae_dirs["a"], "--resume", straight, "--eval-only", "--data",
                                              text_file] + SMALL, capsys)
    assert again["val_acc_router"] == pytest.approx(metrics["val_acc_router"])
    guided_ids.clear()  # train_router.py's sweep generated too
    noted, windows = Router.generate, []  # guided_ids' wrapper

    def with_window(self, *args, window=None, **kwargs):
        windows.append(window)
        return noted(self, *args, window=window, **kwargs)

    monkeypatch.setattr(Router, "generate", with_window)
    guided, lines = run_script(sample.main, ["--resume", vae_dirs["a"], "--router", straight, "--guide", "the",
                                             "--target", "a file line.", "reads a span.", "--num-spans", "2",
                                             "--span-tokens", "4", "--device", "cpu"], capsys)
    (ids,) = guided_ids  # sample.py's: 2 spans of 4 tokens, and the text is theirs
    assert ids.shape == (1, 8) and guided["guided"] == [lm.ByteTokenizer().decode(ids[0].tolist())]
    assert windows == [8]  # the second span sees the VAE's --context 8, not the 3-token guide alone
    assert "--guide is empty" in run_script_error(sample.main, ["--resume", vae_dirs["a"], "--router", straight,
                                                                "--guide", "", "--target", "a", "--device", "cpu"], capsys)


@pytest.mark.parametrize("argv, message", [
    (["--vae", "TINY"], "is on tiny's base (trained fully), so no pretrained LM is there to guide against"),
    (["--vae", "TINY-FROZEN"], "is on tiny's base (frozen, random), so no pretrained LM is there"),
    (["--vae", "B", "--resume", "ROUTER"], "was trained on another VAE"),
])
def test_bad_inputs_are_one_line_errors(argv, message, capsys, tmp_path, text_file, vae_dirs):
    router_dir = str(tmp_path / "router")
    if "ROUTER" in argv:
        run_script(train_router.main, SMALL + ["--vae", vae_dirs["a"], "--data", text_file, "--max-iters", "1",
                                               "--out-dir", router_dir], capsys)
    names = {"TINY": vae_dirs["tiny"], "TINY-FROZEN": vae_dirs["tiny-frozen"], "A": vae_dirs["a"], "B": vae_dirs["b"], "ROUTER": router_dir}
    argv = [names.get(a, a) for a in argv] + ["--data", text_file, "--out-dir", str(tmp_path / "out"), "--device", "cpu"]
    assert message in run_script_error(train_router.main, argv, capsys)


@pytest.mark.parametrize("change", ["missing", "extra", "reshaped"])
def test_a_router_checkpoint_with_other_weights_is_refused(capsys, tmp_path, text_file, vae_dirs, change):
    """A router checkpoint made by another version (a weight missing, one more, another shape) is one line."""
    router_dir = str(tmp_path / "router")
    run_script(train_router.main, SMALL + ["--vae", vae_dirs["a"], "--data", text_file, "--max-iters", "1",
                                           "--out-dir", router_dir], capsys)
    state = checkpoint.load_checkpoint(router_dir, "router")
    key = next(k for k in state["model"] if not k.startswith("vae."))  # the router's own w_d or w_memory
    if change == "missing":
        del state["model"][key]
    elif change == "extra":
        state["model"]["w_other.weight"] = torch.zeros(2)
    else:
        state["model"][key] = torch.zeros(3)
    with pytest.raises(UserError, match="the checkpoint in somewhere does not fit this model"):
        load_router(vae_dirs["a"], torch.device("cpu"), state, "somewhere")


def test_guide_refuses_an_empty_target_and_another_vaes_router(capsys, tmp_path, text_file, vae_dirs):
    router_dir = str(tmp_path / "router")
    run_script(train_router.main, SMALL + ["--vae", vae_dirs["a"], "--data", text_file, "--max-iters", "1",
                                           "--out-dir", router_dir], capsys)
    common = ["--router", router_dir, "--guide", "the model", "--device", "cpu"]
    assert "target 1 is empty" in run_script_error(sample.main, ["--resume", vae_dirs["a"], "--target", " "] + common,
                                                   capsys)
    assert "was trained on another VAE" in run_script_error(sample.main, ["--resume", vae_dirs["b"], "--target", "x"]
                                                            + common, capsys)
    assert "--scale" in run_script_error(sample.main, ["--resume", vae_dirs["a"], "--target", "x", "--scale", "-1"]
                                         + common, capsys)
    assert "--guide needs --router DIR and --target TEXT" in run_script_error(
        sample.main, ["--resume", vae_dirs["a"], "--guide", "the model"], capsys)
