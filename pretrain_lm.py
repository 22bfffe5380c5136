"""
Pretrain a base LM as a plain next-token model on text, and save it where --model loads it:
BigVAE's recipe starts from a *pretrained* base, and offline there are no weights to download,
so this makes a small one (tiny, pretrained on the standard library's docstrings).

    python pretrain_lm.py                              # tiny on the default corpus, CPU: ~2.5 min on 2 cores
    python pretrain_lm.py --data my.txt --out-dir out-lm-mine
    python train_vae.py --model out-lm/base --out-dir out-vae-frozen   # the VAE on it, frozen
    python train_wm.py --backbone lm --model out-lm/base --num-bins 32 --out-dir out-wm-lm  # the world model on it
    python pretrain_lm.py --synthetic markov --out-dir out-lm-markov   # the same LM on synthetic tokens

Data as train_vae.py's (textdata.py): windows of --block-size tokens from the training
documents; held-out next-token cross-entropy and accuracy on every 10th document. With
--synthetic markov the tokens come from a random one-step Markov chain over the vocabulary
instead (each row of its transition matrix a softmax of standard-normal logits): Wang et al.
(ICLR 2024) found such pretraining helps offline RL as much as language does, so it is the
control for "is it the language that helps?" (train_agent.py, README).
OUT_DIR/base is a directory saved with save_pretrained (lm.save_base, with its tokenizer's
name), replaced whole at each checkpoint, never half-written. The last line printed is one
JSON object of the run's metrics.
"""

import json
import os

import torch
import torch.nn as nn
import torch.nn.functional as F

import lm
import offload
import textdata
from checkpoint import TRAIN_KEYS, adopt_config, load_optimizer, open_run, save_checkpoint
from common import UserError, batch_seed, config_from, make_parser, parse, positive_int, replace_folder, run_cli
from trainer import TrainConfig, add_common_args, finish, make_optimizer, setup, train

MODEL_KEYS = ("model", "block_size", "synthetic")  # what a checkpoint records and a resumed run takes from it
SYNTHETIC_AND_DATA = "--synthetic makes its own tokens: drop --data, or drop --synthetic to train on it"
MAX_MARKOV_VOCAB = 4096  # --synthetic markov: its transition matrix, V x V floats, is at most 64 MiB (twice that
#                          while it is built)


def parse_args(argv=None):
    parser = make_parser(__doc__)
    add_common_args(parser, model="tiny", out_dir="out-lm", max_iters=1500, eval_interval=500, batch_size=16,
                    lr=1e-3, warmup_iters=100)
    g = textdata.add_data_args(parser)
    g.add_argument("--synthetic", default=None, choices=["markov"], help="pretrain on synthetic tokens instead "
                   "of text: markov = a random one-step Markov chain over the vocabulary, seeded by --seed")
    g.add_argument("--block-size", type=positive_int, default=128, help="tokens per training window "
                   "(default: %(default)s, train_vae.py's prefix + span)")
    args = parse(parser, argv)
    if args.synthetic is not None and args.data is not None:
        parser.error(SYNTHETIC_AND_DATA)
    return args


class LanguageModel(nn.Module):
    """The base alone as a next-token model, with the loss contract of the training loop."""

    def __init__(self, base):
        super().__init__()
        self.base = base

    def logits_and_labels(self, ids):
        return self.base(ids, use_cache=False).logits[:, :-1].float(), ids[:, 1:]  # (B, L - 1, V), (B, L - 1)

    def compute_loss(self, batch, step):
        logits, labels = self.logits_and_labels(batch["ids"])
        return {"loss": F.cross_entropy(logits.flatten(0, 1), labels.flatten())}


@torch.no_grad()
def evaluate(model, val_batches):
    """Held-out next-token cross-entropy and accuracy."""
    ce = acc = 0.0
    for batch in val_batches:
        logits, labels = model.logits_and_labels(batch["ids"])
        ce += F.cross_entropy(logits.flatten(0, 1), labels.flatten()).item()
        acc += (logits.argmax(-1) == labels).float().mean().item()
    return {"val_ce": ce / len(val_batches), "val_acc": acc / len(val_batches)}


def markov_streams(vocab_size, seed, num_chains=1000, train_steps=1000, val_steps=100):
    """Training and held-out token streams of one random Markov chain: num_chains walks side by
    side (train_steps, then val_steps more), each side the walks one after another."""
    g = torch.Generator().manual_seed(seed)
    transitions = F.softmax(torch.randn(vocab_size, vocab_size, generator=g), dim=-1)  # (V, V), rows sum to 1
    state = torch.randint(vocab_size, (num_chains,), generator=g)
    walks = []
    for _ in range(train_steps + val_steps):
        state = torch.multinomial(transitions[state], 1, generator=g).squeeze(1)  # (num_chains,)
        walks.append(state)
    walks = torch.stack(walks, dim=1)  # (num_chains, train_steps + val_steps)
    return walks[:, :train_steps].flatten(), walks[:, train_steps:].flatten()


