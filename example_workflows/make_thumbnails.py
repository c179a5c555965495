"""Draw the template-browser thumbnail of each example workflow: <name>.jpg next to <name>.json.

ComfyUI front end 1.35.9 shows a custom-node template as a card: the file name as title, the file name
with '_'/'-' turned into spaces as description (it reads no title/description metadata for custom-node
templates), and `/api/workflow_templates/<pack>/<name>.jpg` as thumbnail, a gradient placeholder when that
file is missing. So the readable title and one-line description live here and are drawn on the thumbnail,
above a diagram of the workflow (its nodes at their canvas positions, PaRa nodes highlighted, links).
The test models have random weights, so a generated image would show nothing.

Front end 1.49.6 does the same and draws a "Node graph" badge over the top left corner of every thumbnail
(about 180 x 48 px of the 384 px image, measured in Chromium; longer in other languages), so nothing is
drawn above TITLE_TOP: the title starts below the badge (tests/integration/test_browser.py checks the
badge's box against TITLE_TOP on the real card).

Run with ComfyUI's Python (needs Pillow): python example_workflows/make_thumbnails.py
"""
from __future__ import annotations

import json
import os
import sys

from PIL import Image, ImageDraw, ImageFont

HERE = os.path.dirname(os.path.abspath(__file__))
SIZE = 384
TITLE_TOP = 64  # px of the image kept free at the top for the front end's badges
CARDS = {  # file name: (title, one-line description)
    "para_personalised_generation": ("Personalised generation", "Load a PaRa file and generate your subject."),
    "para_two_subjects_merged": ("Two subjects, merged", "Merge two PaRa (sequential vs union) into one model."),
    "para_regional_two_subjects": ("Two subjects by region", "Hook PaRa per masked prompt: A left, B right, no merge."),
    "para_with_style_lora": ("Subject + style LoRA", "PaRa (subject) and a LoRA (style) combined per layer."),
    "para_train_subject": ("Train a subject", "Train PaRa on 5-6 photos, save it, generate."),
    "para_train_one_shot_edit": ("One-shot edit", "Train on one image, then change the prompt."),
    "para_train_multi_subject": ("Train two subjects", "One PaRa per subject, merged into one image."),
    "para_train_sdxl_subject": ("Train a subject (SDXL)", "Train PaRa on an SDXL checkpoint."),
    "para_train_flux_subject": ("Train a subject (Flux)", "Train PaRa on a Flux model."),
}
BG, BOX, PARA, TEXT, SUB, LINK = (24, 26, 31), (58, 62, 72), (64, 120, 200), (240, 240, 240), (170, 176, 186), (120, 126, 140)


def _font(size: int):
    for path in ("/usr/share/fonts/truetype/dejavu/DejaVuSans-Bold.ttf", "DejaVuSans-Bold.ttf"):
        try:
            return ImageFont.truetype(path, size)
        except OSError:
            continue
    return ImageFont.load_default(size=size)


def _wrap(draw, text: str, font, width: int) -> list[str]:
    lines, cur = [], ""
    for word in text.split():
        trial = f"{cur} {word}".strip()
        if draw.textlength(trial, font=font) <= width or not cur:
            cur = trial
        else:
            lines.append(cur)
            cur = word
    return lines + ([cur] if cur else [])


def thumbnail(workflow: dict, title: str, description: str) -> Image.Image:
    img = Image.new("RGB", (SIZE, SIZE), BG)
    d = ImageDraw.Draw(img)
    size = 26
    while size > 16 and d.textlength(title, font=_font(size)) > SIZE - 32:  # the whole title on one line
        size -= 1
    d.text((16, TITLE_TOP), title, font=_font(size), fill=TEXT)
    y = TITLE_TOP + size + 10
    for line in _wrap(d, description, _font(15), SIZE - 32):
        d.text((16, y), line, font=_font(15), fill=SUB)
        y += 20
    nodes = [n for n in workflow["nodes"] if n["type"] not in ("Note", "MarkdownNote")]
    x0 = min(n["pos"][0] for n in nodes)
    y0 = min(n["pos"][1] for n in nodes)
    x1 = max(n["pos"][0] + n["size"][0] for n in nodes)
    y1 = max(n["pos"][1] + n["size"][1] for n in nodes)
    top, margin = y + 14, 16
    scale = min((SIZE - 2 * margin) / (x1 - x0), (SIZE - top - margin) / (y1 - y0))
    top += ((SIZE - top - margin) - (y1 - y0) * scale) / 2  # centre the diagram below the text
    box = {n["id"]: (margin + (n["pos"][0] - x0) * scale, top + (n["pos"][1] - y0) * scale,
                     margin + (n["pos"][0] + n["size"][0] - x0) * scale, top + (n["pos"][1] + n["size"][1] - y0) * scale) for n in nodes}
    for _lid, src, _s, dst, _d, _t in workflow["links"]:
        if src in box and dst in box:
            a, b = box[src], box[dst]
            d.line([(a[2], (a[1] + a[3]) / 2), (b[0], (b[1] + b[3]) / 2)], fill=LINK, width=2)
    label = _font(11)
    for n in nodes:
        b = box[n["id"]]
        is_para = n["type"].startswith("PaRa")
        d.rounded_rectangle(b, radius=4, fill=PARA if is_para else BOX, outline=(200, 210, 230) if is_para else None)
        name = (n.get("title") or n["type"]).split(" (")[0].split(":")[0]
        if is_para and d.textlength(name, font=label) <= b[2] - b[0] - 8 and b[3] - b[1] >= 16:
            d.text((b[0] + 4, b[1] + 3), name, font=label, fill=TEXT)
    return img


def main(names: list[str]) -> None:
    for name in names or sorted(f[:-5] for f in os.listdir(HERE) if f.endswith(".json")):
        if name not in CARDS:
            print(f"{name}: no title/description in CARDS, skipped", file=sys.stderr)
            continue
        with open(os.path.join(HERE, f"{name}.json"), encoding="utf-8") as f:
            wf = json.load(f)
        path = os.path.join(HERE, f"{name}.jpg")
        thumbnail(wf, *CARDS[name]).save(path, quality=85, optimize=True)
        print(f"{path}: {os.path.getsize(path) // 1024} KiB")


if __name__ == "__main__":
    main(sys.argv[1:])
