"""
Evaluation shared by every minclip script, and a CLI.

    python eval.py --model out/clip_scratch/ckpt.pt --bench shapes --json results.json
    python eval.py --model ViT-B-32:openai --bench shapes          # any open_clip NAME:PRETRAINED
    python eval.py --model local-dir:out/export --bench flickr8k --data_root ~/data/flickr8k
    python eval.py --model out/clip_scratch/ckpt.pt --query "a small red circle left of a large blue square" --top 9 --grid grid.png
    python eval.py --model out/clip_scratch/ckpt.pt --export out/export   # open_clip hub directory
    python eval.py --model out/clips/ckpt.pt --caption 7                  # CLIPS captioner, shapes test scene 7
    python eval.py --model ViT-B-32:openai --bench sugarcrepe --data_root ~/data/sugar-crepe --image_root ~/data/coco/val2017
    python eval.py --model out/clip_hardneg/ckpt.pt --bench aro --data_root ~/data/aro     # also valse, vlchecklist
    python eval.py --model out/clip_hardneg/ckpt.pt --bench intrinsic --threshold 1.0      # HNC metrics, shapes world
    python eval.py --model out/clip_scratch/ckpt.pt --explain 7 --out explain.png          # which words match which patches
    python eval.py --model out/clip_dpo/ckpt.pt --bench vsr --data_root ~/data/vsr [--vsr_split zeroshot]
    python eval.py --model out/rm/ckpt.pt --rank candidates.jsonl --out rankings.jsonl   # a reward model ranks candidates

Protocols: the unwrapped model in eval mode under no_grad, on the whole
fixed split. Retrieval: image->text rank = best rank among the image's captions, text->image one
rank per caption; i2t is CLIP_benchmark's `text_retrieval_recall@k`, t2i its
`image_retrieval_recall@k`. Pairwise probes: correct iff the positive scores strictly higher.
Ties count against the model everywhere (retrieval included), so a collapsed model whose
embeddings cannot tell two captions apart never gets credit for either. VSR (and the shapes
world's vsr/ keys): true/false statements scored two ways, accuracy and per-class / macro
precision, recall and F1 -- contrast (True iff the caption beats the caption with its relation
replaced by the contrast relation) and threshold (True iff cos > tau, tau fitted on dev).
"""
import argparse
import codecs
import difflib
import json
import math
import os
import random
import re
import time
import zipfile

import numpy as np
import torch

import data
from model import CLIP, Captioner

SHAPES_SIZE = 64  # the shapes bench's default resolution, what external models see before their preprocess
LABEL_H = 16      # height of the score strip under each image of a --grid

# -----------------------------------------------------------------------------
# metrics


def retrieval_metrics(sim, text_to_image, ks=(1, 5, 10)):
    """sim: [n_images, n_texts] scores; text_to_image: [n_texts] long, the image each text describes.
    Returns R@k for i2t (an image is found at the best rank among its captions) and t2i (one rank
    per caption), the median ranks (1-based, floor of numpy's median + 1 as in VSE++) and rsum.
    A rank counts every wrong item scoring >= the right one: ties are resolved against the model."""
    sim, text_to_image = sim.float().cpu(), text_to_image.long().cpu()
    cols = torch.arange(sim.shape[1])
    true = torch.zeros_like(sim, dtype=torch.bool)
    true[text_to_image, cols] = True
    # t2i: for each text, the wrong images scoring >= its own image
    t2i_rank = ((sim >= sim[text_to_image, cols][None, :]) & ~true).sum(0)
    # i2t: for each image, the wrong texts scoring >= its best caption
    best = sim.masked_fill(~true, float("-inf")).max(1).values  # [n_images]
    i2t_rank = ((sim >= best[:, None]) & ~true).sum(1)
    out = {}
    for name, ranks in (("i2t", i2t_rank), ("t2i", t2i_rank)):
        for k in ks:
            out[f"retrieval/{name}_r{k}"] = (ranks < k).float().mean().item()
        out[f"retrieval/{name}_medr"] = ranks.float().quantile(0.5).floor().item() + 1
    out["retrieval/rsum"] = 100 * sum(out[f"retrieval/{n}_r{k}"] for n in ("i2t", "t2i") for k in ks)
    return out


def pairwise_accuracy(pos_scores, neg_scores):
    """fraction where the positive scores strictly higher than the negative (ties are wrong)."""
    return (pos_scores > neg_scores).float().mean().item()

def binary_metrics(pred, label):
    """VSR's metrics for true/false predictions: pred, label bool [n] -> accuracy, and per class
    (true, false) precision, recall and F1, and their macro means (macro F1 = the mean of the two
    per-class F1s, not the F1 of the macro precision and recall). 0 where a denominator is 0."""
    pred, label = torch.as_tensor(pred, dtype=torch.bool), torch.as_tensor(label, dtype=torch.bool)
    out = {"acc": (pred == label).float().mean().item()}
    for name, p, t in (("true", pred, label), ("false", ~pred, ~label)):
        tp, n_pred, n_true = (p & t).sum().item(), p.sum().item(), t.sum().item()
        precision, recall = tp / n_pred if n_pred else 0.0, tp / n_true if n_true else 0.0
        out |= {f"{name}_precision": precision, f"{name}_recall": recall,
                f"{name}_f1": 2 * precision * recall / (precision + recall) if precision + recall else 0.0}
    for m in ("precision", "recall", "f1"):
        out[f"macro_{m}"] = (out[f"true_{m}"] + out[f"false_{m}"]) / 2
    return out


def calibrate_threshold(scores, label):
    """the threshold tau that maximises the accuracy of "true iff score > tau" on (scores, label),
    float / bool [n]; candidates: below every score, and the midpoints between consecutive distinct
    scores (the lowest tau among equally good ones)."""
    s = torch.as_tensor(scores, dtype=torch.float64).unique()  # sorted
    candidates = torch.cat([s[:1] - 1, (s[1:] + s[:-1]) / 2])
    scores, label = torch.as_tensor(scores, dtype=torch.float64), torch.as_tensor(label, dtype=torch.bool)
    acc = ((scores[None, :] > candidates[:, None]) == label[None, :]).double().mean(1)
    return candidates[acc.argmax()].item()  # argmax returns the first maximum

# -----------------------------------------------------------------------------
# encoding helpers


@torch.no_grad()
def encode_images(model, images, device, batch_size=256):
    return torch.cat([model.encode_image(images[i:i + batch_size].to(device), normalize=True).float().cpu()
                      for i in range(0, len(images), batch_size)])


@torch.no_grad()
def encode_texts(model, tokenizer, texts, device, batch_size=256):
    return torch.cat([model.encode_text(tokenizer(texts[i:i + batch_size]).to(device), normalize=True).float().cpu()
                      for i in range(0, len(texts), batch_size)])


def open_rgb(image):
    """a PIL image, or a path to one -> RGB PIL image"""
    from PIL import Image
    if isinstance(image, Image.Image):
        return image.convert("RGB")
    try:
        with Image.open(image) as im:
            return im.convert("RGB")
    except (OSError, ValueError) as e:  # a test split must be whole: fail with the file's name
        raise SystemExit(f"error: {image}: unreadable image ({e})")


def encode_pil(model, preprocess, images, device, batch_size=128):
    """images: PIL images or paths, decoded one batch at a time (coco's 5k test photos decoded at
    once would take ~5 GB) -> [n, D] normalised features"""
    return torch.cat([encode_images(model, torch.stack([preprocess(open_rgb(im)) for im in images[i:i + batch_size]]), device)
                      for i in range(0, len(images), batch_size)])

# -----------------------------------------------------------------------------
# benchmarks


@torch.no_grad()
def eval_shapes(model, tokenizer, image_size, device, n=1000, seed=None, preprocess=None):
    """The built-in shapes benchmark: retrieval over n test scenes with unique content, and one
    pairwise probe per hard-negative kind (the scene's own caption vs the negative)."""
    was_training = model.training
    model.eval()
    scenes = data.test_scenes(n, data.TEST_SEED if seed is None else seed)
    if preprocess is None:  # minclip models: the world renders at the model's resolution
        images = torch.stack([data.to_tensor(data.render(s, image_size)) for s in scenes])
    else:  # external models: render, then their own preprocessing
        from PIL import Image
        images = torch.stack([preprocess(Image.fromarray(data.render(s, image_size))) for s in scenes])
    img = encode_images(model, images, device)
    txt = encode_texts(model, tokenizer, [s.caption() for s in scenes], device)
    out = retrieval_metrics(img @ txt.T, torch.arange(n))
    pos = (img * txt).sum(-1)
    for kind, fn in data.NEGATIVES.items():
        neg = encode_texts(model, tokenizer, [fn(s) for s in scenes], device)
        out[f"probe/{kind}"] = pairwise_accuracy(pos, (img * neg).sum(-1))
        if kind == "relation":
            out["diag/relation_text_cos"] = (txt * neg).sum(-1).mean().item()
    # VSR's contrast protocol on the scenes' true/false statements ("The red circle is left of the
    # blue square."): two rows per scene, the true statement and its converse, balanced
    rows = [(i, text, label, rel) for i, s in enumerate(scenes) for (text, label), rel in zip(data.statements(s), (s.relation(), data.CONVERSE[s.relation()]))]
    index, texts, labels, relations = zip(*rows)
    m = vsr_contrast(img[list(index)], encode_texts(model, tokenizer, list(texts), device),
                     encode_texts(model, tokenizer, [data.contrast_caption(t, r) for t, r in zip(texts, relations)], device), labels)
    out["vsr/acc"], out["vsr/macro_f1"] = m["acc"], m["macro_f1"]
    model.train(was_training)
    return out


def vsr_contrast(image, caption, contrast, label):
    """VSR's contrast protocol: predict True iff the image scores its caption strictly higher than
    the caption with the relation replaced by its contrast; the target is the row's label, whichever
    string was edited, so a model that always prefers the unedited caption scores the fraction of
    true rows (0.5 on a balanced set). image, caption, contrast: [n, D] normalised features; label
    bool [n] -> binary_metrics."""
    return binary_metrics((image * caption).sum(-1) > (image * contrast).sum(-1), label)


