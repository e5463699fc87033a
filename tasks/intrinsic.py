"""
The HNC thesis's intrinsic metrics on (image, caption, hard negative) triplets: the mean positive,
hard-negative and random-negative cosines, their margin, and the distinguishing accuracy
(cos(v, t+) / (cos(v, t-) + eps) >= threshold). On the shapes world's test scenes, or on HNC's
test file.

    python eval.py --model out/clip_hardneg/ckpt.pt --bench intrinsic --threshold 1.0
    python eval.py --model out/clip_hardneg/ckpt.pt --bench intrinsic --data hnc --data_root ~/data/hnc
"""

import os

import torch

import shapes
from data import DataError, read_json
from eval import SHAPES_SIZE
from tasks.common import Chooser, bench_root, first_file, text_field


def intrinsic_metrics(pos_cos, neg_cos, rand_cos, threshold=1.0, eps=1e-8):
    """The HNC thesis's intrinsic metrics. pos_cos, neg_cos: [n] cos(image, caption) and cos(image,
    its hard negative) per triplet; rand_cos: [m] cos(image, another image's caption), one per image.
    Distinguishing accuracy: the fraction with cos(v, t+) / (cos(v, t-) + eps) >= threshold, as the
    thesis defines it (eps 1e-8; with a negative denominator the ratio flips, a quirk kept as is);
    pairwise_acc is the plain cos(v, t+) > cos(v, t-). Both count a tie wrong."""
    # float64: in float32 (the thesis's code) 1e-8 vanishes next to a cosine of 0.3, and a tie's
    # ratio would be exactly 1 and count as distinguished at the default threshold
    ratio = pos_cos.double() / (neg_cos.double() + eps)
    return {
        "pos_cos": pos_cos.mean().item(),
        "hard_neg_cos": neg_cos.mean().item(),
        "margin": (pos_cos.mean() - neg_cos.mean()).item(),
        "rand_neg_cos": rand_cos.mean().item(),
        "distinguish_acc": (ratio >= threshold).float().mean().item(),
        "pairwise_acc": (pos_cos > neg_cos).float().mean().item(),
    }


def read_hnc_test(path, image_dir):
    """HNC's test file: {"<gqa image>.jpg": {"<n>": {caption, label (1 positive, 0 negative), type,
    ...}}}. Within an image and a type, positives and negatives pair up in id order, as the thesis
    pairs them; a group with unequal counts is skipped and counted.
    -> ([(image path, positive, negative, type)], skipped groups)"""
    rows, out, skipped = read_json(path), [], 0
    if not isinstance(rows, dict):
        raise DataError(f"{path}: expected a JSON object keyed by image file")
    for image, caps in rows.items():
        groups = {}
        try:
            for cid in sorted(caps, key=int):
                c = caps[cid]
                if c["label"] not in (0, 1):
                    raise ValueError(f"label {c['label']!r}")
                groups.setdefault(c.get("type", "default"), ([], []))[1 - c["label"]].append(
                    text_field(c, "caption", f"{path}: {image} caption {cid}")
                )
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            raise DataError(f"{path}: {image}: malformed captions ({e})") from None
        for kind, (pos, neg) in groups.items():
            if len(pos) != len(neg):
                skipped += 1
                continue
            out += [(os.path.join(image_dir, image), p, n, kind) for p, n in zip(pos, neg)]
    return out, skipped


@torch.no_grad()
def evaluate(
    model,
    preprocess,
    tokenizer,
    device,
    source="shapes",
    root=None,
    image_root=None,
    threshold=1.0,
    n=1000,
    seed=None,
    image_size=SHAPES_SIZE,
):
    """Intrinsic metrics on triplets (image, caption, hard negative). shapes: n test scenes, each with
    every hard-negative kind (pooled, then per kind), rendered at image_size and put through
    preprocess. hnc: HNC's test file (root/hnc_clean_strict_test.json, GQA images under image_root,
    default root/images). The random negative of each distinct image is the caption of the next one."""
    from PIL import Image

    choose = Chooser("intrinsic", model, preprocess, tokenizer, device)
    if source == "shapes":
        scenes = shapes.test_scenes(n, shapes.TEST_SEED if seed is None else seed)
        images = [Image.fromarray(shapes.render(s, image_size)) for s in scenes]
        triplets = [
            (im, s.caption(), fn(s), kind)
            for kind, fn in shapes.NEGATIVES.items()
            for im, s in zip(images, scenes)
        ]
    else:
        bench_root("intrinsic", root, "hnc_clean_strict_test.json and images/")
        path = first_file("intrinsic", [os.path.join(root, "hnc_clean_strict_test.json")], "HNC's test file")
        triplets, skipped = read_hnc_test(path, image_root or os.path.join(root, "images"))
        if skipped:
            print(
                f"intrinsic: skipped {skipped} image/type group(s) of {path} with unequal positives and negatives"
            )
        if not triplets:
            raise DataError(f"intrinsic: {path} has no positive/negative pair")
    scores, readable = choose.scores([(im, [p, q]) for im, p, q, _ in triplets], "triplets")
    first = {}  # each distinct image (pil images by identity) -> (image, its first caption)
    for im, p, _, _ in triplets:
        first.setdefault(im if isinstance(im, str) else id(im), (im, p))
    firsts = list(first.values())
    rand, rand_ok = choose.scores(
        [(im, [firsts[(i + 1) % len(firsts)][1]]) for i, (im, _) in enumerate(firsts)],
        "random negatives",
        count=False,
    )
    kinds = [t[3] for t in triplets]
    out = {
        f"intrinsic/{k}": v
        for k, v in intrinsic_metrics(
            scores[readable, 0], scores[readable, 1], rand[rand_ok, 0], threshold
        ).items()
    }
    if source == "shapes":
        for kind in shapes.NEGATIVES:
            mask = readable & torch.tensor([k == kind for k in kinds])
            m = intrinsic_metrics(scores[mask, 0], scores[mask, 1], rand[rand_ok, 0], threshold)
            out |= {
                f"intrinsic/{kind}/{k}": m[k] for k in ("hard_neg_cos", "distinguish_acc", "pairwise_acc")
            }
    return out | choose.counts()


def run(model, preprocess, tokenizer, device, args):
    return evaluate(
        model,
        preprocess,
        tokenizer,
        device,
        source=args.data,
        root=args.data_root,
        image_root=args.image_root,
        threshold=args.threshold,
        n=args.eval_n,
        seed=args.seed,
        image_size=args.image_size,
    )
