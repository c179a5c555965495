"""Train PaRa's loss plot: the training loss per step and the validation loss at its steps, on one image.

Core's Plot Loss Graph reads only ``loss_map["loss"]``; Train PaRa's loss_map also carries
``validation_loss`` at ``validation_step`` (absolute step numbers; step 0 is before training), so the node
draws both itself, on one step axis and one loss axis, and shows the image beside its previews.
"""
from __future__ import annotations

import numpy as np
import torch

WIDTH, HEIGHT, MARGIN = 640, 360, 48
TRAIN_COLOUR, VALIDATION_COLOUR = (40, 90, 200), (230, 120, 20)


def series(loss_map: dict) -> tuple[list[tuple[int, float]], list[tuple[int, float]]]:
    """(step, loss) pairs of training and validation. The training history ends at the last step (the
    validation's last step when there is one, else its own length): loss[i] is the loss of step
    end - len + i + 1 (a resumed run's history starts where the file it continued began)."""
    train = list(loss_map.get("loss", []))
    val = list(zip(loss_map.get("validation_step", []), loss_map.get("validation_loss", [])))
    end = max([len(train)] + [s for s, _ in val])
    first = end - len(train) + 1
    return [(first + i, float(v)) for i, v in enumerate(train)], [(int(s), float(v)) for s, v in val]


def loss_plot(loss_map: dict) -> torch.Tensor:
    """The plot as an IMAGE batch (1, H, W, 3) float in [0, 1]: training loss in blue, validation in orange
    (dots joined by lines), axes labelled with the step range and the loss range."""
    from PIL import Image, ImageDraw, ImageFont
    train, val = series(loss_map)
    points = train + val
    img = Image.new("RGB", (WIDTH + 2 * MARGIN, HEIGHT + 2 * MARGIN), "white")
    draw = ImageDraw.Draw(img)
    font = ImageFont.load_default()
    if points:
        s0, s1 = min(s for s, _ in points), max(s for s, _ in points)
        lo, hi = min(v for _, v in points), max(v for _, v in points)
        span_s, span_v = max(1, s1 - s0), (hi - lo) or 1.0

        def xy(step: int, value: float) -> tuple[int, int]:
            return (MARGIN + round((step - s0) / span_s * WIDTH), MARGIN + HEIGHT - round((value - lo) / span_v * HEIGHT))
        if len(train) > 1:
            draw.line([xy(s, v) for s, v in train], fill=TRAIN_COLOUR, width=2)
        if len(val) > 1:
            draw.line([xy(s, v) for s, v in val], fill=VALIDATION_COLOUR, width=2)
        for s, v in val:
            x, y = xy(s, v)
            draw.ellipse((x - 3, y - 3, x + 3, y + 3), fill=VALIDATION_COLOUR)
        draw.text((4, MARGIN - 6), f"{hi:.4f}", font=font, fill="black")
        draw.text((4, MARGIN + HEIGHT - 6), f"{lo:.4f}", font=font, fill="black")
        draw.text((MARGIN, MARGIN + HEIGHT + 6), f"step {s0}", font=font, fill="black")
        draw.text((MARGIN + WIDTH - 60, MARGIN + HEIGHT + 6), f"step {s1}", font=font, fill="black")
    draw.line([(MARGIN, MARGIN), (MARGIN, MARGIN + HEIGHT), (MARGIN + WIDTH, MARGIN + HEIGHT)], fill="black", width=1)
    draw.text((MARGIN + 8, 8), "training loss", font=font, fill=TRAIN_COLOUR)
    draw.text((MARGIN + 128, 8), "validation loss (fixed noise)", font=font, fill=VALIDATION_COLOUR)
    return torch.from_numpy(np.asarray(img, dtype=np.float32) / 255.0)[None]
