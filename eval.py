"""
Evaluation shared by the minclip scripts, and its CLI.

    python eval.py --model out/clip_scratch/ckpt.pt                       # the shapes benchmark
    python eval.py --model ViT-B-32:openai --bench shapes                  # any open_clip NAME:PRETRAINED
    python eval.py --model local-dir:out/export --bench flickr8k --data_root ~/data/flickr8k
    python eval.py --model out/clip_dpo/ckpt.pt --bench vsr --data_root ~/data/vsr [--vsr_split zeroshot]
    python eval.py --model out/clip_hardneg/ckpt.pt --bench sugarcrepe --data_root ~/data/sugar-crepe   # any tasks/NAME.py
    python eval.py --model out/clip_scratch/ckpt.pt --query "a small red circle left of a large blue square" --grid grid.png
    python eval.py --model out/clip_scratch/ckpt.pt --explain 7 --out explain.png    # which words match which patches
    python eval.py --model out/clips/ckpt.pt --caption 7                  # the CLIPS captioner on shapes test scene 7
    python eval.py --model out/rm/ckpt.pt --rank candidates.jsonl --out rankings.jsonl   # a reward model ranks candidates
    python eval.py --model out/clip_scratch/ckpt.pt --export out/export   # an open_clip hub folder

Protocols: the unwrapped model in eval mode under no_grad, on the whole fixed split. Retrieval:
image->text rank = the best rank among the image's captions, text->image one rank per caption
(CLIP_benchmark's text_/image_retrieval_recall@k). Pairwise probes: correct iff the positive scores
strictly higher. Ties count against the model everywhere, so a collapsed model that cannot tell two
captions apart never gets credit for either. VSR (vsr/ keys, the VSR dataset only): true/false
statements scored two ways -- contrast (True iff the caption beats the caption with its relation
replaced by the contrast relation) and threshold (True iff cos > tau, tau fitted on dev) -- with
accuracy and per-class / macro precision, recall and F1, and the contrast protocol's accuracy per
meta-category of VSR's and per relation (vsr/by_meta/, vsr/by_relation/). The shapes world's own
true/false statements (statements/ keys) are scored by the contrast protocol. The compositional
benchmarks are one file each in tasks/.
"""

import importlib
import json
import math
import os
import pkgutil
import textwrap

import torch

import data
import shapes
from model import Captioner, export_open_clip, is_checkpoint, load_checkpoint, load_model
from training import Parser

SHAPES_SIZE = 64  # the shapes bench's default resolution, what external models see before their preprocess
LABEL_H = 16  # height of the score strip under each image of a --grid

# -----------------------------------------------------------------------------
# metrics


