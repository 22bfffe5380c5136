"""peft_layout.save_peft / load_peft against peft itself (PeftModel.from_pretrained and save_pretrained),
on a tiny GPT-2 (Conv1D) and a tiny Mistral (nn.Linear), and peft_layout.load_bigvae on a small folder
written the way minihf's BigVAE saves one (peft adapters plus vae.safetensors)."""

import json
import os

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

import lora
import peft_layout
from common import UserError
from conftest import read_bytes
from lm import load_base
from vae import VAE, VAEConfig

peft = pytest.importorskip("peft", reason="peft is the reference implementation; .ci/run installs it")

IDS = torch.randint(0, 97, (2, 12), generator=torch.Generator().manual_seed(1))


def logits(model):
    with torch.no_grad():
        return model(IDS).logits


def randomize(params, seed):
    """Non-zero adapter weights (B is zero after injection)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in params:
            p.copy_(torch.randn(p.shape, generator=g) * 0.1)


def same_tensors(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def ours_with_two_adapters(model_dir):
    """Our model with an 'encoder' on the default layers and a 'decoder' of another r and alpha
    on the first block's layers only, both non-zero."""
    model, _ = load_base(model_dir)
    lora.add_adapter(model, "encoder", r=4, alpha=8)
    lora.add_adapter(model, "decoder", r=2, alpha=3, targets=[r".*\.0\..*(c_attn|c_fc|q_proj|up_proj)"])
    randomize(lora.lora_parameters(model), 0)
    return model


def peft_lora_state(peft_model, name):
    """peft's LoRA weights of adapter `name`, keyed as ours (lora.adapter_state_dict)."""
    return {k.removeprefix("base_model.model.").replace(f".{name}.", "."): v
            for k, v in peft_model.state_dict().items() if f".lora_A.{name}." in k or f".lora_B.{name}." in k}


def test_peft_loads_our_adapters_with_our_logits(saved_model_dir, tmp_path):
    model = ours_with_two_adapters(saved_model_dir)
    out = str(tmp_path / "peft")
    peft_layout.save_peft(model, out, ["encoder", "decoder"], saved_model_dir)
    assert sorted(os.listdir(out)) == ["decoder", "encoder"]

    theirs = peft.PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(saved_model_dir).eval(),
                                            os.path.join(out, "encoder"), adapter_name="encoder")
    theirs.load_adapter(os.path.join(out, "decoder"), adapter_name="decoder")
    with theirs.disable_adapter():
        base = logits(theirs)
    for name in ("encoder", "decoder"):
        theirs.set_adapter(name)
        assert same_tensors(peft_lora_state(theirs, name), lora.adapter_state_dict(model, name))
        with lora.use_adapter(model, name):
            ours = logits(model)
        assert (ours - base).abs().max() > 1e-2  # the adapter changes the output, so the match means something
        torch.testing.assert_close(logits(theirs), ours, rtol=1e-5, atol=1e-5)


def test_our_peft_folder_reads_back_bitwise(saved_model_dir, tmp_path):
    model = ours_with_two_adapters(saved_model_dir)
    out = str(tmp_path / "peft")
    peft_layout.save_peft(model, out, ["encoder", "decoder"], saved_model_dir)

    fresh, _ = load_base(saved_model_dir)
    for name in ("encoder", "decoder"):  # added by load_peft, with the saved r, alpha and layers
        peft_layout.load_peft(fresh, os.path.join(out, name), name)
        assert same_tensors(lora.adapter_state_dict(fresh, name), lora.adapter_state_dict(model, name))
        with lora.use_adapter(fresh, name), lora.use_adapter(model, name):
            assert torch.equal(logits(fresh), logits(model))

    existing, _ = load_base(saved_model_dir)  # into an adapter that exists: it must fit
    lora.add_adapter(existing, "encoder", r=4, alpha=8)
    peft_layout.load_peft(existing, os.path.join(out, "encoder"), "encoder")
    assert same_tensors(lora.adapter_state_dict(existing, "encoder"), lora.adapter_state_dict(model, "encoder"))
    lora.add_adapter(existing, "decoder", r=4, alpha=8)
    with pytest.raises(UserError, match=r"\(r=2, lora_alpha=3.0, 2 layers\) does not fit adapter 'decoder'"):
        peft_layout.load_peft(existing, os.path.join(out, "decoder"), "decoder")
    other_scale, _ = load_base(saved_model_dir)  # the encoder's r and layers, another alpha: another scale
    lora.add_adapter(other_scale, "encoder", r=4, alpha=16)
    with pytest.raises(UserError, match=r"\(r=4, lora_alpha=8.0, \d+ layers\) does not fit adapter 'encoder' of "
                       r"this model \(r=4, alpha=16.0"):
        peft_layout.load_peft(other_scale, os.path.join(out, "encoder"), "encoder")


