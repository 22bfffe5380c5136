"""lm_backbone.py: a pretrained LM inside the IRIS world model stays causal, its real KV cache
gives the full-context logits, and only the dynamics adapter, embedder and heads train."""

import pytest
import torch

import lora
import offload
from conftest import tiny_gpt2, tiny_mistral
from lm_backbone import LMBackbone, first_layers, lm_token_tables, randomized
from common import UserError
from worldmodel import WorldModel, WorldModelConfig, interleave

CONFIG = WorldModelConfig(tokens_per_obs=4, obs_vocab_size=16, num_actions=3, max_steps=5)


def world_model(make_lm, other_adapter=None):
    torch.manual_seed(0)
    lm = make_lm()
    if other_adapter:  # e.g. a VAE's adapter, living in the same layers
        lora.add_adapter(lm, other_adapter, r=4)
    backbone = LMBackbone(lm, r=4, alpha=8)
    for p in lora.lora_parameters(backbone.lm, "dynamics"):  # a trained adapter, not B = 0
        torch.nn.init.normal_(p, std=0.05)
    return WorldModel(CONFIG, backbone).eval()


def tokens(batch_size=2, num_steps=5, seed=1):
    g = torch.Generator().manual_seed(seed)
    obs = torch.randint(0, CONFIG.obs_vocab_size, (batch_size, num_steps, CONFIG.tokens_per_obs), generator=g)
    actions = torch.randint(0, CONFIG.num_actions, (batch_size, num_steps), generator=g)
    return interleave(obs, actions)


LMS = pytest.mark.parametrize("make_lm", [tiny_gpt2, tiny_mistral], ids=["gpt2", "mistral"])


@LMS
def test_lm_backbone_is_causal(make_lm):
    """Changing a later token leaves every earlier position's logits unchanged."""
    model = world_model(make_lm)
    x = tokens()
    changed = x.clone()
    changed[:, 12] = (changed[:, 12] + 1) % CONFIG.obs_vocab_size  # step 3's third obs token (5 tokens a step)
    with torch.no_grad():
        a, b = model.backbone(model.embedder(x)), model.backbone(model.embedder(changed))
    assert torch.allclose(a[:, :12], b[:, :12], atol=1e-5)
    assert not torch.allclose(a[:, 12:], b[:, 12:], atol=1e-3)


def assert_cached_equals_full_context(model, before_caching=lambda: None):
    x = tokens()
    with torch.no_grad():
        full = model(x)
        before_caching()
        cache = model.backbone.new_cache(len(x), CONFIG.max_tokens)
        steps = [model(x[:, :7], cache)] + [model(x[:, t:t + 1], cache) for t in range(7, x.shape[1])]
    assert cache.length == x.shape[1]
    for name in full:
        cached = torch.cat([s[name] for s in steps], dim=1)
        assert torch.allclose(cached, full[name], atol=1e-4), name


@LMS
def test_a_bfloat16_lm_inside_the_float32_world_model(make_lm):
    """--dtype auto on a GPU: the LM computes in bf16, the world model's tables and heads in fp32;
    the backbone casts in and out, so the heads get fp32 and the adapter fp32-finite gradients."""
    model = world_model(lambda: make_lm().to(torch.bfloat16)).train()
    out = model(tokens())
    assert {name: logits.dtype for name, logits in out.items()} == dict.fromkeys(out, torch.float32)
    sum(logits.sum() for logits in out.values()).backward()
    grads = [p.grad for p in lora.lora_parameters(model.backbone.lm, "dynamics")]
    assert grads and all(g is not None and torch.isfinite(g).all() for g in grads)
    assert any(g.abs().sum() > 0 for g in grads)


@LMS
def test_kv_cached_tokens_equal_full_context(make_lm):
    assert_cached_equals_full_context(world_model(make_lm))


@LMS
def test_offloaded_lm_keeps_the_kv_cache_exact(make_lm):
    """--offload's per-layer fetching (CPU as both devices here) under imagination's cache."""
    model = world_model(make_lm)
    assert_cached_equals_full_context(model, lambda: offload.offload_layers(model.backbone.lm, "cpu"))


