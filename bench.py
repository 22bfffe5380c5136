"""
Benchmarks, measured side by side in one run and printed as one JSON line each (like
nanoGPT's bench.py). Speed never goes in the tests; it goes here (and the memory of a
Mistral-7B VAE in bench_memory.py).

    python bench.py lora                # our LoRA vs peft's: training step; merged vs base forward
    python bench.py lora --steps 3      # a quicker, noisier look
    python bench.py vae                 # VAE encode / reconstruct throughput: tiny and GPT-2-small shape
    python bench.py imagine             # world-model imagination: KV cache vs recomputing the context,
                                        # IRIS's transformer and the LM backbone (--lm gpt2: GPT-2 small's shape)
    python bench.py vae-step --lm smollm2 --steps 4   # a VAE training step: fp32, bf16 autocast, torch.compile,
                                        # the encoder over the first third of the layers (--encoder-layers)
    python bench.py agent --steps 5 --batch-size 64 --device cpu   # one actor-critic step in imagination
                                        # (agent.py: imagine 20 CartPole steps, loss, backward, update), cache vs
                                        # recompute, both backbones, and the latent world model with a policy
                                        # that reads z (no decoding); the README's figures, on the CPU

Times are medians over steps that alternate between the contenders, so a machine that
slows down or speeds up mid-run affects both alike.
"""

import json
import statistics
import sys
import time

import torch

import lm
import lora
from agent import ActorCritic, ActorCriticConfig, imagine
from common import UserError, make_parser, parse, positive_int, run_cli
from latent_wm import LatentWorldModel, LatentWorldModelConfig, LatentWorldModelEnv, iris_sized_lm
from lm_backbone import LMBackbone
from obs_tokenizer import TokenObservations, VectorTokenizer, VectorTokenizerConfig
from trainer import pick_device
from vae import VAE, VAEConfig
from worldmodel import Transformer, TransformerConfig, WorldModel, WorldModelConfig, WorldModelEnv


def timed(fn):
    sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
    sync()
    t = time.perf_counter()
    fn()
    sync()
    return time.perf_counter() - t


def alternate(contenders, steps, warmup=1):
    """Median seconds per call of each fn in {name: fn}, calling them in turn, the order
    reversed every other round (A B, B A, ...): whoever runs right after another contender
    (warm or cold caches, a freshly freed allocator pool) is each of them equally often."""
    for fn in contenders.values():
        for _ in range(warmup):
            fn()
    times = {name: [] for name in contenders}
    names = list(contenders)
    for i in range(steps):
        for name in names if i % 2 == 0 else names[::-1]:
            times[name].append(timed(contenders[name]))
    return {name: statistics.median(ts) for name, ts in times.items()}


def random_gpt2(shape="gpt2"):
    """A GPT-2 LM with random weights, of tiny's shape or GPT-2 small's (124M): speed does not depend
    on training."""
    transformers = lm.import_transformers()  # here, not at the top: --help answers without it
    return transformers.GPT2LMHeadModel(transformers.GPT2Config(**lm.TINY_CONFIG if shape == "tiny" else {}))


def gpt2_small(seed=0):
    torch.manual_seed(seed)
    return random_gpt2().eval()


