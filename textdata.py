"""
The text that train_vae.py and pretrain_lm.py train on: documents, one token stream per
side (training / held out), and windows cut from it.

    docs = read_documents(path)                        # --data FILE (stdlib_docstrings(): the default corpus)
    train, val = split_streams(docs, tokenizer, window, name)
    batch = vae_batch(stream, starts, context, should_keep_prefix)

The default corpus is the docstrings of this Python's standard library, read from its
installed source files at run time (~1.3 MB of English paragraphs; nothing downloaded, no
text shipped). --data FILE takes one document per line, or paragraphs separated by blank
lines. Every 10th document is held out, so held-out documents are never trained on (a --data file
that repeats a document can put its text on both sides; the default corpus has no repeats).
A window is 2 x context tokens: the first half is `prefix_ids` (the context the decoder
sees before z's span), the second the span that is encoded and reconstructed
(`input_ids` = `target_ids`), as BigVAE cuts 128-token chunks into 64 + 64.
"""

import ast
import os
import re
import sysconfig

import torch

from common import UserError, positive_int

HELD_OUT_EVERY = 10  # every 10th document is held out


def add_data_args(parser):
    """The data flags of train_vae.py, train_router.py and pretrain_lm.py; returns their group for the
    script's own."""
    g = parser.add_argument_group("data (textdata.py)")
    g.add_argument("--data", default=None, help="UTF-8 text file, one document per line or paragraphs "
                   "(default: the standard library's docstrings)")
    g.add_argument("--eval-batches", type=positive_int, default=8, help="held-out batches per evaluation "
                   "(default: %(default)s)")
    return g


def stdlib_docstrings():
    """Paragraphs of the docstrings in this Python's standard library sources (~1.3 MB of English)."""
    root, skip = sysconfig.get_paths()["stdlib"], {"test", "tests", "idlelib", "site-packages", "__pycache__"}
    paragraphs = []
    for folder, subfolders, files in os.walk(root):
        subfolders[:] = sorted(d for d in subfolders if d not in skip)
        for name in sorted(f for f in files if f.endswith(".py")):
            try:
                with open(os.path.join(folder, name), encoding="utf-8") as f:
                    tree = ast.parse(f.read())
            except (SyntaxError, UnicodeDecodeError, ValueError):
                continue
            for node in ast.walk(tree):
                if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                    for p in re.split(r"\n\s*\n", ast.get_docstring(node) or ""):
                        p = " ".join(p.split())
                        if len(p) >= 40 and not p.startswith(">>>"):
                            paragraphs.append(p)
    return list(dict.fromkeys(paragraphs))  # drop repeats, keep the order


def read_documents(path):
    """A text file's documents: paragraphs when it has blank lines, else lines."""
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except OSError as e:
        raise UserError(f"cannot read --data {path} ({e.strerror}); give a UTF-8 text file") from e
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise UserError(f"--data {path} is not UTF-8 (bad byte at offset {e.start}); convert it first, "
                        f"e.g. iconv -f latin1 -t utf-8 {path}") from e
    parts = re.split(r"\n\s*\n", text) if re.search(r"\n\s*\n", text.strip()) else text.splitlines()
    docs = [d.strip() for d in parts if d.strip()]
    if not docs:
        raise UserError(f"--data {path} holds no text; give a UTF-8 file with one document per line or "
                        "paragraphs")
    return docs


def split_streams(docs, tokenizer, window, name, shorter="a smaller --context"):
    """Every 10th document held out; each side one token stream with end-of-text between documents.
    shorter: how the script's user asks for a shorter window, for the error when a side has none."""
    if len(docs) < HELD_OUT_EVERY:
        raise UserError(f"{name} has {len(docs)} document(s); it needs at least {HELD_OUT_EVERY} (every "
                        f"{HELD_OUT_EVERY}th is held out): one document per line, or paragraphs between blank lines")
    streams = []
    for held_out in (False, True):
        ids = []
        for i, doc in enumerate(docs):
            if (i % HELD_OUT_EVERY == HELD_OUT_EVERY - 1) == held_out:
                ids += tokenizer.encode(doc) + [tokenizer.eos_id]
        if len(ids) < window:
            raise UserError(f"{name} is too small: its {'held-out' if held_out else 'training'} part has "
                            f"{len(ids)} tokens, fewer than one window of {window}; give more text or "
                            f"{shorter}")
        streams.append(torch.tensor(ids, dtype=torch.long))
    return streams


def held_out_paragraphs(docs, tokenizer, num_paragraphs, max_tokens):
    """num_paragraphs held-out documents of at most max_tokens tokens, evenly spread over the held-out
    side (the documents split_streams holds out): token lists, for whole-paragraph reconstruction."""
    held_out = [ids for i, doc in enumerate(docs) if i % HELD_OUT_EVERY == HELD_OUT_EVERY - 1
                for ids in [tokenizer.encode(doc)] if 0 < len(ids) <= max_tokens]
    step = max(1, len(held_out) // num_paragraphs) if num_paragraphs else 1
    return held_out[::step][:num_paragraphs]


def windows(stream, starts, length):
    """(B, length) windows of the stream at `starts`."""
    return torch.stack([stream[s:s + length] for s in starts.tolist()])


def vae_batch(stream, starts, context, should_keep_prefix):
    """Windows at `starts` as a VAE batch: the span half, and the prefix half when kept."""
    w = windows(stream, starts, 2 * context)  # (B, 2 * context)
    span = w[:, context:]
    batch = {"input_ids": span, "target_ids": span, "num_tokens": span.numel() * (3 if should_keep_prefix else 2)}
    if should_keep_prefix:
        batch["prefix_ids"] = w[:, :context]
    return batch


def random_starts(stream, length, batch_size, generator):
    """batch_size window starts drawn uniformly from the stream."""
    return torch.randint(0, len(stream) - length + 1, (batch_size,), generator=generator)


def spread_starts(stream, length, num_batches, batch_size):
    """Fixed held-out window starts, evenly spread over the stream: (num_batches, batch_size)."""
    n = num_batches * batch_size
    return torch.linspace(0, len(stream) - length, n).long().view(num_batches, batch_size)


def to_device(batch, device):
    return {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}
