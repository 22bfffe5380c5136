"""
IRIS's whole loop: an agent that learns to act from few real steps by practising in its world
model's imagination (agent.py), with train_wm.py's world model (both build it with wm_setup.py).

    python train_agent.py                                  # CartPole-v1, 10 epochs of 1000 real steps
    python train_agent.py --max-iters 2 --collect-steps 300 --wm-iters 20 --ac-iters 5 \
        --out-dir out-agent-quick                          # a quick look at the loop, CPU: ~30 s
    python train_agent.py --env Acrobot-v1 --out-dir out-agent-acrobot
    python train_agent.py --env FrozenLake-v1 --out-dir out-agent-frozenlake   # a Discrete state, slippery ice
    python train_agent.py --env ALE/Pong-v5 --max-iters 2 --collect-steps 500 --tokenizer-iters 50 \
        --wm-iters 10 --ac-iters 2 --ac-batch-size 8 --eval-episodes 1 --out-dir out-agent-pong   # smoke
    python train_agent.py --backbone lm --model out-lm/base --out-dir out-agent-lm   # an LM world model
    python train_agent.py --state latent --out-dir out-agent-latent   # practise in latent_wm.py's world model
    python train_agent.py --state latent --policy-input latent --out-dir out-agent-z   # a policy that reads z
    python train_agent.py --resume out-agent --max-iters 30   # continue the loop up to epoch 30
    python train_agent.py --resume out-agent --eval-only      # play the held-out episodes again
    python train_agent.py --resume out-agent --eval-only --eval-episodes 100   # more of them, a tighter mean
    python experiments/agent_curve.py --runs iris out-agent   # the picture: held-out return vs real steps

One epoch, as IRIS's (src/trainer.py there), with --max-iters epochs in all:
1. collect --collect-steps real transitions with the current policy, sampled (the first epoch
   with a uniformly random one); episodes are seeded from (--seed, epoch), and an episode still
   running when the epoch's steps are spent is cut there (no end label), so every epoch starts
   from a fresh reset and a resumed run collects exactly what a straight one does;
2. the first epoch fits the observation tokenizer to its observations (vectors: bin edges; with
   --bin-range space they also cover the observation space's finite bounds: the random policy's
   CartPole cart stays within +-0.3, a good policy's drifts to the end at +-2.4; frames:
   --tokenizer-iters training steps); then it stays frozen. Simplification: IRIS trains
   its tokenizer again every epoch, which changes every stored observation's tokens under the
   world model; here they keep their meaning;
3. train the world model --wm-iters steps on segments from all the real data so far (the world
   model's flags, --state among them, --batch-size, --lr, --warmup-iters, --weight-decay and
   --grad-clip are train_wm.py's; the learning rate warms up once, then stays constant; IRIS's is
   constant throughout);
   with --end-share, that share of each batch's segments holds an episode end (wm_setup.segment_batches),
   which a uniform draw rarely gives once episodes grow long;
4. train the actor-critic --ac-iters steps, each on --ac-batch-size trajectories of --horizon
   steps imagined from real observations drawn from the data (agent.py). IRIS starts it after 50
   epochs (its world model after 25); here it trains from the first epoch on. With --state latent the
   world model imagines in latent space and decodes each imagined observation for the policy;
   with --policy-input latent too, the policy reads z instead (Dreamer's actor) and nothing is
   decoded. Simplification: the encoder is the world model's, which the agent never trains, and
   the world model trains every epoch, so what z means drifts under the policy (as in Dreamer);
5. every --eval-interval epochs: play --eval-episodes real episodes on held-out seeds (never
   collected from) with the greedy and with the sampled policy; print; checkpoint.
Every random draw is a function of --seed and the epoch or step, each stream with a seed of its
own (STREAMS; a frame tokenizer's steps draw from the world model's, before it trains). Progress:
a line per phase from the shared loop (the world model's, then the actor-critic's, every
--log-interval steps and at the phase's end), and one per evaluated epoch
with real env steps, real returns, imagined steps/s and the ETA. The last line printed is one
JSON object of the run's metrics; `history` in the checkpoint holds every evaluated epoch's.
"""

