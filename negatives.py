"""
Hard negatives for real captions, and the released hard-negative training files.

- A rule-based generator (small word lists the project ships, no NLP model): relation swap and
  replace, attribute replace and swap, object and verb replace, ARO's four order shuffles
  (caption_negatives). Replacements work on whole words ("man" is never found in "woman"), and a
  negative equal to its caption is dropped.
- Readers, in their exact released formats: NegCLIP's TSV (read_negclip), CE-CLIP's pickled .npy
  (read_ceclip), HNC's JSON (read_hnc, streamed: the train file is 8 GB).
Every bad input raises data.DataError naming the file and line. The shapes world's negatives are
exact and live with the world (shapes.NEGATIVES).
"""

import functools
import json
import os
import pickle
import re

import numpy as np

from data import DataError, _caption, _need, csv_rows

# -----------------------------------------------------------------------------
# the generator


NEG_COLOURS = (
    "red",
    "orange",
    "yellow",
    "green",
    "blue",
    "purple",
    "pink",
    "brown",
    "black",
    "white",
    "gray",
    "silver",
)
NEG_MATERIALS = ("wooden", "metal", "glass", "plastic", "stone", "brick", "paper", "leather", "ceramic")
NEG_COUNTS = ("two", "three", "four", "five", "six", "seven", "eight", "nine", "ten")  # not "one": "one dogs"
NEG_SIZES = {
    "small": "large",
    "large": "small",
    "big": "little",
    "little": "big",
    "tiny": "huge",
    "huge": "tiny",
    # antonyms: "big" -> "large" would be no negative
    "tall": "short",
    "short": "tall",
    "long": "short",
}
NEG_OBJECTS = (
    "man",
    "woman",
    "boy",
    "girl",
    "child",
    "person",
    "player",
    "dog",
    "cat",
    "horse",
    "cow",
    "sheep",
    "elephant",
    "giraffe",
    "zebra",
    "bear",
    "bird",
    "car",
    "bus",
    "truck",
    "train",
    "bicycle",
    "motorcycle",
    "boat",
    "airplane",
    "table",
    "chair",
    "bed",
    "couch",
    "bench",
    "tree",
    "building",
    "plate",
    "bowl",
    "cup",
    "pizza",
    "sandwich",
    "cake",
    "banana",
    "apple",
    "laptop",
    "phone",
    "clock",
    "kite",
    "umbrella",
    "ball",
    "frisbee",
    "skateboard",
    "surfboard",
    "shirt",
    "hat",
    "sign",
    "window",
    "door",
    "wall",
    "toilet",
    "sink",
    "box",
    "bag",
    "bottle",
    "vase",
    "book",
    "computer",
    "desk",
    "fence",
    "road",
)
IRREGULAR_PLURALS = {
    "man": "men",
    "woman": "women",
    "child": "children",
    "person": "people",
    "sheep": "sheep",
}
NEG_VERBS = (
    ("sitting", "sits"),
    ("standing", "stands"),
    ("holding", "holds"),
    ("riding", "rides"),
    ("eating", "eats"),
    ("walking", "walks"),
    ("running", "runs"),
    ("playing", "plays"),
    ("flying", "flies"),
    ("lying", "lies"),
    ("looking", "looks"),
    ("carrying", "carries"),
    ("throwing", "throws"),
    ("catching", "catches"),
    ("drinking", "drinks"),
    ("cutting", "cuts"),
    ("watching", "watches"),
    ("driving", "drives"),
    ("jumping", "jumps"),
    ("sleeping", "sleeps"),
    ("reading", "reads"),
    ("pulling", "pulls"),
    ("pushing", "pushes"),
    ("kicking", "kicks"),
    ("wearing", "wears"),
    ("climbing", "climbs"),
)
# spatial relations and their converses; multi-word phrases are matched before their parts
NEG_RELATIONS = {
    "left": "right",
    "right": "left",
    "above": "below",
    "below": "above",
    "on top of": "under",
    "on": "under",
    "under": "on",
    "beneath": "on top of",
    "in front of": "behind",
    "behind": "in front of",
    "inside": "outside",
    "outside": "inside",
    "top": "bottom",
    "bottom": "top",
    "near": "far from",
    "far from": "near",
    "over": "under",
}


def _plural(noun):
    if noun in IRREGULAR_PLURALS:
        return IRREGULAR_PLURALS[noun]
    return noun + "es" if noun.endswith(("s", "x", "ch", "sh")) else noun + "s"


