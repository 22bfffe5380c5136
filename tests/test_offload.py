"""offload.py and quantized loading, on CPU: the CPU serves as both storage and compute device,
so the offload code path runs whole (hooks, fetch, release, prefetch direction) without CUDA."""


import pytest
import torch

import lm
import lora
import offload
from common import UserError

IDS = torch.randint(0, 257, (2, 12), generator=torch.Generator().manual_seed(0))


CUDA = pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(),
                                                    reason="checks the CUDA copy stream and pinned memory; needs a GPU"))


def adapted(path, quantize=None, should_checkpoint=False, device="cpu"):
    """A base with a non-zero 'decoder' adapter, the only trainable part (as in the VAE)."""
    model, _ = lm.load_base(path, device=device, dtype="float32", quantize=quantize)
    lora.add_adapter(model, "decoder", r=4, alpha=8)
    lora.mark_only_lora_trainable(model)
    lora.set_adapter(model, "decoder")
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in lora.lora_parameters(model):
            p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    if should_checkpoint:  # --grad-checkpoint
        offload.checkpoint_layers(model)
    model.train()
    return model


def loss_and_grads(model, device="cpu"):
    torch.manual_seed(2)  # the same dropout masks for both models
    ids = IDS.to(device)
    loss = model(ids, labels=ids).loss
    loss.backward()
    return loss.detach().cpu(), [p.grad.cpu() for p in lora.lora_parameters(model)]


def watch_residency(offloader):
    """Record, whenever a layer starts (in the forward pass or its re-run in the backward pass),
    which layers have weights on the device while it runs."""
    seen, before = [], offloader._before

    def recording_before(i):
        before(i)
        seen.append((i, sorted(offloader.resident)))

    offloader._before = recording_before
    return seen


@pytest.mark.parametrize("device", ["cpu", CUDA])
@pytest.mark.parametrize("quantize", [None, "8bit"])
def test_offload_gives_the_same_numbers_with_one_layer_resident(saved_model_dir, quantize, device):
    if quantize:
        pytest.importorskip("bitsandbytes", reason="bitsandbytes is needed only for --load-8bit")
    plain = adapted(saved_model_dir, quantize, should_checkpoint=True, device=device)
    offloaded = adapted(saved_model_dir, quantize)  # loaded on the CPU, then offloaded
    offloader = offload.offload_layers(offloaded, device)
    seen = watch_residency(offloader)
    num_layers = len(offloader.layers)

    # before a run no layer's weights are on the device: their slots hold empty placeholders
    frozen = [p for layer in offloader.layers for p in layer.parameters() if not p.requires_grad]
    assert frozen and all(p.numel() == 0 for p in frozen)
    loss, grads = loss_and_grads(plain, device)
    loss_off, grads_off = loss_and_grads(offloaded, device)
    # and both equal the model run once, without re-runs: a re-run draws the forward's dropout masks again
    loss_once, grads_once = loss_and_grads(adapted(saved_model_dir, quantize, device=device), device)
    for other_loss, other_grads in ((loss_off, grads_off), (loss_once, grads_once)):
        assert torch.allclose(loss, other_loss, atol=1e-5)
        for a, b in zip(grads, other_grads):
            assert torch.allclose(a, b, atol=1e-5)

    # forward 0..L-1, then the backward pass re-runs each layer last to first (checkpointing)
    order = [i for i, _ in seen]
    assert order == list(range(num_layers)) + list(reversed(range(num_layers)))
    for i, resident in seen:  # only the running layer and the one being prefetched
        assert i in resident and len(resident) <= 2 and all(abs(j - i) <= 1 for j in resident)
    assert seen[num_layers] == (num_layers - 1, [num_layers - 2, num_layers - 1])  # the turn prefetches backward
    assert offloader.num_fetches == 2 * num_layers - 1  # the last layer stays for the turn
    assert offloader.max_resident == 2


def test_the_prefetch_follows_each_pass_up_and_down():
    """A VAE step on one offloaded base, 4 layers: encoder and decoder forward (up), then the backward
    re-runs of the decoder's and the encoder's layers (down, each from the top), then the next step.
    Each layer prefetches the next one its pass will run; at a pass's end, none."""
    layers = torch.nn.ModuleList(torch.nn.Linear(2, 2).requires_grad_(False) for _ in range(4))
    offloader = offload.LayerOffloader(layers, "cpu")
    order = [0, 1, 2, 3] * 2 + [3, 2, 1, 0] * 2 + [0, 1]
    prefetched = []
    for i in order:
        offloader._before(i)
        prefetched.append(sorted(set(offloader.resident) - {i}))
    up, down = [[1], [2], [3], []], [[2], [1], [0], []]
    assert prefetched == up * 2 + down * 2 + up[:2]


