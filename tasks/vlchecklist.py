"""
VL-CheckList (Zhao et al. 2022, "VL-CheckList: Evaluating Pre-trained Vision-Language Models with
Objects, Attributes and Relations"): 56 files of an image with a positive and a negative text,
grouped by type (object, attribute, relation), subtype and source corpus.

    python eval.py --model out/clip_hardneg/ckpt.pt --bench vlchecklist --data_root ~/data/vl-checklist
"""

import os

import torch

from data import DataError, read_json
from tasks.common import Chooser, accuracy, bench_root, mean


def vlchecklist_files():
    """VL-CheckList's corpus as its release lists it (corpus/v1/<Type>/<subtype>/<source>.yaml):
    -> [(type, subtype, source, corpus, annotation path, image folder)], 56 files"""
    out = []
    for kind, values in (("location", ("center", "mid", "margin")), ("size", ("large", "medium", "small"))):
        top = f"data/Object/{kind.capitalize()}"
        for v in values:
            out += [
                ("object", f"{kind}_{v}", "vg", f"vg_{r}", f"{top}/vg_{kind}/vg_{r}_{v}.json", "vg")
                for r in ("obj", "subj")
            ]
            out += [
                (
                    "object",
                    f"{kind}_{v}",
                    "swig",
                    f"swig_{r}",
                    f"{top}/swig_{kind}/swig_{r}/swig_{r}_{v}.json",
                    "swig",
                )
                for r in ("agent", "destination", "item", "tool")
            ]
            out.append(
                ("object", f"{kind}_{v}", "hake", "hake", f"{top}/hake_{kind}/hake_obj_{v}.json", "hake")
            )
    for attribute in ("action", "color", "material", "size", "state"):
        out += [
            ("attribute", attribute, src, src, f"data/Attribute/{src}/{attribute}.json", "vg")
            for src in ("vg", "vaw")
        ]
    out += [
        ("relation", "action", "vg", "vg", "data/Relation/vg/action.json", "vg"),
        ("relation", "action", "swig", "swig", "data/Relation/swig_action.json", "swig"),
        ("relation", "action", "hake", "hake", "data/Relation/hake_action.json", "hake"),
        ("relation", "spatial", "vg", "vg", "data/Relation/vg/spatial.json", "vg"),
    ]
    return out


def read_vlchecklist_file(path, image_dir):
    """one VL-CheckList file: a JSON list of [image relpath, {"POS": [texts], "NEG": [texts]}] ->
    [(image path, [POS[0], NEG[0]])]. Its evaluation (itc) compares POS[0] with NEG[0] only: the swig
    files carry 3 of each, the rest 1; texts are used as written (some NEG start with a space)."""
    rows, items = read_json(path), []
    if not isinstance(rows, list):
        raise DataError(f"{path}: expected a JSON list")
    for i, r in enumerate(rows):
        try:
            rel, texts = r
            pos, neg = texts["POS"][0], texts["NEG"][0]
        except (ValueError, TypeError, KeyError, IndexError):
            raise DataError(
                f'{path}: item {i}: expected [image path, {{"POS": [...], "NEG": [...]}}]'
            ) from None
        if not all(isinstance(t, str) and t.strip() for t in (rel, pos, neg)):
            raise DataError(f"{path}: item {i}: empty image path or text")
        items.append((os.path.join(image_dir, rel), [pos, neg]))
    return items


@torch.no_grad()
def evaluate(model, preprocess, tokenizer, device, root, image_root=None):
    """VL-CheckList's itc protocol: per file, POS[0] vs NEG[0]. Aggregated as the release's radar
    chart does: a subtype is the mean over its sources (vg, swig, hake, vaw) of the mean over each
    source's files; a type (object, attribute, relation) the mean of its subtypes; mean the mean of
    the 3 types. Files in root/data/... (a clone of its repository), images under image_root/<vg |
    swig | hake>/ (default image_root: root, where the release's relative image roots point). The
    release's sample config also cuts each file to its first 1,000 items; this runs them all.
    A file that is absent, or none of whose images is on disk (a user may have downloaded part of
    the release), is reported as None and named on one line; the subtypes, types and mean are then
    over the files evaluated (vlchecklist/n_files), a part with none of them None. No file at all
    is an error."""
    bench_root("vlchecklist", root, "VL-CheckList's data/ folder (a clone of its repository) and its images")
    image_root = image_root or root
    choose, out, by_source, missing = Chooser("vlchecklist", model, preprocess, tokenizer, device), {}, {}, {}
    files = vlchecklist_files()
    for kind, subtype, source, corpus, rel, img in files:
        key, path = f"vlchecklist/{kind}/{subtype}/{corpus}", os.path.join(root, rel)
        if not os.path.isfile(path):
            out[key], missing[rel] = None, "no file"
            continue
        items = read_vlchecklist_file(path, os.path.join(image_root, img))
        if items and not any(os.path.exists(image) for image, _ in items):
            out[key], missing[rel] = None, f"no image on disk (first: {items[0][0]})"
            continue
        out[key] = accuracy(choose.correct(items, rel))
        by_source.setdefault((kind, subtype), {}).setdefault(source, []).append(out[key])
    if not by_source:
        if all(why == "no file" for why in missing.values()):
            raise DataError(
                f"vlchecklist: missing all {len(files)} annotation files under {root} (first: {files[0][4]}); "
                "expected VL-CheckList's data/ folder as released (a clone of its repository)"
            )
        raise DataError(
            f"vlchecklist: no file could be evaluated: {'; '.join(f'{r}: {why}' for r, why in missing.items())}"
        )
    if missing:
        print(
            f"vlchecklist: evaluated {len(files) - len(missing)} of {len(files)} files; missing: "
            + "; ".join(f"{r} ({why})" for r, why in missing.items())
        )
    by_kind = {}
    for kind, subtype in dict.fromkeys((f[0], f[1]) for f in files):
        sources = by_source.get((kind, subtype))
        out[f"vlchecklist/{kind}/{subtype}"] = (
            mean(mean(accs) for accs in sources.values()) if sources else None
        )
        by_kind.setdefault(kind, []).extend([out[f"vlchecklist/{kind}/{subtype}"]] if sources else [])
    out |= {f"vlchecklist/{kind}": mean(accs) for kind, accs in by_kind.items()}  # None: none of its files
    out["vlchecklist/mean"] = mean(out[f"vlchecklist/{kind}"] for kind in by_kind if by_kind[kind])
    return out | choose.counts() | {"vlchecklist/n_files": len(files) - len(missing)}


def run(model, preprocess, tokenizer, device, args):
    return evaluate(model, preprocess, tokenizer, device, args.data_root, args.image_root)