import time
from dataclasses import replace

import numpy as np
import torch

import lora
from agent import ActorCritic, ActorCriticConfig, first_reaching, imagine, play, policy_view
from checkpoint import TRAIN_KEYS, adopt_config, check_out_dir, load_checkpoint, load_optimizer, save_checkpoint
from common import (UserError, batch_seed, config_from, fraction, make_parser, nonneg_float, parse, positive_float,
                    positive_int, run_cli, standing)
from data_wm import collect, make_env, with_space_bounds
from latent_wm import imagination_env
from trainer import add_common_args, finish, format_seconds, make_optimizer, setup, train
from wm_setup import (MODEL_KEYS, TOKENIZER_KEYS, TokenizerSettings, add_world_model_args, build_world_model,
                      check_model_flags, check_world_model_flags, make_tokenizer, obs_scale, prepare_tokenizer,
                      restore, saved_state, segment_batches, settings_from, tokenize, train_config_from)

AGENT_KEYS = ("collect_steps", "wm_iters", "ac_iters", "ac_batch_size", "ac_lr", "ac_grad_clip", "horizon", "gamma",
              "lambda_", "entropy_weight", "ac_width", "eval_episodes", "policy_input", "end_share")
# what makes the data and the tokenizer; a resumed run takes these, the model's and the agent's from its checkpoint
DATA_KEYS = ("env", "seed", "bin_range") + TOKENIZER_KEYS
EVAL_SEED = 2**31  # the held-out episodes: env seeds EVAL_SEED + i, far from every collection seed
# the random streams: the world model's steps draw from --seed itself (as train_wm.py's), the
# others from --seed + stream * 2**22, so that no two streams, nor the same stream of runs with
# seeds less than 2**22 apart, share a seed
STREAMS = {"world_model": 0, "actor_critic": 1, "collect": 2, "evaluate": 3}


def stream_seed(seed, stream, index=0):
    return batch_seed(seed + STREAMS[stream] * 2**22, index)


def parse_args(argv=None):
    parser = make_parser(__doc__)
    add_common_args(parser, model=None, unit="epochs", out_dir="out-agent", max_iters=10, eval_interval=1,
                    batch_size=32, lr=1e-3, warmup_iters=100, weight_decay=0.01, log_interval=200)
    add_world_model_args(parser, tokenizer_iters_default="2000")
    g = parser.add_argument_group("the agent and the loop (agent.py)")
    g.add_argument("--collect-steps", type=positive_int, default=1000, help="real env transitions collected "
                   "per epoch (default: %(default)s)")
    g.add_argument("--wm-iters", type=positive_int, default=200, help="world-model optimizer steps per epoch "
                   "(default: %(default)s)")
    g.add_argument("--ac-iters", type=positive_int, default=150, help="actor-critic optimizer steps per epoch "
                   "(default: %(default)s)")
    g.add_argument("--ac-batch-size", type=positive_int, default=64, help="imagined trajectories per "
                   "actor-critic step (default: %(default)s)")
    g.add_argument("--horizon", type=positive_int, default=20, help="imagined steps per trajectory (IRIS: 20; "
                   "default: %(default)s)")
    g.add_argument("--ac-lr", type=positive_float, default=1e-3, help="actor-critic learning rate, constant "
                   "(IRIS: 1e-4; default: %(default)s)")
    g.add_argument("--ac-grad-clip", type=nonneg_float, default=10.0, help="clip its gradient norm; 0: off (IRIS: "
                   "10; default: %(default)s)")
    g.add_argument("--gamma", type=fraction, default=0.995, help="discount (IRIS: 0.995; default: %(default)s)")
    g.add_argument("--lambda", dest="lambda_", type=fraction, default=0.95, help="lambda of the lambda-returns "
                   "(IRIS: 0.95; default: %(default)s)")
    g.add_argument("--entropy-weight", type=nonneg_float, default=0.001, help="weight of the entropy bonus (IRIS: "
                   "0.001; default: %(default)s)")
    g.add_argument("--ac-width", type=positive_int, default=128, help="hidden width of the policy and value "
                   "networks (default: %(default)s)")
    g.add_argument("--bin-range", default="data", choices=["data", "space"], help="vector observations: the "
                   "tokenizer's bins cover the first epoch's data only, or it and the observation space's finite "
                   "bounds (data_wm.with_space_bounds; default: %(default)s)")
    g.add_argument("--end-share", type=fraction, default=0.0, help="the share of each world-model batch drawn "
                   "(at least one segment for a share above 0) to hold an episode end, at a uniform position in its "
                   "segment, the others from uniform starts: a rare event oversampled, as long episodes leave few "
                   "ends to learn from (IRIS draws a segment's episode, the newest ones more often, which weighs "
                   "short episodes' ends up; default: %(default)s, all uniform)")
    g.add_argument("--eval-episodes", type=positive_int, default=10, help="held-out real episodes per "
                   "evaluation, each policy; --eval-only may play another number (default: %(default)s)")
    g.add_argument("--policy-input", default="obs", choices=["obs", "latent"], help="what the policy reads: obs, "
                   "the observation as the tokenizer reconstructs it; latent (--state latent), the world model's "
                   "z, and imagination decodes nothing (default: %(default)s)")
    args = parse(parser, argv)
    check_world_model_flags(parser, vars(args))
    return args


