"""
One small line chart with Pillow (no plotting library needed), shared by the experiments' pictures:
each series is a mean line with an optional band (its 95% interval).

    draw([{"label": "z = mu", "points": [(x, mean, half_width), ...]}, ...], "out.png",
         x_label="minutes", title="held-out token accuracy")
"""

from PIL import Image, ImageDraw

from common import UserError

COLORS = ["red", "blue", "green", "orange", "purple", "gray"]


def draw(series, path, x_label, title, y_digits=0):
    """Lines of (x, mean, half) points, a band drawn where half > 0; the y axis starts at 0 (or below,
    where a band goes); y_digits: decimals on the y axis."""
    W, H, left, bottom, top, right = 640, 400, 60, 40, 30, 20
    xs = [x for s in series for x, _, _ in s["points"]]
    ys = [v for s in series for _, mean, half in s["points"] for v in (mean - half, mean + half)]
    x_hi, y_lo, y_hi = max(xs) or 1.0, min(ys), max(ys)
    y_lo = min(0.0, y_lo)
    span = (y_hi - y_lo) or 1.0

    def at(x, y):
        return (left + (W - left - right) * x / x_hi, H - bottom - (H - top - bottom) * (y - y_lo) / span)

    image = Image.new("RGB", (W, H), "white")
    canvas = ImageDraw.Draw(image)
    canvas.rectangle([left, top, W - right, H - bottom], outline="lightgray")
    for k in range(5):
        x, y = x_hi * k / 4, y_lo + span * k / 4
        canvas.text((at(x, y_lo)[0] - 15, H - bottom + 5), f"{x:.0f}", fill="black")
        canvas.text((5, at(0, y)[1] - 6), f"{y:.{y_digits}f}", fill="black")
    canvas.text((W // 2 - 60, H - 18), x_label, fill="black")
    for i, s in enumerate(series):
        color = COLORS[i % len(COLORS)]
        if any(half > 0 for _, _, half in s["points"]):
            canvas.line([at(x, mean + half) for x, mean, half in s["points"]], fill=color, width=1)
            canvas.line([at(x, mean - half) for x, mean, half in s["points"]], fill=color, width=1)
        canvas.line([at(x, mean) for x, mean, _ in s["points"]], fill=color, width=3)
        canvas.text((left + 10, top + 5 + 14 * i), s["label"], fill=color)
    canvas.text((left, 8), title, fill="black")
    try:
        image.save(path)
    except (OSError, ValueError) as e:  # no such folder, or a name with no picture format Pillow knows
        raise UserError(f"cannot write the picture to {path} ({e}); give a path in an existing folder, ending in .png")
