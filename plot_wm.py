"""
The picture train_wm.py draws after each evaluation (OUT_DIR/imagination.png): real vs
imagined observations and the error per imagined step against the copy baseline. Pillow
only, imported here alone; its own file so train_wm.py reads as data, training, evaluation.
"""

import torch


def draw(example, curves, path):
    """Real vs imagined: frames side by side, or one plot per vector dimension; and the
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
    width = max(top.width if top else 0, panel_w * len(plots))
    height = (top.height if top else 0) + panel_h
    image = Image.new("RGB", (width, height), "white")
    if top:
        image.paste(top, (0, 0))
    canvas = ImageDraw.Draw(image)
    y0 = top.height if top else 0
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
    image.save(path)