@torch.no_grad()
def eval_vsr(model, preprocess, tokenizer, rows, calib_rows, device, batch_size=128):
    """VSR, both protocols, on rows (data.VSRRow) -> {"vsr/..." (contrast), "vsr_threshold/..."}.
    - contrast: vsr_contrast on every row whose relation has a contrast (data.VSR_CONTRAST); rows
      with a skipped relation are counted in vsr/skipped, vsr/n is the number scored;
    - threshold: predict True iff cos(image, caption) > tau, tau = calibrate_threshold on calib_rows
      (the dev split), applied to every row.
    Each: accuracy, per-class precision/recall/F1 and the macro means (binary_metrics)."""
    was_training = model.training
    model.eval()
    paths = sorted({r.image for r in [*rows, *calib_rows]})
    where = {p: i for i, p in enumerate(paths)}
    img = encode_pil(model, preprocess, paths, device, batch_size)
    scored = [r for r in rows if data.VSR_CONTRAST[r.relation] is not None]
    out = {}
    if scored:
        m = vsr_contrast(img[[where[r.image] for r in scored]],
                         encode_texts(model, tokenizer, [r.caption for r in scored], device, batch_size),
                         encode_texts(model, tokenizer, [data.contrast_caption(r.caption, r.relation) for r in scored], device, batch_size),
                         [r.label for r in scored])
        out |= {f"vsr/{k}": v for k, v in m.items()}
    out |= {"vsr/n": len(scored), "vsr/skipped": len(rows) - len(scored)}

    def cosines(rs):
        return (img[[where[r.image] for r in rs]] * encode_texts(model, tokenizer, [r.caption for r in rs], device, batch_size)).sum(-1)
    tau = calibrate_threshold(cosines(calib_rows), [r.label for r in calib_rows])
    m = binary_metrics(cosines(rows) > tau, [r.label for r in rows])
    out |= {f"vsr_threshold/{k}": v for k, v in m.items()} | {"vsr_threshold/tau": tau}
    model.train(was_training)
    return out


@torch.no_grad()
def rank_candidates(model, preprocess, tokenizer, rows, device, batch_size=128):
    """Score every candidate of data.read_rankings rows with a CLIP (a reward model trained by
    clip_dpo.py --loss bt, or any CLIP): cosine of the query and the candidate. -> per row, (the
    candidates' indices best first, their cosines in that order)."""
    model.eval()
    paths = sorted({p for r in rows for p in ([r["query"]] if r["direction"] == "i2t" else r["candidates"])})
    texts = sorted({t for r in rows for t in (r["candidates"] if r["direction"] == "i2t" else [r["query"]])})
    img = dict(zip(paths, encode_pil(model, preprocess, paths, device, batch_size)))
    txt = dict(zip(texts, encode_texts(model, tokenizer, texts, device, batch_size)))
    out = []
    for r in rows:
        query, cands = (img, txt) if r["direction"] == "i2t" else (txt, img)
        scores = torch.stack([query[r["query"]] @ cands[c] for c in r["candidates"]])
        order = scores.argsort(descending=True, stable=True)
        out.append((order.tolist(), scores[order].tolist()))
    return out


@torch.no_grad()
def eval_retrieval(model, preprocess, tokenizer, items, device, batch_size=128):
    """Real-data retrieval over a whole test split. items: [(image path, [captions], ...)]; a
    recaption file's third field, the synthetic caption, is not a test caption."""
    was_training = model.training
    model.eval()
    img = encode_pil(model, preprocess, [item[0] for item in items], device, batch_size)
    txt = encode_texts(model, tokenizer, [c for item in items for c in item[1]], device, batch_size)
    text_to_image = torch.tensor([i for i, item in enumerate(items) for _ in item[1]])
    model.train(was_training)
    return retrieval_metrics(img @ txt.T, text_to_image)


@torch.no_grad()
def find_matches(model, preprocess, tokenizer, images, query, device, k=9):
    """The retrieval demo: rank images (PIL images or paths) by cosine similarity to the query
    text -> [(index, score)] of the top k, best first."""
    model.eval()
    sim = encode_pil(model, preprocess, images, device) @ encode_texts(model, tokenizer, [query], device)[0]
    scores, idx = sim.topk(min(k, len(images)))
    return list(zip(idx.tolist(), scores.tolist()))