def test_offload_refuses_4bit_layers():
    bnb = pytest.importorskip("bitsandbytes", reason="bitsandbytes is needed only for --load-4bit")
    layers = torch.nn.ModuleList([torch.nn.Sequential(bnb.nn.Linear4bit(64, 64))])
    with pytest.raises(ValueError, match="does not support 4-bit"):
        offload.LayerOffloader(layers, "cpu")


def test_load_8bit_trains_lora_on_cpu(saved_model_dir):
    bnb = pytest.importorskip("bitsandbytes", reason="bitsandbytes is needed only for --load-8bit")
    model = adapted(saved_model_dir, "8bit")
    assert any(isinstance(m, bnb.nn.Linear8bitLt) for m in model.modules())
    loss, grads = loss_and_grads(model)
    assert torch.isfinite(loss) and all(torch.isfinite(g).all() and g.abs().sum() > 0 for g in grads)


def test_quantizing_tiny_is_a_clear_error():
    with pytest.raises(UserError, match="tiny has none"):
        lm.load_base("tiny", quantize="8bit")


def test_offloaded_base_loads_on_the_cpu_in_the_dtype_of_its_compute_device(saved_model_dir, monkeypatch):
    """--offload loads on the CPU, but 'auto' means bf16 for the CUDA device it will run on (fp32
    would double what every step copies); no CUDA is touched, so this runs anywhere."""
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *args, **kwargs: True)
    memory = offload.MemoryConfig(offload=True)
    model, _ = offload.load_with_memory(saved_model_dir, memory, torch.device("cuda"), should_train_base=False)
    weight = model.get_input_embeddings().weight
    assert weight.device.type == "cpu" and weight.dtype == torch.bfloat16


def test_decoder_layers_are_found(saved_model_dir):
    model, _ = lm.load_base(saved_model_dir)
    assert len(offload.decoder_layers(model)) == model.config.num_hidden_layers


@pytest.mark.parametrize("should_offload", [False, True], ids=["checkpoint", "offload"])
def test_recomputation_uses_the_adapter_of_the_first_run(saved_model_dir, should_offload):
    """Encoder pass with one adapter, decoder pass with another, one backward (as the VAE
    trains): checkpointed layers re-run with the adapter each pass had, not the current one."""
    def two_adapter_grads(transform):
        model, _ = lm.load_base(saved_model_dir)
        for name, seed in (("encoder", 3), ("decoder", 4)):
            lora.add_adapter(model, name, r=4, alpha=8)
            g = torch.Generator().manual_seed(seed)
            with torch.no_grad():
                for p in lora.lora_parameters(model, name):
                    p.copy_(torch.randn(p.shape, generator=g) * 0.1)
        lora.mark_only_lora_trainable(model)
        model.eval()  # no dropout: the two models must compute the same thing
        transform(model)
        with lora.use_adapter(model, "encoder"):
            a = model(IDS).logits.square().mean()
        with lora.use_adapter(model, "decoder"):
            b = model(IDS, labels=IDS).loss
        (a + b).backward()
        return [p.grad for p in lora.lora_parameters(model)]

    plain = two_adapter_grads(lambda model: None)
    transform = (lambda m: offload.offload_layers(m, "cpu")) if should_offload else offload.checkpoint_layers
    for a, b in zip(plain, two_adapter_grads(transform)):
        assert torch.allclose(a, b, atol=1e-6)


