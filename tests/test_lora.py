"""lora.py against its claims, on a tiny GPT-2 (Conv1D layers) and a tiny Mistral (nn.Linear),
each loaded from a save_pretrained directory through lm.load_base."""

import pytest
import torch
from transformers import AutoModelForCausalLM

import lora
from lm import load_base

IDS = torch.randint(0, 97, (2, 12), generator=torch.Generator().manual_seed(1))


def logits(model):
    with torch.no_grad():
        return model(IDS).logits


def randomize(model, name, seed):
    """Give adapter `name` non-zero weights (B is zero after injection)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in lora.lora_parameters(model, name):
            p.copy_(torch.randn(p.shape, generator=g) * 0.1)


@pytest.fixture
def pair(saved_model_dir):
    """(our model with adapters 'encoder' and 'decoder', the plain transformers model)."""
    model, _ = load_base(saved_model_dir)
    lora.add_adapter(model, "encoder", r=4, alpha=8)
    lora.add_adapter(model, "decoder", r=4, alpha=8)
    return model, AutoModelForCausalLM.from_pretrained(saved_model_dir).eval()


def test_injected_model_equals_base_until_trained(pair):
    model, reference = pair
    lora.set_adapter(model, "encoder")
    assert torch.allclose(logits(model), logits(reference), atol=1e-5)
    randomize(model, "encoder", 0)
    assert not torch.allclose(logits(model), logits(reference), atol=1e-3)


def test_defaults_wrap_attention_and_mlp(pair):
    model, _ = pair
    wrapped = {n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, lora.LoRALayer)}
    expected = lora.DEFAULT_TARGETS[model.config.model_type]
    assert wrapped == set(expected)


def test_merge_equals_unmerged_and_unmerge_restores(pair):
    model, _ = pair
    randomize(model, "decoder", 1)
    lora.set_adapter(model, "decoder")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    unmerged = logits(model)
    lora.merge(model)
    assert torch.allclose(logits(model), unmerged, atol=1e-5)
    with pytest.raises(ValueError, match="unmerge"):
        lora.set_adapter(model, "encoder")
    lora.unmerge(model)
    assert torch.allclose(logits(model), unmerged, atol=1e-5)
    for k, v in model.state_dict().items():
        assert torch.allclose(v, before[k], atol=1e-6), k


def test_folded_equals_unfolded_without_gradients_and_leaves_the_weights(pair):
    model, _ = pair
    randomize(model, "encoder", 4)
    randomize(model, "decoder", 5)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    expected = {}
    for name in ("encoder", "decoder"):
        lora.set_adapter(model, name)
        expected[name] = logits(model)
    layers = lora.lora_layers(model)
    with lora.folded(model):
        assert all(layer.folded == {} for layer in layers)  # nothing copied before a pass needs it
        lora.set_adapter(model, "decoder")
        assert torch.allclose(logits(model), expected["decoder"], atol=1e-5)
        assert all(set(layer.folded) == {"decoder"} for layer in layers)  # only the adapter that ran
        with lora.folded(model):  # nested: the outer block's copies serve, and stay after it
            lora.set_adapter(model, "encoder")
            assert torch.allclose(logits(model), expected["encoder"], atol=1e-5)
        assert all(set(layer.folded) == {"encoder", "decoder"} for layer in layers)
        assert torch.allclose(logits(model), expected["encoder"], atol=1e-5)  # the encoder's copy, kept
    assert all(layer.folded is None for layer in layers)
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_folded_trains_as_usual_and_a_changed_weight_is_refused(pair):
    model, _ = pair
    randomize(model, "decoder", 6)
    lora.set_adapter(model, "decoder")

    def grads():
        model.zero_grad(set_to_none=True)
        model(IDS).logits.square().mean().backward()
        return [p.grad.clone() for p in lora.lora_parameters(model, "decoder")]

    outside = grads()
    with lora.folded(model):
        inside = grads()  # with gradients the LoRA path runs: the adapter still learns
        logits(model)  # folded now
        with torch.no_grad():
            next(lora.lora_parameters(model, "decoder")).add_(0.1)  # an optimizer step, say
        with pytest.raises(RuntimeError, match="stale"):
            logits(model)
    with lora.folded(model):
        logits(model)
        layer = lora.lora_layers(model)[0]
        layer.base.weight.data = layer.base.weight.data.clone()  # replaced, as offload.py does: no version bump
        with pytest.raises(RuntimeError, match="stale"):
            logits(model)
    assert all(torch.equal(a, b) for a, b in zip(outside, inside))


def test_only_float32_bases_fold(pair):
    model, _ = pair
    randomize(model, "decoder", 7)
    lora.set_adapter(model, "decoder")
    model.to(torch.bfloat16)  # a bf16 fold would round the adapter's small update into the weight
    unfolded = logits(model)
    with lora.folded(model):
        assert torch.equal(logits(model), unfolded)
        assert all(layer.folded is None for layer in lora.lora_layers(model))


def test_switching_adapters_and_context_manager(pair):
    model, reference = pair
    randomize(model, "encoder", 2)
    randomize(model, "decoder", 3)
    lora.set_adapter(model, "encoder")
    enc = logits(model)
    with lora.use_adapter(model, "decoder"):
        assert lora.active_adapter(model) == "decoder"
        assert not torch.allclose(logits(model), enc, atol=1e-3)
        with lora.use_adapter(model, None):  # adapters off: the plain base model
            assert torch.allclose(logits(model), logits(reference), atol=1e-5)
        assert lora.active_adapter(model) == "decoder"
    assert lora.active_adapter(model) == "encoder"
    assert torch.equal(logits(model), enc)
    with pytest.raises(ValueError, match="no adapter 'router'"):
        lora.set_adapter(model, "router")


def test_adapter_save_load_round_trip(pair, saved_model_dir, tmp_path):
    model, _ = pair
    randomize(model, "encoder", 4)
    lora.set_adapter(model, "encoder")
    lora.save_adapter(model, "encoder", tmp_path / "encoder.safetensors")

    fresh, _ = load_base(saved_model_dir)
    lora.add_adapter(fresh, "other", r=4, alpha=8)  # saved weights load under any name
    lora.load_adapter(fresh, "other", tmp_path / "encoder.safetensors")
    lora.set_adapter(fresh, "other")
    assert torch.equal(logits(fresh), logits(model))
    saved, loaded = lora.adapter_state_dict(model, "encoder"), lora.adapter_state_dict(fresh, "other")
    assert saved.keys() == loaded.keys() and all(torch.equal(saved[k], loaded[k]) for k in saved)

    wrong, _ = load_base(saved_model_dir)
    lora.add_adapter(wrong, "encoder", r=4, targets=["c_attn" if "c_attn" in str(wrong) else "q_proj"])
    with pytest.raises(ValueError, match="do not fit"):
        lora.load_adapter(wrong, "encoder", tmp_path / "encoder.safetensors")
    rank_1, _ = load_base(saved_model_dir)  # the same layers at rank 1: copy_ would broadcast it into rank 4
    lora.add_adapter(rank_1, "one", r=1)
    lora.save_adapter(rank_1, "one", tmp_path / "one.safetensors")
    with pytest.raises(ValueError, match=r"is \(1, \d+\), adapter 'other' of this model has \(4, \d+\)"):
        lora.load_adapter(fresh, "other", tmp_path / "one.safetensors")


def test_only_lora_trains_and_base_gets_no_grad(pair):
    model, _ = pair
    lora.mark_only_lora_trainable(model)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_A." in n or ".lora_B." in n for n in trainable)
    randomize(model, "encoder", 5)
    lora.set_adapter(model, "encoder")
    model(IDS, labels=IDS).loss.backward()
    for n, p in model.named_parameters():
        if lora.is_lora_key(n, "encoder"):
            assert p.grad is not None and p.grad.abs().sum() > 0, n
        else:  # frozen base and the inactive adapter
            assert p.grad is None, n


def test_matches_peft(pair):
    """The same adapter weights in peft's LoRA give the same logits."""
    import peft  # the reference implementation (requirements-dev.txt); not skipped when missing
    model, reference = pair
    randomize(model, "encoder", 6)
    lora.set_adapter(model, "encoder")
    targets = lora.DEFAULT_TARGETS[model.config.model_type]
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=targets, lora_dropout=0.0,
                             fan_in_fan_out=model.config.model_type == "gpt2")
    theirs = peft.get_peft_model(reference, config).eval()
    ours = lora.adapter_state_dict(model, "encoder")
    with torch.no_grad():
        for name, p in theirs.named_parameters():
            if ".lora_" in name:
                key = name.removeprefix("base_model.model.").replace(".default.", ".")
                p.copy_(ours[key])
    assert torch.allclose(logits(theirs), logits(model), atol=1e-5)


