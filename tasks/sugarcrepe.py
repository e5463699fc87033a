"""
SugarCrepe (Hsieh et al. 2023, "SugarCrepe: Fixing Hackable Benchmarks for Vision-Language
Compositionality"): a COCO val2017 image, its caption and one negative caption made by replacing,
swapping or adding an object, attribute or relation (7 subsets).

    python eval.py --model ViT-B-32:openai --bench sugarcrepe --data_root ~/data/sugar-crepe --image_root ~/data/coco/val2017
"""

import os

import torch

from data import DataError, read_json
from tasks.common import Chooser, accuracy, bench_root, first_file, mean, text_field

SUGARCREPE = {
    "replace": ("replace_obj", "replace_att", "replace_rel"),
    "swap": ("swap_obj", "swap_att"),
    "add": ("add_obj", "add_att"),
}


def read_sugarcrepe(root, image_root=None):
    """SugarCrepe as released: <subset>.json for its 7 subsets, in root or root/data (a clone of its
    repository), each a dict keyed by string ids (not always contiguous: swap_obj skips "108") of
    {filename, caption, negative_caption}; the images are COCO val2017, under image_root (default
    root/val2017). -> {subset: [(image path, [caption, negative_caption])]}"""
    bench_root("sugarcrepe", root, "the 7 subset files <subset>.json (or data/<subset>.json)")
    image_root = image_root or os.path.join(root, "val2017")
    out = {}
    for subset in (s for group in SUGARCREPE.values() for s in group):
        path = first_file(
            "sugarcrepe",
            [os.path.join(root, f"{subset}.json"), os.path.join(root, "data", f"{subset}.json")],
            "SugarCrepe's data/<subset>.json files",
        )
        items = read_json(path)
        if not isinstance(items, dict):
            raise DataError(f"{path}: expected a JSON object keyed by item id")
        out[subset] = [
            (
                os.path.join(image_root, text_field(it, "filename", f"{path}: item {k!r}")),
                [
                    text_field(it, "caption", f"{path}: item {k!r}"),
                    text_field(it, "negative_caption", f"{path}: item {k!r}"),
                ],
            )
            for k, it in items.items()
        ]
    return out


@torch.no_grad()
def evaluate(model, preprocess, tokenizer, device, root, image_root=None):
    """Per subset: caption vs negative_caption. Groups replace / swap / add pool their subsets' items
    (the subset accuracies weighted by size); mean is the plain mean of the 7 subset accuracies."""
    choose, out, correct = Chooser("sugarcrepe", model, preprocess, tokenizer, device), {}, {}
    for subset, items in read_sugarcrepe(root, image_root).items():
        correct[subset] = choose.correct(items, subset)
        out[f"sugarcrepe/{subset}"] = accuracy(correct[subset])
    for group, subsets in SUGARCREPE.items():
        out[f"sugarcrepe/{group}"] = accuracy(torch.cat([correct[s] for s in subsets]))
    out["sugarcrepe/mean"] = mean(out[f"sugarcrepe/{s}"] for s in correct)
    return out | choose.counts()


def run(model, preprocess, tokenizer, device, args):
    return evaluate(model, preprocess, tokenizer, device, args.data_root, args.image_root)