def start_or_resume(args):
    """(state, env): a new loop's state, or the --resume checkpoint's, whose settings the run
    takes unless given (a given one that differs is an error; the optimisation ones win)."""
    state = {"kind": "agent", "step": 0, "history": []}
    if args.resume is not None:
        state = load_checkpoint(args.resume, "agent", "--resume")
        # --eval-only saves nothing, so it may play another number of held-out episodes than the run did
        # and the actor-critic's lr and clip may change, as the world model's may (a divergence's hint names them)
        overridable = ("ac_lr", "ac_grad_clip") + (("eval_episodes",) if args.eval_only else ())
        kept = tuple(k for k in DATA_KEYS + MODEL_KEYS + AGENT_KEYS if k not in overridable)
        adopt_config(vars(args), args.explicit, state["config"], kept, args.resume)
        adopt_config(vars(args), args.explicit, state["config"], TRAIN_KEYS + overridable, args.resume,
                     overridable=True)
        if not args.eval_only and state["step"] >= args.max_iters:
            raise UserError(f"the checkpoint in {args.resume} is at epoch {state['step']} already; give --max-iters "
                            "above it to continue, or --eval-only to evaluate it")
        if args.eval_only and "actor_critic" not in state:
            raise UserError(f"{args.resume} has no trained agent yet; resume it without --eval-only")
    args.model = check_model_flags(vars(args), args.explicit)
    if args.policy_input == "latent" and args.state != "latent":
        raise UserError("--policy-input latent reads the latent world model's z: add --state latent")
    env = make_env(args.env)
    if args.tokenizer_iters is None:
        args.tokenizer_iters = 2000 if len(env.observation_space.shape) == 3 else 0
    state["config"] = {k: getattr(args, k) for k in TRAIN_KEYS + DATA_KEYS + MODEL_KEYS + AGENT_KEYS}
    return state, env


def phase_config(config, epoch, iters, **changes):
    """The shared loop's settings (TrainConfig) for one phase of one epoch: steps epoch * iters up to
    (epoch + 1) * iters."""
    return replace(config, max_iters=(epoch + 1) * iters, **changes)


def warmup_then_constant(step, config):
    return config.lr * min(1.0, (step + 1) / max(1, config.warmup_iters))


def append(data, new):
    """All the real data so far: new's episodes numbered after data's."""
    if data is None:
        return new
    new = {**new, "episode": new["episode"] + int(data["episode"][-1]) + 1}
    return {k: torch.cat([data[k], new[k]]) for k in ("obs", "actions", "rewards", "ends", "episode")}


def finished_returns(data):
    """Returns of the episodes of one collection (collect's) that finished in it, by an end or the env's
    time limit: all but the last, which collect cut, unless its last step was done."""
    last = int(data["episode"][-1])
    if not bool(data["dones"][-1]):
        last -= 1
    sums = torch.zeros(int(data["episode"][-1]) + 1).index_add_(0, data["episode"], data["rewards"])
    return sums[:last + 1].tolist()