@pytest.mark.parametrize("flag", ["offload", "grad_checkpoint"])
def test_place_sets_up_the_base_and_keeps_the_model_computing_the_same(saved_model_dir, flag):
    """place() on a model holding the base and a part of its own (as the VAE and the world model
    are): --offload leaves the frozen decoder weights as placeholders, --grad-checkpoint wraps
    each layer, and the whole model's loss and gradients match a plainly placed copy's."""
    def built(memory):
        torch.manual_seed(5)
        base = adapted(saved_model_dir)
        model = torch.nn.ModuleDict({"base": base, "head": torch.nn.Linear(lm.hidden_size(base), 3)})
        offload.place(model, base, memory, torch.device("cpu"), tokens_per_step=24, lower="--batch-size (now 2)",
                      should_print=True)
        model.eval()  # no dropout: the two models must compute the same thing
        return model

    def loss_and_grads_with_head(model):
        hidden = model["base"](IDS, output_hidden_states=True).hidden_states[-1]  # (B, T, C)
        loss = model["head"](hidden).square().mean()
        loss.backward()
        return loss.detach(), [p.grad for p in model.parameters() if p.requires_grad]

    plain, placed = built(offload.MemoryConfig()), built(offload.MemoryConfig(**{flag: True}))
    layers = offload.decoder_layers(placed["base"])
    frozen = [p for p in layers.parameters() if not p.requires_grad]
    assert all(p.numel() == 0 for p in frozen) == (flag == "offload")
    assert all("forward" in vars(layer) for layer in layers)  # checkpointed forward, both flags
    assert not any("forward" in vars(layer) for layer in offload.decoder_layers(plain["base"]))
    loss, grads = loss_and_grads_with_head(plain)
    loss_placed, grads_placed = loss_and_grads_with_head(placed)
    assert torch.allclose(loss, loss_placed, atol=1e-6)
    assert len(grads) == len(grads_placed) and all(torch.allclose(a, b, atol=1e-6) for a, b in zip(grads, grads_placed))


def saved_for_backward(model, loss_fn):
    """Bytes of the tensors a training step keeps for its backward pass, weights left out: what
    the activation estimate stands for, measured."""
    weights = {p.data_ptr() for p in model.parameters()}
    storages = {}

    def pack(t):
        if t.data_ptr() not in weights:
            storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss_fn()
    return sum(storages.values())


def tiny_vae_step():
    from vae import VAE, VAEConfig

    base, _ = lm.load_base("tiny")
    vae = VAE(base, VAEConfig(prefix_slots=32)).train()  # tiny as train_vae.py trains it, at --context 32
    ids = torch.randint(0, 256, (16, 32), generator=torch.Generator().manual_seed(0))
    batch = {"input_ids": ids, "target_ids": ids, "prefix_ids": ids}
    return vae, lambda: vae.compute_loss(batch, step=10**6)["loss"], 16 * 3 * 32


def iris_world_model_step(tokens_per_obs, vocab_size):
    from worldmodel import Transformer, TransformerConfig, WorldModel, WorldModelConfig

    config = WorldModelConfig(tokens_per_obs=tokens_per_obs, obs_vocab_size=vocab_size, num_actions=6, max_steps=20)
    model = WorldModel(config, Transformer(TransformerConfig(width=128, num_layers=3, num_heads=4, dropout=0.1))).train()
    g = torch.Generator().manual_seed(0)
    batch = {"obs_tokens": torch.randint(0, vocab_size, (32, 20, tokens_per_obs), generator=g),
             "actions": torch.randint(0, 6, (32, 20), generator=g), "rewards": torch.ones(32, 20),
             "ends": torch.zeros(32, 20, dtype=torch.long), "mask_padding": torch.ones(32, 20, dtype=torch.bool)}
    return model, lambda: model.compute_loss(batch, step=0)["loss"], 32 * config.max_tokens


@pytest.mark.parametrize("step", [tiny_vae_step, lambda: iris_world_model_step(4, 64),
                                  lambda: iris_world_model_step(16, 512)], ids=["vae", "wm-cartpole", "wm-frames"])
def test_the_activation_estimate_covers_what_a_cpu_step_keeps_and_not_absurdly_more(step):
    """train_vae.py's (at --context 32) and train_wm.py's default models (CartPole's 4 tokens per observation,
    Pong's 16):
    the CPU estimate is above what the step saves for its backward pass (the peak adds temporaries
    to that), and within 4x of it."""
    model, loss_fn, tokens = step()
    estimate = offload.estimate_memory(model, tokens, value_bytes=offload.activation_bytes(torch.device("cpu")))
    saved = saved_for_backward(model, loss_fn)
    assert saved < estimate["activations"] < 4 * saved