def test_reads_what_peft_saves(saved_model_dir, tmp_path):
    """peft's own save_pretrained (its full config, an adapter saved under its name) reads into ours."""
    targets = lora.DEFAULT_TARGETS[AutoModelForCausalLM.from_pretrained(saved_model_dir).config.model_type]
    config = peft.LoraConfig(r=4, lora_alpha=16, target_modules=targets, task_type="CAUSAL_LM")
    theirs = peft.get_peft_model(AutoModelForCausalLM.from_pretrained(saved_model_dir).eval(), config,
                                 adapter_name="decoder")
    randomize([p for n, p in theirs.named_parameters() if ".lora_" in n], 1)
    theirs.save_pretrained(tmp_path)

    ours, _ = load_base(saved_model_dir)
    peft_layout.load_peft(ours, str(tmp_path / "decoder"), "decoder")
    assert same_tensors(lora.adapter_state_dict(ours, "decoder"), peft_lora_state(theirs, "decoder"))
    with lora.use_adapter(ours, "decoder"):
        torch.testing.assert_close(logits(ours), logits(theirs), rtol=1e-5, atol=1e-5)


def test_save_peft_replaces_whole_or_leaves_the_old_folder(saved_model_dir, tmp_path, monkeypatch):
    model = ours_with_two_adapters(saved_model_dir)
    out = str(tmp_path / "peft")
    peft_layout.save_peft(model, out, ["encoder", "decoder"], saved_model_dir)
    before = read_bytes(os.path.join(out, "encoder", peft_layout.PEFT_WEIGHTS))

    def full_disk(*args):
        raise OSError(28, "No space left on device")

    randomize(lora.lora_parameters(model, "encoder"), 2)
    monkeypatch.setattr(peft_layout, "save_file", full_disk)
    with pytest.raises(UserError, match="cannot save .*No space left on device.*the previous one is unchanged"):
        peft_layout.save_peft(model, out, ["encoder"], saved_model_dir)
    assert read_bytes(os.path.join(out, "encoder", peft_layout.PEFT_WEIGHTS)) == before
    assert sorted(os.listdir(tmp_path)) == ["peft"]  # no temporary folder left

    monkeypatch.undo()
    peft_layout.save_peft(model, out, ["encoder"], saved_model_dir)  # replaced whole: decoder/ is gone
    assert os.listdir(out) == ["encoder"]
    assert read_bytes(os.path.join(out, "encoder", peft_layout.PEFT_WEIGHTS)) != before


def test_load_peft_refuses_what_it_cannot_read(saved_model_dir, tmp_path):
    model = ours_with_two_adapters(saved_model_dir)
    out = str(tmp_path / "peft")
    peft_layout.save_peft(model, out, ["encoder"], saved_model_dir)
    fresh, _ = load_base(saved_model_dir)
    with pytest.raises(UserError, match="no adapter_config.json and adapter_model.safetensors in .*nowhere"):
        peft_layout.load_peft(fresh, str(tmp_path / "nowhere"), "encoder")
    config_path = os.path.join(out, "encoder", peft_layout.PEFT_CONFIG)
    with open(config_path) as f:
        config = json.load(f)
    with open(config_path, "w") as f:
        json.dump({**config, "use_dora": True}, f)
    with pytest.raises(UserError, match="has use_dora=True; only plain LoRA adapters"):
        peft_layout.load_peft(fresh, os.path.join(out, "encoder"), "encoder")
    with open(config_path, "w") as f:
        json.dump(config, f)
    weights_path = os.path.join(out, "encoder", peft_layout.PEFT_WEIGHTS)
    weights = load_file(weights_path)
    first_a = sorted(k for k in weights if ".lora_A." in k)[0]
    save_file({**weights, first_a: weights[first_a][:, :-1].contiguous()}, weights_path)  # another model's width
    with pytest.raises(UserError, match=r"has .*lora_A.weight of shape \(\d+, \d+\), where this model needs"):
        peft_layout.load_peft(fresh, os.path.join(out, "encoder"), "encoder")
    with open(os.path.join(out, "encoder", peft_layout.PEFT_WEIGHTS), "wb") as f:
        f.write(b"not safetensors")
    with pytest.raises(UserError, match="cannot read the adapter in .*encoder .*it is damaged or not a peft LoRA"):
        peft_layout.load_peft(fresh, os.path.join(out, "encoder"), "encoder")
    assert not lora.lora_layers(fresh)  # nothing was added