@LMS
def test_offloaded_layers_run_unfolded_in_imagination(make_lm):
    """lora.folded (agent.imagine) leaves the offloaded layers alone: each pass brings their weights anew."""
    model = world_model(make_lm)
    x = tokens()
    with torch.no_grad():
        full = model(x)
    offload.offload_layers(model.backbone.lm, "cpu")
    with lora.folded(model), torch.no_grad():
        for _ in range(2):  # a copy folded on the first pass would be stale on the second
            out = model(x)
            assert all(torch.allclose(out[name], full[name], atol=1e-5) for name in full)
        layers = lora.lora_layers(model.backbone.lm)
        assert any(not layer.can_fold for layer in layers)
        assert all(layer.folded is None for layer in layers if not layer.can_fold)


@LMS
def test_only_dynamics_adapter_embedder_and_heads_train(make_lm):
    model = world_model(make_lm, other_adapter="decoder")
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    lm_trainable = {n for n in trainable if n.startswith("backbone.")}
    assert lm_trainable and all(lora.is_lora_key(n, "dynamics") for n in lm_trainable)
    assert {n.split(".")[0] for n in trainable} == {"backbone", "embedder", "heads"}  # the LM adds positions
    batch = dict(obs_tokens=torch.randint(0, 16, (2, 5, 4)), actions=torch.randint(0, 3, (2, 5)),
                 rewards=torch.zeros(2, 5), ends=torch.zeros(2, 5), mask_padding=torch.ones(2, 5, dtype=torch.bool))
    model.train()
    model.compute_loss(batch)["loss"].backward()
    for n, p in model.named_parameters():
        assert (p.grad is not None) == (n in trainable and not lora.is_lora_key(n, "decoder")), n


@LMS
def test_world_model_initialises_its_own_parts_only(make_lm):
    """IRIS's init (normal 0.02) reaches the heads, never the pretrained LM or its table rows."""
    torch.manual_seed(0)
    lm = make_lm()
    pretrained = {k: v.clone() for k, v in lm.state_dict().items()}
    tables = lm_token_tables(lm, CONFIG.obs_vocab_size, CONFIG.num_actions, should_train=True)
    model = WorldModel(CONFIG, LMBackbone(lm, r=4, alpha=8), tables)
    after = {k.replace(".base.", "."): v for k, v in model.backbone.lm.state_dict().items() if not lora.is_lora_key(k)}
    assert after.keys() == pretrained.keys() and all(torch.equal(after[k], v) for k, v in pretrained.items())
    rows = pretrained[next(k for k in pretrained if "embed" in k or "wte" in k)][-19:]
    assert torch.equal(torch.cat([t.weight for t in model.embedder.tables]), rows)
    head = model.heads["obs"].mlp[0]
    assert torch.equal(head.bias, torch.zeros_like(head.bias)) and abs(head.weight.std().item() - 0.02) < 0.003


def test_lm_token_tables_are_rows_of_the_lm_table():
    lm = tiny_gpt2()
    obs, act = lm_token_tables(lm, 16, 3)
    table = lm.get_input_embeddings().weight
    assert torch.equal(obs.weight, table[-19:-3]) and torch.equal(act.weight, table[-3:])
    assert not obs.weight.requires_grad
    trained, _ = lm_token_tables(lm, 16, 3, should_train=True)
    assert trained.weight.requires_grad and trained.weight.data_ptr() != table.data_ptr()
    with pytest.raises(UserError, match="fewer than the 300 observation"):
        lm_token_tables(lm, 300, 3)


@LMS
def test_first_layers_are_the_lm_s_own_lower_layers(make_lm):
    """--lm-layers N: the cut LM's output is the full LM's hidden state after layer N, through its final norm."""
    torch.manual_seed(0)
    full = make_lm()
    cut = first_layers(make_lm().requires_grad_(False).eval(), 1)
    cut.load_state_dict(full.state_dict(), strict=False)  # the same weights; the cut one lacks layer 2's
    embeds = torch.randn(2, 7, full.config.hidden_size)
    with torch.no_grad():
        hidden = full.base_model(inputs_embeds=embeds, output_hidden_states=True).hidden_states[1]
        final_norm = full.base_model.ln_f if hasattr(full.base_model, "ln_f") else full.base_model.norm
        assert torch.allclose(cut.base_model(inputs_embeds=embeds).last_hidden_state, final_norm(hidden), atol=1e-5)
    assert cut.config.num_hidden_layers == 1 and full.config.num_hidden_layers == 2
    assert len(offload.decoder_layers(cut)) == 1  # offload.py and --grad-checkpoint find the cut stack
    assert len(offload.decoder_layers(randomized(cut))) == 1  # --lm-init random draws the cut shape
