"""
ARO (Yuksekgonul et al. 2023, "When and why vision-language models behave like bags-of-words"):
VG-Relation and VG-Attribution (a cropped Visual Genome image, the true caption and the one with
the relation's or the attributes' order swapped) and COCO / Flickr30k order (a caption against
four word-order shuffles of it).

    python eval.py --model out/clip_hardneg/ckpt.pt --bench aro --data_root ~/data/aro
"""

import os
import random
import re

import numpy as np
import torch

from data import DataError, read_json
from tasks.common import Chooser, accuracy, bench_root, choice_correct, mean, text_field

# the relations ARO's authors leave out of VG-Relation's macro accuracy, verbatim from the list in
# their replication notebook (symmetric relations such as "next to", and others they dropped with them)
ARO_EXCLUDED_RELATIONS = frozenset(
    (
        "adjusting",
        "attached to",
        "between",
        "bigger than",
        "biting",
        "boarding",
        "brushing",
        "chewing",
        "cleaning",
        "climbing",
        "close to",
        "coming from",
        "coming out of",
        "contain",
        "crossing",
        "dragging",
        "draped over",
        "drinking",
        "drinking from",
        "driving",
        "driving down",
        "driving on",
        "eating from",
        "eating in",
        "enclosing",
        "exiting",
        "facing",
        "filled with",
        "floating in",
        "floating on",
        "flying",
        "flying above",
        "flying in",
        "flying over",
        "flying through",
        "full of",
        "going down",
        "going into",
        "going through",
        "grazing in",
        "growing in",
        "growing on",
        "guiding",
        "hanging from",
        "hanging in",
        "hanging off",
        "hanging over",
        "higher than",
        "holding onto",
        "hugging",
        "in between",
        "jumping off",
        "jumping on",
        "jumping over",
        "kept in",
        "larger than",
        "leading",
        "leaning over",
        "leaving",
        "licking",
        "longer than",
        "looking in",
        "looking into",
        "looking out",
        "looking over",
        "looking through",
        "lying next to",
        "lying on top of",
        "making",
        "mixed with",
        "mounted on",
        "moving",
        "on the back of",
        "on the edge of",
        "on the front of",
        "on the other side of",
        "opening",
        "painted on",
        "parked at",
        "parked beside",
        "parked by",
        "parked in",
        "parked in front of",
        "parked near",
        "parked next to",
        "perched on",
        "petting",
        "piled on",
        "playing",
        "playing in",
        "playing on",
        "playing with",
        "pouring",
        "reaching for",
        "reading",
        "reflected on",
        "riding on",
        "running in",
        "running on",
        "running through",
        "seen through",
        "sitting behind",
        "sitting beside",
        "sitting by",
        "sitting in front of",
        "sitting near",
        "sitting next to",
        "sitting under",
        "skiing down",
        "skiing on",
        "sleeping in",
        "sleeping on",
        "smiling at",
        "sniffing",
        "splashing",
        "sprinkled on",
        "stacked on",
        "standing against",
        "standing around",
        "standing behind",
        "standing beside",
        "standing in front of",
        "standing near",
        "standing next to",
        "staring at",
        "stuck in",
        "surrounding",
        "swimming in",
        "swinging",
        "talking to",
        "topped with",
        "touching",
        "traveling down",
        "traveling on",
        "tying",
        "typing on",
        "underneath",
        "wading in",
        "waiting for",
        "walking across",
        "walking by",
        "walking down",
        "walking next to",
        "walking through",
        "working in",
        "working on",
        "worn on",
        "wrapped around",
        "wrapped in",
        "by",
        "of",
        "near",
        "next to",
        "with",
        "beside",
        "on the side of",
        "around",
    )
)
ARO_MIN_PAIR = 25  # VG-Attribution's macro accuracy keeps attribute pairs with at least this many items
ARO_ORDER = {"coco_order": "coco_karpathy_test.json", "flickr30k_order": "flickr30k_test.json"}
ARO_PERTURBATIONS = (
    "shuffle_nouns_and_adj",
    "shuffle_allbut_nouns_and_adj",
    "shuffle_within_trigrams",
    "shuffle_trigrams",
)
NOUN_TAGS, ADJECTIVE_TAGS = ("NN", "NNS", "NNP", "NNPS"), ("JJ", "JJR", "JJS")


