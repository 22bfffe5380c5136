"""
How train_wm.py measures a world model on the held-out episodes, and the picture it draws
(OUT_DIR/imagination.png), with a baseline IRIS does not report:
- each head's accuracy and cross-entropy over consecutive segments of every held-out episode,
  and the accuracy on the rare steps plain accuracy hides (a nonzero reward, an episode's end);
- open-loop imagination (WorldModelEnv; latent_wm.py's LatentWorldModelEnv for a latent world model,
  whose "obs" logits are its decoder's, reading the predicted latent): from held-out observations,
  --horizon steps with the real actions, compared at each step with the real future and with copying the start
  observation ("nothing changes"), as token accuracy and as error in observation units.
The picture needs Pillow only, imported where it is drawn. A library, not a script: to evaluate a
saved world model again, `python train_wm.py --eval-only --resume out-wm` (run alone, this file
says so in one line, exit code 2).
"""

import os
import time
from collections import defaultdict

import torch
import torch.nn as nn

import lora
from common import UserError, run_cli, write_failure
from data_wm import segments
from latent_wm import imagination_env
from obs_tokenizer import DiscreteTokenizer


@torch.no_grad()
def evaluate(world_model, tokenizer, val, scale, segment_steps, horizon, num_starts, seed, picture, device):
    """All held-out metrics, at horizons 1, 5 and `horizon` (heldout_metrics, imagine); draws the picture
    to the path `picture`."""
    world_model.eval()
    metrics = heldout_metrics(world_model, val, segment_steps, device)
    curves, example, metrics["imagined_steps_per_s"] = imagine(world_model, tokenizer, val, scale, horizon,
                                                               num_starts, seed, device)
    for h in sorted({1, 5, horizon} & set(range(1, horizon + 1))):
        for name, curve in curves.items():
            metrics[f"{name}_h{h}"] = curve[h - 1]
    beats = [i < c for i, c in zip(curves["imag_err"], curves["copy_err"])]
    metrics["imag_beats_copy_up_to_h"] = (beats + [False]).index(False)  # it beats copying at h1 to this h (0: not h1)
    draw(example, curves, picture)
    return metrics


def heldout_metrics(world_model, val, segment_steps, device):
    """Accuracy and cross-entropy of each head over the held-out episodes, cut into
    consecutive segments of segment_steps steps from each episode's start; and the accuracy on the rare events
    that plain accuracy hides: steps with a nonzero reward, steps where the episode ended."""
    steps = torch.arange(len(val["episode"]))
    starts = steps[(steps - val["episode_start"]) % segment_steps == 0]
    sums = defaultdict(float)
    for chunk in starts.split(64):
        batch = {k: v.to(device) for k, v in segments(val, chunk, segment_steps).items()}
        for name, (logits, labels) in world_model.logits_and_labels(batch).items():
            keep = labels != -100
            logits, labels = logits[keep].float(), labels[keep]
            correct = logits.argmax(-1) == labels
            sums[f"{name}_ce"] += nn.functional.cross_entropy(logits, labels, reduction="sum").item()
            sums[f"{name}_acc"] += correct.sum().item()
            sums[f"{name}_n"] += len(labels)
            if name != "obs":
                event = labels != 1 if name == "reward" else labels == 1  # reward class 1 is 0
                sums[f"{name}_event_acc"] += correct[event].sum().item()
                sums[f"{name}_event_n"] += event.sum().item()
    metrics = {f"val_{name}_{m}": sums[f"{name}_{m}"] / sums[f"{name}_n"]
               for name in ("obs", "reward", "end") for m in ("acc", "ce")}
    for name in ("reward", "end"):  # 0 when there is no such event in the held-out episodes
        metrics[f"val_{name}_event_acc"] = sums[f"{name}_event_acc"] / max(1, sums[f"{name}_event_n"])
    return metrics


def imagination_starts(episode, horizon, num_starts):
    """Up to num_starts held-out steps, evenly spread, each with `horizon` more steps in its episode
    (episode: (N,) episode numbers); train_wm.py asks right after collecting, before anything trains."""
    valid = torch.nonzero(episode[horizon:] == episode[:max(0, len(episode) - horizon)]).squeeze(1)
    if len(valid) == 0:
        raise UserError(f"no held-out episode has more than --horizon {horizon} steps: lower --horizon, or raise "
                        "--collect-steps or --val-fraction")
    return valid[torch.linspace(0, len(valid) - 1, min(num_starts, len(valid))).long()]