NEG_NOUNS = {
    **{o: (o, False) for o in NEG_OBJECTS},
    **{_plural(o): (o, True) for o in NEG_OBJECTS if o != "sheep"},
}
NEG_ATTRIBUTES = {
    "colour": NEG_COLOURS,
    "material": NEG_MATERIALS,
    "count": NEG_COUNTS,
    "size": tuple(NEG_SIZES),
}
_ADJECTIVES = {w for words in NEG_ATTRIBUTES.values() for w in words}
# "t-shirt" and "man's" are one word each: never "shirt", "man"
_WORD = re.compile(r"[A-Za-z]+(?:[-'][A-Za-z]+)*")


def _words(caption):
    """caption -> (leading text, [[word, the text after it]]): whole words, and enough to rebuild the caption exactly"""
    parts = _WORD.split(caption)
    return parts[0], [[w, sep] for w, sep in zip(_WORD.findall(caption), parts[1:])]


def _join(lead, words, changed=()):
    """rebuild a caption; 'a'/'an' right before a changed word is fixed to fit it ("an apple" -> "a table")"""
    for i in changed:
        if i > 0 and words[i - 1][0].lower() in ("a", "an"):
            article = "an" if words[i][0][0].lower() in "aeiou" else "a"
            words[i - 1][0] = article.capitalize() if words[i - 1][0][0].isupper() else article
    return lead + "".join(w + sep for w, sep in words)


def _match_case(new, old):
    return new[0].upper() + new[1:] if old[0].isupper() else new


def _find_relations(words):
    """-> [(start, end, phrase)] word spans of relation phrases, longest match first, non-overlapping"""
    low, spans, i = [w.lower() for w, _ in words], [], 0
    phrases = sorted(NEG_RELATIONS, key=lambda p: -len(p.split()))
    while i < len(low):
        for p in phrases:
            n = len(p.split())
            if low[i : i + n] == p.split():
                spans.append((i, i + n, p))
                i += n - 1
                break
        i += 1
    return spans


def _replace_span(lead, words, start, end, text):
    """words[start:end] -> the words of text (the span's last separator kept)"""
    new = [[w, " "] for w in text.split()]
    new[0][0] = _match_case(new[0][0], words[start][0])
    new[-1][1] = words[end - 1][1]
    out = words[:start] + new + words[end:]
    return _join(lead, out, range(start, start + len(new)))


def relation_replace(caption, rng):
    """a relation phrase replaced by its converse (left <-> right, on <-> under, in front of <-> behind, ...)."""
    lead, words = _words(caption)
    spans = _find_relations(words)
    if not spans:
        return None
    start, end, phrase = rng.choice(spans)
    return _replace_span(lead, words, start, end, NEG_RELATIONS[phrase])


_DETERMINERS = ("a", "an", "the", "this", "that", "these", "those", "his", "her", "their", "its", "some")


def _noun_phrase(words, i):
    """the span of the noun at i with the attribute words and the determiner before it ("[a large red car]")"""
    start = i
    while start > 0 and words[start - 1][0].lower() in _ADJECTIVES:
        start -= 1
    if start > 0 and words[start - 1][0].lower() in _DETERMINERS:
        start -= 1
    return start, i + 1


def relation_swap(caption, rng):
    """the noun phrases on either side of a relation exchanged ("a cat on a table" -> "a table on a cat")."""
    lead, words = _words(caption)
    nouns = [i for i, (w, _) in enumerate(words) if w.lower() in NEG_NOUNS]
    options = []
    for start, end, _ in _find_relations(words):
        before, after = [i for i in nouns if i < start], [i for i in nouns if i >= end]
        if before and after and words[before[-1]][0].lower() != words[after[0]][0].lower():
            options.append((_noun_phrase(words, before[-1]), _noun_phrase(words, after[0])))
    if not options:
        return None
    (a0, a1), (b0, b1) = rng.choice(options)
    has_det = [
        words[a0][0].lower() in _DETERMINERS + NEG_COUNTS,
        words[b0][0].lower() in _DETERMINERS + NEG_COUNTS,
    ]
    # "a man" <-> "road" (of "a dirt road") would give "a dirt a man": keep determiners
    if has_det[0] != has_det[1]:
        a0, b0 = a0 + has_det[0], b0 + has_det[1]
    A, B = [list(w) for w in words[a0:a1]], [list(w) for w in words[b0:b1]]
    # each phrase takes the other's trailing separator
    A[-1][1], B[-1][1] = words[b1 - 1][1], words[a1 - 1][1]
    if a0 == 0:  # keep a sentence-initial capital where it was
        B[0][0], A[0][0] = _match_case(B[0][0], words[0][0]), A[0][0].lower()
    out = words[:a0] + B + words[a1:b0] + A + words[b1:]
    return _join(lead, out, [a0, a0 + len(B) + (b0 - a1)])