def read_aro_vg(path, image_dir, part):
    """visual_genome_{relation,attribution}.json: a list of {image_path, bbox_x, bbox_y, bbox_w,
    bbox_h, true_caption, false_caption, relation_name | attributes} -> ([((image path, crop box),
    [true_caption, false_caption])], [group]) where group is the relation, or the attribute pair
    "first_second" (ordered, as ARO's evaluation keys it)."""
    rows, items, groups = read_json(path), [], []
    if not isinstance(rows, list):
        raise DataError(f"{path}: expected a JSON list")
    for i, r in enumerate(rows):
        where = f"{path}: item {i}"
        try:
            x, y, w, h = (float(r[k]) for k in ("bbox_x", "bbox_y", "bbox_w", "bbox_h"))
            group = r["relation_name"] if part == "relation" else f"{r['attributes'][0]}_{r['attributes'][1]}"
        except (KeyError, TypeError, ValueError, IndexError) as e:
            raise DataError(f"{where}: missing or malformed field {e}") from None
        if w <= 0 or h <= 0:
            raise DataError(f"{where}: empty box {w} x {h}")
        items.append(
            (
                (os.path.join(image_dir, text_field(r, "image_path", where)), (x, y, x + w, y + h)),
                [text_field(r, "true_caption", where), text_field(r, "false_caption", where)],
            )
        )
        groups.append(group)
    return items, groups


def read_karpathy_test(path, image_root):
    """ARO's order sets start from BLIP's Karpathy test files: a list of {"image": "val2014/...jpg",
    "caption": [captions]} (a train file has one string instead) -> [(image path, caption)], one per caption"""
    rows = read_json(path)
    if not isinstance(rows, list):
        raise DataError(f"{path}: expected a JSON list")
    out = []
    for i, r in enumerate(rows):
        caps = r.get("caption") if isinstance(r, dict) else None
        caps = [caps] if isinstance(caps, str) else caps
        if not isinstance(caps, list) or not caps or not all(isinstance(c, str) and c.strip() for c in caps):
            raise DataError(f"{path}: item {i}: missing or empty 'caption'")
        out += [(os.path.join(image_root, text_field(r, "image", f"{path}: item {i}")), c) for c in caps]
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
    within = [tokens[i : i + 3] for i in range(0, len(tokens), 3)]
    for trigram in within:
        rng.shuffle(trigram)
    trigrams = [tokens[i : i + 3] for i in range(0, len(tokens), 3)]
    rng.shuffle(trigrams)
    return [
        pre_caption(" ".join(x))
        for x in (a, b, [w for t in within for w in t], [w for t in trigrams for w in t])
    ]


def aro_text_tools():
    """ARO's own text tools -> (tag, tokenize), or (None, why) when they are not installed"""
    try:
        import nltk
        import spacy

        nlp = spacy.load("en_core_web_sm")
        nltk.word_tokenize("a test.")  # needs nltk's punkt data
    except (ImportError, OSError, LookupError) as e:
        return None, (
            "needs ARO's text tools, spaCy's en_core_web_sm and nltk's punkt: pip install spacy nltk && "
            f"python -m spacy download en_core_web_sm && python -m nltk.downloader punkt punkt_tab ({type(e).__name__})"
        )
    return (lambda text: [(t.text, t.tag_) for t in nlp(text)], nltk.word_tokenize), None


@torch.no_grad()
def evaluate(model, preprocess, tokenizer, device, root, seed=1):
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
    bench_root(
        "aro",
        root,
        "visual_genome_relation.json, visual_genome_attribution.json, images/, "
        "coco_karpathy_test.json, flickr30k_test.json",
    )
    choose, out = Chooser("aro", model, preprocess, tokenizer, device), {}
    for part, name in (
        ("relation", "visual_genome_relation.json"),
        ("attribution", "visual_genome_attribution.json"),
    ):
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
        out[f"aro/{part}"] = mean(mean(by_group[g]) for g in kept)
        out[f"aro/{part}_micro"] = accuracy(correct)
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
        items = [
            (image, [pre_caption(c)] + order_perturbations(c, tag, tokenize, np_rng, rng))
            for image, c in read_karpathy_test(path, root)
        ]
        scores, readable = choose.scores(items, part)
        scores = scores[readable]
        out[f"aro/{part}"] = accuracy(choice_correct(scores))
        for j, name in enumerate(ARO_PERTURBATIONS, 1):
            changed = ~scores[:, j].isnan()  # over the captions this shuffle changed
            out[f"aro/{part}/{name}"] = (
                accuracy(scores[changed, 0] > scores[changed, j]) if changed.any() else None
            )
    if all(out[f"aro/{p}"] is None for p in ("relation", "attribution", *ARO_ORDER)):
        raise DataError(
            f"aro: none of ARO's files in {root}: visual_genome_relation.json, "
            "visual_genome_attribution.json, coco_karpathy_test.json, flickr30k_test.json"
        )
    return out | choose.counts()


def run(model, preprocess, tokenizer, device, args):
    return evaluate(
        model, preprocess, tokenizer, device, args.data_root, seed=1 if args.seed is None else args.seed
    )