def save_grid(images, scores, path):
    """images (PIL or paths) as a square grid with the score written under each; tiny images
    (the shapes world) are upscaled with nearest neighbour so their pixels stay visible."""
    from PIL import Image, ImageDraw, ImageOps
    images = [open_rgb(im) for im in images]
    cols = math.ceil(math.sqrt(len(images)))
    rows = math.ceil(len(images) / cols)  # k = 9 -> 3 x 3
    cell = min(256, max(128, min(min(im.size) for im in images)))
    grid = Image.new("RGB", (cols * cell, rows * (cell + LABEL_H)), "white")
    draw = ImageDraw.Draw(grid)
    for j, (im, score) in enumerate(zip(images, scores)):
        x, y = (j % cols) * cell, (j // cols) * (cell + LABEL_H)
        small = min(im.size) < cell
        grid.paste(ImageOps.fit(im, (cell, cell), Image.Resampling.NEAREST if small else Image.Resampling.BICUBIC), (x, y))
        draw.text((x + 4, y + cell + 2), f"{score:.3f}", fill="black")  # pil's default bitmap font
    _save_png(grid, path)


def _save_png(image, path):
    """write to a temp file, then rename: a crash never leaves half a picture at path"""
    tmp = f"{path}.tmp.{os.getpid()}.png"  # keep the suffix: pil picks the format from it
    image.save(tmp)
    os.replace(tmp, path)


@torch.no_grad()
def generate_caption(model, captioner, image, web_caption, tokenizer, device="cpu"):
    """The CLIPS captioner's greedy caption of one image (float [3, S, S], preprocessed) given its
    web caption -> text (lowercase, bpe-spaced as the tokenizer decodes it)."""
    model.eval(), captioner.eval()
    web = tokenizer([web_caption]).to(device)
    _, image_tokens = model.encode_image(image[None].to(device), return_tokens=True)
    _, text_tokens = model.encode_text(web, return_tokens=True)
    ids = captioner.greedy(captioner(image_tokens, text_tokens, web))[0].tolist()
    ids = ids[:ids.index(tokenizer.eot_token_id)] if tokenizer.eot_token_id in ids else ids
    return tokenizer.decode(ids).strip()

# -----------------------------------------------------------------------------
# compositional benchmarks
#
# SugarCrepe, ARO, VALSE and VL-CheckList are each a multiple choice per image: a reader turns the
# released files into items (image, [right caption, wrong caption, ...]) and choice_scores scores a
# whole set in one batched pass. An item is correct only if the right caption scores strictly
# higher than every other (a tie is wrong). An image that cannot be read is counted and reported,
# and the accuracies are over the readable items; a part none of whose images can be read stops
# the run with the folder it looked in.

PROGRESS_EVERY = 10.0  # seconds between progress lines, so only long runs print them


def _progress(desc, done, total, last):
    now = time.time()
    if now - last < PROGRESS_EVERY:
        return last
    print(f"  {desc}: {done}/{total}", flush=True)
    return now


def _open_choice_image(ref):
    """a path, (path, (left, top, right, bottom)) crop box, or a PIL image -> RGB PIL image, None if unreadable"""
    from PIL import Image
    if isinstance(ref, Image.Image):
        return ref.convert("RGB")
    path, box = (ref, None) if isinstance(ref, str) else ref
    try:
        with Image.open(path) as im:
            im = im.convert("RGB")
    except (OSError, ValueError, Image.DecompressionBombError):
        return None
    # ARO's crop: a box past the border is padded with black, as PIL (and ARO's loader) does
    return im if box is None else im.crop(box)


def _image_path(ref):
    return ref if isinstance(ref, str) else ref[0] if isinstance(ref, tuple) else "<in-memory image>"


@torch.no_grad()
def choice_scores(model, preprocess, tokenizer, items, device, desc="", batch_size=128):
    """items: [(image, [texts])], K texts each (texts[0] the right one); image as _open_choice_image
    takes it. Every distinct image and text is encoded once, in batches, normalised.
    -> scores [n, K] cosine similarities, readable [n] bool. Unreadable images leave NaN rows; a
    wrong text identical to the right one is NaN too: it is the same caption, not a distractor
    (ARO's shuffles leave some captions unchanged, and its argmax gave those ties to the caption)."""
    was_training = model.training
    model.eval()
    if len({len(cands) for _, cands in items}) > 1:
        raise ValueError("choice_scores: every item needs the same number of texts")
    key = lambda ref: ref if isinstance(ref, (str, tuple)) else id(ref)  # noqa: E731 (pil images: by identity)
    refs = {key(image): image for image, _ in items}
    keys = list(refs)
    texts = list(dict.fromkeys(t for _, cands in items for t in cands))
    row, feats, last = {}, [], time.time()
    for i in range(0, len(keys), batch_size):
        good = [(k, im) for k in keys[i:i + batch_size] if (im := _open_choice_image(refs[k])) is not None]
        if good:
            feats.append(encode_images(model, torch.stack([preprocess(im) for _, im in good]), device))
            row |= {k: len(row) + j for j, (k, _) in enumerate(good)}
        last = _progress(f"{desc} images", min(i + batch_size, len(keys)), len(keys), last)
    txt = []
    for i in range(0, len(texts), 1024):
        txt.append(encode_texts(model, tokenizer, texts[i:i + 1024], device))
        last = _progress(f"{desc} texts", min(i + 1024, len(texts)), len(texts), last)
    txt = torch.cat(txt) if txt else None
    col = {t: j for j, t in enumerate(texts)}
    readable = torch.tensor([key(image) in row for image, _ in items], dtype=torch.bool)
    scores = torch.full((len(items), len(items[0][1]) if items else 0), float("nan"))
    if readable.any():
        img = torch.cat(feats)
        kept = [item for item, ok in zip(items, readable) if ok]
        image_rows = torch.tensor([row[key(image)] for image, _ in kept])
        text_cols = torch.tensor([[col[t] for t in cands] for _, cands in kept])  # [m, K]
        # identical strings share one embedding, so a model that cannot tell them apart ties exactly
        scores[readable] = (img[image_rows][:, None, :] * txt[text_cols]).sum(-1)
        same = torch.tensor([[j > 0 and t == cands[0] for j, t in enumerate(cands)] for _, cands in items], dtype=torch.bool)
        scores[same] = float("nan")
    model.train(was_training)
    return scores, readable


def choice_correct(scores):
    """scores [n, K] as choice_scores gives them, column 0 the right caption -> [n] bool: strictly
    above every wrong caption; an item whose wrong captions all equal the right one is wrong, as
    VALSE's and VL-CheckList's own scoring count their few pairs with caption == foil"""
    wrong = scores[:, 1:]
    best = wrong.nan_to_num(nan=float("-inf")).max(1).values
    return (scores[:, 0] > best) & ~wrong.isnan().all(1)


class Chooser:
    """scores the parts of one benchmark with one model, tallying items and unreadable images"""

    def __init__(self, bench, model, preprocess, tokenizer, device):
        self.bench, self.model, self.preprocess, self.tokenizer, self.device = bench, model, preprocess, tokenizer, device
        self.n_items, self.unreadable = 0, {}

    def scores(self, items, where, count=True):
        """-> (scores [m, K], readable [m]) for the items; raises if none of their images can be read"""
        scores, readable = choice_scores(self.model, self.preprocess, self.tokenizer, items, self.device,
                                         desc=f"{self.bench} {where}")
        if items and not readable.any():
            raise data.DataError(f"{self.bench}: {where}: none of its {len(items)} images could be read "
                                 f"(first: {_image_path(items[0][0])})")
        self.n_items += len(items) if count else 0
        self.unreadable |= dict.fromkeys(_image_path(im) for (im, _), ok in zip(items, readable) if not ok)
        return scores, readable

    def correct(self, items, where):
        """-> [m'] bool over the readable items: the right caption strictly above every other"""
        scores, readable = self.scores(items, where)
        return choice_correct(scores[readable])

    def counts(self):
        if self.unreadable:
            print(f"{self.bench}: {len(self.unreadable)} image(s) could not be read, their items are left out "
                  f"of every accuracy (first: {next(iter(self.unreadable))})")
        return {f"{self.bench}/n_items": self.n_items, f"{self.bench}/unreadable_images": len(self.unreadable)}


def _mean(xs):
    xs = list(xs)
    return sum(xs) / len(xs) if xs else None


def _acc(correct):
    return correct.float().mean().item()


def _bench_root(bench, root, expects):
    if root is None or not os.path.isdir(root):
        raise data.DataError(f"{bench}: --data_root {root} is not a folder; it should hold {expects}")
    return root


def _first_file(bench, candidates, expects):
    for path in candidates:
        if os.path.isfile(path):
            return path
    alternatives = f" (or {', '.join(candidates[1:])})" if candidates[1:] else ""
    raise data.DataError(f"{bench}: missing {candidates[0]}{alternatives}; expected {expects}")


def _text(item, key, where):
    value = item.get(key) if isinstance(item, dict) else None
    if not isinstance(value, str) or not value.strip():
        raise data.DataError(f"{where}: missing or empty {key!r}")
    return value

# --- SugarCrepe


SUGARCREPE = {"replace": ("replace_obj", "replace_att", "replace_rel"), "swap": ("swap_obj", "swap_att"),
              "add": ("add_obj", "add_att")}


def read_sugarcrepe(root, image_root=None):
    """SugarCrepe as released: <subset>.json for its 7 subsets, in root or root/data (a clone of its
    repository), each a dict keyed by string ids (not always contiguous: swap_obj skips "108") of
    {filename, caption, negative_caption}; the images are COCO val2017, under image_root (default
    root/val2017). -> {subset: [(image path, [caption, negative_caption])]}"""
    _bench_root("sugarcrepe", root, "the 7 subset files <subset>.json (or data/<subset>.json)")
    image_root = image_root or os.path.join(root, "val2017")
    out = {}
    for subset in (s for group in SUGARCREPE.values() for s in group):
        path = _first_file("sugarcrepe", [os.path.join(root, f"{subset}.json"), os.path.join(root, "data", f"{subset}.json")],
                           "SugarCrepe's data/<subset>.json files")
        items = data.read_json(path)
        if not isinstance(items, dict):
            raise data.DataError(f"{path}: expected a JSON object keyed by item id")
        out[subset] = [(os.path.join(image_root, _text(it, "filename", f"{path}: item {k!r}")),
                        [_text(it, "caption", f"{path}: item {k!r}"), _text(it, "negative_caption", f"{path}: item {k!r}")])
                       for k, it in items.items()]
    return out


@torch.no_grad()
def eval_sugarcrepe(model, preprocess, tokenizer, device, root, image_root=None):
    """Per subset: caption vs negative_caption. Groups replace / swap / add pool their subsets' items
    (the subset accuracies weighted by size); mean is the plain mean of the 7 subset accuracies."""
    choose, out, correct = Chooser("sugarcrepe", model, preprocess, tokenizer, device), {}, {}
    for subset, items in read_sugarcrepe(root, image_root).items():
        correct[subset] = choose.correct(items, subset)
        out[f"sugarcrepe/{subset}"] = _acc(correct[subset])
    for group, subsets in SUGARCREPE.items():
        out[f"sugarcrepe/{group}"] = _acc(torch.cat([correct[s] for s in subsets]))
    out["sugarcrepe/mean"] = _mean(out[f"sugarcrepe/{s}"] for s in correct)
    return out | choose.counts()

# --- ARO


# the relations ARO's authors leave out of VG-Relation's macro accuracy, verbatim from the list in
# their replication notebook (symmetric relations such as "next to", and others they dropped with them)
ARO_EXCLUDED_RELATIONS = frozenset((
    "adjusting", "attached to", "between", "bigger than", "biting", "boarding", "brushing", "chewing", "cleaning",
    "climbing", "close to", "coming from", "coming out of", "contain", "crossing", "dragging", "draped over",
    "drinking", "drinking from", "driving", "driving down", "driving on", "eating from", "eating in", "enclosing",
    "exiting", "facing", "filled with", "floating in", "floating on", "flying", "flying above", "flying in",
    "flying over", "flying through", "full of", "going down", "going into", "going through", "grazing in",
    "growing in", "growing on", "guiding", "hanging from", "hanging in", "hanging off", "hanging over",
    "higher than", "holding onto", "hugging", "in between", "jumping off", "jumping on", "jumping over", "kept in",
    "larger than", "leading", "leaning over", "leaving", "licking", "longer than", "looking in", "looking into",
    "looking out", "looking over", "looking through", "lying next to", "lying on top of", "making", "mixed with",
    "mounted on", "moving", "on the back of", "on the edge of", "on the front of", "on the other side of",
    "opening", "painted on", "parked at", "parked beside", "parked by", "parked in", "parked in front of",
    "parked near", "parked next to", "perched on", "petting", "piled on", "playing", "playing in", "playing on",
    "playing with", "pouring", "reaching for", "reading", "reflected on", "riding on", "running in", "running on",
    "running through", "seen through", "sitting behind", "sitting beside", "sitting by", "sitting in front of",
    "sitting near", "sitting next to", "sitting under", "skiing down", "skiing on", "sleeping in", "sleeping on",
    "smiling at", "sniffing", "splashing", "sprinkled on", "stacked on", "standing against", "standing around",
    "standing behind", "standing beside", "standing in front of", "standing near", "standing next to",
    "staring at", "stuck in", "surrounding", "swimming in", "swinging", "talking to", "topped with", "touching",
    "traveling down", "traveling on", "tying", "typing on", "underneath", "wading in", "waiting for",
    "walking across", "walking by", "walking down", "walking next to", "walking through", "working in",
    "working on", "worn on", "wrapped around", "wrapped in", "by", "of", "near", "next to", "with", "beside",
    "on the side of", "around"))
ARO_MIN_PAIR = 25  # VG-Attribution's macro accuracy keeps attribute pairs with at least this many items
ARO_ORDER = {"coco_order": "coco_karpathy_test.json", "flickr30k_order": "flickr30k_test.json"}
ARO_PERTURBATIONS = ("shuffle_nouns_and_adj", "shuffle_allbut_nouns_and_adj", "shuffle_within_trigrams", "shuffle_trigrams")
NOUN_TAGS, ADJECTIVE_TAGS = ("NN", "NNS", "NNP", "NNPS"), ("JJ", "JJR", "JJS")


def read_aro_vg(path, image_dir, part):
    """visual_genome_{relation,attribution}.json: a list of {image_path, bbox_x, bbox_y, bbox_w,
    bbox_h, true_caption, false_caption, relation_name | attributes} -> ([((image path, crop box),
    [true_caption, false_caption])], [group]) where group is the relation, or the attribute pair
    "first_second" (ordered, as ARO's evaluation keys it)."""
    rows, items, groups = data.read_json(path), [], []
    if not isinstance(rows, list):
        raise data.DataError(f"{path}: expected a JSON list")
    for i, r in enumerate(rows):
        where = f"{path}: item {i}"
        try:
            x, y, w, h = (float(r[k]) for k in ("bbox_x", "bbox_y", "bbox_w", "bbox_h"))
            group = r["relation_name"] if part == "relation" else f"{r['attributes'][0]}_{r['attributes'][1]}"
        except (KeyError, TypeError, ValueError, IndexError) as e:
            raise data.DataError(f"{where}: missing or malformed field {e}") from None
        if w <= 0 or h <= 0:
            raise data.DataError(f"{where}: empty box {w} x {h}")
        items.append(((os.path.join(image_dir, _text(r, "image_path", where)), (x, y, x + w, y + h)),
                      [_text(r, "true_caption", where), _text(r, "false_caption", where)]))
        groups.append(group)
    return items, groups


def read_karpathy_test(path, image_root):
    """ARO's order sets start from BLIP's Karpathy test files: a list of {"image": "val2014/...jpg",
    "caption": [captions]} (a train file has one string instead) -> [(image path, caption)], one per caption"""
    rows = data.read_json(path)
    if not isinstance(rows, list):
        raise data.DataError(f"{path}: expected a JSON list")
    out = []
    for i, r in enumerate(rows):
        caps = r.get("caption") if isinstance(r, dict) else None
        caps = [caps] if isinstance(caps, str) else caps
        if not isinstance(caps, list) or not caps or not all(isinstance(c, str) and c.strip() for c in caps):
            raise data.DataError(f"{path}: item {i}: missing or empty 'caption'")
        out += [(os.path.join(image_root, _text(r, "image", f"{path}: item {i}")), c) for c in caps]
    return out


def pre_caption(caption, max_words=30):
    """ARO's (BLIP's) caption normalisation: lowercase, .!"()*#:;~ -> space, runs of whitespace -> one
    space, strip, then the first max_words words"""
    caption = re.sub(r"([.!\"()*#:;~])", " ", caption.lower())
    caption = re.sub(r"\s{2,}", " ", caption).rstrip("\n").strip(" ")
    words = caption.split(" ")
    return " ".join(words[:max_words]) if len(words) > max_words else caption


def order_perturbations(caption, tag, tokenize, np_rng, rng):
    """ARO's four shuffles of a raw caption, each then normalised by pre_caption: nouns among nouns
    and adjectives among adjectives; every other word among themselves; the words within each
    trigram; the trigrams. tag(text) -> [(token, Penn tag)] (ARO: spaCy en_core_web_sm), tokenize(text)
    -> [token] (ARO: nltk.word_tokenize). The random draws are ARO's, in its order (numpy for the
    first two, python's random for the trigrams), so the same seeds and tools give its exact captions."""
    tagged = tag(caption)
    words = np.array([w for w, _ in tagged])
    nouns = [i for i, (_, t) in enumerate(tagged) if t in NOUN_TAGS]
    adjectives = [i for i, (_, t) in enumerate(tagged) if t in ADJECTIVE_TAGS]
    a = words.copy()
    a[nouns] = np_rng.permutation(a[nouns])
    a[adjectives] = np_rng.permutation(a[adjectives])
    b, rest = words.copy(), np.ones(len(words), dtype=bool)
    rest[nouns + adjectives] = False
    b[rest] = np_rng.permutation(b[rest])
    tokens = list(tokenize(caption))
    within = [tokens[i:i + 3] for i in range(0, len(tokens), 3)]
    for trigram in within:
        rng.shuffle(trigram)
    trigrams = [tokens[i:i + 3] for i in range(0, len(tokens), 3)]
    rng.shuffle(trigrams)
    return [pre_caption(" ".join(x)) for x in (a, b, [w for t in within for w in t], [w for t in trigrams for w in t])]


def aro_text_tools():
    """ARO's own text tools -> (tag, tokenize), or (None, why) when they are not installed"""
    try:
        import nltk
        import spacy
        nlp = spacy.load("en_core_web_sm")
        nltk.word_tokenize("a test.")  # needs nltk's punkt data
    except (ImportError, OSError, LookupError) as e:
        return None, ("needs ARO's text tools, spaCy's en_core_web_sm and nltk's punkt: pip install spacy nltk && "
                      f"python -m spacy download en_core_web_sm && python -m nltk.downloader punkt punkt_tab ({type(e).__name__})")
    return (lambda text: [(t.text, t.tag_) for t in nlp(text)], nltk.word_tokenize), None


@torch.no_grad()
def eval_aro(model, preprocess, tokenizer, device, root, seed=1):
    """ARO, each part whose files are in root (ARO's own layout):
    - relation: visual_genome_relation.json + images/, the image cropped to the box; true vs false
      caption. Macro accuracy over relations, leaving out ARO_EXCLUDED_RELATIONS as ARO's authors do
      (the reported number), and the micro accuracy over every item.
    - attribution: visual_genome_attribution.json; macro over ordered attribute pairs with at least
      25 items (reported), micro over all.
    - coco_order / flickr30k_order: coco_karpathy_test.json (images under root/val2014) and
      flickr30k_test.json (root/flickr30k-images); per caption, the normalised caption against its 4
      perturbations (order_perturbations, ARO's seed 1 by default): correct iff the caption scores
      strictly highest (ARO's Precision@1, where its argmax gave ties to the caption), and the
      pairwise accuracy against each perturbation.
    A part whose file is absent is reported as None."""
    _bench_root("aro", root, "visual_genome_relation.json, visual_genome_attribution.json, images/, "
                "coco_karpathy_test.json, flickr30k_test.json")
    choose, out = Chooser("aro", model, preprocess, tokenizer, device), {}
    for part, name in (("relation", "visual_genome_relation.json"), ("attribution", "visual_genome_attribution.json")):
        path = os.path.join(root, name)
        if not os.path.isfile(path):
            print(f"aro: {part} missing (no {path})")
            out[f"aro/{part}"] = None
            continue
        items, groups = read_aro_vg(path, os.path.join(root, "images"), part)
        scores, readable = choose.scores(items, part)
        correct, groups = choice_correct(scores[readable]), [g for g, ok in zip(groups, readable) if ok]
        by_group = {}
        for g, c in zip(groups, correct.tolist()):
            by_group.setdefault(g, []).append(c)
        if part == "relation":
            kept = [g for g in by_group if g not in ARO_EXCLUDED_RELATIONS]
        else:
            kept = [g for g in by_group if len(by_group[g]) >= ARO_MIN_PAIR]
        out[f"aro/{part}"] = _mean(_mean(by_group[g]) for g in kept)
        out[f"aro/{part}_micro"] = _acc(correct)
        out[f"aro/{part}_groups"] = len(kept)
    tools = None
    for part, name in ARO_ORDER.items():
        path = os.path.join(root, name)
        if not os.path.isfile(path):
            print(f"aro: {part} missing (no {path})")
            out[f"aro/{part}"] = None
            continue
        if tools is None:  # loaded once, only when an order file is there
            tools = aro_text_tools()
        text_tools, why = tools
        if text_tools is None:
            print(f"aro: {part} skipped: {why}")
            out[f"aro/{part}"] = None
            continue
        tag, tokenize = text_tools
        np_rng, rng = np.random.RandomState(seed), random.Random(seed)  # fresh per set, as each ARO run seeds
        items = [(image, [pre_caption(c)] + order_perturbations(c, tag, tokenize, np_rng, rng))
                 for image, c in read_karpathy_test(path, root)]
        scores, readable = choose.scores(items, part)
        scores = scores[readable]
        out[f"aro/{part}"] = _acc(choice_correct(scores))
        for j, name in enumerate(ARO_PERTURBATIONS, 1):
            changed = ~scores[:, j].isnan()  # over the captions this shuffle changed
            out[f"aro/{part}/{name}"] = _acc(scores[changed, 0] > scores[changed, j]) if changed.any() else None
    if all(out[f"aro/{p}"] is None for p in ("relation", "attribution", *ARO_ORDER)):
        raise data.DataError(f"aro: none of ARO's files in {root}: visual_genome_relation.json, "
                             "visual_genome_attribution.json, coco_karpathy_test.json, flickr30k_test.json")
    return out | choose.counts()

# --- VALSE


VALSE_PIECES = {  # piece file -> category (noun phrases: FOIL-it!), in the paper's table order
    "existence": "existence", "plurals": "plurality", "counting-hard": "counting",
    "counting-small-quant": "counting", "counting-adversarial": "counting", "relations": "relations",
    "action-replacement": "actions", "actant-swap": "actions", "coreference-standard": "coreference",
    "coreference-hard": "coreference", "foil-it": "noun_phrases"}
VALSE_MIN_VOTES = 2  # valid item: at least 2 of 3 annotators chose the caption (and not the foil)


def read_valse(root, image_root=None):
    """VALSE as released: <piece>.json in root or root/data, a dict keyed by id of {image_file,
    caption, foil, mturk: {caption, foil, other}, ...}. Only valid items are kept, as VALSE's README
    and evaluation scripts do: mturk["caption"] >= 2. Each piece's images come from another dataset:
    looked up as image_root/<piece>/<image_file>, then image_root/<image_file> (default image_root:
    root/images). -> {piece: ([(image path, [caption, foil])], n_items)}"""
    _bench_root("valse", root, "the 11 piece files <piece>.json (or data/<piece>.json) and images/")
    image_root = image_root or os.path.join(root, "images")
    out = {}
    for piece in VALSE_PIECES:
        path = _first_file("valse", [os.path.join(root, f"{piece}.json"), os.path.join(root, "data", f"{piece}.json")],
                           "VALSE's data/<piece>.json files")
        rows, items = data.read_json(path), []
        if not isinstance(rows, dict):
            raise data.DataError(f"{path}: expected a JSON object keyed by item id")
        for key, r in rows.items():
            where = f"{path}: item {key!r}"
            votes = r.get("mturk") if isinstance(r, dict) else None
            if not isinstance(votes, dict) or not isinstance(votes.get("caption"), int):
                raise data.DataError(f"{where}: missing or malformed 'mturk' votes")
            if votes["caption"] < VALSE_MIN_VOTES:
                continue
            name = _text(r, "image_file", where)
            image = os.path.join(image_root, piece, name)
            image = image if os.path.exists(image) else os.path.join(image_root, name)
            items.append((image, [_text(r, "caption", where), _text(r, "foil", where)]))
        out[piece] = (items, len(rows))
    return out


@torch.no_grad()
def eval_valse(model, preprocess, tokenizer, device, root, image_root=None):
    """Per piece: caption vs foil over its valid items; each category the mean of its pieces;
    mean the mean of the 11 pieces (VALSE's average)."""
    choose, out, by_category, n_valid = Chooser("valse", model, preprocess, tokenizer, device), {}, {}, 0
    for piece, (items, n) in read_valse(root, image_root).items():
        category = VALSE_PIECES[piece]
        if not items:
            raise data.DataError(f"valse: {piece}: none of its {n} items is valid (mturk caption votes >= 2)")
        out[f"valse/{category}/{piece}"] = _acc(choose.correct(items, piece))
        by_category.setdefault(category, []).append(out[f"valse/{category}/{piece}"])
        n_valid += len(items)
    out |= {f"valse/{c}": _mean(accs) for c, accs in by_category.items()}
    out["valse/mean"] = _mean(out[f"valse/{VALSE_PIECES[p]}/{p}"] for p in VALSE_PIECES)
    return out | choose.counts() | {"valse/n_valid": n_valid}

# --- VL-CheckList


def vlchecklist_files():
    """VL-CheckList's corpus as its release lists it (corpus/v1/<Type>/<subtype>/<source>.yaml):
    -> [(type, subtype, source, corpus, annotation path, image folder)], 56 files"""
    out = []
    for kind, values in (("location", ("center", "mid", "margin")), ("size", ("large", "medium", "small"))):
        top = f"data/Object/{kind.capitalize()}"
        for v in values:
            out += [("object", f"{kind}_{v}", "vg", f"vg_{r}", f"{top}/vg_{kind}/vg_{r}_{v}.json", "vg") for r in ("obj", "subj")]
            out += [("object", f"{kind}_{v}", "swig", f"swig_{r}", f"{top}/swig_{kind}/swig_{r}/swig_{r}_{v}.json", "swig")
                    for r in ("agent", "destination", "item", "tool")]
            out.append(("object", f"{kind}_{v}", "hake", "hake", f"{top}/hake_{kind}/hake_obj_{v}.json", "hake"))
    for attribute in ("action", "color", "material", "size", "state"):
        out += [("attribute", attribute, src, src, f"data/Attribute/{src}/{attribute}.json", "vg") for src in ("vg", "vaw")]
    out += [("relation", "action", "vg", "vg", "data/Relation/vg/action.json", "vg"),
            ("relation", "action", "swig", "swig", "data/Relation/swig_action.json", "swig"),
            ("relation", "action", "hake", "hake", "data/Relation/hake_action.json", "hake"),
            ("relation", "spatial", "vg", "vg", "data/Relation/vg/spatial.json", "vg")]
    return out


def read_vlchecklist_file(path, image_dir):
    """one VL-CheckList file: a JSON list of [image relpath, {"POS": [texts], "NEG": [texts]}] ->
    [(image path, [POS[0], NEG[0]])]. Its evaluation (itc) compares POS[0] with NEG[0] only: the swig
    files carry 3 of each, the rest 1; texts are used as written (some NEG start with a space)."""
    rows, items = data.read_json(path), []
    if not isinstance(rows, list):
        raise data.DataError(f"{path}: expected a JSON list")
    for i, r in enumerate(rows):
        try:
            rel, texts = r
            pos, neg = texts["POS"][0], texts["NEG"][0]
        except (ValueError, TypeError, KeyError, IndexError):
            raise data.DataError(f"{path}: item {i}: expected [image path, {{\"POS\": [...], \"NEG\": [...]}}]") from None
        if not all(isinstance(t, str) and t.strip() for t in (rel, pos, neg)):
            raise data.DataError(f"{path}: item {i}: empty image path or text")
        items.append((os.path.join(image_dir, rel), [pos, neg]))
    return items


@torch.no_grad()
def eval_vlchecklist(model, preprocess, tokenizer, device, root, image_root=None):
    """VL-CheckList's itc protocol: per file, POS[0] vs NEG[0]. Aggregated as the release's radar
    chart does: a subtype is the mean over its sources (vg, swig, hake, vaw) of the mean over each
    source's files; a type (object, attribute, relation) the mean of its subtypes; mean the mean of
    the 3 types. Files in root/data/... (a clone of its repository), images under image_root/<vg |
    swig | hake>/ (default image_root: root, where the release's relative image roots point). The
    release's sample config also cuts each file to its first 1,000 items; this runs them all."""
    _bench_root("vlchecklist", root, "VL-CheckList's data/ folder (a clone of its repository) and its images")
    image_root = image_root or root
    choose, out, by_source = Chooser("vlchecklist", model, preprocess, tokenizer, device), {}, {}
    for kind, subtype, source, corpus, rel, img in vlchecklist_files():
        path = _first_file("vlchecklist", [os.path.join(root, rel)], "VL-CheckList's data/ folder as released")
        key = f"vlchecklist/{kind}/{subtype}/{corpus}"
        out[key] = _acc(choose.correct(read_vlchecklist_file(path, os.path.join(image_root, img)), rel))
        by_source.setdefault((kind, subtype), {}).setdefault(source, []).append(out[key])
    by_kind = {}
    for (kind, subtype), sources in by_source.items():
        out[f"vlchecklist/{kind}/{subtype}"] = _mean(_mean(accs) for accs in sources.values())
        by_kind.setdefault(kind, []).append(out[f"vlchecklist/{kind}/{subtype}"])
    out |= {f"vlchecklist/{kind}": _mean(accs) for kind, accs in by_kind.items()}
    out["vlchecklist/mean"] = _mean(out[f"vlchecklist/{kind}"] for kind in by_kind)
    return out | choose.counts()

# --- intrinsic metrics (the HNC thesis)


def intrinsic_metrics(pos_cos, neg_cos, rand_cos, threshold=1.0, eps=1e-8):
    """The HNC thesis's intrinsic metrics. pos_cos, neg_cos: [n] cos(image, caption) and cos(image,
    its hard negative) per triplet; rand_cos: [m] cos(image, another image's caption), one per image.
    Distinguishing accuracy: the fraction with cos(v, t+) / (cos(v, t-) + eps) >= threshold, as the
    thesis defines it (eps 1e-8; with a negative denominator the ratio flips, a quirk kept as is);
    pairwise_acc is the plain cos(v, t+) > cos(v, t-). Both count a tie wrong."""
    # float64: in float32 (the thesis's code) 1e-8 vanishes next to a cosine of 0.3, and a tie's
    # ratio would be exactly 1 and count as distinguished at the default threshold
    ratio = pos_cos.double() / (neg_cos.double() + eps)
    return {"pos_cos": pos_cos.mean().item(), "hard_neg_cos": neg_cos.mean().item(),
            "margin": (pos_cos.mean() - neg_cos.mean()).item(), "rand_neg_cos": rand_cos.mean().item(),
            "distinguish_acc": (ratio >= threshold).float().mean().item(),
            "pairwise_acc": (pos_cos > neg_cos).float().mean().item()}


def read_hnc_test(path, image_dir):
    """HNC's test file: {"<gqa image>.jpg": {"<n>": {caption, label (1 positive, 0 negative), type,
    ...}}}. Within an image and a type, positives and negatives pair up in id order, as the thesis
    pairs them; a group with unequal counts is skipped and counted.
    -> ([(image path, positive, negative, type)], skipped groups)"""
    rows, out, skipped = data.read_json(path), [], 0
    if not isinstance(rows, dict):
        raise data.DataError(f"{path}: expected a JSON object keyed by image file")
    for image, caps in rows.items():
        groups = {}
        try:
            for cid in sorted(caps, key=int):
                c = caps[cid]
                if c["label"] not in (0, 1):
                    raise ValueError(f"label {c['label']!r}")
                groups.setdefault(c.get("type", "default"), ([], []))[1 - c["label"]].append(_text(c, "caption", f"{path}: {image} caption {cid}"))
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            raise data.DataError(f"{path}: {image}: malformed captions ({e})") from None
        for kind, (pos, neg) in groups.items():
            if len(pos) != len(neg):
                skipped += 1
                continue
            out += [(os.path.join(image_dir, image), p, n, kind) for p, n in zip(pos, neg)]
    return out, skipped


@torch.no_grad()
def eval_intrinsic(model, preprocess, tokenizer, device, source="shapes", root=None, image_root=None,
                   threshold=1.0, n=1000, seed=None, image_size=SHAPES_SIZE):
    """Intrinsic metrics on triplets (image, caption, hard negative). shapes: n test scenes, each with
    every hard-negative kind (pooled, then per kind), rendered at image_size and put through
    preprocess. hnc: HNC's test file (root/hnc_clean_strict_test.json, GQA images under image_root,
    default root/images). The random negative of each distinct image is the caption of the next one."""
    from PIL import Image
    choose = Chooser("intrinsic", model, preprocess, tokenizer, device)
    if source == "shapes":
        scenes = data.test_scenes(n, data.TEST_SEED if seed is None else seed)
        images = [Image.fromarray(data.render(s, image_size)) for s in scenes]
        triplets = [(im, s.caption(), fn(s), kind) for kind, fn in data.NEGATIVES.items() for im, s in zip(images, scenes)]
    else:
        _bench_root("intrinsic", root, "hnc_clean_strict_test.json and images/")
        path = _first_file("intrinsic", [os.path.join(root, "hnc_clean_strict_test.json")], "HNC's test file")
        triplets, skipped = read_hnc_test(path, image_root or os.path.join(root, "images"))
        if skipped:
            print(f"intrinsic: skipped {skipped} image/type group(s) of {path} with unequal positives and negatives")
        if not triplets:
            raise data.DataError(f"intrinsic: {path} has no positive/negative pair")
    scores, readable = choose.scores([(im, [p, q]) for im, p, q, _ in triplets], "triplets")
    first = {}  # each distinct image (pil images by identity) -> (image, its first caption)
    for im, p, _, _ in triplets:
        first.setdefault(im if isinstance(im, str) else id(im), (im, p))
    firsts = list(first.values())
    rand, rand_ok = choose.scores([(im, [firsts[(i + 1) % len(firsts)][1]]) for i, (im, _) in enumerate(firsts)],
                                  "random negatives", count=False)
    kinds = [t[3] for t in triplets]
    out = {f"intrinsic/{k}": v for k, v in intrinsic_metrics(scores[readable, 0], scores[readable, 1], rand[rand_ok, 0], threshold).items()}
    if source == "shapes":
        for kind in data.NEGATIVES:
            mask = readable & torch.tensor([k == kind for k in kinds])
            m = intrinsic_metrics(scores[mask, 0], scores[mask, 1], rand[rand_ok, 0], threshold)
            out |= {f"intrinsic/{kind}/{k}": m[k] for k in ("hard_neg_cos", "distinguish_acc", "pairwise_acc")}
    return out | choose.counts()

COMPOSITIONAL = {"sugarcrepe": eval_sugarcrepe, "aro": eval_aro, "valse": eval_valse, "vlchecklist": eval_vlchecklist,
                 "intrinsic": eval_intrinsic}

# -----------------------------------------------------------------------------
# explanations: which words match which image patches (second-order attributions)


def _tower(module, name):
    """-> (the transformer's resblocks, whether they see [batch, seq, width]) of one tower"""
    blocks = getattr(getattr(module, "transformer", None), "resblocks", None)
    if blocks is None:
        raise SystemExit(f"error: --explain needs a ViT with open_clip's module names, but {name} is a "
                         f"{type(module).__name__} without transformer.resblocks")
    return blocks, getattr(module.transformer, "batch_first", True)  # open_clip < 2.24 ran [seq, batch, width]


def _path_embeddings(encode, block, batch_first, x, ref, steps):
    """Embed [x] * (steps + 1) + [ref] with the input of `block` replaced: row k by r + a_k (h - r),
    a_k = 1 - k / steps (k = 0 .. steps: a = 1, ..., 1/steps, 0), where h and r are the block inputs
    of x and of ref; the last row keeps r. Row `steps` is r read out the way x is (a text tower
    pools at x's EOT), the last row r read out the way ref is. Works whatever length the tower runs
    at (minclip's text tower stops at the batch's last EOT, open_clip's runs the whole context):
    every row shares it. -> (embeddings [steps + 2, D], the path [steps + 2, S, F], a leaf that
    requires grad)"""
    cache = []

    def hook(module, args):
        h = args[0] if batch_first else args[0].transpose(0, 1)  # [B, S, F]
        h_x, h_r = h[0].detach(), h[-1].detach()
        a = 1 - torch.arange(steps + 1, device=h.device, dtype=h.dtype) / steps
        path = torch.cat([h_r + a[:, None, None] * (h_x - h_r), h_r[None]]).requires_grad_(True)
        cache.append(path)
        return (path if batch_first else path.transpose(0, 1),) + tuple(args[1:])

    handle = block.register_forward_pre_hook(hook)
    try:
        e = encode(torch.cat([x.expand(steps + 1, *x.shape[1:]), ref]))
    finally:
        handle.remove()
    assert len(cache) == 1, "the hooked block ran more than once"
    return e.float(), cache[0]


def _contracted_jacobian(e, path, steps):
    """U[d, s] = sum_f J[d, s, f] (h - r)[s, f] with J the integrated Jacobian: the mean over the
    steps of d e_d / d path. Rows of the batch are independent, so one backward pass of the sum
    over the steps gives every step's gradient; one pass per embedding dimension d. -> [D, S]"""
    delta = (path[0] - path[-1]).detach()  # h - r: row 0 is a = 1
    rows = []
    for d in range(e.shape[1]):
        (g,) = torch.autograd.grad(e[:steps, d].sum(), path, retain_graph=d < e.shape[1] - 1)
        rows.append((g[:steps].float().mean(0) * delta.float()).sum(-1))
    return torch.stack(rows)


def explain(model, image, text, layer=-1, steps=10, return_terms=False):
    """Second-order caption-image attributions (Moeller et al. 2025): how much each (token, patch)
    pair contributes to the cosine score of a caption and an image.

    image [1, 3, H, W], preprocessed; text [1, L] token ids (SOT ... EOT, zero padded); any CLIP
    with open_clip's module names (visual.transformer.resblocks, transformer.resblocks), minclip's
    or open_clip's. -> A [T, grid, grid] float on the cpu, T = the tokens through the EOT (SOT
    first), one value per (token, patch) pair, the class token's column dropped.

    The protocol. In both towers the input h of block `layer` (negative counts from the end) is
    interpolated between the reference's r and the input's: r + a (h - r), a = 1, 1 - 1/N, ..., 1/N
    (N = steps). References: the all-zero image in the model's input space (after preprocessing),
    and the text [SOT, 0, EOT, 0, ...] (one placeholder token). J = the mean over the N points of
    d e / d h, the Jacobian of the tower's unnormalised embedding e [D] with respect to h [S, F].
    Then, with U[d, s] = sum_f J[d, s, f] (h - r)[s, f] per tower,

        A[s, p] = sum_d U_t[d, s] U_i[d, p] / (|e_t| |e_i|)

    (e_t, e_i: the embeddings of the text and the image). This is the paper's
    (h_t - r_t)^T J_t^T J_i (h_i - r_i), restricted to token s and patch p and summed over their
    feature dimensions, without ever forming the (S F) x (P F) matrix J_t^T J_i.

    Completeness: sum_s U[:, s] -> e(h) - e(r) as N grows (exactly, for a tower linear in h; the
    sum over the steps is a right Riemann sum, error O(1/N)), so with the score cos(e_t, e_i),

        score = A.sum() + class_token + reference,
        reference = (e_t . e_i(r) + e_t(r) . e_i - e_t(r) . e_i(r)) / (|e_t| |e_i|),

    class_token the dropped column (the text positions after the EOT contribute nothing to a
    causal text tower), e(r) a tower's output for the reference features r at block `layer`, read
    out where the input's is (the text at the caption's EOT, not at the reference's: that is the
    end of the path). return_terms=True returns (A, {"score", "class_token", "reference"})."""
    vis_blocks, vis_bf = _tower(model.visual, "its image tower")
    txt_blocks, txt_bf = _tower(model, "its text tower")
    for blocks, tower in ((vis_blocks, "image"), (txt_blocks, "text")):
        if not -len(blocks) <= layer < len(blocks):
            raise SystemExit(f"error: --layer {layer}: the {tower} tower has {len(blocks)} blocks")
    if image.dim() != 4 or image.shape[0] != 1 or text.dim() != 2 or text.shape[0] != 1:
        raise ValueError(f"explain takes one image [1, 3, H, W] and one text [1, L], got {list(image.shape)} and {list(text.shape)}")
    if steps < 1:
        raise SystemExit(f"error: --steps {steps}: needs at least one interpolation step")
    eot = int(text[0].argmax())  # the EOT token has the highest id
    text_ref = torch.zeros_like(text)
    text_ref[0, 0], text_ref[0, 2] = text[0, 0], text[0, eot]
    was_training = model.training
    model.eval()
    try:
        with torch.enable_grad():  # callers may sit under no_grad
            e_i, path_i = _path_embeddings(model.encode_image, vis_blocks[layer], vis_bf, image, torch.zeros_like(image), steps)
            U_i = _contracted_jacobian(e_i, path_i, steps)  # [D, 1 + grid * grid]
            e_t, path_t = _path_embeddings(model.encode_text, txt_blocks[layer], txt_bf, text, text_ref, steps)
            U_t = _contracted_jacobian(e_t, path_t, steps)[:, :eot + 1]  # [D, T]
    finally:
        model.train(was_training)
    norm = e_t[0].norm() * e_i[0].norm()  # row 0 is the input itself (a = 1), row `steps` the reference (a = 0)
    full = (U_t.T @ U_i / norm).detach().cpu()  # [T, 1 + grid * grid]
    grid = math.isqrt(full.shape[1] - 1)
    if grid * grid != full.shape[1] - 1:
        raise SystemExit(f"error: --explain: {full.shape[1]} image tokens are not a class token and a square grid")
    A = full[:, 1:].reshape(-1, grid, grid)
    if not return_terms:
        return A
    e_t, e_i = e_t.detach().cpu(), e_i.detach().cpu()
    r_t, r_i = e_t[steps], e_i[steps]
    reference = (e_t[0] @ r_i + r_t @ e_i[0] - r_t @ r_i) / norm.item()
    terms = {"score": (e_t[0] @ e_i[0] / norm.item()).item(), "class_token": full[:, 0].sum().item(),
             "reference": reference.item()}
    return A, terms


def caption_words(tokenizer, ids):
    """ids: one caption's token ids [L] -> [(word, [token positions])] for the words between SOT and
    EOT, a word's BPE pieces together (open_clip's SimpleTokenizer ends a word's last piece with
    '</w>'; a tokenizer without its `decoder` gets one entry per token)."""
    ids = [int(i) for i in ids]
    eot = max(range(len(ids)), key=ids.__getitem__)
    decoder = getattr(tokenizer, "decoder", None)
    words, piece, positions = [], "", []
    for s in range(1, eot):
        text = decoder[ids[s]] if decoder is not None else tokenizer.decode([ids[s]])
        piece, positions = piece + text.replace("</w>", ""), positions + [s]
        if decoder is None or text.endswith("</w>"):
            words.append((piece.strip(), positions))
            piece, positions = "", []
    if positions:  # a caption cut at the context length
        words.append((piece, positions))
    return words


def span_positions(tokenizer, ids, span):
    """the token positions of `span` (a run of whole words) in a caption's ids [L] -> [positions]"""
    words = caption_words(tokenizer, ids)
    want = [w for w, _ in caption_words(tokenizer, tokenizer([span])[0])]
    for i in range(len(words) - len(want) + 1):
        if want and [w for w, _ in words[i:i + len(want)]] == want:
            return [s for _, pos in words[i:i + len(want)] for s in pos]
    caption = " ".join(w for w, _ in words)
    raise SystemExit(f"error: --span {span!r} is not a run of words of the caption {caption!r}")


def save_explanation(image, panels, path, note=""):
    """The picture: the image (PIL, what the model sees), then one panel per (title, total, heat
    [grid, grid]) with the heat map over a grey copy of the image, positive red, negative blue,
    opacity |value| / m on one scale m for all panels (the largest |value|), a patch per cell of
    the grid; laid out like save_grid, two lines under each cell: the title and the panel's sum."""
    from PIL import Image, ImageDraw, ImageOps
    m = max(float(h.abs().max()) for _, _, h in panels) or 1.0  # an all-zero map stays clear
    cols = math.ceil(math.sqrt(len(panels) + 1))
    rows = math.ceil((len(panels) + 1) / cols)
    cell = min(256, max(128, min(image.size)))
    resample = Image.Resampling.NEAREST if min(image.size) < cell else Image.Resampling.BICUBIC
    base = ImageOps.fit(image, (cell, cell), resample)
    grey = np.asarray(base.convert("L").convert("RGB"), dtype=np.float32) * 0.6 + 255 * 0.4  # lighter, so colour reads
    red, blue = np.array([215, 25, 28], np.float32), np.array([44, 123, 182], np.float32)
    canvas = Image.new("RGB", (cols * cell, rows * (cell + 2 * LABEL_H)), "white")
    draw = ImageDraw.Draw(canvas)
    tiles = [(base, note, f"scale ±{m:.2g}")]
    for title, total, heat in panels:
        t = (heat.float() / m).clamp(-1, 1).numpy()
        t = np.asarray(Image.fromarray(t.astype(np.float32)).resize((cell, cell), Image.Resampling.NEAREST))
        alpha = 0.9 * np.abs(t)[..., None]
        colour = np.where(t[..., None] >= 0, red, blue)
        tiles.append((Image.fromarray((grey * (1 - alpha) + colour * alpha).round().astype(np.uint8)), title, f"{total:+.3g}"))
    for j, (tile, *lines) in enumerate(tiles):
        x, y = (j % cols) * cell, (j // cols) * (cell + 2 * LABEL_H)
        canvas.paste(tile, (x, y))
        for k, line in enumerate(lines):
            # pil's default font; its spaces are thin, so a span's words get two
            draw.text((x + 4, y + cell + 2 + k * LABEL_H), line.replace(" ", "  "), fill="black")
    _save_png(canvas, path)

# -----------------------------------------------------------------------------
# models: load any CLIP, export ours as an open_clip hub directory


CKPT_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt", ".safetensors")


def is_checkpoint(spec):
    """a file path (an existing file, or a name like ckpt.pt), not local-dir:DIR or NAME:PRETRAINED"""
    return os.path.isfile(spec) or (":" not in spec and spec.endswith(CKPT_SUFFIXES))


def _refuse(path, why):
    raise SystemExit(f"error: {path}: {why}")


def load_checkpoint(path, clip=None, captioner=None, need=()):
    """A minclip training checkpoint -> its dict: "model" (the open_clip towers' state dict),
    "model_cfg" (open_clip's config for them), "captioner" + "captioner_cfg" (CLIPS, else None),
    "optimizer", "step", "args", "rng", loaded on the CPU with weights_only=True. Its weights are
    checked against `clip` and `captioner` if given (a resumed run: the models its flags build),
    else against the models its own configs build (on the meta device, no memory). need: keys the
    caller needs too (resume: optimizer, step, rng). Anything else exits with one line naming the
    file and what is wrong with it: missing, empty, cut short, text, unreadable by torch, a
    .safetensors file, a bare state dict, no model_cfg, weights that do not fit, a missing key."""
    if not os.path.isfile(path):
        _refuse(path, "a folder, not a checkpoint file" if os.path.isdir(path) else "no such checkpoint file")
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        head = f.read(64)
    # safetensors: an 8-byte little-endian header length, then the JSON header
    if path.endswith(".safetensors") or (head[8:10] == b'{"' and int.from_bytes(head[:8], "little") < size):
        _refuse(path, "a .safetensors file holds weights without the config that builds them: give its folder "
                f"as local-dir:{os.path.dirname(path) or '.'} (an open_clip hub folder, open_clip_config.json beside it)")
    if size == 0:
        _refuse(path, "empty (0 bytes): copied before the checkpoint was written?")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises RuntimeError, EOFError, KeyError, UnpicklingError, ... by the damage
        _refuse(path, _unreadable(path, e))
    if not isinstance(ckpt, dict):
        _refuse(path, f"holds a {type(ckpt).__name__}, not a checkpoint dict")
    tensors = lambda d: isinstance(d, dict) and all(isinstance(v, torch.Tensor) for v in d.values())
    if "model_cfg" not in ckpt:  # not written by minclip: say what it is and how to load it
        if ckpt and tensors(ckpt) or "state_dict" in ckpt:  # open_clip loads both kinds as NAME:FILE
            what = "an open_clip training checkpoint" if "state_dict" in ckpt else f"a bare state dict ({len(ckpt)} tensors)"
            _refuse(path, f"{what} without the model_cfg that says which model it is: give it as NAME:{path} with its "
                    "open_clip architecture NAME (e.g. ViT-B-32), or re-save it with the model_cfg of its --model_size")
        if "model" in ckpt:
            _refuse(path, "'model' without 'model_cfg' (the open_clip config that builds it): re-save it with the "
                    "model_cfg of its --model_size")
        _refuse(path, f"not a minclip checkpoint: no 'model' and 'model_cfg' (keys: {', '.join(map(str, list(ckpt)[:6]))})")
    for key in ("model", *need):
        if key not in ckpt:
            _refuse(path, f"no '{key}' in the checkpoint (keys: {', '.join(map(str, ckpt))})")
    if not tensors(ckpt["model"]) or not tensors(ckpt.get("captioner") or {}):
        _refuse(path, "its 'model' or 'captioner' is not a state dict of tensors")
    # the towers and the captioner as one key space, so a captioner too many or too few is named like any key
    state = ckpt["model"] | {f"captioner.{k}": v for k, v in (ckpt.get("captioner") or {}).items()}
    against = "the model this run builds from its flags" if clip is not None else "its model_cfg"
    if clip is None:
        with torch.device("meta"):  # shapes only: a base model costs nothing to build here
            clip = _build(path, CLIP, ckpt["model_cfg"], "model_cfg")
            if ckpt.get("captioner_cfg"):
                captioner = _build(path, Captioner, ckpt["captioner_cfg"], "captioner_cfg")
    own = clip.state_dict() | {f"captioner.{k}": v for k, v in (captioner.state_dict() if captioner is not None else {}).items()}
    shapes = [k for k in own if k in state and own[k].shape != state[k].shape]
    missing, unexpected = [k for k in own if k not in state], [k for k in state if k not in own]
    problems = []
    if shapes:
        k = shapes[0]
        problems.append(f"{len(shapes)} of another shape (e.g. {k}: {list(state[k].shape)} in the file, {list(own[k].shape)} in the model)")
    if missing:
        problems.append(f"{len(missing)} missing (e.g. {missing[0]})")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected (e.g. {unexpected[0]})")
    if problems:
        _refuse(path, f"its weights do not fit {against}: " + "; ".join(problems))
    return ckpt


def _build(path, cls, cfg, name):
    """cls(**cfg) (CLIP or Captioner) with fresh weights, or one line: the file's config is not one minclip builds"""
    try:
        return cls(**cfg)
    except (TypeError, ValueError, KeyError, AttributeError, AssertionError) as e:
        _refuse(path, f"its {name} does not describe a model minclip builds ({type(e).__name__}: {e})")


def _unreadable(path, error):
    """why torch.load failed on path, from the file itself: torch's own errors name no cause"""
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        head = f.read(64)
    if head.startswith(b"PK\x03\x04") and not zipfile.is_zipfile(path):  # torch's zip format, its end missing
        return f"cut short ({size:,} bytes, the end of its zip archive is missing): copied while it was being written?"
    try:
        text = codecs.getincrementaldecoder("utf-8")().decode(head)  # a character cut at byte 64 is fine
        if all(c.isprintable() or c in "\t\r\n" for c in text):
            return f"a text file, not a torch checkpoint (it begins {text.strip()[:40]!r})"
    except UnicodeDecodeError:
        pass
    if "Weights only load failed" in str(error):
        return ("it holds Python objects besides tensors, numbers and containers, which are not loaded "
                "(weights_only=True): not a minclip checkpoint")
    message = str(error).strip().splitlines()[0][:120] if str(error).strip() else "no message"
    return f"not a checkpoint torch can read ({type(error).__name__}: {message})"


def load_model(spec, device="cpu"):
    """spec: a minclip checkpoint (*.pt), 'local-dir:DIR' (open_clip hub directory) or
    'NAME:PRETRAINED' (open_clip, e.g. ViT-B-32:openai; PRETRAINED may be a file) -> (model,
    preprocess, tokenizer), eval mode. model.image_size is the native resolution; minclip models
    also carry model.model_cfg."""
    import open_clip
    if is_checkpoint(spec):
        ckpt = load_checkpoint(spec)
        model = _build(spec, CLIP, ckpt["model_cfg"], "model_cfg")
        model.load_state_dict(ckpt["model"], strict=True)
        model.model_cfg, model.image_size = ckpt["model_cfg"], int(ckpt["model_cfg"]["vision_cfg"].get("image_size", 224))
        tokenizer = open_clip.tokenizer.SimpleTokenizer(context_length=model.context_length)
        preprocess = open_clip.transform.image_transform(model.image_size, is_train=False)  # openai mean/std, bicubic
        return model.to(device).eval(), preprocess, tokenizer
    kwargs = {}
    if spec.startswith("local-dir:"):
        d, name = spec[len("local-dir:"):], spec
        # open_clip itself only logs a warning and returns a *randomly initialised* model when the
        # directory has a config but no weights file, so check for both here
        if not os.path.isfile(os.path.join(d, "open_clip_config.json")):
            raise SystemExit(f"error: --model {spec}: no open_clip_config.json in {d}")
        if not any(f.endswith((".safetensors", ".bin", ".pth")) for f in os.listdir(d)):
            raise SystemExit(f"error: --model {spec}: no weights (*.safetensors, *.bin, *.pth) in {d}")
        try:
            config = data.read_json(os.path.join(d, "open_clip_config.json"))
        except data.DataError as err:
            raise SystemExit(f"error: --model {spec}: {err}")
        if not isinstance(config, dict) or not isinstance(config.get("model_cfg"), dict):
            raise SystemExit(f"error: --model {spec}: {d}/open_clip_config.json has no \"model_cfg\" object")
        model_cfg = config["model_cfg"]
    else:
        name, _, pretrained = spec.partition(":") if not spec.startswith("hf-hub:") else (spec, "", "")
        arch, known = name.replace("/", "-"), open_clip.list_models()
        # open_clip's own error for an unknown name lists every config it has (~3,000 characters)
        if not name.startswith("hf-hub:") and arch not in known:
            close = difflib.get_close_matches(name, known, n=3)
            raise SystemExit(f"error: --model {spec}: neither a checkpoint file, a local-dir: folder nor a known open_clip "
                             "NAME:PRETRAINED" + (f" (close names: {', '.join(close)})" if close else "")
                             + (f"; an open_clip hub folder is given as local-dir:{spec}" if os.path.isdir(spec) else ""))
        # pitfall: OpenAI's ViT-B-32 (and any *-quickgelu tag) was trained with QuickGELU. open_clip
        # 3.x builds plain `ViT-B-32` with GELU and only *warns* about the mismatch, and a fine-tuned
        # checkpoint passed as a file path gets no warning at all: every score silently changes.
        # so follow the tag's flag here; for a file path, name the model ViT-B-32-quickgelu yourself.
        tag = open_clip.pretrained.get_pretrained_cfg(arch, pretrained) if pretrained else {}
        if pretrained and not tag and not os.path.isfile(pretrained):
            tags = open_clip.list_pretrained_tags_by_model(arch)
            close = difflib.get_close_matches(pretrained.lower().replace("-", "_"), tags, n=3)
            raise SystemExit(f"error: --model {spec}: '{pretrained}' is neither a pretrained tag of {name} nor a file"
                             + (f" (close tags: {', '.join(close)})" if close else f" ({len(tags)} tags: open_clip.list_pretrained())"))
        kwargs["pretrained"] = pretrained or None
        kwargs["force_quick_gelu"] = bool(tag.get("quick_gelu", False))
        model_cfg = open_clip.get_model_config(name)
        if model_cfg is not None and kwargs["force_quick_gelu"]:
            model_cfg = {**model_cfg, "quick_gelu": True}
    try:
        model, _, preprocess = open_clip.create_model_and_transforms(name, **kwargs)
        tokenizer = open_clip.get_tokenizer(name)
    except Exception as e:  # open_clip's: no download, a bad config, a PRETRAINED file that is damaged or does not fit
        why = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
        weights = kwargs.get("pretrained") or ""
        if os.path.isfile(weights):
            try:
                torch.load(weights, map_location="cpu", weights_only=True)
                why = f"the weights in {weights} do not fit open_clip's {name} ({why})"
            except Exception as load_error:
                why = f"{weights}: {_unreadable(weights, load_error)}"
        raise SystemExit(f"error: --model {spec}: {why}")
    size = model.visual.image_size
    model.image_size, model.model_cfg = int(size[0] if isinstance(size, (tuple, list)) else size), model_cfg
    return model.to(device).eval(), preprocess, tokenizer


def load_clip(spec, device="cpu"):
    """The --init of the fine-tuning scripts: any spec load_model accepts -> (minclip CLIP with its
    weights, model_cfg, preprocess, tokenizer). open_clip's weights load into minclip's CLIP with
    strict=True (same names, same maths), so every script trains one model class; a model that is not
    the standard ViT + text Transformer CLIP is one clear error."""
    model, preprocess, tokenizer = load_model(spec, device)
    if isinstance(model, CLIP):
        return model, model.model_cfg, preprocess, tokenizer
    try:
        ours = CLIP(**model.model_cfg)
        ours.load_state_dict(model.state_dict(), strict=True)
    except (TypeError, ValueError, RuntimeError) as e:
        raise SystemExit(f"error: --init {spec}: minclip's CLIP cannot hold this model ({str(e).splitlines()[0]})")
    ours.model_cfg, ours.image_size = model.model_cfg, model.image_size
    return ours.to(device).eval(), model.model_cfg, preprocess, tokenizer


def load_captioner(path, device="cpu"):
    """the CLIPS captioner saved beside the towers in a clip_scratch.py checkpoint, or one clear error"""
    ckpt = load_checkpoint(path)
    if not ckpt.get("captioner_cfg"):
        raise SystemExit(f"error: {path} has no captioner: --caption needs a checkpoint trained with "
                         "clip_scratch.py --captioner_weight 2")
    captioner = Captioner(**ckpt["captioner_cfg"])
    captioner.load_state_dict(ckpt["captioner"], strict=True)
    return captioner.to(device).eval()


def export_open_clip(model, model_cfg, out_dir):
    """Write an open_clip hub directory: open_clip_config.json + open_clip_model.safetensors, which
    `open_clip.create_model_and_transforms("local-dir:" + out_dir)` loads with strict=True."""
    from open_clip.constants import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD
    from safetensors.torch import save_file
    os.makedirs(out_dir, exist_ok=True)
    config = {"model_cfg": model_cfg,
              "preprocess_cfg": {"size": model_cfg["vision_cfg"]["image_size"], "mean": list(OPENAI_DATASET_MEAN),
                                 "std": list(OPENAI_DATASET_STD), "interpolation": "bicubic", "resize_mode": "shortest"}}
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}  # safetensors wants contiguous tensors
    # weights first: a crash between the two writes must not leave a config without weights, which
    # open_clip would load as a random model (see load_model)
    weights, cfg_path = os.path.join(out_dir, "open_clip_model.safetensors"), os.path.join(out_dir, "open_clip_config.json")
    save_file(state, f"{weights}.tmp")
    os.replace(f"{weights}.tmp", weights)
    with open(f"{cfg_path}.tmp", "w") as f:
        json.dump(config, f, indent=2)
    os.replace(f"{cfg_path}.tmp", cfg_path)

# -----------------------------------------------------------------------------
# cli


def explain_cli(model, preprocess, tokenizer, args, image_size, native, device):
    """--explain: attributions of one caption and one image, printed per word and drawn to --out"""
    from PIL import Image, ImageOps
    _tower(model.visual, "its image tower")  # a ResNet fails here, before any image is read
    from_scene = args.explain.isdigit()
    if from_scene:
        scene = data.test_scenes(int(args.explain) + 1)[-1]
        pil = Image.fromarray(data.render(scene, image_size))
        text = scene.caption() if args.text is None else args.text
    else:
        if args.text is None:
            raise SystemExit("error: --explain IMAGE_PATH needs --text CAPTION")
        pil, text = open_rgb(args.explain), args.text
    ids = tokenizer([text])
    panels = ([(args.span, span_positions(tokenizer, ids[0], args.span))] if args.span is not None
              else caption_words(tokenizer, ids[0]))
    # what the model sees: minclip models take a shapes render as is, everything else its preprocess
    image = (data.to_tensor(np.asarray(pil)) if native and from_scene else preprocess(pil))[None]
    A, terms = explain(model, image.to(device), ids.to(device), args.layer, args.steps, return_terms=True)
    words = sum(A[pos].sum().item() for _, pos in caption_words(tokenizer, ids[0]))
    print(f"shapes test scene {args.explain}" if from_scene else f"image: {args.explain}")
    print(f"caption: {text!r}\nlayer {args.layer}, {args.steps} steps, a {A.shape[1]}x{A.shape[2]} patch grid")
    print(f"score (cosine)          {terms['score']:+.4f}")
    print(f"sum of attributions     {A.sum().item():+.4f}   (words {words:+.4f}, "
          f"start token {A[0].sum().item():+.4f}, end token {A[-1].sum().item():+.4f})")
    print(f"class-token column      {terms['class_token']:+.4f}")
    print(f"reference terms         {terms['reference']:+.4f}   (score = sum + class token + reference as --steps grows)")
    heats = [(word, A[pos].sum(0)) for word, pos in panels]
    for word, heat in heats:
        print(f"{heat.sum().item():+.4f}  {word}")
    # a square view of the image, cropped like the preprocess crops it, so patches line up
    side = min(pil.size)
    out = args.out or "explain.png"
    save_explanation(ImageOps.fit(pil, (side, side)), [(w, h.sum().item(), h) for w, h in heats], out,
                     note=f"score {terms['score']:+.3f}")
    print(f"wrote {out}")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=__doc__.split("\n\n", 1)[1])
    # model
    p.add_argument("--model", required=True, help="ckpt.pt | local-dir:DIR | NAME:PRETRAINED (open_clip)")
    # benchmark
    p.add_argument("--bench", default="shapes", choices=("shapes", "flickr8k", "coco", "vsr", *COMPOSITIONAL))
    p.add_argument("--data_root", default=None, help="dataset folder (flickr8k, coco, vsr, and the compositional benchmarks)")
    p.add_argument("--image_root", default=None, help="sugarcrepe, valse, vlchecklist, intrinsic --data hnc: "
                   "the images, when not in the default place under --data_root (see README)")
    p.add_argument("--vsr_split", default="random", choices=("random", "zeroshot"), help="vsr: which split's dev/test")
    p.add_argument("--n", type=int, default=1000, help="shapes: number of test scenes")
    p.add_argument("--seed", type=int, default=None, help="shapes: draw the test scenes from this seed (default: the "
                   "fixed test seed); aro: seed of the order perturbations (default 1, ARO's)")
    p.add_argument("--data", default="shapes", choices=("shapes", "hnc"), help="intrinsic: the shapes world's test "
                   "scenes, or HNC's test file under --data_root")
    p.add_argument("--threshold", type=float, default=1.0, help="intrinsic: distinguishing accuracy counts "
                   "cos(v, t+) / (cos(v, t-) + 1e-8) >= threshold")
    # retrieval demo (replaces the metrics)
    p.add_argument("--query", default=None, help="rank the bench's test images by similarity to this text")
    p.add_argument("--top", type=int, default=9, help="with --query: how many matches to show")
    p.add_argument("--grid", default=None, metavar="PNG", help="with --query: save the top matches as an image grid")
    # captioning demo (replaces the metrics)
    p.add_argument("--caption", default=None, metavar="IMAGE_OR_INDEX",
                   help="print the CLIPS captioner's greedy caption of an image file, or of shapes test scene INDEX")
    p.add_argument("--web_caption", default=None, help="with --caption: the web caption it is conditioned on "
                   "(default: the scene's caption; '' for an image file)")
    # explanation demo (replaces the metrics)
    p.add_argument("--explain", default=None, metavar="IMAGE_OR_INDEX",
                   help="draw which words of a caption match which patches of an image file, or of shapes test scene INDEX")
    p.add_argument("--text", default=None, help="with --explain: the caption (default: the scene's; needed for an image file)")
    p.add_argument("--span", default=None, help="with --explain: one panel for these words of the caption (default: one per word)")
    p.add_argument("--layer", type=int, default=-1, help="with --explain: the transformer block whose input is attributed (both towers)")
    p.add_argument("--steps", type=int, default=10, help="with --explain: interpolation steps of the integrated Jacobians")
    # reward model: rank candidates (replaces the metrics)
    p.add_argument("--rank", default=None, metavar="CANDIDATES.jsonl",
                   help="score each row's candidates with --model and write them best first to --out (the input of clip_dpo.py --data rankings)")
    # output
    p.add_argument("--out", default=None, metavar="FILE", help="with --explain: where to write the picture (default explain.png); "
                   "with --rank: where to write the rankings (required)")
    p.add_argument("--json", default=None, metavar="PATH", help="write the metrics as a flat JSON dict")
    p.add_argument("--export", default=None, metavar="DIR", help="write a minclip checkpoint as an open_clip hub directory, then stop")
    # system
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    args = p.parse_args(argv)
    device = torch.device("cuda" if args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available()) else "cpu")

    if args.export and not is_checkpoint(args.model):
        raise SystemExit(f"error: --export needs a minclip checkpoint (*.pt), got --model {args.model}")
    if args.rank and not args.out:
        raise SystemExit("error: --rank needs --out RANKINGS.jsonl")
    model, preprocess, tokenizer = load_model(args.model, device)
    if args.rank:
        try:
            rows = data.read_rankings(args.rank, ranked=False)
        except data.DataError as e:
            raise SystemExit(f"error: {e}")
        folder = os.path.dirname(os.path.abspath(args.out))
        rel = lambda p: os.path.relpath(p, folder)  # noqa: E731  (image paths relative to the output file, as read_rankings wants)
        with open(f"{args.out}.tmp", "w") as f:
            for r, (order, scores) in zip(rows, rank_candidates(model, preprocess, tokenizer, rows, device)):
                ranked = [r["candidates"][i] for i in order]
                line = ({"image": rel(r["query"]), "texts": ranked} if r["direction"] == "i2t" else
                        {"text": r["query"], "images": [rel(p) for p in ranked]})
                f.write(json.dumps(line | {"scores": [round(s, 6) for s in scores]}) + "\n")
        os.replace(f"{args.out}.tmp", args.out)
        print(f"ranked the candidates of {len(rows)} rows of {args.rank} with {args.model}; wrote {args.out}")
        return
    if args.export:
        export_open_clip(model, model.model_cfg, args.export)
        print(f"wrote {args.export}: open_clip.create_model_and_transforms('local-dir:{args.export}')")
        return
    if args.caption is not None:
        if not is_checkpoint(args.model):
            raise SystemExit(f"error: --caption needs a minclip checkpoint (*.pt), got --model {args.model}")
        captioner = load_captioner(args.model, device)
        if args.caption.isdigit():
            scene = data.test_scenes(int(args.caption) + 1)[-1]
            image, web = data.to_tensor(data.render(scene, model.image_size)), scene.caption()
            print(f"shapes test scene {args.caption}\ndescription: {data.description(scene)}")
        else:
            image, web = preprocess(open_rgb(args.caption)), ""
        web = web if args.web_caption is None else args.web_caption
        print(f"web caption: {web!r}\ncaption:     {generate_caption(model, captioner, image, web, tokenizer, device)}")
        return
    native = is_checkpoint(args.model)  # minclip models see the world at their own resolution
    image_size = model.image_size if native else SHAPES_SIZE
    if args.explain is not None:
        explain_cli(model, preprocess, tokenizer, args, image_size, native, device)
        return

    if args.bench in COMPOSITIONAL:
        if args.query:
            raise SystemExit("error: --query ranks the test images of --bench shapes, flickr8k or coco")
        if args.bench == "intrinsic":
            kwargs = dict(source=args.data, root=args.data_root, image_root=args.image_root, threshold=args.threshold,
                          n=args.n, seed=args.seed, image_size=image_size)
        elif args.bench == "aro":
            kwargs = dict(root=args.data_root, seed=1 if args.seed is None else args.seed)
        else:
            kwargs = dict(root=args.data_root, image_root=args.image_root)
        try:
            metrics = COMPOSITIONAL[args.bench](model, preprocess, tokenizer, device, **kwargs)
        except data.DataError as e:
            raise SystemExit(f"error: {e}")
        return report(args, metrics)

    # the bench's test images (PIL images or paths) with one caption each, for the demo
    if args.bench == "shapes":
        from PIL import Image
        scenes = data.test_scenes(args.n, data.TEST_SEED if args.seed is None else args.seed) if args.query else []
        images, labels = [Image.fromarray(data.render(s, image_size)) for s in scenes], [s.caption() for s in scenes]
    else:
        if args.data_root is None:
            raise SystemExit(f"error: --bench {args.bench} needs --data_root")
        try:
            if args.bench == "vsr":
                vsr = data.read_vsr(args.data_root, args.vsr_split)
                items = [(r.image, [r.caption]) for r in vsr["test"]]
            else:
                items = data.read_dataset(args.bench, args.data_root)["test"]
        except data.DataError as e:
            raise SystemExit(f"error: {e}")
        images, labels = [path for path, _ in items], [f"{os.path.basename(path)}  {caps[0]}" for path, caps in items]

    if args.query:
        matches = find_matches(model, preprocess, tokenizer, images, args.query, device, args.top)
        print(f"top {len(matches)} of {len(images)} test images for {args.query!r}:")
        for i, score in matches:
            print(f"{score:8.4f}  {labels[i]}")
        if args.grid:
            save_grid([images[i] for i, _ in matches], [s for _, s in matches], args.grid)
            print(f"wrote {args.grid}")
        return

    if args.bench == "shapes":
        metrics = eval_shapes(model, tokenizer, image_size, device, n=args.n, seed=args.seed,
                              preprocess=None if native else preprocess)
    elif args.bench == "vsr":
        metrics = eval_vsr(model, preprocess, tokenizer, vsr["test"], vsr["dev"], device)
    else:
        metrics = eval_retrieval(model, preprocess, tokenizer, items, device)
    report(args, metrics)


def report(args, metrics):
    """print the metrics as a table (counts as integers, a part without data as 'missing'), and --json"""
    width = max(map(len, metrics))
    print(f"{args.model} on {args.bench}")
    for k, v in metrics.items():
        print(f"{k:<{width}}  {'missing' if v is None else f'{v:8d}' if isinstance(v, int) else f'{v:8.4f}'}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"model": args.model, "bench": args.bench, **metrics}, f, indent=2)


if __name__ == "__main__":
    main()