def imagine(world_model, tokenizer, val, scale, horizon, num_starts, seed, device):
    """Open-loop imagination from up to num_starts held-out starts (imagination_starts) with the real
    actions, `horizon` steps (sampled from seed); per-horizon token accuracy and error of the world model
    and of copying the start observation; imagined steps per second (all starts imagine at once, as one batch)."""
    H = horizon
    starts = imagination_starts(val["episode"], H, num_starts)
    env = imagination_env(world_model, tokenizer, generator=torch.Generator(device).manual_seed(seed))
    real, real_tokens = val["obs"][starts], val["obs_tokens"][starts]  # the start observations, copied
    curves = {"imag_acc": [], "copy_acc": [], "imag_err": [], "copy_err": []}
    seconds = 0.0
    with lora.folded(world_model):  # an LM's adapters folded into copies of its weights (no gradients here)
        obs, info = env.reset(real.to(device))
        imagined = [obs.cpu()]
        for h in range(1, H + 1):
            t = time.time()
            obs, _, _, _, info = env.step(val["actions"][starts + h - 1].to(device))
            seconds += time.time() - t
            imagined.append(obs.cpu())
            real_next = val["obs"][starts + h]
            next_tokens = val["obs_tokens"][starts + h]
            curves["imag_acc"].append((info["obs_tokens"].cpu() == next_tokens).float().mean().item())
            curves["copy_acc"].append((real_tokens == next_tokens).float().mean().item())
            curves["imag_err"].append(((obs.cpu().float() - real_next.float()).abs() / scale).mean().item())
            curves["copy_err"].append(((real.float() - real_next.float()).abs() / scale).mean().item())
    i = len(starts) // 2  # a start from the middle of the held-out data, not an episode's first frame
    example = {"real": val["obs"][starts[i]:starts[i] + H + 1], "imagined": torch.stack(imagined)[:, i]}
    if isinstance(tokenizer, DiscreteTokenizer):  # the state's token (state - start): one plot, not one per cell
        example = {k: tokenizer.encode(v).float() for k, v in example.items()}
    return curves, example, len(starts) * H / seconds


def draw(example, curves, path):
    """Real vs imagined: frames side by side, or one plot per vector dimension (a state: its token); and the
    error per horizon of the world model and of the copy baseline."""
    from PIL import Image, ImageDraw

    real, imagined = example["real"], example["imagined"]
    panel_w, panel_h = 300, 140
    if real.dim() == 4:  # frames (T, 64, 64, 3): a row of real, a row of imagined
        rows = torch.cat([torch.cat(list(real), 1), torch.cat(list(imagined), 1)], 0).numpy()
        top = Image.fromarray(rows)
        plots = []
    else:
        top = None
        plots = [(f"dim {d}: real (black) vs imagined (red)",
                  {"black": real[:, d].tolist(), "red": imagined[:, d].tolist()}) for d in range(real.shape[1])]
    plots.append(("error per step: imagined (red) vs copy (grey)",
                  {"red": curves["imag_err"], "gray": curves["copy_err"]}))
    width = max(0 if top is None else top.width, panel_w * len(plots))
    height = (0 if top is None else top.height) + panel_h
    image = Image.new("RGB", (width, height), "white")
    if top is not None:
        image.paste(top, (0, 0))
    canvas = ImageDraw.Draw(image)
    y0 = 0 if top is None else top.height
    for i, (title, series) in enumerate(plots):
        x0 = i * panel_w
        values = [v for vs in series.values() for v in vs]
        lo, hi = min(values), max(values)
        span = (hi - lo) or 1.0
        canvas.rectangle([x0 + 5, y0 + 20, x0 + panel_w - 5, y0 + panel_h - 5], outline="lightgray")
        canvas.text((x0 + 8, y0 + 4), title, fill="black")
        for color, vs in series.items():
            points = [(x0 + 10 + (panel_w - 20) * t / max(1, len(vs) - 1),
                       y0 + panel_h - 10 - (panel_h - 35) * (v - lo) / span) for t, v in enumerate(vs)]
            canvas.line(points, fill=color, width=2)
    try:  # written beside, then renamed: a full disk leaves the previous picture whole
        image.save(path + ".tmp", format="PNG")
        os.replace(path + ".tmp", path)
    except OSError as e:
        if os.path.exists(path + ".tmp"):
            os.remove(path + ".tmp")
        raise UserError(f"cannot save {path} ({write_failure(e, os.path.dirname(path) or '.')}); the last "
                        "checkpoint, if any, is unchanged: free some space or choose another --out-dir") from e


def main():
    raise UserError("eval_wm.py is the library train_wm.py evaluates with; to evaluate a saved world model, run "
                    "python train_wm.py --eval-only --resume DIR")


if __name__ == "__main__":
    run_cli(main)