def retrieval_ranks(image_features, text_features, text_to_image, block=2048):
    """The ranks of S = image_features @ text_features.T ([n_images, D], [n_texts, D]; text_to_image:
    [n_texts] long, the image each text describes) -> (i2t [n_images]: the wrong texts scoring >= the
    image's best caption, t2i [n_texts]: the wrong images scoring >= the text's own), ties against the
    model. S is computed in [block, block] tiles on the features' device, never whole (COCO val2014
    without the Karpathy split: 40k x 200k, 32 GB in fp32): a first pass over the tiles that hold true
    pairs reads each text's own score, a second over every tile counts; both passes compute a tile
    alike, so every comparison is between scores of the same arithmetic."""
    img, txt = image_features.float(), text_features.float()
    owner = text_to_image.long().cpu()  # the tile bookkeeping stays on the host: no device sync
    t2i_dev, device = owner.to(img.device), img.device
    n_img, n_txt = len(img), len(txt)
    tile = lambda i, j: img[i : i + block] @ txt[j : j + block].T  # noqa: E731
    own = torch.empty(n_txt, device=device)  # S[text_to_image[t], t]
    for j in range(0, n_txt, block):
        for i in ((owner[j : j + block] // block).unique() * block).tolist():
            here = ((owner[j : j + block] >= i) & (owner[j : j + block] < i + block)).nonzero().squeeze(1)
            own[j + here.to(device)] = tile(i, j)[(owner[j + here] - i).to(device), here.to(device)]
    # an image's best caption
    best = torch.full((n_img,), float("-inf"), device=device).scatter_reduce(0, t2i_dev, own, "amax")
    i2t, t2i = (
        torch.zeros(n_img, dtype=torch.long, device=device),
        torch.zeros(n_txt, dtype=torch.long, device=device),
    )
    for i in range(0, n_img, block):
        for j in range(0, n_txt, block):
            s = tile(i, j)
            above_best, above_own = s >= best[i : i + block, None], s >= own[None, j : j + block]
            # the tile holds true pairs: not counted
            if owner[j : j + block].max() >= i and owner[j : j + block].min() < i + block:
                wrong = t2i_dev[None, j : j + block] != torch.arange(i, i + len(s), device=device)[:, None]
                above_best, above_own = above_best & wrong, above_own & wrong
            # int32 sums: faster than int64 ones on CPU
            i2t[i : i + block] += above_best.sum(1, dtype=torch.int32)
            t2i[j : j + block] += above_own.sum(0, dtype=torch.int32)
    return i2t.cpu(), t2i.cpu()


def retrieval_metrics(image_features, text_features, text_to_image, ks=(1, 5, 10), block=2048):
    """R@k of S = image_features @ text_features.T for i2t (an image is found at the best rank among
    its captions) and t2i (one rank per caption), the median ranks (1-based, floor of numpy's median
    + 1 as in VSE++) and rsum. A rank counts every wrong item scoring >= the right one: ties are
    resolved against the model. Ranks in tiles of block x block scores (retrieval_ranks)."""
    i2t_rank, t2i_rank = retrieval_ranks(image_features, text_features, text_to_image, block)
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
        out |= {
            f"{name}_precision": precision,
            f"{name}_recall": recall,
            f"{name}_f1": 2 * precision * recall / (precision + recall) if precision + recall else 0.0,
        }
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
    return torch.cat(
        [
            model.encode_image(images[i : i + batch_size].to(device), normalize=True).float().cpu()
            for i in range(0, len(images), batch_size)
        ]
    )


@torch.no_grad()
def encode_texts(model, tokenizer, texts, device, batch_size=256):
    return torch.cat(
        [
            model.encode_text(tokenizer(texts[i : i + batch_size]).to(device), normalize=True).float().cpu()
            for i in range(0, len(texts), batch_size)
        ]
    )


def open_rgb(image):
    """a PIL image, or a path to one -> RGB PIL image"""
    from PIL import Image

    if isinstance(image, Image.Image):
        return image.convert("RGB")
    try:
        with Image.open(image) as im:
            return im.convert("RGB")
    except (OSError, ValueError) as e:  # a test split must be whole: fail with the file's name
        raise SystemExit(f"error: {image}: unreadable image ({e})") from None


def encode_pil(model, preprocess, images, device, batch_size=128):
    """images: PIL images or paths, decoded one batch at a time (coco's 5k test photos decoded at
    once would take ~5 GB) -> [n, D] normalised features"""
    return torch.cat(
        [
            encode_images(
                model, torch.stack([preprocess(open_rgb(im)) for im in images[i : i + batch_size]]), device
            )
            for i in range(0, len(images), batch_size)
        ]
    )


# -----------------------------------------------------------------------------
# benchmarks


@torch.no_grad()
def eval_shapes(model, tokenizer, image_size, device, n=1000, seed=None, preprocess=None, holdout=False):
    """The built-in shapes benchmark on n test scenes with unique content: retrieval, one pairwise
    probe per hard-negative kind (the scene's own caption vs the negative) and the true/false
    statements (statements/acc, statements/macro_f1: VSR's contrast protocol on the world's own
    statements, not VSR's data). With holdout, every metric twice: seen/... over the scenes that
    show no held-out combination (shapes.holdout_combos), unseen/... over the others, each a
    retrieval pool of its own."""
    scenes = shapes.test_scenes(n, shapes.TEST_SEED if seed is None else seed)
    if not holdout:
        return _shapes_metrics(model, tokenizer, scenes, image_size, device, preprocess)
    held = shapes.holdout_combos()
    out = {}
    for name, part in (
        ("seen", [s for s in scenes if not shapes.unseen(s, held)]),
        ("unseen", [s for s in scenes if shapes.unseen(s, held)]),
    ):
        out |= {
            f"{name}/{k}": v
            for k, v in _shapes_metrics(model, tokenizer, part, image_size, device, preprocess).items()
        }
        out[f"{name}/n"] = len(part)
    return out


def _shapes_metrics(model, tokenizer, scenes, image_size, device, preprocess):
    was_training = model.training
    model.eval()
    n = len(scenes)
    if preprocess is None:  # minclip models: the world renders at the model's resolution
        images = torch.stack([data.to_tensor(shapes.render(s, image_size)) for s in scenes])
    else:  # external models: render, then their own preprocessing
        from PIL import Image

        images = torch.stack([preprocess(Image.fromarray(shapes.render(s, image_size))) for s in scenes])
    img = encode_images(model, images, device)
    txt = encode_texts(model, tokenizer, [s.caption() for s in scenes], device)
    out = retrieval_metrics(img, txt, torch.arange(n))
    pos = (img * txt).sum(-1)
    for kind, fn in shapes.NEGATIVES.items():
        neg = encode_texts(model, tokenizer, [fn(s) for s in scenes], device)
        out[f"probe/{kind}"] = pairwise_accuracy(pos, (img * neg).sum(-1))
        if kind == "relation":
            out["diag/relation_text_cos"] = (txt * neg).sum(-1).mean().item()
    # VSR's contrast protocol on the scenes' true/false statements ("The red circle is left of the
    # blue square."): two rows per scene, the true statement and its converse, balanced
    rows = [
        (i, text, label, rel)
        for i, s in enumerate(scenes)
        for (text, label), rel in zip(shapes.statements(s), (s.relation(), shapes.CONVERSE[s.relation()]))
    ]
    index, texts, labels, relations = zip(*rows)
    m = vsr_contrast(
        img[list(index)],
        encode_texts(model, tokenizer, list(texts), device),
        encode_texts(
            model, tokenizer, [data.contrast_caption(t, r) for t, r in zip(texts, relations)], device
        ),
        labels,
    )
    # not VSR's data: statements/, not vsr/
    out["statements/acc"], out["statements/macro_f1"] = m["acc"], m["macro_f1"]
    model.train(was_training)
    return out


def vsr_contrast(image, caption, contrast, label):
    """VSR's contrast protocol: predict True iff the image scores its caption strictly higher than
    the caption with the relation replaced by its contrast; the target is the row's label, whichever
    string was edited, so a model that always prefers the unedited caption scores the fraction of
    true rows (0.5 on a balanced set). image, caption, contrast: [n, D] normalised features; label
    bool [n] -> binary_metrics."""
    return binary_metrics(contrast_pred(image, caption, contrast), label)


def contrast_pred(image, caption, contrast):
    """the contrast protocol's prediction per row: True iff the caption scores strictly higher -> bool [n]"""
    return (image * caption).sum(-1) > (image * contrast).sum(-1)


def vsr_breakdown(correct, relations, by_relation=True):
    """VSR's analysis scripts' breakdown of a protocol's predictions: correct bool [n], relations
    (one a row) -> vsr/by_meta/<category>/acc and /n over the rows of each of VSR's meta-categories
    (data.VSR_META, in its order), and with by_relation vsr/by_relation/<relation>/acc and /n
    (relations as VSR names them, in sorted order); a category or relation without rows has no keys."""
    correct, out = torch.as_tensor(correct, dtype=torch.bool), {}
    groups = [("by_meta", c, [data.VSR_META[r] == c for r in relations]) for c in data.VSR_META_LISTS]
    groups += (
        [("by_relation", r, [x == r for x in relations]) for r in data.VSR_RELATIONS] if by_relation else []
    )
    for kind, name, member in groups:
        member = torch.tensor(member, dtype=torch.bool)
        if n := int(member.sum()):  # VSR's scripts' sum(correct) / len, exactly
            out |= {f"vsr/{kind}/{name}/acc": int(correct[member].sum()) / n, f"vsr/{kind}/{name}/n": n}
    return out


@torch.no_grad()
def eval_vsr(model, preprocess, tokenizer, rows, calib_rows, device, batch_size=128, by_relation=True):
    """VSR, both protocols, on rows (data.VSRRow) -> {"vsr/..." (contrast), "vsr_threshold/..."}.
    - contrast: vsr_contrast on every row whose relation has a contrast (data.VSR_CONTRAST); rows
      with a skipped relation are counted in vsr/skipped, vsr/n is the number scored; its accuracy
      per meta-category of VSR's (vsr/by_meta/<category>/acc, /n) and, with by_relation, per
      relation (vsr/by_relation/<relation>/acc, /n) over the rows scored (vsr_breakdown);
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
        pred = contrast_pred(
            img[[where[r.image] for r in scored]],
            encode_texts(model, tokenizer, [r.caption for r in scored], device, batch_size),
            encode_texts(
                model,
                tokenizer,
                [data.contrast_caption(r.caption, r.relation) for r in scored],
                device,
                batch_size,
            ),
        )
        label = torch.tensor([r.label for r in scored])
        out |= {f"vsr/{k}": v for k, v in binary_metrics(pred, label).items()}
    out |= {"vsr/n": len(scored), "vsr/skipped": len(rows) - len(scored)}
    if scored:
        out |= vsr_breakdown(pred == label, [r.relation for r in scored], by_relation)

    def cosines(rs):
        return (
            img[[where[r.image] for r in rs]]
            * encode_texts(model, tokenizer, [r.caption for r in rs], device, batch_size)
        ).sum(-1)

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
    return retrieval_metrics(img.to(device), txt.to(device), text_to_image)  # in tiles, on the device


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
        grid.paste(
            ImageOps.fit(im, (cell, cell), Image.Resampling.NEAREST if small else Image.Resampling.BICUBIC),
            (x, y),
        )
        draw.text((x + 4, y + cell + 2), f"{score:.3f}", fill="black")  # pil's default bitmap font
    _save_png(grid, path)


def _save_png(image, path):
    """write to a temp file, then rename: a crash never leaves half a picture at path"""
    tmp = f"{path}.tmp.{os.getpid()}.png"  # keep the suffix: pil picks the format from it
    image.save(tmp)
    os.replace(tmp, path)


def load_captioner(path, device="cpu"):
    """the CLIPS captioner saved beside the towers in a clip_scratch.py checkpoint, or one clear error"""
    ckpt = load_checkpoint(path)
    if not ckpt.get("captioner_cfg"):
        raise SystemExit(
            f"error: {path} has no captioner: --caption needs a checkpoint trained with "
            "clip_scratch.py --captioner_weight 2"
        )
    captioner = Captioner(**ckpt["captioner_cfg"])
    captioner.load_state_dict(ckpt["captioner"], strict=True)
    return captioner.to(device).eval()


@torch.no_grad()
def generate_caption(model, captioner, image, web_caption, tokenizer, device="cpu"):
    """The CLIPS captioner's greedy caption of one image (float [3, S, S], preprocessed) given its
    web caption -> text (lowercase, bpe-spaced as the tokenizer decodes it)."""
    model.eval(), captioner.eval()
    web = tokenizer([web_caption]).to(device)
    _, image_tokens = model.encode_image(image[None].to(device), return_tokens=True)
    _, text_tokens = model.encode_text(web, return_tokens=True)
    ids = captioner.greedy(captioner(image_tokens, text_tokens, web))[0].tolist()
    ids = ids[: ids.index(tokenizer.eot_token_id)] if tokenizer.eot_token_id in ids else ids
    return tokenizer.decode(ids).strip()


def evaluate(model, preprocess, tokenizer, device, evalset, split, image_size, n=1000):
    """The training scripts' evaluation of `model` -> metrics, or None when there is nothing to score.
    evalset: "shapes-none" or "shapes-combos" (the shapes benchmark, n test scenes at image_size; its
    seen and unseen scenes apart, --holdout combos), splits of image-caption
    items {"val", "test"} (retrieval on evalset[split]), VSR rows {"val", "test", "calib"} (both
    protocols, the threshold fitted on "calib", VSR's dev split; of the breakdown the 7
    meta-categories only, so the scripts' eval lines stay readable: eval.py --bench vsr --json
    gives the per-relation keys), or None."""
    if evalset in ("shapes-none", "shapes-combos"):
        return eval_shapes(model, tokenizer, image_size, device, n=n, holdout=evalset == "shapes-combos")
    if evalset is None:
        return None
    if "calib" in evalset:
        return eval_vsr(
            model, preprocess, tokenizer, evalset[split], evalset["calib"], device, by_relation=False
        )
    return eval_retrieval(model, preprocess, tokenizer, evalset[split], device)


def task(name):
    """tasks/NAME.py, a benchmark of its own: run(model, preprocess, tokenizer, device, args) -> metrics"""
    return importlib.import_module(f"tasks.{name}")


def tasks():
    """the benchmarks in tasks/: every module there with a run()"""
    folder = os.path.join(os.path.dirname(os.path.abspath(__file__)), "tasks")
    return sorted(m.name for m in pkgutil.iter_modules([folder]) if hasattr(task(m.name), "run"))


# -----------------------------------------------------------------------------
# cli


def main(argv=None):
    p = Parser(__doc__)
    # model
    p.add_argument("--model", required=True, help="ckpt.pt | local-dir:DIR | NAME:PRETRAINED (open_clip)")
    # benchmark
    p.add_argument("--bench", default="shapes", choices=("shapes", "flickr8k", "coco", "vsr", *tasks()))
    p.add_argument(
        "--data_root",
        default=None,
        help="dataset folder (flickr8k, coco, vsr, and the compositional benchmarks)",
    )
    p.add_argument(
        "--image_root",
        default=None,
        help="vsr, sugarcrepe, valse, vlchecklist, intrinsic --data hnc: "
        "the images, when not in the default place under --data_root (see README)",
    )
    p.add_argument(
        "--vsr_split", default="random", choices=("random", "zeroshot"), help="vsr: which split's dev/test"
    )
    p.add_argument("--eval_n", "--n", type=int, default=1000, help="shapes: number of test scenes")
    p.add_argument(
        "--seed",
        type=int,
        default=None,
        help="shapes: draw the test scenes from this seed (default: the "
        "fixed test seed); aro: seed of the order perturbations (default 1, ARO's)",
    )
    p.add_argument(
        "--holdout",
        default="none",
        choices=("none", "combos"),
        help="shapes: every metric on the scenes "
        "that show no held-out combination (seen/) and on the others (unseen/)",
    )
    p.add_argument(
        "--data",
        default="shapes",
        choices=("shapes", "hnc"),
        help="intrinsic: the shapes world's test scenes, or HNC's test file under --data_root",
    )
    p.add_argument(
        "--threshold",
        type=float,
        default=1.0,
        help="intrinsic: distinguishing accuracy counts cos(v, t+) / (cos(v, t-) + 1e-8) >= threshold",
    )
    # retrieval demo (replaces the metrics)
    p.add_argument("--query", default=None, help="rank the bench's test images by similarity to this text")
    p.add_argument("--top", type=int, default=9, help="with --query: how many matches to show")
    p.add_argument(
        "--grid", default=None, metavar="PNG", help="with --query: save the top matches as an image grid"
    )
    # captioning demo (replaces the metrics)
    p.add_argument(
        "--caption",
        default=None,
        metavar="IMAGE_OR_INDEX",
        help="print the CLIPS captioner's greedy caption of an image file, or of shapes test scene INDEX",
    )
    p.add_argument(
        "--web_caption",
        default=None,
        help="with --caption: the web caption it is conditioned on "
        "(default: the scene's caption; '' for an image file)",
    )
    # explanation demo (replaces the metrics)
    p.add_argument(
        "--explain",
        default=None,
        metavar="IMAGE_OR_INDEX",
        help="draw which words of a caption match which patches of an image file, or of shapes test scene INDEX",
    )
    p.add_argument(
        "--text",
        default=None,
        help="with --explain: the caption (default: the scene's; needed for an image file)",
    )
    p.add_argument(
        "--span",
        default=None,
        help="with --explain: one panel for these words of the caption (default: one per word)",
    )
    p.add_argument(
        "--layer",
        type=int,
        default=-1,
        help="with --explain: the transformer block whose input is attributed (both towers)",
    )
    p.add_argument(
        "--steps",
        type=int,
        default=10,
        help="with --explain: interpolation steps of the integrated Jacobians",
    )
    # reward model: rank candidates (replaces the metrics)
    p.add_argument(
        "--rank",
        default=None,
        metavar="CANDIDATES.jsonl",
        help="score each row's candidates with --model and write them best first to --out (the input of clip_dpo.py --data rankings)",
    )
    # output
    p.add_argument(
        "--out",
        default=None,
        metavar="FILE",
        help="with --explain: where to write the picture (default explain.png); "
        "with --rank: where to write the rankings (required)",
    )
    p.add_argument("--json", default=None, metavar="PATH", help="write the metrics as a flat JSON dict")
    p.add_argument(
        "--export",
        default=None,
        metavar="DIR",
        help="write a minclip checkpoint as an open_clip hub directory, then stop",
    )
    # system
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    args = p.parse_args(argv)
    reads_image_root = (
        "vsr",
        "sugarcrepe",
        "valse",
        "vlchecklist",
        *(("intrinsic",) if args.data == "hnc" else ()),
    )
    if args.image_root is not None and args.bench not in reads_image_root:
        p.error(
            f"--image_root: --bench {args.bench}{' --data shapes' if args.bench == 'intrinsic' else ''} does not read it "
            f"(it is for --bench {', '.join(reads_image_root[:4])}, intrinsic --data hnc)"
        )
    device = torch.device(
        "cuda" if args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available()) else "cpu"
    )

    if args.export and not is_checkpoint(args.model):
        raise SystemExit(f"error: --export needs a minclip checkpoint (*.pt), got --model {args.model}")
    if args.rank and not args.out:
        raise SystemExit("error: --rank needs --out RANKINGS.jsonl")
    model, preprocess, tokenizer = load_model(args.model, device)
    if args.rank:
        try:
            rows = data.read_rankings(args.rank, ranked=False)
        except data.DataError as e:
            raise SystemExit(f"error: {e}") from None
        folder = os.path.dirname(os.path.abspath(args.out))
        # image paths relative to the output file, as read_rankings wants
        rel = lambda p: os.path.relpath(p, folder)
        with open(f"{args.out}.tmp", "w") as f:
            for r, (order, scores) in zip(rows, rank_candidates(model, preprocess, tokenizer, rows, device)):
                ranked = [r["candidates"][i] for i in order]
                line = (
                    {"image": rel(r["query"]), "texts": ranked}
                    if r["direction"] == "i2t"
                    else {"text": r["query"], "images": [rel(p) for p in ranked]}
                )
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
            scene = shapes.test_scenes(int(args.caption) + 1)[-1]
            image, web = data.to_tensor(shapes.render(scene, model.image_size)), scene.caption()
            print(f"shapes test scene {args.caption}\ndescription: {shapes.description(scene)}")
        else:
            image, web = preprocess(open_rgb(args.caption)), ""
        web = web if args.web_caption is None else args.web_caption
        print(
            f"web caption: {web!r}\ncaption:     {generate_caption(model, captioner, image, web, tokenizer, device)}"
        )
        return
    native = is_checkpoint(args.model)  # minclip models see the world at their own resolution
    image_size = model.image_size if native else SHAPES_SIZE
    if args.explain is not None:
        task("explain").cli(model, preprocess, tokenizer, args, image_size, native, device)
        return

    if args.bench not in ("shapes", "flickr8k", "coco", "vsr"):
        if args.query:
            raise SystemExit("error: --query ranks the test images of --bench shapes, flickr8k or coco")
        args.image_size = image_size  # what the shapes world renders at for this model
        try:
            metrics = task(args.bench).run(model, preprocess, tokenizer, device, args)
        except data.DataError as e:
            raise SystemExit(f"error: {e}") from None
        return report(args, metrics)

    # the bench's test images (PIL images or paths) with one caption each, for the demo
    if args.bench == "shapes":
        from PIL import Image

        scenes = (
            shapes.test_scenes(args.eval_n, shapes.TEST_SEED if args.seed is None else args.seed)
            if args.query
            else []
        )
        images, labels = (
            [Image.fromarray(shapes.render(s, image_size)) for s in scenes],
            [s.caption() for s in scenes],
        )
    else:
        if args.data_root is None:
            raise SystemExit(f"error: --bench {args.bench} needs --data_root")
        try:
            if args.bench == "vsr":
                # their images only
                vsr = data.read_vsr(args.data_root, args.vsr_split, args.image_root, parts=("dev", "test"))
                items = [(r.image, [r.caption]) for r in vsr["test"]]
            else:
                items = data.read_dataset(args.bench, args.data_root)["test"]
        except data.DataError as e:
            raise SystemExit(f"error: {e}") from None
        images, labels = (
            [path for path, _ in items],
            [f"{os.path.basename(path)}  {caps[0]}" for path, caps in items],
        )

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
        metrics = eval_shapes(
            model,
            tokenizer,
            image_size,
            device,
            n=args.eval_n,
            seed=args.seed,
            preprocess=None if native else preprocess,
            holdout=args.holdout == "combos",
        )
    elif args.bench == "vsr":
        metrics = eval_vsr(model, preprocess, tokenizer, vsr["test"], vsr["dev"], device)
    else:
        metrics = eval_retrieval(model, preprocess, tokenizer, items, device)
    report(args, metrics)


def report(args, metrics):
    """print the metrics as a table (counts as integers, a part without data as 'missing'), VSR's
    breakdown as vsr_table's few lines instead of its keys, and --json (every key)"""
    flat = {k: v for k, v in metrics.items() if not k.startswith(("vsr/by_meta/", "vsr/by_relation/"))}
    width = max(map(len, flat))
    print(f"{args.model} on {args.bench}")
    for k, v in flat.items():
        print(f"{k:<{width}}  {'missing' if v is None else f'{v:8d}' if isinstance(v, int) else f'{v:8.4f}'}")
    for line in vsr_table(metrics):
        print(line)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"model": args.model, "bench": args.bench, **metrics}, f, indent=2)