def test_checkpointing_and_offload_lower_the_estimate():
    """A 4-layer LM, frozen but for an adapter: checkpointing keeps each layer's input and one layer's
    activations; offload keeps that, and 2 of the 4 layers' frozen weights."""
    from transformers import GPT2Config, GPT2LMHeadModel

    model = GPT2LMHeadModel(GPT2Config(n_layer=4, n_head=2, n_embd=32, vocab_size=257))
    lora.add_adapter(model, "decoder", r=4, alpha=8)
    lora.mark_only_lora_trainable(model)
    plain, checkpointed, offloaded = (offload.estimate_memory(model, 1000, *flags)
                                      for flags in ((False, False), (True, False), (False, True)))
    assert checkpointed["activations"] < plain["activations"] and checkpointed["weights"] == plain["weights"]
    layer = sum(p.numel() * 4 for p in model.transformer.h[0].parameters() if not p.requires_grad)
    assert offloaded["activations"] == checkpointed["activations"]
    assert offloaded["weights"] == plain["weights"] - 2 * layer
    trainable = sum(p.numel() for p in lora.lora_parameters(model))
    assert plain["optimizer"] == 3 * 4 * trainable  # fp32 gradient and AdamW's two moments


def test_the_memory_check_counts_the_vae_head_beside_its_frozen_base(monkeypatch):
    """offload.place checks the base with the head around it: the head's weights, gradients and
    moments are in the estimate, so free memory that fits the frozen base's step alone is not enough."""
    vae, _, tokens = tiny_vae_step()
    lora.mark_only_lora_trainable(vae.base)  # a frozen base: the head is most of what trains
    head = offload.outside(vae, vae.base)
    assert head and {id(p) for p in head}.isdisjoint(id(p) for p in vae.base.parameters())
    assert len(head) + len(list(vae.base.parameters())) == len(list(vae.parameters()))
    cpu = torch.device("cpu")
    alone = offload.estimate_memory(vae.base, tokens, value_bytes=offload.activation_bytes(cpu))
    both = offload.estimate_memory(vae.base, tokens, value_bytes=offload.activation_bytes(cpu), others=head)
    head_bytes = sum(p.numel() * 4 for p in head)
    assert both["weights"] == alone["weights"] + head_bytes and both["optimizer"] == alone["optimizer"] + 3 * head_bytes
    # the weights are on the CPU already; what the base's step alone needs more is free, not the head's moments
    monkeypatch.setattr(offload, "free_memory", lambda device: alone["total"] - alone["weights"])
    with pytest.raises(UserError, match="GiB more cpu memory"):
        offload.place(vae, vae.base, offload.MemoryConfig(), cpu, tokens, "--batch-size", should_print=False)


def test_a_vae_that_is_used_not_trained_is_checked_without_gradients_or_moments(monkeypatch):
    """build_vae with no batch size (sample.py's): nothing trains, so the check counts no optimizer state."""
    from vae import VAEConfig
    from vae_setup import build_vae

    estimates, check = [], offload.check_memory
    monkeypatch.setattr(offload, "check_memory", lambda *args: estimates.append(check(*args)) or estimates[-1])
    trainable = []
    cpu = torch.device("cpu")
    for batch_size in (None, 4):
        vae = build_vae("tiny", VAEConfig(prefix_slots=16), offload.MemoryConfig(), cpu, True, batch_size, False)
        trainable.append(all(p.requires_grad for p in vae.parameters()))
    assert estimates[0]["optimizer"] == 0 < estimates[1]["optimizer"]
    assert trainable == [True, True]  # only the check changes: offload moves what has no gradient off the device


def test_a_step_is_refused_when_it_needs_more_than_is_free(monkeypatch):
    """The weights already on the device are out of the free memory already: only the rest must fit."""
    model, _, tokens = tiny_vae_step()
    cpu = torch.device("cpu")
    free = offload.free_memory(cpu)
    assert 0 < free <= 1024 * int(open("/proc/meminfo").read().split("MemTotal:")[1].split()[0])
    estimate = offload.estimate_memory(model, tokens, value_bytes=offload.activation_bytes(cpu))
    needed = estimate["total"] - estimate["weights"]
    monkeypatch.setattr(offload, "free_memory", lambda device: needed)
    assert offload.check_memory(model, cpu, tokens, "--batch-size (now 16)") == estimate
    monkeypatch.setattr(offload, "free_memory", lambda device: needed - 1)
    with pytest.raises(UserError, match=r"GiB more cpu memory .* GiB is free: lower --batch-size \(now 16\)$"):
        offload.check_memory(model, cpu, tokens, "--batch-size (now 16)")
