"""
VALSE (Parcalabescu et al. 2022, "VALSE: A Task-Independent Benchmark for Vision and Language
Models Centered on Linguistic Phenomena"): 11 pieces, each an image with its caption and a foil
that changes one linguistic phenomenon (existence, plurality, counting, relations, actions,
coreference, noun phrases).

    python eval.py --model out/clip_hardneg/ckpt.pt --bench valse --data_root ~/data/valse
"""
import os

import torch

from data import DataError, read_json
from tasks.common import Chooser, accuracy, bench_root, first_file, mean, text_field

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
    bench_root("valse", root, "the 11 piece files <piece>.json (or data/<piece>.json) and images/")
    image_root = image_root or os.path.join(root, "images")
    out = {}
    for piece in VALSE_PIECES:
        path = first_file("valse", [os.path.join(root, f"{piece}.json"), os.path.join(root, "data", f"{piece}.json")],
                           "VALSE's data/<piece>.json files")
        rows, items = read_json(path), []
        if not isinstance(rows, dict):
            raise DataError(f"{path}: expected a JSON object keyed by item id")
        for key, r in rows.items():
            where = f"{path}: item {key!r}"
            votes = r.get("mturk") if isinstance(r, dict) else None
            if not isinstance(votes, dict) or not isinstance(votes.get("caption"), int):
                raise DataError(f"{where}: missing or malformed 'mturk' votes")
            if votes["caption"] < VALSE_MIN_VOTES:
                continue
            name = text_field(r, "image_file", where)
            image = os.path.join(image_root, piece, name)
            image = image if os.path.exists(image) else os.path.join(image_root, name)
            items.append((image, [text_field(r, "caption", where), text_field(r, "foil", where)]))
        out[piece] = (items, len(rows))
    return out


@torch.no_grad()
def evaluate(model, preprocess, tokenizer, device, root, image_root=None):
    """Per piece: caption vs foil over its valid items; each category the mean of its pieces;
    mean the mean of the 11 pieces (VALSE's average)."""
    choose, out, by_category, n_valid = Chooser("valse", model, preprocess, tokenizer, device), {}, {}, 0
    for piece, (items, n) in read_valse(root, image_root).items():
        category = VALSE_PIECES[piece]
        if not items:
            raise DataError(f"valse: {piece}: none of its {n} items is valid (mturk caption votes >= 2)")
        out[f"valse/{category}/{piece}"] = accuracy(choose.correct(items, piece))
        by_category.setdefault(category, []).append(out[f"valse/{category}/{piece}"])
        n_valid += len(items)
    out |= {f"valse/{c}": mean(accs) for c, accs in by_category.items()}
    out["valse/mean"] = mean(out[f"valse/{VALSE_PIECES[p]}/{p}"] for p in VALSE_PIECES)
    return out | choose.counts() | {"valse/n_valid": n_valid}


def run(model, preprocess, tokenizer, device, args):
    return evaluate(model, preprocess, tokenizer, device, args.data_root, args.image_root)