def test_bitsandbytes_8bit_base_layer():
    """The adapter adds to whatever the quantized base layer outputs; merging is refused."""
    import bitsandbytes as bnb  # pinned in requirements.txt for --load-8bit; not skipped when missing
    torch.manual_seed(0)
    dense = torch.nn.Linear(32, 16)
    quantized = bnb.nn.Linear8bitLt(32, 16, has_fp16_weights=False, threshold=0.0)
    quantized.load_state_dict(dense.state_dict())
    model = torch.nn.Sequential(quantized.to("cpu"))
    assert model[0].weight.dtype == torch.int8  # quantized, not a float layer under another name
    x = torch.randn(4, 32)
    with torch.no_grad():
        base_out = model(x)
    lora.add_adapter(model, "encoder", r=4, alpha=8, targets=["0"])
    lora.set_adapter(model, "encoder")
    assert torch.equal(model(x), base_out)
    randomize(model, "encoder", 7)
    layer = model[0]
    expected = base_out + x @ layer.delta_weight("encoder").T
    assert torch.allclose(model(x), expected, atol=1e-5)
    assert (base_out - dense(x)).abs().max() < 0.05  # 8-bit is close to the dense layer, not equal
    with pytest.raises(ValueError, match="cannot be merged"):
        lora.merge(model)
    with torch.no_grad(), lora.folded(model):  # nor folded: it runs as it did
        assert layer.folded is None and torch.allclose(model(x), expected, atol=1e-5)


