"""
What a CLIPS captioner reads off the image: greedy token accuracy on the shapes test scenes'
descriptions, by word kind, given each scene's partial or full web caption. The captioner's
queries never read predictions, so greedy decoding is one teacher-free pass and position q is
compared with token q+1 of shapes.description(scene).

    python bench/studies/captioner_tokens.py out/clips_study_partial/captioner_s*/ckpt.pt
    python bench/studies/captioner_tokens.py out/clips_study/captioner_s0/ckpt.pt --caption_style full
"""

import argparse
import collections
import os
import random
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
import data  # noqa: E402
import shapes  # noqa: E402
from eval import load_captioner  # noqa: E402
from model import load_model  # noqa: E402

KINDS = {
    **{w: "colour" for w in shapes.COLOURS},
    **{w: "size" for w in shapes.SIZES},
    **{w: "background" for w in shapes.BACKGROUNDS},
    **{w: "shape" for w in shapes.SHAPES},
    **{w: "relation" for w in ("left", "right", "above", "below", "top", "bottom")},
}
COLUMNS = ["all", "colour", "size", "background", "shape", "relation", "other"]


@torch.no_grad()
def accuracy(ckpt, caption_style, n, batch=50):
    model, _, tok = load_model(ckpt)
    captioner = load_captioner(ckpt)
    kind_of = {tok.encode(w)[0]: k for w, k in KINDS.items()}  # each is a single token
    target_tok, hit, count = data.get_tokenizer(77), collections.Counter(), collections.Counter()
    scenes = shapes.test_scenes(n)
    for i in range(0, n, batch):
        part = scenes[i : i + batch]
        webs = [
            shapes.partial_caption(s, random.Random(i + j)) if caption_style == "partial" else s.caption()
            for j, s in enumerate(part)
        ]
        images = torch.stack([data.to_tensor(shapes.render(s, model.image_size)) for s in part])
        web = tok(webs)
        logits = captioner(
            model.encode_image(images, return_tokens=True)[1],
            model.encode_text(web, return_tokens=True)[1],
            web,
        )
        pred = captioner.greedy(logits)
        target = target_tok([shapes.description(s) for s in part])[:, 1:]  # query q predicts token q + 1
        for b, t in enumerate(target.tolist()):
            for q in range(t.index(tok.eot_token_id) + 1):  # real tokens and the EOT, no padding
                for key in (kind_of.get(t[q], "other"), "all"):
                    count[key] += 1
                    hit[key] += int(pred[b, q] == t[q])
    return {k: hit[k] / count[k] for k in COLUMNS}


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("ckpts", nargs="+", help="clip_scratch.py checkpoints trained with --captioner_weight")
    p.add_argument(
        "--caption_style",
        default="partial",
        choices=shapes.CAPTION_STYLES,
        help="the web caption each scene is given",
    )
    p.add_argument("--n", type=int, default=300, help="test scenes")
    args = p.parse_args()
    torch.set_num_threads(1)
    print("| checkpoint | " + " | ".join(COLUMNS) + " |\n|---|" + "---|" * len(COLUMNS))
    rows = []
    for ckpt in args.ckpts:
        rows.append(accuracy(ckpt, args.caption_style, args.n))
        print(f"| {ckpt} | " + " | ".join(f"{rows[-1][k]:.3f}" for k in COLUMNS) + " |", flush=True)
    if len(rows) > 1:
        print("| mean | " + " | ".join(f"{sum(r[k] for r in rows) / len(rows):.3f}" for k in COLUMNS) + " |")


if __name__ == "__main__":
    main()