def attribute_replace(caption, rng):
    """one colour, material, count or size word replaced by another of its kind (sizes by their antonym)."""
    lead, words = _words(caption)
    options = [
        (i, kind)
        for i, (w, _) in enumerate(words)
        for kind, vocab in NEG_ATTRIBUTES.items()
        if w.lower() in vocab
    ]
    if not options:
        return None
    i, kind = rng.choice(options)
    old = words[i][0].lower()
    new = NEG_SIZES[old] if kind == "size" else rng.choice([w for w in NEG_ATTRIBUTES[kind] if w != old])
    return _replace_span(lead, words, i, i + 1, new)


def attribute_swap(caption, rng):
    """two different attribute words of one kind exchanged ("a red car and a blue bus" -> "a blue car and a red bus")."""
    lead, words = _words(caption)
    options = []
    for vocab in NEG_ATTRIBUTES.values():
        found = [i for i, (w, _) in enumerate(words) if w.lower() in vocab]
        options += [
            (i, j)
            for n, i in enumerate(found)
            for j in found[n + 1 :]
            if words[i][0].lower() != words[j][0].lower()
        ]
    if not options:
        return None
    i, j = rng.choice(options)
    out = [list(w) for w in words]
    out[i][0], out[j][0] = (
        _match_case(words[j][0].lower(), words[i][0]),
        _match_case(words[i][0].lower(), words[j][0]),
    )
    return _join(lead, out, [i, j])


def object_replace(caption, rng):
    """one object noun replaced by another object absent from the caption, singular or plural as it was."""
    lead, words = _words(caption)
    nouns = [i for i, (w, _) in enumerate(words) if w.lower() in NEG_NOUNS]
    if not nouns:
        return None
    i = rng.choice(nouns)
    present = {NEG_NOUNS[w.lower()][0] for w, _ in words if w.lower() in NEG_NOUNS}
    new = rng.choice([o for o in NEG_OBJECTS if o not in present])
    return _replace_span(lead, words, i, i + 1, _plural(new) if NEG_NOUNS[words[i][0].lower()][1] else new)


def verb_replace(caption, rng):
    """one verb replaced by another in the same form ("sitting" -> "eating", "sits" -> "eats")."""
    lead, words = _words(caption)
    form = {v: (f, pair) for pair in NEG_VERBS for f, v in enumerate(pair)}
    options = [i for i, (w, _) in enumerate(words) if w.lower() in form]
    if not options:
        return None
    i = rng.choice(options)
    f, pair = form[words[i][0].lower()]
    return _replace_span(lead, words, i, i + 1, rng.choice([p for p in NEG_VERBS if p != pair])[f])


# ARO's four order perturbations, on the normalised caption (lowercase, punctuation dropped). ARO
# finds nouns and adjectives with a POS tagger; here they are the generator's word lists.


def _shuffle_order(caption, rng, how):
    words = [w.lower() for w in _WORD.findall(caption)]
    for _ in range(10):  # a shuffle can give back the same order: retry, then give up
        out = list(words)
        if how in ("nouns_adjectives", "other_words"):
            idx = [
                i
                for i, w in enumerate(words)
                if (w in NEG_NOUNS or w in _ADJECTIVES) == (how == "nouns_adjectives")
            ]
            picked = [words[i] for i in idx]
            rng.shuffle(picked)
            for i, w in zip(idx, picked):
                out[i] = w
        else:
            trigrams = [words[i : i + 3] for i in range(0, len(words), 3)]
            if how == "within_trigrams":
                for t in trigrams:
                    rng.shuffle(t)
            else:
                rng.shuffle(trigrams)
            out = [w for t in trigrams for w in t]
        if out != words:
            return " ".join(out)
    return None