def vsr_table(metrics, width=110):
    """VSR's breakdown (vsr_breakdown's keys) as one line per meta-category: its accuracy and rows,
    then its relations' as "relation acc (n)", most rows first, wrapped under the line -> [lines]"""
    if not any(k.startswith("vsr/by_meta/") for k in metrics):
        return []
    lines = ["vsr by meta-category (contrast protocol, the rows scored): acc, n; its relations: acc (n)"]
    for category in data.VSR_META_LISTS:
        if f"vsr/by_meta/{category}/n" not in metrics:
            continue
        rels = sorted(
            (
                r
                for r in data.VSR_RELATIONS
                if data.VSR_META[r] == category and f"vsr/by_relation/{r}/n" in metrics
            ),
            key=lambda r: (-metrics[f"vsr/by_relation/{r}/n"], r),
        )
        head = f"  {category:<12} {metrics[f'vsr/by_meta/{category}/acc']:.4f} {metrics[f'vsr/by_meta/{category}/n']:6d}  "
        # no-break spaces inside an item: textwrap breaks between "relation acc (n)" items only
        items = ", ".join(
            f"{r} {metrics[f'vsr/by_relation/{r}/acc']:.2f} ({metrics[f'vsr/by_relation/{r}/n']})".replace(
                " ", "\xa0"
            )
            for r in rels
        )
        wrapped = (
            textwrap.wrap(items, width, initial_indent=head, subsequent_indent=" " * len(head))
            if rels
            else [head.rstrip()]
        )
        lines += [line.replace("\xa0", " ") for line in wrapped]
    return lines


if __name__ == "__main__":
    main()