def training_step(model, ids):
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)

    def step():
        model.train()  # every contender in the same mode (peft's get_peft_model leaves its model in train mode)
        model(ids, labels=ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def bench_lora(args):
    import peft

    r, alpha, targets = 8, 16, lora.DEFAULT_TARGETS["gpt2"]
    ids = torch.randint(0, 50257, (args.batch_size, args.block_size))

    def ours_model():
        model = gpt2_small()
        lora.add_adapter(model, "default", r=r, alpha=alpha)
        lora.mark_only_lora_trainable(model)
        lora.set_adapter(model, "default")
        return model

    ours, ours_twin = ours_model(), ours_model()
    theirs = peft.get_peft_model(gpt2_small(), peft.LoraConfig(r=r, lora_alpha=alpha, target_modules=targets,
                                                                fan_in_fan_out=True))
    # the twin is the same model again: ours / twin is the bench's own noise, the yardstick for ours / peft
    train = alternate({"ours": training_step(ours, ids), "peft": training_step(theirs, ids),
                       "twin": training_step(ours_twin, ids)}, args.steps)

    base = gpt2_small()
    lora.merge(ours)

    def forward(model):
        def fn():
            model.eval()
            with torch.no_grad():
                model(ids)
        return fn

    infer = alternate({"merged": forward(ours), "base": forward(base), "peft_unmerged": forward(theirs)},
                      args.steps)
    return {
        "bench": "lora", "model": "gpt2-small shape (random init)", "batch": [args.batch_size, args.block_size],
        "rank": r, "targets": targets, "threads": torch.get_num_threads(),
        "train_step_s_ours": round(train["ours"], 4), "train_step_s_peft": round(train["peft"], 4),
        "train_step_ratio_ours_over_peft": round(train["ours"] / train["peft"], 3),
        "train_step_ratio_ours_over_twin": round(train["ours"] / train["twin"], 3),
        "forward_s_merged": round(infer["merged"], 4), "forward_s_base": round(infer["base"], 4),
        "forward_ratio_merged_over_base": round(infer["merged"] / infer["base"], 3),
        "forward_ratio_peft_unmerged_over_base": round(infer["peft_unmerged"] / infer["base"], 3),
    }


def check_fits(vae, base, block_size):
    """--block-size target tokens after the VAE's decoder inputs must fit the base's positions: one line if not."""
    needed = vae.text_start(None) + block_size - 1  # the last target is predicted, never fed back
    if needed > lm.num_positions(base):
        raise UserError(f"--block-size {block_size} needs {needed} positions, more than the base's "
                        f"{lm.num_positions(base)}: lower --block-size")


def bench_vae(args):
    """Sequences per second for encode (one bidirectional pass + pooling) and reconstruct (encode,
    then greedy decoding of block_size tokens with the KV cache), on tiny and on GPT-2 small's shape
    (random weights, fp32, no grad). A third contender decodes without the cache (the whole
    sequence re-run for every token), to show what the cache buys."""
    results = {}
    for name in ("tiny", "gpt2-small shape"):
        base = lm.load_base("tiny")[0] if name == "tiny" else gpt2_small()
        torch.manual_seed(0)
        vae = VAE(base, VAEConfig()).eval()
        check_fits(vae, base, args.block_size)
        vocab = base.config.vocab_size - 1
        ids = torch.randint(0, vocab, (args.batch_size, args.block_size))

        def encode():
            with torch.no_grad():
                vae.encode(ids)

        def reconstruct():
            with torch.no_grad():
                vae.generate(vae.encode(ids)[0], args.block_size, should_stop_at_eos=False)  # all of them, as below

        def reconstruct_uncached():
            with torch.no_grad():
                z, out = vae.encode(ids)[0], ids[:, :0]
                for _ in range(args.block_size):  # teacher-forced pass over everything so far, every token
                    logits = vae(z, torch.cat([out, out[:, :1] if out.shape[1] else ids[:, :1]], 1))
                    out = torch.cat([out, logits[:, -1].argmax(-1, keepdim=True)], 1)

        t = alternate({"encode": encode, "reconstruct": reconstruct, "uncached": reconstruct_uncached}, args.steps)
        results[name] = {"encode_seq_per_s": round(args.batch_size / t["encode"], 1),
                         "reconstruct_seq_per_s": round(args.batch_size / t["reconstruct"], 2),
                         "reconstruct_uncached_seq_per_s": round(args.batch_size / t["uncached"], 2),
                         "kv_cache_speedup": round(t["uncached"] / t["reconstruct"], 2)}
        print(name, results[name], file=sys.stderr, flush=True)
    return {"bench": "vae", "batch": [args.batch_size, args.block_size], "threads": torch.get_num_threads(),
            "dtype": "float32", "z_memory": True, **results}


def bench_vae_step(args):
    """One VAE training step (compute_loss, backward, AdamW; the autoencoder phase, no prefix) in fp32,
    under bf16 autocast, compiled (torch.compile of compute_loss, fp32), and with the encoder over the
    first third of the layers (train_vae.py --encoder-layers; fp32), on a frozen base of
    SmolLM2-135M's shape with random weights (--lm smollm2), GPT-2 small's or tiny's. bf16 pays only where the CPU
    multiplies bf16 natively (AVX512-BF16 or AMX; `cpu_bf16_native` below); without it, it is slower."""
    transformers = lm.import_transformers()
    torch.manual_seed(0)
    if args.lm == "smollm2":  # SmolLM2-135M's shape (its config.json), random weights
        base = transformers.LlamaForCausalLM(transformers.LlamaConfig(
            vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
            num_key_value_heads=3, max_position_embeddings=2048, tie_word_embeddings=True))
    else:
        base = random_gpt2(args.lm)
    base.requires_grad_(False)
    vae = VAE(base, VAEConfig(decoder_init="lm", prefix_slots=args.block_size, ae_iters=1)).to(args.device)
    check_fits(vae, base, args.block_size)
    vae.train()
    ids = torch.randint(0, base.config.vocab_size - 1, (args.batch_size, args.block_size), device=args.device)
    batch = {"input_ids": ids}
    batch["target_ids"] = batch["input_ids"]
    optimizer = torch.optim.AdamW([p for p in vae.parameters() if p.requires_grad], lr=1e-4)
    compiled = torch.compile(vae.compute_loss)

    def step(autocast=False, loss_fn=vae.compute_loss, encoder_layers=0):
        def fn():
            vae.cfg.encoder_layers = encoder_layers
            with torch.autocast(args.device.type, dtype=torch.bfloat16, enabled=autocast):
                loss = loss_fn(batch, 0)["loss"]
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        return fn

    t = alternate({"fp32": step(), "bf16_autocast": step(autocast=True), "compiled": step(loss_fn=compiled)},
                  args.steps)
    # the encoder over the first third of the layers: a run of its own beside fp32, as cutting the stack
    # between the compiled calls would make them recompile
    third = max(1, base.config.num_hidden_layers // 3)
    cut = alternate({"fp32": step(), "encoder_third": step(encoder_layers=third)}, args.steps)
    try:  # the CPU's flags, on Linux
        with open("/proc/cpuinfo") as f:
            flags = f.read()
    except OSError:
        flags = ""
    return {"bench": "vae-step", "lm": f"{args.lm} shape (random init), frozen", "batch": [args.batch_size,
            args.block_size], "threads": torch.get_num_threads(), "device": args.device.type,
            "cpu_bf16_native": any(f in flags for f in ("avx512_bf16", "amx_bf16")),
            **{f"step_s_{k}": round(v, 4) for k, v in t.items()},
            "speedup_bf16_autocast": round(t["fp32"] / t["bf16_autocast"], 3),
            "speedup_compiled": round(t["fp32"] / t["compiled"], 3),
            "encoder_layers": third, "step_s_encoder_third": round(cut["encoder_third"], 4),
            "speedup_encoder_third": round(cut["fp32"] / cut["encoder_third"], 3)}


def bench_imagine(args):
    """Imagined steps/s of the token world model (worldmodel.py) and the latent one (latent_wm.py),
    side by side in one run, with the KV cache and recomputing the context every step.
    Token model: IRIS's transformer at train_wm.py's default size (width 128, 3 layers, 4 heads)
    and the LM backbone (lm_backbone.py, the LM's real KV cache) on tiny's shape, or GPT-2 small's
    with --lm gpt2. Latent model: a GPT-2-shaped transformer of IRIS's size and the LM's shape, each
    step one 2-token dynamics pass, decoding the observation (16 cached decoder passes) or not
    ("latent_only"). IRIS's Pong token shapes (16 obs tokens + 1 action per step, vocabulary 512,
    6 actions, a 20-step context); random weights: speed does not depend on training. One
    observation then 19 imagined steps fill the context without a rebuild, so both ways compute
    the same logits."""
    device = args.device
    config = WorldModelConfig(tokens_per_obs=16, obs_vocab_size=512, num_actions=6, max_steps=20)
    latent_config = LatentWorldModelConfig(tokens_per_obs=16, obs_vocab_size=512, num_actions=6, max_steps=20)
    backbones, latents = world_model_backbones(args), latent_world_models(args, latent_config)
    tokens_as_obs = TokenObservations()  # the timing is the world model, not a pixel decoder
    num_steps = config.max_steps - 1
    start = torch.randint(config.obs_vocab_size, (args.batch_size, config.tokens_per_obs), device=device)
    actions = torch.randint(config.num_actions, (num_steps, args.batch_size), device=device)

    def imagine(env_class, world_model, should_use_cache, **kwargs):
        def fn():
            env = env_class(world_model, tokens_as_obs, should_use_cache=should_use_cache,
                            generator=torch.Generator(device).manual_seed(0), **kwargs)
            with lora.folded(world_model):  # as agent.imagine and eval_wm.imagine run it
                env.reset(start)
                for action in actions:
                    env.step(action)
        return fn

    out = {"bench": "imagine", "device": str(device), "batch_size": args.batch_size,
           "context_steps": config.max_steps}
    for name, backbone in backbones.items():
        tokens, latent = WorldModel(config, backbone).to(device).eval(), latents[name]
        seconds = alternate({"tokens_kv_cache": imagine(WorldModelEnv, tokens, True),
                             "tokens_recompute": imagine(WorldModelEnv, tokens, False),
                             "latent_kv_cache": imagine(LatentWorldModelEnv, latent, True, should_decode=True),
                             "latent_only_kv_cache": imagine(LatentWorldModelEnv, latent, True, should_decode=False),
                             "latent_recompute": imagine(LatentWorldModelEnv, latent, False, should_decode=True)},
                            args.steps)
        steps_per_s = {way: args.batch_size * num_steps / s for way, s in seconds.items()}
        ratio = {"tokens_kv_cache_speedup": ("tokens_kv_cache", "tokens_recompute"),
                 "latent_vs_tokens": ("latent_kv_cache", "tokens_kv_cache"),
                 "latent_only_vs_tokens": ("latent_only_kv_cache", "tokens_kv_cache")}
        out[name] = {**{f"{way}_steps_per_s": round(v, 1) for way, v in steps_per_s.items()},
                     **{k: round(steps_per_s[a] / steps_per_s[b], 2) for k, (a, b) in ratio.items()}}
        print(name, out[name], file=sys.stderr, flush=True)
    return out


def world_model_backbones(args):
    """IRIS's transformer at train_wm.py's default size (width 128, 3 layers, 4 heads) and the LM
    backbone (lm_backbone.py) on tiny's shape or, with --lm gpt2, GPT-2 small's; random weights."""
    torch.manual_seed(0)
    return {"iris": Transformer(TransformerConfig(width=128, num_layers=3, num_heads=4)),
            f"lm_{args.lm}": LMBackbone(random_gpt2(args.lm))}


def latent_world_models(args, config):
    """latent_wm.py's world model (LatentWorldModelConfig `config`) beside each of world_model_backbones:
    a GPT-2-shaped transformer of IRIS's size, and the LM's shape; random weights, on args.device."""
    torch.manual_seed(0)
    iris_shape = TransformerConfig(width=128, num_layers=3, num_heads=4, dropout=0.1)
    lms = {"iris": iris_sized_lm(iris_shape, config), f"lm_{args.lm}": random_gpt2(args.lm)}
    return {name: LatentWorldModel(config, lm).to(args.device).eval() for name, lm in lms.items()}


def bench_agent(args):
    """Imagined env steps/s while training the actor-critic (agent.py): one step = imagine --batch-size
    trajectories of 20 CartPole steps (4 obs tokens + 1 action each, 64 bins a number), the loss, its
    backward and the update. The token world model with its KV cache vs recomputing the context for
    every token (its 20-step context is rebuilt once in the 20 steps: WorldModelEnv); beside it the
    latent one (latent_wm.py, at the same shape) with a policy that reads z (train_agent.py
    --policy-input latent): one cached 2-token dynamics pass per step and nothing decoded."""
    device = args.device
    tokenizer = VectorTokenizer(VectorTokenizerConfig(obs_dim=4, num_bins=64)).to(device)
    tokenizer.fit(torch.randn(1000, 4, device=device))
    shapes = dict(tokens_per_obs=4, obs_vocab_size=tokenizer.vocab_size, num_actions=2, max_steps=20)
    config, latent_config = WorldModelConfig(**shapes), LatentWorldModelConfig(**shapes)
    start = torch.randn(args.batch_size, 4, device=device)
    out = {"bench": "agent", "device": str(device), "batch_size": args.batch_size, "horizon": 20}
    latents = latent_world_models(args, latent_config)
    for name, backbone in world_model_backbones(args).items():
        world_model = WorldModel(config, backbone).to(device).eval()

        def step(make_env, policy_input="obs"):
            obs_shape = (latent_config.latent_size,) if policy_input == "latent" else (4,)
            actor_critic = ActorCritic(ActorCriticConfig(), obs_shape, 2).to(device)
            optimizer = torch.optim.AdamW(actor_critic.parameters(), lr=1e-4)

            def fn():
                torch.manual_seed(0)
                batch = imagine(actor_critic, make_env(), start, 20, policy_input)
                actor_critic.compute_loss(batch)["loss"].backward()
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
            return fn

        seconds = alternate({
            "kv_cache": step(lambda: WorldModelEnv(world_model, tokenizer, True)),
            "recompute": step(lambda: WorldModelEnv(world_model, tokenizer, False)),
            "latent_policy": step(lambda: LatentWorldModelEnv(latents[name], tokenizer, should_decode=False), "latent"),
        }, args.steps)
        steps_per_s = {way: args.batch_size * 20 / s for way, s in seconds.items()}
        out[name] = {**{f"{way}_steps_per_s": round(v, 1) for way, v in steps_per_s.items()},
                     "kv_cache_speedup": round(steps_per_s["kv_cache"] / steps_per_s["recompute"], 2),
                     "latent_policy_vs_tokens": round(steps_per_s["latent_policy"] / steps_per_s["kv_cache"], 2)}
        print(name, out[name], file=sys.stderr, flush=True)
    return out


BENCHMARKS = {"agent": bench_agent, "imagine": bench_imagine, "lora": bench_lora, "vae": bench_vae,
              "vae-step": bench_vae_step}


def parse_args(argv=None):
    parser = make_parser(__doc__)
    parser.add_argument("name", choices=sorted(BENCHMARKS), help="which benchmark to run")
    parser.add_argument("--steps", type=positive_int, default=8, help="timed calls per contender (default: "
                        "%(default)s)")
    parser.add_argument("--batch-size", type=positive_int, default=8, help="sequences per batch (default: "
                        "%(default)s)")
    parser.add_argument("--block-size", type=positive_int, default=64, help="tokens per sequence (default: "
                        "%(default)s)")
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"], help="imagine, agent, vae-step: "
                        "auto (cuda when available), cpu or cuda (default: %(default)s)")
    parser.add_argument("--lm", default="tiny", choices=["tiny", "gpt2", "smollm2"], help="imagine, agent: the "
                        "LM backbone's shape, tiny's or GPT-2 small's; vae-step: also SmolLM2-135M's (random "
                        "weights; default: %(default)s)")
    return parse(parser, argv)


def main(argv=None):
    args = parse_args(argv)
    args.device = torch.device(pick_device(args.device))  # --device cuda without a GPU: one line
    if args.lm == "smollm2" and args.name != "vae-step":
        raise UserError(f"bench.py {args.name} takes --lm tiny or gpt2; smollm2's shape is for vae-step")
    print(json.dumps(BENCHMARKS[args.name](args)))


if __name__ == "__main__":
    run_cli(main)