CAPTION_NEGATIVES = {
    "relation_swap": relation_swap,
    "relation_replace": relation_replace,
    "attribute_replace": attribute_replace,
    "attribute_swap": attribute_swap,
    "object_replace": object_replace,
    "verb_replace": verb_replace,
    "shuffle_nouns_adjectives": functools.partial(_shuffle_order, how="nouns_adjectives"),
    "shuffle_other_words": functools.partial(_shuffle_order, how="other_words"),
    "shuffle_within_trigrams": functools.partial(_shuffle_order, how="within_trigrams"),
    "shuffle_trigrams": functools.partial(_shuffle_order, how="trigrams"),
}
# the hard-negative *types* a caption gets, one negative each (CE-CLIP's four + ARO's order)
NEGATIVE_TYPES = {
    "relation": ("relation_swap", "relation_replace"),
    "attribute": ("attribute_replace", "attribute_swap"),
    "object": ("object_replace",),
    "verb": ("verb_replace",),
    "order": (
        "shuffle_nouns_adjectives",
        "shuffle_other_words",
        "shuffle_within_trigrams",
        "shuffle_trigrams",
    ),
}


def caption_negative(caption, kind, rng):
    """one hard negative of `caption` made by CAPTION_NEGATIVES[kind], or None when it cannot make one:
    an empty, one-word or non-ASCII caption, nothing to edit, or a result equal to the caption
    (compared by its lowercase words). Replacements work on whole words only ("man" is never
    edited inside "woman"). Deterministic given rng's state."""
    if not caption.isascii() or len(_WORD.findall(caption)) < 2:
        return None
    neg = CAPTION_NEGATIVES[kind](caption, rng)
    if neg is None or [w.lower() for w in _WORD.findall(neg)] == [w.lower() for w in _WORD.findall(caption)]:
        return None
    return neg


def caption_negatives(caption, rng, types=tuple(NEGATIVE_TYPES)):
    """one hard negative per type (NEGATIVE_TYPES) -> [str or None]: the type's generators are tried
    in a random order until one gives a negative; None (to be counted as dropped) if none does."""
    out = []
    for t in types:
        neg = None
        for kind in rng.sample(NEGATIVE_TYPES[t], len(NEGATIVE_TYPES[t])):
            neg = caption_negative(caption, kind, rng)
            if neg is not None:
                break
        out.append(neg)
    return out


# -----------------------------------------------------------------------------
# the released hard-negative files


def _image(path, where):
    if not os.path.isfile(path):
        raise DataError(f"{where}: missing image {path}")
    return os.path.abspath(path)


def read_negclip(path, image_root=None):
    """NegCLIP's training file (mscoco_with_negatives_training.csv: tab-separated despite the name).
    Header: an unnamed index column, title (the caption), filepath (relative to image_root, default
    the file's folder), neg_caption (a Python list literal of 1-5 strings, parsed with
    ast.literal_eval, never eval) and neg_image (a list literal of row numbers of the same file,
    counted from 0: the rows whose images are this row's hard-negative images).
    -> [(absolute image path, caption, [negative captions], [neg image rows])], one per row"""
    import ast

    image_root = os.path.dirname(os.path.abspath(path)) if image_root is None else image_root
    # text_lines' rules: UTF-8 with or without a BOM, strict quoting
    rows, records = [], csv_rows(path, delimiter="\t")
    _, header = next(records, (1, []))
    cols = {
        name: header.index(name)
        for name in ("title", "filepath", "neg_caption", "neg_image")
        if name in header
    }
    if len(cols) < 4:
        raise DataError(
            f"{path}:1: expected the tab-separated columns title, filepath, neg_caption, neg_image; got {header}"
        )
    for line, row in records:
        where = f"{path}:{line}"
        if len(row) != len(header):
            raise DataError(f"{where}: expected {len(header)} tab-separated fields, got {len(row)}")
        parsed = {}
        for name in ("neg_caption", "neg_image"):
            try:
                parsed[name] = ast.literal_eval(row[cols[name]])
            except (ValueError, SyntaxError, MemoryError, RecursionError):
                parsed[name] = None
        negs, neg_rows = parsed["neg_caption"], parsed["neg_image"]
        if not (isinstance(negs, list) and negs and all(isinstance(n, str) for n in negs)):
            raise DataError(
                f"{where}: neg_caption is not a list literal of strings: {row[cols['neg_caption']][:60]!r}"
            )
        if not (isinstance(neg_rows, list) and all(isinstance(n, int) for n in neg_rows)):
            raise DataError(
                f"{where}: neg_image is not a list literal of row numbers: {row[cols['neg_image']][:60]!r}"
            )
        image = _image(os.path.join(image_root, row[cols["filepath"]]), where)
        rows.append(
            (where, (image, _caption(row[cols["title"]], where), [n.strip() for n in negs], neg_rows))
        )
    for where, (_, _, _, neg_rows) in rows:
        bad = [n for n in neg_rows if not 0 <= n < len(rows)]
        if bad:
            raise DataError(f"{where}: neg_image row {bad[0]} is outside the file's {len(rows)} rows")
    return [item for _, item in rows]