def test_dropout_acts_on_the_adapter_branch_in_training_only():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(32, 16))
    x = torch.randn(4, 32)
    with torch.no_grad():
        base_out = model(x)
    lora.add_adapter(model, "encoder", r=4, alpha=8, dropout=0.5, targets=["0"])
    lora.set_adapter(model, "encoder")
    model.train()
    assert torch.equal(model(x), base_out)  # B starts at zero: dropout or not, the base alone
    randomize(model, "encoder", 8)
    assert not torch.equal(model(x), model(x))  # two dropout masks
    model.eval()
    expected = base_out + x @ model[0].delta_weight("encoder").T
    assert torch.equal(model(x), model(x)) and torch.allclose(model(x), expected, atol=1e-5)


def test_bad_targets_give_clear_errors(saved_model_dir):
    model, _ = load_base(saved_model_dir)
    with pytest.raises(ValueError, match="'nope' matches no Linear layer; candidates: .*lm_head"):
        lora.add_adapter(model, "encoder", targets=["nope"])
    unknown = torch.nn.Sequential(torch.nn.Linear(4, 4))
    with pytest.raises(ValueError, match="no default LoRA targets .* Linear layers: 0"):
        lora.add_adapter(unknown, "encoder")


def test_saved_state_keeps_adapters_not_a_frozen_base_and_loads_back(saved_model_dir):
    from common import UserError

    model = load_base(saved_model_dir)[0]
    lora.add_adapter(model, "decoder", r=4)
    for p in lora.lora_parameters(model):
        torch.nn.init.normal_(p)
    saved = lora.saved_state(model, "", should_save_base=False)
    assert saved and all(lora.is_lora_key(k) for k in saved)  # the frozen base reloads from its name
    assert set(lora.saved_state(model, "", should_save_base=True)) == set(model.state_dict())
    other = load_base(saved_model_dir)[0]
    lora.add_adapter(other, "decoder", r=4)
    lora.load_saved_state(other, saved, "", False, "somewhere")
    for k, v in saved.items():
        assert torch.equal(other.state_dict()[k], v), k
    smaller = load_base(saved_model_dir)[0]
    lora.add_adapter(smaller, "encoder", r=4)  # another adapter: other weights
    with pytest.raises(UserError, match="the checkpoint in somewhere does not fit this model"):
        lora.load_saved_state(smaller, saved, "", False, "somewhere")
    wider = load_base(saved_model_dir)[0]
    lora.add_adapter(wider, "decoder", r=8)  # the same keys, other shapes
    with pytest.raises(UserError, match="the checkpoint in somewhere does not fit this model"):
        lora.load_saved_state(wider, saved, "", False, "somewhere")