def save_base_dir(base, tokenizer, out_dir):
    """OUT_DIR/base, replaced whole (common.replace_folder): a failed write leaves the previous
    base/ as it was and nothing half-written."""
    replace_folder(os.path.join(out_dir, "base"), lambda path: lm.save_base(base, tokenizer, path))


def main(argv=None):
    args = parse_args(argv)
    run = setup(args.device, args.seed)
    state = open_run("lm", args.out_dir, args.resume, args.eval_only, args.max_iters)
    if state is not None:  # a Markov chain is drawn from --seed: then the seed is the data's, and stays
        data_keys = ("seed",) if state["config"].get("synthetic") is not None else ()
        adopt_config(vars(args), args.explicit, state["config"], tuple(k for k in TRAIN_KEYS if k not in data_keys),
                     args.resume, overridable=True)
        adopt_config(vars(args), args.explicit, state["config"], MODEL_KEYS + data_keys, args.resume)
    if args.synthetic is not None and args.data is not None:  # a resumed run's --synthetic, taken just now
        raise UserError(SYNTHETIC_AND_DATA)
    # a --data file is read (and a bad one refused) before the base loads; the default corpus, known good, after
    docs = None if args.data is None else textdata.read_documents(args.data)
    base, tokenizer = lm.load_base(args.model, run.device, "float32" if args.dtype == "auto" else args.dtype)  # it trains
    if args.block_size > lm.num_positions(base):
        raise UserError(f"--block-size {args.block_size} is more than the {lm.num_positions(base)} positions of "
                        f"{args.model}: use --block-size {lm.num_positions(base)} or less")
    offload.check_memory(base, run.device, args.batch_size * args.block_size, f"--batch-size (now {args.batch_size})")
    model = LanguageModel(base)
    if state is not None:
        model.load_state_dict(state["model"])
    if args.synthetic is not None:
        vocab_size = base.get_input_embeddings().num_embeddings
        if vocab_size > MAX_MARKOV_VOCAB:
            raise UserError(f"{args.model} has {vocab_size} tokens; a Markov chain over them needs a {vocab_size}^2 "
                            f"transition matrix: use a base with at most {MAX_MARKOV_VOCAB} (tiny, tiny-bpe)")
        train_stream, val_stream = markov_streams(vocab_size, args.seed)
    else:
        docs = textdata.stdlib_docstrings() if docs is None else docs
        train_stream, val_stream = textdata.split_streams(docs, tokenizer, args.block_size,
                                                          "the default corpus" if args.data is None else args.data,
                                                          "a smaller --block-size")
    starts = textdata.spread_starts(val_stream, args.block_size, args.eval_batches, args.batch_size)
    val_batches = [{"ids": textdata.windows(val_stream, s, args.block_size).to(run.device)} for s in starts]
    if args.eval_only:
        print(json.dumps({**evaluate(model.eval(), val_batches), "step": state["step"]}))
        return
    optimizer = make_optimizer(model, args.lr, args.weight_decay)
    if state is not None:
        load_optimizer(optimizer, state["optimizer"])

    def get_batch(index):
        g = torch.Generator().manual_seed(batch_seed(args.seed, index))
        ids = textdata.windows(train_stream, textdata.random_starts(train_stream, args.block_size, args.batch_size, g),
                               args.block_size)
        return {"ids": ids.to(run.device), "num_tokens": ids.numel()}

    def save(step):
        config = {k: getattr(args, k) for k in TRAIN_KEYS + MODEL_KEYS}
        # base/ first: a save cut short between the two leaves the checkpoint at the step before, which
        # resumes and rewrites base/ exactly; the other order could leave a finished checkpoint by a stale base/
        save_base_dir(model.base, tokenizer, args.out_dir)
        save_checkpoint(args.out_dir, {"kind": "lm", "config": config,
                                       "step": step, "model": model.state_dict(), "optimizer": optimizer.state_dict()})

    if run.is_main:
        print(f"{args.model}: {sum(p.numel() for p in base.parameters()):,} parameters, {len(train_stream):,} "
              f"training / {len(val_stream):,} held-out tokens")
    metrics = train(model, optimizer, get_batch, lambda: evaluate(model, val_batches),
                    config_from(TrainConfig, vars(args)), run, 0 if state is None else state["step"], save)
    finish(run, metrics)


if __name__ == "__main__":
    run_cli(main)