CECLIP_TYPES = ("relation_aug_caption", "adj_aug_caption", "noun_aug_caption", "verb_aug_caption")


def read_ceclip(path, image_root=None, allow_pickle=False):
    """CE-CLIP's precomputed negatives: a .npy file (or a folder of them) holding a pickled NumPy
    object array of dicts {image_id, id, caption, relation_aug_caption, adj_aug_caption,
    noun_aug_caption, verb_aug_caption, valid_caption: [1, r, a, n, v]}; an invalid negative is the
    string '###' with a 0 in valid_caption. Images: image_root/train2014/COCO_train2014_<id:012d>.jpg
    (image_root defaults to the file's folder). Unpickling runs code stored in the file, so this
    refuses unless allow_pickle (the --allow_pickle flag) says the file is trusted.
    -> [(absolute image path, caption, [relation, adjective, noun, verb negative or None])]"""
    files = (
        sorted(os.path.join(path, f) for f in os.listdir(path) if f.endswith(".npy"))
        if os.path.isdir(path)
        else [_need(path)]
    )
    if not files:
        raise DataError(f"{path}: no .npy file in this folder")
    if not allow_pickle:
        raise DataError(
            f"{files[0]}: CE-CLIP's .npy files are pickled object arrays, and unpickling runs code "
            "stored in the file: pass --allow_pickle if you trust it"
        )
    image_root = os.path.dirname(os.path.abspath(files[0])) if image_root is None else image_root
    out = []
    for file in files:
        try:
            records = np.load(file, allow_pickle=True)
        except (OSError, ValueError, EOFError, pickle.UnpicklingError) as e:
            raise DataError(f"{file}: not a readable .npy file ({e})") from None
        for j, r in enumerate(np.asarray(records).reshape(-1)):
            where = f"{file}: record {j}"
            try:
                valid = [int(v) for v in r["valid_caption"]]
                if len(valid) != 5:
                    raise DataError(
                        f"{where}: valid_caption has {len(valid)} entries, expected 5 (the caption + 4 negatives)"
                    )
                caption = _caption(r["caption"], where)
                negs = [
                    r[k].strip()
                    if ok and isinstance(r[k], str) and r[k].strip() not in ("###", "", caption)
                    else None
                    for k, ok in zip(CECLIP_TYPES, valid[1:])
                ]
                image = _image(
                    os.path.join(image_root, "train2014", f"COCO_train2014_{int(r['image_id']):012d}.jpg"),
                    where,
                )
            except (KeyError, TypeError, ValueError, IndexError) as e:
                if isinstance(e, DataError):
                    raise
                raise DataError(f"{where}: missing or malformed field {e}") from None
            out.append((image, caption, negs))
    return out


_JSON_WS = re.compile(r"[ \t\n\r]*")


def _json_object_items(path, chunk=1 << 20):
    """Stream the members of a JSON file whose top level is one object, without loading it whole:
    yields (key, value, byte offset of the value, its length in bytes). Memory stays at about one
    chunk plus one value; a value longer than a chunk is read on until it is complete."""
    decoder = json.JSONDecoder()
    with open(_need(path), encoding="utf-8", newline="") as f:  # newline="": byte offsets stay exact
        buf, pos, offset, eof = "", 0, 0, False  # offset: the byte offset of buf[pos] in the file

        def fill():  # one more chunk after the unread part of the buffer; False at the end of the file
            nonlocal buf, pos, eof
            more = f.read(chunk)
            eof = not more
            buf, pos = buf[pos:] + more, 0
            return bool(more)

        def advance(end):  # consume buf[pos:end]
            nonlocal pos, offset
            offset += len(buf[pos:end].encode("utf-8"))
            pos = end

        def next_char():  # skip whitespace -> the next character, '' at the end of the file
            while True:
                advance(_JSON_WS.match(buf, pos).end())
                if pos < len(buf) or not fill():
                    return buf[pos : pos + 1]

        def value():
            while True:
                try:
                    v, end = decoder.raw_decode(buf, pos)
                    if end < len(buf) or eof:  # a number at the buffer's end may go on in the next chunk
                        start = offset
                        advance(end)
                        return v, start, offset - start
                except json.JSONDecodeError as e:
                    if eof:
                        raise DataError(f"{path}: malformed JSON near byte {offset} ({e.msg})") from None
                fill()

        def expect(ch):
            if next_char() != ch:
                raise DataError(f"{path}: malformed JSON near byte {offset} (expected {ch!r})")
            advance(pos + 1)

        expect("{")
        if next_char() == "}":
            return
        while True:
            if next_char() != '"':
                raise DataError(f"{path}: malformed JSON near byte {offset} (expected a key)")
            key = value()[0]
            expect(":")
            next_char()
            yield (key, *value())
            if next_char() == "}":
                return
            expect(",")