def mean(values):
    return sum(values) / len(values) if values else None  # None: no episode finished (JSON null)


def main(argv=None):
    args = parse_args(argv)
    t_start = time.time()
    run = setup(args.device, args.seed)
    if run.world_size > 1:
        raise UserError("train_agent.py runs in one process: start it with python, not torchrun")
    if not args.eval_only:
        check_out_dir(args.out_dir, args.resume)
    state, env = start_or_resume(args)
    train_config, settings = train_config_from(vars(args)), settings_from(vars(args))
    tokenizer_settings = config_from(TokenizerSettings, vars(args))

    tokenizer = make_tokenizer(env, tokenizer_settings).to(run.device)
    if "tokenizer" in state:
        tokenizer.load_state_dict(state["tokenizer"])
    torch.manual_seed(args.seed)  # the initialisation: --seed's
    world_model = build_world_model(settings, tokenizer, int(env.action_space.n), run.device, args.batch_size,
                                    run.is_main)
    optimizer = make_optimizer(world_model, args.lr, args.weight_decay)
    restore(world_model, optimizer, state, settings, args.resume)
    reads_latent = args.policy_input == "latent"  # the policy reads z (D,), else observations as reconstructed
    obs_shape = tokenizer.preprocess(env.observation_space.sample()[None]).shape[1:]
    obs_shape = (args.latent_size,) if reads_latent else obs_shape
    ac_config = ActorCriticConfig(width=args.ac_width, gamma=args.gamma, lambda_=args.lambda_,
                                  entropy_weight=args.entropy_weight)
    actor_critic = ActorCritic(ac_config, obs_shape, int(env.action_space.n)).to(run.device)
    ac_optimizer = make_optimizer(actor_critic, args.ac_lr, weight_decay=0.0)
    if "actor_critic" in state:
        actor_critic.load_state_dict(state["actor_critic"])
        load_optimizer(ac_optimizer, state["ac_optimizer"])
    data = state.get("data")

    def policy(should_sample, generator=None):
        """act(env observation) -> action, for collect() and play()."""
        def act(obs):
            view = policy_view(tokenizer, tokenizer.preprocess(np.asarray(obs)[None]).to(run.device),
                               world_model if reads_latent else None)
            return int(actor_critic.act(view, should_sample, generator))
        return act

    def evaluate_policy(epoch):
        actor_critic.eval()
        world_model.eval()  # --policy-input latent encodes with it; fresh (--eval-only) it is in train mode
        greedy = play(env, policy(False), args.eval_episodes, EVAL_SEED)
        generator = torch.Generator(run.device).manual_seed(stream_seed(args.seed, "evaluate", epoch))
        sampled = play(env, policy(True, generator), args.eval_episodes, EVAL_SEED)
        return {"eval_return": mean(greedy), "eval_return_min": min(greedy), "eval_return_sampled": mean(sampled)}

    def save(epoch):
        save_checkpoint(args.out_dir, {
            **{k: state[k] for k in ("kind", "config", "history")}, "step": epoch,
            "data": {k: data[k] for k in ("obs", "actions", "rewards", "ends", "episode")},
            "tokenizer": tokenizer.state_dict(), "tokenizer_step": args.tokenizer_iters,
            **saved_state(world_model, settings), "optimizer": optimizer.state_dict(),
            "actor_critic": actor_critic.state_dict(), "ac_optimizer": ac_optimizer.state_dict()})

    if args.eval_only:
        finish(run, {**evaluate_policy(state["step"] - 1), "epoch": state["step"], "env_steps": len(data["actions"]),
                     "eval_episodes": args.eval_episodes})
        return

    t_loop, start_epoch = time.time(), state["step"]
    metrics = {}
    for epoch in range(start_epoch, args.max_iters):
        standing["step"] = epoch  # an interrupted run names its epoch (train() counts only its own loop's steps)
        # 1. real experience
        t_epoch = time.time()
        seed = stream_seed(args.seed, "collect", epoch)
        act = None if epoch == 0 else policy(True, torch.Generator(run.device).manual_seed(seed))
        actor_critic.eval()
        world_model.eval()  # as in evaluate_policy: a resumed run's is fresh, in train mode (dropout)
        new = collect(env, tokenizer, args.collect_steps, seed, act)
        data = append(data, new)
        # 2. the tokenizer, once (its error is measured on the same observations: nothing is held out)
        if epoch == 0:
            fit = data if args.bin_range == "data" else {**data, "obs": with_space_bounds(data["obs"],
                                                                                          env.observation_space)}
            prepare_tokenizer(tokenizer, fit, data["obs"], obs_scale(data["obs"]), tokenizer_settings, train_config,
                              run, state)
        tokenize(tokenizer, data, run.device)  # every epoch all of it again: a few ms for vectors, seconds for frames
        # 3. the world model
        get_batch = segment_batches(data, tokenizer, args.segment_steps, args.batch_size, args.seed, run.device,
                                    args.end_share)
        wm_terms = train(world_model, optimizer, get_batch, None, phase_config(train_config, epoch, args.wm_iters),
                         run, epoch * args.wm_iters, schedule=warmup_then_constant)
        # 4. the actor-critic, in imagination
        world_model.eval()
        wm_env = imagination_env(world_model, tokenizer, **({"should_decode": False} if reads_latent else {}))

        def imagined_batch(index):  # train() seeded torch's generator from (seed, index) just before
            starts = torch.randint(len(data["obs"]), (args.ac_batch_size,))
            return imagine(actor_critic, wm_env, data["obs"][starts].to(run.device), args.horizon, args.policy_input)

        t_ac = time.time()
        ac_phase = phase_config(train_config, epoch, args.ac_iters, lr=args.ac_lr, grad_clip=args.ac_grad_clip,
                                grad_accum=1, seed=stream_seed(args.seed, "actor_critic"),
                                # the divergence hint's dtype: the actor-critic is fp32, and decoded observations
                                # are finite in any --dtype; a policy that reads z reads the world model's numbers
                                dtype=train_config.dtype if reads_latent else "float32")
        with lora.folded(world_model):  # folded once for the phase (imagine's own block then reuses the copies)
            ac_terms = train(actor_critic, ac_optimizer, imagined_batch, None, ac_phase, run, epoch * args.ac_iters,
                             schedule=lambda step, config: config.lr, flags=("--ac-lr", "--ac-grad-clip"))
        imagined_per_s = args.ac_iters * args.ac_batch_size * args.horizon / (time.time() - t_ac)
        # 5. evaluation on held-out real episodes
        done = epoch + 1
        metrics = {"epoch": done, "env_steps": len(data["actions"]), "collect_return": mean(finished_returns(new)),
                   **{f"wm_{k}": v for k, v in wm_terms.items() if k.startswith("train_")},
                   **{f"ac_{k}": v for k, v in ac_terms.items() if k.startswith("train_")},
                   "imagined_steps_per_s": round(imagined_per_s, 1), "epoch_seconds": round(time.time() - t_epoch, 1)}
        if done % args.eval_interval == 0 or done == args.max_iters:
            metrics.update(evaluate_policy(epoch))
            state["history"].append(metrics)
            eta = (time.time() - t_loop) / (done - start_epoch) * (args.max_iters - done)
            collected = "-" if metrics["collect_return"] is None else f"{metrics['collect_return']:.1f}"
            print(f"epoch {done}/{args.max_iters} | env steps {metrics['env_steps']} | collect return "
                  f"{collected} | eval return {metrics['eval_return']:.1f} (sampled "
                  f"{metrics['eval_return_sampled']:.1f}) | imagined {imagined_per_s:.0f} steps/s | "
                  f"{metrics['epoch_seconds']:.1f} s/epoch | eta {format_seconds(eta)}", flush=True)
            save(done)
    threshold = env.spec.reward_threshold  # CartPole-v1: 475; None for Atari
    metrics.update({"reward_threshold": threshold, "env_steps_to_threshold": first_reaching(state["history"], threshold),
                    "best_eval_return": max(h["eval_return"] for h in state["history"])})
    metrics["wall_seconds"] = round(time.time() - t_start, 1)
    finish(run, metrics)


if __name__ == "__main__":
    run_cli(main)