@pytest.mark.parametrize("saved_model_dir", ["mistral"], indirect=True)
def test_load_bigvae_layout(saved_model_dir, tmp_path):
    """A folder as minihf's DecoderOnlyTransformerVAE.save_pretrained writes it: peft's save_pretrained of
    a model with adapters 'default', 'encoder' and 'decoder' (the last two in subfolders), and the head's
    state dict as vae.safetensors."""
    config = peft.LoraConfig(task_type="CAUSAL_LM", r=4, lora_alpha=8, target_modules=[
        "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
        "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"])  # BigVAE's LoraConfig at a smaller r
    theirs = peft.get_peft_model(AutoModelForCausalLM.from_pretrained(saved_model_dir).eval(), config)
    theirs.add_adapter("encoder", config)
    theirs.add_adapter("decoder", config)
    randomize([p for n, p in theirs.named_parameters() if ".lora_" in n], 3)
    theirs.save_pretrained(tmp_path, safe_serialization=True)
    g = torch.Generator().manual_seed(4)
    head = {"f.weight": (1, 32), "f.bias": (1,), "w_e.weight": (16, 32), "w_e.bias": (16,),
            "w_d.weight": (32, 16), "w_d.bias": (32,)}
    head = {k: torch.randn(shape, generator=g) for k, shape in head.items()}
    save_file(head, tmp_path / "vae.safetensors")

    cfg = VAEConfig(latent_size=16, lora_r=4, lora_alpha=8, z_memory=0)
    vae = VAE(load_base(saved_model_dir)[0], cfg)
    peft_layout.load_bigvae(vae, str(tmp_path))
    assert all(torch.equal(vae.head.state_dict()[k], v) for k, v in head.items())
    for name in ("encoder", "decoder"):
        assert same_tensors(lora.adapter_state_dict(vae.base, name), peft_lora_state(theirs, name))
        theirs.set_adapter(name)
        with lora.use_adapter(vae.base, name):
            torch.testing.assert_close(logits(vae.base), logits(theirs), rtol=1e-5, atol=1e-5)

    with pytest.raises(UserError, match="build the VAE with pool_queries=1, posterior='bigvae', z_memory=0"):
        peft_layout.load_bigvae(VAE(load_base(saved_model_dir)[0], VAEConfig(latent_size=16, lora_r=4, lora_alpha=8)),
                         str(tmp_path))
    led = VAE(load_base(saved_model_dir)[0], VAEConfig(latent_size=16, lora_r=4, lora_alpha=8, z_memory=0, lead_token=True))
    with pytest.raises(UserError, match="one soft token first"):
        peft_layout.load_bigvae(led, str(tmp_path))
    narrower = VAE(load_base(saved_model_dir)[0], VAEConfig(latent_size=8, lora_r=4, lora_alpha=8, z_memory=0))
    with pytest.raises(UserError, match="does not fit this VAE's head"):
        peft_layout.load_bigvae(narrower, str(tmp_path))


@pytest.mark.parametrize("saved_model_dir", ["gpt2"], indirect=True)
def test_train_vae_writes_its_adapters_in_peft_layout(tmp_path, capsys, text_file, saved_model_dir):
    """A VAE run on a frozen pretrained base leaves out_dir/peft/{encoder,decoder}: its checkpoint's adapters."""
    import train_vae

    out = str(tmp_path / "run")
    train_vae.main(["--model", saved_model_dir, "--data", text_file, "--out-dir", out, "--context", "8",
                    "--batch-size", "2", "--eval-batches", "1", "--latent-size", "16", "--lora-r", "4",
                    "--max-iters", "2", "--eval-interval", "2", "--warmup-iters", "1", "--device", "cpu",
                    "--iw-samples", "1"])
    saved = torch.load(os.path.join(out, "ckpt.pt"), weights_only=True)["model"]
    fresh, _ = load_base(saved_model_dir)
    for name in ("encoder", "decoder"):
        peft_layout.load_peft(fresh, os.path.join(out, "peft", name), name)
        ckpt = {lora.strip_name(k.removeprefix("base."), name): v
                for k, v in saved.items() if lora.is_lora_key(k, name)}
        assert same_tensors(lora.adapter_state_dict(fresh, name), ckpt)
        assert any(v.abs().sum() > 0 for k, v in ckpt.items() if ".lora_B." in k)  # trained: B moved off zero