def _hnc_pairs(key, value, where):
    """one image's HNC entry -> (image file name, [(positive caption, [its negative captions])], orphans)"""
    # train / val: negatives name their positive
    if isinstance(value, dict) and isinstance(value.get("captions"), dict):
        entries, name = value["captions"], f"{key}.jpg"
        try:
            pos = {str(k): (c["caption"].strip(), []) for k, c in entries.items() if int(c["label"]) == 1}
            orphans = 0
            for c in entries.values():
                if int(c["label"]) == 0:
                    parent = pos.get(str(c.get("cpt_p_id")))
                    if parent is None:
                        orphans += 1
                    else:
                        parent[1].append(c["caption"].strip())
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            raise DataError(f"{where}: missing or malformed caption field {e}") from None
        return name, [p for p in pos.values() if p[0]], orphans
    if isinstance(value, dict):  # test: {"0": positive, "1": its negative, ...}, key = the image file
        pairs, last, orphans = [], {}, 0  # a negative goes with the latest positive of its type, in id order
        try:
            for _, c in sorted(value.items(), key=lambda kv: int(kv[0])):
                if int(c["label"]) == 1:
                    last[c.get("type")] = (c["caption"].strip(), [])
                    pairs.append(last[c.get("type")])
                elif c.get("type") in last:
                    last[c.get("type")][1].append(c["caption"].strip())
                else:
                    orphans += 1
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            raise DataError(f"{where}: missing or malformed caption field {e}") from None
        return key, [p for p in pairs if p[0]], orphans
    raise DataError(f"{where}: expected an object of captions, got {type(value).__name__}")


class HNCData:
    """HNC (hnc_clean_strict_{train,val,test}.json) as a sequence of images, from an index of byte
    offsets: the train file is 8 GB, so it is streamed once (validating every entry) and each item
    is decoded from disk when asked for. Item i -> (absolute image path, [(positive caption,
    [its hard-negative captions])]); a positive without negatives has an empty list.
    Train/val: {"<gqa id>": {"captions": {"<n>": {caption, label (1 pos / 0 neg), type, ...,
    cpt_p_id}}}}, a negative's cpt_p_id naming the key of the positive it was made from (null for
    positives); the image is <id>.jpg. Test: {"<file>.jpg": {"0": {caption, label, type, replaced},
    "1": ...}}, positive / negative pairs in id order: a negative goes with the latest positive of
    its type. Negatives without their positive are counted (self.orphans) and dropped; images
    without a positive are skipped."""

    def __init__(self, path, image_root=None, in_memory=False):
        self.path, self.orphans, self.index, self.items = path, 0, [], None
        image_root = (
            os.path.join(os.path.dirname(os.path.abspath(path)), "images")
            if image_root is None
            else image_root
        )
        kept = []
        for key, value, start, n in _json_object_items(path):
            name, pairs, orphans = _hnc_pairs(key, value, f"{path}: image {key}")
            self.orphans += orphans
            if pairs:
                image = _image(os.path.join(image_root, name), f"{path}: image {key}")
                self.index.append((key, image, start, n))
                kept.append(pairs if in_memory else None)
        self.items = kept if in_memory else None

    def __len__(self):
        return len(self.index)

    def __getitem__(self, i):
        key, image, start, n = self.index[i]
        if self.items is not None:
            return image, self.items[i]
        with open(self.path, "rb") as f:
            f.seek(start)
            value = json.loads(f.read(n).decode("utf-8"))
        return image, _hnc_pairs(key, value, f"{self.path}: image {key}")[1]


def read_hnc(path, image_root=None, in_memory=False):
    """HNC's JSON (train, val or test file) -> HNCData, a sequence of (image path, [(positive,
    [negatives])]); GQA images under image_root (default: the file's folder's images/). in_memory keeps the parsed
    captions (fine for val/test; the 8 GB train file is read from disk item by item by default)."""
    return HNCData(path, image_root, in_memory)
