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
from tasks.common import Chooser, accuracy, bench_root, mean, text_field

VALSE_PIECES = {  # piece file -> category (noun phrases: FOIL-it!), in the paper's table order
    "existence": "existence",
    "plurals": "plurality",
    "counting-hard": "counting",
    "counting-small-quant": "counting",
    "counting-adversarial": "counting",
    "relations": "relations",
    "action-replacement": "actions",
    "actant-swap": "actions",
    "coreference-standard": "coreference",
    "coreference-hard": "coreference",
    "foil-it": "noun_phrases",
}
VALSE_MIN_VOTES = 2  # valid item: at least 2 of 3 annotators chose the caption (and not the foil)


def read_valse(root, image_root=None):
    """VALSE as released: <piece>.json in root or root/data, a dict keyed by id of {image_file,
    caption, foil, mturk: {caption, foil, other}, ...}. Only valid items are kept, as VALSE's README
    and evaluation scripts do: mturk["caption"] >= 2. Each piece's images come from another dataset:
    looked up as image_root/<piece>/<image_file>, then image_root/<image_file> (default image_root:
    root/images). A piece whose file is absent is left out (a user may have downloaded some pieces
    only); none at all is an error. -> {piece: ([(image path, [caption, foil])], n_items)}"""
    bench_root("valse", root, "the 11 piece files <piece>.json (or data/<piece>.json) and images/")
    image_root = image_root or os.path.join(root, "images")
    out = {}
    for piece in VALSE_PIECES:
        path = next(
            (
                f
                for f in (os.path.join(root, f"{piece}.json"), os.path.join(root, "data", f"{piece}.json"))
                if os.path.isfile(f)
            ),
            None,
        )
        if path is None:
            continue
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
    if not out:
        raise DataError(
            f"valse: none of VALSE's piece files in {root} (or {root}/data): expected <piece>.json for "
            f"{', '.join(VALSE_PIECES)}"
        )
    return out


@torch.no_grad()
def evaluate(model, preprocess, tokenizer, device, root, image_root=None):
    """Per piece: caption vs foil over its valid items; each category the mean of its pieces;
    mean the mean of the pieces (VALSE's average when all 11 are there). A piece whose file is
    absent, or none of whose images is on disk, is reported as None and named on one line; mean
    and the categories are then over the pieces evaluated (valse/n_pieces)."""
    choose, out, by_category, n_valid, missing = (
        Chooser("valse", model, preprocess, tokenizer, device),
        {},
        {},
        0,
        {},
    )
    pieces = read_valse(root, image_root)
    for piece, category in VALSE_PIECES.items():
        key = f"valse/{category}/{piece}"
        items, n = pieces.get(piece, ([], 0))
        if piece not in pieces:
            out[key], missing[piece] = None, "no file"
            continue
        if not items:
            raise DataError(f"valse: {piece}: none of its {n} items is valid (mturk caption votes >= 2)")
        if not any(os.path.exists(image) for image, _ in items):
            out[key], missing[piece] = None, f"no image on disk (first: {items[0][0]})"
            continue
        out[key] = accuracy(choose.correct(items, piece))
        by_category.setdefault(category, []).append(out[key])
        n_valid += len(items)
    if not by_category:
        raise DataError(
            f"valse: no piece could be evaluated: {'; '.join(f'{p}: {why}' for p, why in missing.items())}"
        )
    if missing:
        print(
            f"valse: evaluated {len(VALSE_PIECES) - len(missing)} of {len(VALSE_PIECES)} pieces; missing: "
            + "; ".join(f"{p} ({why})" for p, why in missing.items())
        )
    out |= {
        f"valse/{c}": mean(by_category[c]) if c in by_category else None
        for c in dict.fromkeys(VALSE_PIECES.values())
    }
    out["valse/mean"] = mean(
        acc for acc in (out[f"valse/{c}/{p}"] for p, c in VALSE_PIECES.items()) if acc is not None
    )
    return (
        out | choose.counts() | {"valse/n_valid": n_valid, "valse/n_pieces": len(VALSE_PIECES) - len(missing)}
    )


def run(model, preprocess, tokenizer, device, args):
    return evaluate(model, preprocess, tokenizer, device, args.data_root, args.image_root)
