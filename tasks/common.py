"""
The multiple-choice scoring every compositional benchmark shares.

SugarCrepe, ARO, VALSE, VL-CheckList and the intrinsic metrics are each a multiple choice per
image: a reader turns the released files into items (image, [right caption, wrong caption, ...])
and choice_scores scores a whole set in one batched pass. An item is correct only if the right
caption scores strictly higher than every other (a tie is wrong). An image that cannot be read is
counted and reported, and the accuracies are over the readable items; a part none of whose images
can be read stops the run with the folder it looked in. An item whose right caption and a wrong one
are the same token ids at the model's context length (they differ only past it: at 32 tokens,
VALSE's long coreference captions; or only in what the tokenizer drops, case and spacing) is a tie,
so wrong; such items are counted (<bench>/n_truncated_ties) and named in one line.
"""

import os
import time

import torch

from data import DataError
from eval import encode_images, encode_texts

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
    takes it. Every distinct image and token sequence is encoded once, in batches, normalised: texts
    that the tokenizer cuts to the same ids share one embedding, so they tie exactly.
    -> scores [n, K] cosine similarities, readable [n] bool, truncated [n] bool (a wrong text that
    differs from the right one as a string but not as token ids). Unreadable images leave NaN rows;
    a wrong text identical to the right one is NaN: it is the same caption, not a distractor (ARO's
    shuffles leave some captions unchanged, and its argmax gave those ties to the caption)."""
    was_training = model.training
    model.eval()
    if len({len(cands) for _, cands in items}) > 1:
        raise ValueError("choice_scores: every item needs the same number of texts")
    # pil images: by identity
    key = lambda ref: ref if isinstance(ref, (str, tuple)) else id(ref)
    refs = {key(image): image for image, _ in items}
    keys = list(refs)
    texts = list(dict.fromkeys(t for _, cands in items for t in cands))
    row, feats, last = {}, [], time.time()
    for i in range(0, len(keys), batch_size):
        good = [(k, im) for k in keys[i : i + batch_size] if (im := _open_choice_image(refs[k])) is not None]
        if good:
            feats.append(encode_images(model, torch.stack([preprocess(im) for _, im in good]), device))
            row |= {k: len(row) + j for j, (k, _) in enumerate(good)}
        last = _progress(f"{desc} images", min(i + batch_size, len(keys)), len(keys), last)
    ids = (
        torch.cat([tokenizer(texts[i : i + 1024]) for i in range(0, len(texts), 1024)])
        if texts
        else torch.zeros(0, 1)
    )
    ids, inverse = torch.unique(ids, dim=0, return_inverse=True)  # one row a distinct token sequence
    txt = []
    for i in range(0, len(ids), 1024):
        txt.append(
            encode_texts(model, lambda rows: rows, ids[i : i + 1024], device)
        )  # rows already tokenised
        last = _progress(f"{desc} texts", min(i + 1024, len(ids)), len(ids), last)
    txt = torch.cat(txt) if txt else None
    col = dict(zip(texts, inverse.tolist()))
    truncated = torch.tensor(
        [any(t != cands[0] and col[t] == col[cands[0]] for t in cands[1:]) for _, cands in items],
        dtype=torch.bool,
    )
    readable = torch.tensor([key(image) in row for image, _ in items], dtype=torch.bool)
    scores = torch.full((len(items), len(items[0][1]) if items else 0), float("nan"))
    if readable.any():
        img = torch.cat(feats)
        kept = [item for item, ok in zip(items, readable) if ok]
        image_rows = torch.tensor([row[key(image)] for image, _ in kept])
        text_cols = torch.tensor([[col[t] for t in cands] for _, cands in kept])  # [m, K]
        # identical strings share one embedding, so a model that cannot tell them apart ties exactly
        scores[readable] = (img[image_rows][:, None, :] * txt[text_cols]).sum(-1)
        same = torch.tensor(
            [[j > 0 and t == cands[0] for j, t in enumerate(cands)] for _, cands in items], dtype=torch.bool
        )
        scores[same] = float("nan")
    model.train(was_training)
    return scores, readable, truncated


def choice_correct(scores):
    """scores [n, K] as choice_scores gives them, column 0 the right caption -> [n] bool: strictly
    above every wrong caption; an item whose wrong captions all equal the right one is wrong, as
    VALSE's and VL-CheckList's own scoring count their few pairs with caption == foil"""
    wrong = scores[:, 1:]
    best = wrong.nan_to_num(nan=float("-inf")).max(1).values
    return (scores[:, 0] > best) & ~wrong.isnan().all(1)


class Chooser:
    """scores the parts of one benchmark with one model, tallying items, unreadable images and the
    readable items that are truncated ties (choice_scores), per part"""

    def __init__(self, bench, model, preprocess, tokenizer, device):
        self.bench, self.model, self.preprocess, self.tokenizer, self.device = (
            bench,
            model,
            preprocess,
            tokenizer,
            device,
        )
        self.n_items, self.unreadable, self.ties = 0, {}, {}

    def scores(self, items, where, count=True):
        """-> (scores [m, K], readable [m]) for the items; raises if none of their images can be read"""
        scores, readable, truncated = choice_scores(
            self.model, self.preprocess, self.tokenizer, items, self.device, desc=f"{self.bench} {where}"
        )
        if items and not readable.any():
            raise DataError(
                f"{self.bench}: {where}: none of its {len(items)} images could be read "
                f"(first: {_image_path(items[0][0])})"
            )
        self.n_items += len(items) if count else 0
        self.unreadable |= dict.fromkeys(_image_path(im) for (im, _), ok in zip(items, readable) if not ok)
        if n_ties := int((truncated & readable).sum()):
            self.ties[where] = self.ties.get(where, 0) + n_ties
        return scores, readable

    def correct(self, items, where):
        """-> [m'] bool over the readable items: the right caption strictly above every other"""
        scores, readable = self.scores(items, where)
        return choice_correct(scores[readable])

    def counts(self):
        """-> n_items, unreadable_images, n_truncated_ties, and n_truncated_ties/<part> for each part that has any"""
        if self.unreadable:
            print(
                f"{self.bench}: {len(self.unreadable)} image(s) could not be read, their items are left out "
                f"of every accuracy (first: {next(iter(self.unreadable))})"
            )
        if self.ties:
            length = getattr(self.tokenizer, "context_length", None)
            print(
                f"{self.bench}: {sum(self.ties.values())} item(s) whose right and wrong captions are the same tokens at the "
                f"model's context length{f' ({length})' if length else ''} tie, counted wrong: "
                + ", ".join(f"{where} {n}" for where, n in self.ties.items())
            )
        return {
            f"{self.bench}/n_items": self.n_items,
            f"{self.bench}/unreadable_images": len(self.unreadable),
            f"{self.bench}/n_truncated_ties": sum(self.ties.values()),
        } | {f"{self.bench}/n_truncated_ties/{where}": n for where, n in self.ties.items()}


def mean(xs):
    xs = list(xs)
    return sum(xs) / len(xs) if xs else None


def accuracy(correct):
    return correct.float().mean().item()


def bench_root(bench, root, expects):
    if root is None or not os.path.isdir(root):
        raise DataError(f"{bench}: --data_root {root} is not a folder; it should hold {expects}")
    return root


def first_file(bench, candidates, expects):
    for path in candidates:
        if os.path.isfile(path):
            return path
    alternatives = f" (or {', '.join(candidates[1:])})" if candidates[1:] else ""
    raise DataError(f"{bench}: missing {candidates[0]}{alternatives}; expected {expects}")


def text_field(item, key, where):
    value = item.get(key) if isinstance(item, dict) else None
    if not isinstance(value, str) or not value.strip():
        raise DataError(f"{where}: missing or empty {key!r}")
    return value
