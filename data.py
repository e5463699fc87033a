"""
Data for minclip, shared by every script.
- Real image-caption sets: readers for Flickr8k (Kaggle, original and Karpathy layouts) and COCO
  captions, in their exact released on-disk formats (each reader's docstring and comments give
  the layout and its quirks); ImageTextDataset yields one image with one of its captions,
  optionally from a uint8 memmap cache of decoded images; StepBatches makes resumable batches.
  Every bad input raises DataError naming the file and line (or flag). Every text file is opened
  by text_lines (and csv_rows, read_json on top of it): UTF-8 with an optional byte-order mark.
- CLIPS: recaptioned CSV/JSONL files (image, web caption, synthetic caption) and the four token
  reductions of a long synthetic caption (reduce_caption).
- The shapes world: procedural two-object scenes with exact hard negatives and twin scenes, the
  project's built-in training set and benchmark (no download).
- open_clip's tokenizer.
Datasets return raw texts (image, caption, synthetic caption, rng); each training script turns
them into the token tensors its method needs.
"""
import codecs
import csv
import functools
import json
import multiprocessing
import os
import pickle
import random
import re
from dataclasses import dataclass, replace

import numpy as np
import torch
import torchvision.transforms.functional as TF
from open_clip.constants import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD
from open_clip.tokenizer import SimpleTokenizer
from PIL import Image

SPLITS = ("train", "val", "test")

# -----------------------------------------------------------------------------
# errors and tokenizer

class DataError(ValueError):
    """a bad dataset file, line or flag; scripts catch it at top level and print `error: <msg>`"""

@functools.lru_cache(maxsize=None)
def get_tokenizer(context_length=77):
    # open_clip's bpe tokenizer, the one pretrained clip text towers expect; call it with a list of
    # strings -> long tensor [n, context_length]
    return SimpleTokenizer(context_length=context_length)

# -----------------------------------------------------------------------------
# readers: each returns {"train" | "val" | "test": [(absolute image path, [captions]), ...]}

def _need(path, what="file"):
    if not os.path.exists(path):
        raise DataError(f"missing {what}: {path}")
    return path

def _caption(text, where):
    text = text.strip()  # coco captions carry trailing spaces and newlines
    if not text:
        raise DataError(f"{where}: empty caption")
    return text

# text files: every reader opens its files through these three, so a byte-order mark, a byte that
# is not UTF-8, a NUL byte or an unclosed CSV quote get the same answer in every format

def text_lines(path):
    """the lines of a UTF-8 text file, line endings kept -> iterator of str. Lines end at \\n, \\r\\n
    or \\r (what the csv module wants). A leading byte-order mark (what Windows tools write) is
    dropped, so a file reads the same with or without one. A byte that is not UTF-8 (a latin-1 'é')
    or a NUL byte raises DataError naming the file, the line and the byte."""
    with open(_need(path), encoding="utf-8-sig", newline="") as f:
        try:
            for n, line in enumerate(f, 1):
                if "\0" in line:
                    raise DataError(f"{path}:{n}: a NUL byte (column {line.index(chr(0)) + 1}): a damaged file, or not a text file")
                yield line
        except UnicodeDecodeError:
            raise DataError(_not_utf8(path)) from None

def _not_utf8(path):
    # the decoder reads ahead in blocks, so the error does not say which line: find the byte again
    with open(path, "rb") as f:
        raw = f.read()
    bom = len(codecs.BOM_UTF8) if raw.startswith(codecs.BOM_UTF8) else 0
    try:
        raw[bom:].decode("utf-8")
        return f"{path}: not UTF-8; the file must be UTF-8"  # only if it changed since it was read
    except UnicodeDecodeError as e:
        at = bom + e.start
    line = len(re.findall(rb"\r\n|\r|\n", raw[:at])) + 1  # counted as text_lines splits
    column = at - max(raw.rfind(b"\n", 0, at), raw.rfind(b"\r", 0, at), bom - 1)  # the bom is no column of line 1
    return (f"{path}:{line}: byte 0x{raw[at]:02x} (byte {column} of the line) is not UTF-8: "
            "the file must be UTF-8 (re-save it as UTF-8)")

def csv_rows(path, delimiter=","):
    """the records of a CSV file (text_lines' rules) -> iterator of (line where the record starts,
    [fields]); blank lines are skipped. The csv module runs in strict mode, so a quoted field left
    open (a stray '"' at the start of a field) raises DataError naming the line where it starts,
    instead of swallowing the next lines into one field. A quoted field closed just before a line
    end is still valid CSV: readers whose fields never hold a newline must check for one."""
    rows = csv.reader(text_lines(path), delimiter=delimiter, strict=True)
    while True:
        start = rows.line_num + 1  # line_num counts the lines read so far, so the next record starts here
        try:
            row = next(rows)
        except StopIteration:
            return
        except csv.Error as e:
            # a record runs over line ends only inside a quoted field; "end of data": the file ended inside one
            if rows.line_num > start or "end of data" in str(e):
                raise DataError(f"{path}:{start}: a quoted field starting on this line is never closed (csv read on "
                                f"to line {rows.line_num}: {e}); close it, or write a literal quote as \"\"") from None
            raise DataError(f"{path}:{start}: malformed CSV ({e})") from None
        if row:
            yield start, row

def read_json(path):
    """a whole JSON file (text_lines' rules) -> its value; malformed JSON -> DataError with file:line"""
    text = "".join(text_lines(path))
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise DataError(f"{path}:{e.lineno}: malformed JSON ({e.msg})") from None

def _assemble(captions, split_of, image_dir, source, splits=SPLITS):
    """captions: image name -> [captions]; split_of: image name -> split, in output order"""
    # an entry without an image file is skipped, not fatal: the original flickr8k token file lists
    # 2258277193_586949ec62.jpg.1, which was never released. report it once, with names
    missing = dict.fromkeys(n for n in captions if not os.path.isfile(os.path.join(image_dir, n)))
    missing |= dict.fromkeys(n for n in split_of if n not in captions)
    if missing:
        print(f"{source}: skipped {len(missing)} image(s) without an image file or captions: "
              f"{', '.join(list(missing)[:3])}")
    out = {s: [] for s in splits}
    for name, split in split_of.items():
        if name not in missing:
            out[split].append((os.path.abspath(os.path.join(image_dir, name)), captions[name]))
    for s in splits:
        if not out[s]:
            raise DataError(f"{source}: split '{s}' has no usable image (images looked up in {image_dir})")
    return out

def _parse_karpathy(path):
    """karpathy split json -> (image name -> captions, image name -> split)"""
    data, captions, split_of, i = read_json(path), {}, {}, 0
    try:
        for i, im in enumerate(data["images"]):
            name = os.path.join(im.get("filepath", ""), im["filename"])  # coco entries have a folder
            where = f"{path}: {name} (images[{i}])"
            if im["split"] not in ("train", "restval", "val", "test"):
                raise DataError(f"{where}: unknown split {im['split']!r}")
            captions[name] = [_caption(s["raw"], where) for s in im["sentences"]]
            # restval: the coco val2014 images that karpathy's split leaves to training
            split_of[name] = "train" if im["split"] == "restval" else im["split"]
    except (KeyError, TypeError, AttributeError) as e:
        raise DataError(f"{path}: images[{i}]: missing or malformed field {e}") from None
    return captions, split_of

def read_karpathy(json_path, image_root):
    """a karpathy split json (flickr8k/30k, coco) with images under image_root; restval -> train"""
    captions, split_of = _parse_karpathy(json_path)
    return _assemble(captions, split_of, image_root, json_path)

def _seeded_split(names, seed):
    # the kaggle layout (and a recaption file) has no split: hold out 1000 + 1000 images like
    # flickr8k's original 8091, scaled down for smaller sets, by image so no caption of a held-out
    # image is trained on
    k = max(1, min(1000, round(len(names) * 1000 / 8091)))
    order = sorted(names)
    random.Random(seed).shuffle(order)
    split = {n: "test" for n in order[:k]} | {n: "val" for n in order[k:2 * k]}
    return {n: split.get(n, "train") for n in names}

def read_flickr8k(root, seed=0):
    """flickr8k in any of its three layouts; seed only picks the split when none ships with the data"""
    j = lambda *p: os.path.join(root, *p)
    karpathy = j("dataset_flickr8k.json")
    if os.path.exists(j("captions.txt")):  # (a) kaggle: csv, captions hold quoted commas
        path, captions = j("captions.txt"), {}
        rows = csv_rows(path)
        n, header = next(rows, (1, None))
        if header != ["image", "caption"]:
            raise DataError(f"{path}:{n}: expected the header 'image,caption'")
        for n, row in rows:
            where = f"{path}:{n}"
            if len(row) != 2:
                raise DataError(f"{where}: expected 2 columns (image,caption), got {len(row)}")
            if "\n" in row[1] or "\r" in row[1]:  # no flickr8k caption has one: a stray quote swallowed lines
                raise DataError(f"{where}: the caption runs over several lines: a quoted field starting on this "
                                "line is closed only on a later one")
            captions.setdefault(row[0], []).append(_caption(row[1], where))
        split_of = _parse_karpathy(karpathy)[1] if os.path.exists(karpathy) else _seeded_split(list(captions), seed)
        return _assemble(captions, split_of, _need(j("Images"), "folder"), path)
    if os.path.exists(j("Flickr8k.token.txt")):  # (b) original: "<file>.jpg#<k>\t<caption>"
        path, captions = j("Flickr8k.token.txt"), {}
        for n, line in enumerate(text_lines(path), 1):
            if not line.strip():
                continue
            key, tab, text = line.rstrip("\r\n").partition("\t")
            name, hash_, k = key.rpartition("#")
            if not tab or not hash_ or not k.isdigit():
                raise DataError(f"{path}:{n}: expected '<image>#<k><TAB><caption>', got {line.strip()[:60]!r}")
            captions.setdefault(name, []).append(_caption(text, f"{path}:{n}"))
        split_of = {}
        for split, stem in (("train", "train"), ("val", "dev"), ("test", "test")):
            lines = text_lines(j(f"Flickr_8k.{stem}Images.txt"))
            split_of.update((line.strip(), split) for line in lines if line.strip())
        # the release misspells the folder name
        return _assemble(captions, split_of, _need(j("Flicker8k_Dataset"), "folder"), path)
    if os.path.exists(karpathy):  # (c) karpathy json + an images folder
        for d in ("Images", "Flicker8k_Dataset", "images"):
            if os.path.isdir(j(d)):
                return read_karpathy(karpathy, j(d))
    raise DataError(f"no Flickr8k layout under {root}: looked for captions.txt + Images/ (Kaggle), "
                    "Flickr8k.token.txt + Flicker8k_Dataset/ + Flickr_8k.*Images.txt (original), "
                    "dataset_flickr8k.json + Images/ or Flicker8k_Dataset/ or images/ (Karpathy)")

def read_coco(root):
    """coco 2014 captions; karpathy's splits if root/dataset_coco.json exists, else val2014 is val and test"""
    if os.path.exists(os.path.join(root, "dataset_coco.json")):
        return read_karpathy(os.path.join(root, "dataset_coco.json"), root)
    captions, split_of = {}, {}
    for part, split in (("train2014", "train"), ("val2014", "val")):
        path = os.path.join(root, "annotations", f"captions_{part}.json")
        data = read_json(path)
        try:
            names = {im["id"]: os.path.join(part, im["file_name"]) for im in data["images"]}
            captions |= {name: [] for name in names.values()}
            split_of |= {name: split for name in names.values()}
            # group the ~5 captions per image: one sample is one image, so a batch never holds the
            # same image twice (a false negative for the contrastive loss)
            for a in data["annotations"]:
                if a["image_id"] not in names:
                    raise DataError(f"{path}: annotation id {a['id']}: unknown image_id {a['image_id']}")
                name = names[a["image_id"]]
                captions[name].append(_caption(a["caption"], f"{path}: annotation id {a['id']} ({name})"))
        except (KeyError, TypeError, AttributeError) as e:
            raise DataError(f"{path}: missing or malformed field {e}") from None
    captions = {n: c for n, c in captions.items() if c}  # uncaptioned images get reported as skipped
    out = _assemble(captions, split_of, root, os.path.join(root, "annotations"), splits=("train", "val"))
    print(f"{root}: no dataset_coco.json (karpathy split), so val and test are both val2014")
    return out | {"test": list(out["val"])}

def read_recap(path, image_key="image", caption_key="caption", recap_key="re_caption", seed=0):
    """CLIPS-style recaptioned data: a CSV (header row) or JSONL file (by its extension) of rows
    (image path relative to the file's folder, web caption, long synthetic caption); the column
    names are flags because they vary between releases. No split ships with such files, so val and
    test are held out by image as for flickr8k's kaggle layout.
    -> {split: [(absolute image path, [web caption], synthetic caption)]}"""
    if not path.endswith((".csv", ".jsonl")):
        raise DataError(f"--data_root {path}: a recaption file must be *.csv or *.jsonl")
    keys = {"--image_key": image_key, "--caption_key": caption_key, "--recap_key": recap_key}
    rows = []  # (line number, {field: value})
    if path.endswith(".csv"):
        records = csv_rows(path)
        n, header = next(records, (1, []))
        missing = [f"{flag} {k}" for flag, k in keys.items() if k not in header]
        if missing:
            raise DataError(f"{path}:{n}: no column {', '.join(missing)} (columns: {', '.join(header)})")
        for n, row in records:
            if len(row) != len(header):  # an unquoted comma would shift a caption into the next column
                raise DataError(f"{path}:{n}: expected {len(header)} columns ({','.join(header)}), got {len(row)}")
            rows.append((n, dict(zip(header, row))))
    else:
        for n, line in enumerate(text_lines(path), 1):
            if line.strip():
                try:
                    rows.append((n, json.loads(line)))
                except json.JSONDecodeError as e:
                    raise DataError(f"{path}:{n}: malformed JSON ({e.msg})") from None
    root, items, skipped = os.path.dirname(os.path.abspath(path)), {}, []
    for n, row in rows:
        where = f"{path}:{n}"
        if not isinstance(row, dict):
            raise DataError(f"{where}: expected an object with the fields {', '.join(keys.values())}")
        for flag, k in keys.items():
            if not isinstance(row.get(k), str):
                raise DataError(f"{where}: no text field '{k}' ({flag}; fields: {', '.join(row)})")
        image = os.path.join(root, row[image_key])
        if image in items or not os.path.isfile(image):
            skipped.append(row[image_key])  # a duplicate would be its own false negative in a batch
            continue
        items[image] = ([_caption(row[caption_key], where)], _caption(row[recap_key], where))
    if skipped:
        print(f"{path}: skipped {len(skipped)} row(s) with a missing or repeated image: {', '.join(skipped[:3])}")
    if len(items) < 3:
        raise DataError(f"{path}: {len(items)} usable row(s); need at least 3 (train, val, test)")
    split_of = _seeded_split(list(items), seed)
    return {s: [(p, *items[p]) for p in items if split_of[p] == s] for s in SPLITS}

def read_dataset(name, root, recap_keys=("image", "caption", "re_caption")):
    """--data name, --data_root root -> splits; recap_keys: the --image_key, --caption_key and
    --recap_key column names of a recaption file"""
    if name == "recap":
        return read_recap(root, *recap_keys)
    readers = {"flickr8k": read_flickr8k, "coco": read_coco}
    if name not in readers:
        raise DataError(f"--data {name}: unknown dataset, choose from {', '.join(readers)}, recap")
    if not os.path.isdir(root):
        raise DataError(f"--data_root {root}: no such directory")
    return readers[name](root)

# -----------------------------------------------------------------------------
# preference data: VSR (Liu et al. 2023, "Visual Spatial Reasoning") and ranked-candidate files

# every relation of VSR's two splits (66), and its contrast: the relation that makes the caption
# false when it is true, read with the same subject and object. None = no sensible contrast: the
# relation is skipped (and counted) wherever a contrast caption is needed.
VSR_CONTRAST = {
    "above": "below", "below": "above", "over": "under", "under": "on top of", "on top of": "beneath",
    "beneath": "on top of", "on": "under", "off": "on",
    "left of": "right of", "right of": "left of",
    "at the left side of": "at the right side of", "at the right side of": "at the left side of",
    "in front of": "behind", "behind": "in front of", "ahead of": "behind", "at the back of": "in front of",
    "inside": "outside", "outside": "inside", "in": "outside", "within": "outside", "into": "out of", "out of": "into",
    "contains": "inside", "surrounding": "enclosed by", "enclosed by": "surrounding",
    "part of": "has as a part", "has as a part": "part of", "consists of": "part of",
    "touching": "away from", "away from": "touching", "against": "away from", "toward": "away from",
    "attached to": "detached from", "connected to": "detached from", "detached from": "attached to",
    "near": "far from", "close to": "far from", "next to": "far from", "beside": "far from", "by": "far from",
    "adjacent to": "far from", "alongside": "far from", "at the side of": "far from",
    "far from": "near", "far away from": "close to", "across from": "next to", "opposite to": "next to",
    "facing": "facing away from", "facing away from": "facing",
    "parallel to": "perpendicular to", "perpendicular to": "parallel to",
    "at the edge of": "in the middle of", "in the middle of": "at the edge of",
    # no contrast that is false whenever the caption is true (directions of motion, vague or rare relations)
    "across": None, "along": None, "among": None, "around": None, "at": None, "between": None, "beyond": None,
    "congruent": None, "down": None, "down from": None, "past": None, "through": None, "with": None,
}
VSR_RELATIONS = tuple(sorted(VSR_CONTRAST))
VSR_SKIPPED = tuple(r for r in VSR_RELATIONS if VSR_CONTRAST[r] is None)
VSR_VERB_RELATIONS = ("contains", "consists of", "has as a part")  # "The bowl contains the apple." (no "is")
VSR_SPLIT_FILES = ("train", "dev", "test")


def relation_phrase(relation):
    """the words a VSR caption uses for a relation: "is left of", or the bare verb ("contains")"""
    return relation if relation in VSR_VERB_RELATIONS else f"is {relation}"


def contrast_caption(caption, relation):
    """VSR's caption "The cat is left of the dog." -> "The cat is right of the dog.": the relation's
    words replaced, as whole words, by its contrast's (VSR_CONTRAST; never inserted next to them),
    with "is" added or dropped for the verb relations ("contains" -> "is inside"). None if the
    relation has no contrast. ValueError if the relation's words are not in the caption exactly once."""
    if VSR_CONTRAST.get(relation) is None:
        return None
    pattern = re.compile(r"(?<![\w-])" + re.escape(relation_phrase(relation)) + r"(?![\w-])")
    if len(pattern.findall(caption)) != 1:
        raise ValueError(f"caption {caption!r} does not contain {relation_phrase(relation)!r} exactly once as whole words")
    return pattern.sub(relation_phrase(VSR_CONTRAST[relation]), caption)


@dataclass(frozen=True)
class VSRRow:
    image: str      # absolute path
    caption: str
    label: bool     # the caption is true of the image
    relation: str
    where: str      # "file:line", for messages


def _vote_ids(value, where, key):
    # the current files hold the validator ids as JSON-encoded strings ("[2, 9]"), older ones as lists
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError:
            raise DataError(f"{where}: {key} {value!r} is not a JSON list") from None
    if not isinstance(value, list) or not all(isinstance(v, int) for v in value):
        raise DataError(f"{where}: {key} must be a list of validator ids, got {value!r}")
    return value


def _vsr_file(root, split, part):
    for path in (os.path.join(root, "splits", split, f"{part}.jsonl"), os.path.join(root, "data", "splits", split, f"{part}.jsonl"),
                 os.path.join(root, f"{part}.jsonl")):
        if os.path.isfile(path):
            return path
    raise DataError(f"--data_root {root}: no VSR {split} {part} file (looked for splits/{split}/{part}.jsonl, "
                    f"data/splits/{split}/{part}.jsonl, {part}.jsonl)")


def read_vsr(root, split="random"):
    """VSR's train/dev/test files of one split (random | zeroshot) -> {"train" | "dev" | "test": [VSRRow]}.
    One JSON object per line: image (a COCO 2017 file name), image_link (.../train2017/... or
    .../val2017/...), caption ("The <subj> is <relation> the <obj>."), label (1 / 0), relation (one
    of VSR_RELATIONS), annotator_id, vote_true_validator_id and vote_false_validator_id (JSON-encoded
    strings "[2, 9]" in the current files, lists in older ones; both accepted), reference_frame
    (random split) or subj and obj (zero-shot split). Files are found as splits/<split>/<part>.jsonl,
    data/splits/<split>/<part>.jsonl or <part>.jsonl under root; images as images/<file>,
    train2017/<file> or val2017/<file>. A malformed line, an unknown relation, a caption without its
    relation's words, or a missing image is one error naming the file and line."""
    if split not in ("random", "zeroshot"):
        raise DataError(f"--vsr_split {split}: choose random or zeroshot")
    if not os.path.isdir(root):
        raise DataError(f"--data_root {root}: no such directory")
    image_dirs = [os.path.join(root, d) for d in ("images", "train2017", "val2017")]
    out = {}
    for part in VSR_SPLIT_FILES:
        path, rows, missing = _vsr_file(root, split, part), [], []
        for n, line in enumerate(text_lines(path), 1):
            if not line.strip():
                continue
            where = f"{path}:{n}"
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{where}: malformed JSON ({e.msg})") from None
            if not isinstance(row, dict):
                raise DataError(f"{where}: expected a JSON object")
            for key in ("image", "caption", "relation"):
                if not isinstance(row.get(key), str) or not row[key].strip():
                    raise DataError(f"{where}: missing or empty field {key!r}")
            if row.get("label") not in (0, 1):  # True / False compare equal to 1 / 0
                raise DataError(f"{where}: label must be 1 or 0, got {row.get('label')!r}")
            if row["relation"] not in VSR_CONTRAST:
                raise DataError(f"{where}: unknown relation {row['relation']!r} (not one of VSR's 66)")
            if len(re.findall(r"(?<![\w-])" + re.escape(relation_phrase(row["relation"])) + r"(?![\w-])", row["caption"])) != 1:
                raise DataError(f"{where}: caption {row['caption']!r} does not contain {relation_phrase(row['relation'])!r} once")
            for key in ("vote_true_validator_id", "vote_false_validator_id"):
                if key in row:
                    _vote_ids(row[key], where, key)
            image = next((p for p in (os.path.join(d, row["image"]) for d in image_dirs) if os.path.isfile(p)), None)
            if image is None:
                missing.append((where, row["image"]))
                continue
            rows.append(VSRRow(os.path.abspath(image), row["caption"].strip(), bool(row["label"]), row["relation"], where))
        if missing:
            (where, name), more = missing[0], len(missing) - 1
            raise DataError(f"{where}: image {name} not found in images/, train2017/ or val2017/ under {root}"
                            + (f" (and {more} more rows of {path} without their image)" if more else ""))
        if not rows:
            raise DataError(f"{path}: no rows")
        out[part] = rows
    return out


def read_rankings(path, ranked=True):
    """Ranked candidates, one JSON object per line, in either direction:
        {"image": "imgs/1.jpg", "texts": ["best caption", "next", "worst"]}              captions ranked for an image
        {"text": "a dog left of a cat", "images": ["imgs/1.jpg", "imgs/2.jpg"]}          images ranked for a caption
    best first; an optional "ranks": [0, 1, 1] gives tiers instead (0 = best; equal = no preference).
    Image paths are relative to the file's folder. ranked=False reads a candidates file (eval.py
    --rank): the order means nothing and "ranks" is ignored. Other fields ("scores") are ignored.
    -> [{"direction": "i2t" | "t2i", "query": text or absolute image path, "candidates": [...],
    "ranks": [int], "where": "file:line"}]"""
    folder, out = os.path.dirname(os.path.abspath(path)), []
    for n, line in enumerate(text_lines(path), 1):
        if not line.strip():
            continue
        where = f"{path}:{n}"
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{where}: malformed JSON ({e.msg})") from None
        if not isinstance(row, dict) or ("image" in row) == ("text" in row):
            raise DataError(f"{where}: expected an object with either \"image\" + \"texts\" or \"text\" + \"images\"")
        direction = "i2t" if "image" in row else "t2i"
        query, key = (row["image"], "texts") if direction == "i2t" else (row["text"], "images")
        candidates = row.get(key)
        if not isinstance(query, str) or not query.strip():
            raise DataError(f"{where}: empty {'image' if direction == 'i2t' else 'text'}")
        if not isinstance(candidates, list) or len(candidates) < 2 or not all(isinstance(c, str) and c.strip() for c in candidates):
            raise DataError(f"{where}: \"{key}\" must be a list of at least 2 non-empty strings")
        ranks = list(range(len(candidates)))
        if ranked and "ranks" in row:
            ranks = row["ranks"]
            if (not isinstance(ranks, list) or len(ranks) != len(candidates)
                    or not all(isinstance(r, int) and not isinstance(r, bool) and r >= 0 for r in ranks)):
                raise DataError(f"{where}: \"ranks\" must be {len(candidates)} integers >= 0, got {ranks!r}")
            if len(set(ranks)) < 2:
                raise DataError(f"{where}: \"ranks\" are all equal: no preference to learn")
        images = [query] if direction == "i2t" else candidates
        for image in images:
            if not os.path.isfile(os.path.join(folder, image)):
                raise DataError(f"{where}: image {image} not found (paths are relative to {folder})")
        absolute = lambda p: os.path.abspath(os.path.join(folder, p))  # noqa: E731
        if direction == "i2t":
            query = absolute(query)
        else:
            candidates = [absolute(c) for c in candidates]
        out.append({"direction": direction, "query": query, "candidates": candidates, "ranks": ranks, "where": where})
    if not out:
        raise DataError(f"{path}: no rows")
    return out

# -----------------------------------------------------------------------------
# hard negatives for real captions: a rule-based generator (small word lists, no NLP model) and
# the released hard-negative training files (NegCLIP's TSV, CE-CLIP's .npy, HNC's JSON)

NEG_COLOURS = ("red", "orange", "yellow", "green", "blue", "purple", "pink", "brown", "black", "white", "gray", "silver")
NEG_MATERIALS = ("wooden", "metal", "glass", "plastic", "stone", "brick", "paper", "leather", "ceramic")
NEG_COUNTS = ("two", "three", "four", "five", "six", "seven", "eight", "nine", "ten")  # not "one": "one dogs"
NEG_SIZES = {"small": "large", "large": "small", "big": "little", "little": "big", "tiny": "huge", "huge": "tiny",
             "tall": "short", "short": "tall", "long": "short"}  # antonyms: "big" -> "large" would be no negative
NEG_OBJECTS = ("man", "woman", "boy", "girl", "child", "person", "player", "dog", "cat", "horse", "cow", "sheep",
               "elephant", "giraffe", "zebra", "bear", "bird", "car", "bus", "truck", "train", "bicycle", "motorcycle",
               "boat", "airplane", "table", "chair", "bed", "couch", "bench", "tree", "building", "plate", "bowl",
               "cup", "pizza", "sandwich", "cake", "banana", "apple", "laptop", "phone", "clock", "kite", "umbrella",
               "ball", "frisbee", "skateboard", "surfboard", "shirt", "hat", "sign", "window", "door", "wall",
               "toilet", "sink", "box", "bag", "bottle", "vase", "book", "computer", "desk", "fence", "road")
IRREGULAR_PLURALS = {"man": "men", "woman": "women", "child": "children", "person": "people", "sheep": "sheep"}
NEG_VERBS = (("sitting", "sits"), ("standing", "stands"), ("holding", "holds"), ("riding", "rides"), ("eating", "eats"),
             ("walking", "walks"), ("running", "runs"), ("playing", "plays"), ("flying", "flies"), ("lying", "lies"),
             ("looking", "looks"), ("carrying", "carries"), ("throwing", "throws"), ("catching", "catches"),
             ("drinking", "drinks"), ("cutting", "cuts"), ("watching", "watches"), ("driving", "drives"),
             ("jumping", "jumps"), ("sleeping", "sleeps"), ("reading", "reads"), ("pulling", "pulls"),
             ("pushing", "pushes"), ("kicking", "kicks"), ("wearing", "wears"), ("climbing", "climbs"))
# spatial relations and their converses; multi-word phrases are matched before their parts
NEG_RELATIONS = {"left": "right", "right": "left", "above": "below", "below": "above", "on top of": "under",
                 "on": "under", "under": "on", "beneath": "on top of", "in front of": "behind", "behind": "in front of",
                 "inside": "outside", "outside": "inside", "top": "bottom", "bottom": "top", "near": "far from",
                 "far from": "near", "over": "under"}


def _plural(noun):
    if noun in IRREGULAR_PLURALS:
        return IRREGULAR_PLURALS[noun]
    return noun + "es" if noun.endswith(("s", "x", "ch", "sh")) else noun + "s"


NEG_NOUNS = {**{o: (o, False) for o in NEG_OBJECTS}, **{_plural(o): (o, True) for o in NEG_OBJECTS if o != "sheep"}}
NEG_ATTRIBUTES = {"colour": NEG_COLOURS, "material": NEG_MATERIALS, "count": NEG_COUNTS, "size": tuple(NEG_SIZES)}
_ADJECTIVES = {w for words in NEG_ATTRIBUTES.values() for w in words}
_WORD = re.compile(r"[A-Za-z]+(?:[-'][A-Za-z]+)*")  # "t-shirt" and "man's" are one word each: never "shirt", "man"


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
            if low[i:i + n] == p.split():
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
    has_det = [words[a0][0].lower() in _DETERMINERS + NEG_COUNTS, words[b0][0].lower() in _DETERMINERS + NEG_COUNTS]
    if has_det[0] != has_det[1]:  # "a man" <-> "road" (of "a dirt road") would give "a dirt a man": keep determiners
        a0, b0 = a0 + has_det[0], b0 + has_det[1]
    A, B = [list(w) for w in words[a0:a1]], [list(w) for w in words[b0:b1]]
    A[-1][1], B[-1][1] = words[b1 - 1][1], words[a1 - 1][1]  # each phrase takes the other's trailing separator
    if a0 == 0:  # keep a sentence-initial capital where it was
        B[0][0], A[0][0] = _match_case(B[0][0], words[0][0]), A[0][0].lower()
    out = words[:a0] + B + words[a1:b0] + A + words[b1:]
    return _join(lead, out, [a0, a0 + len(B) + (b0 - a1)])


def attribute_replace(caption, rng):
    """one colour, material, count or size word replaced by another of its kind (sizes by their antonym)."""
    lead, words = _words(caption)
    options = [(i, kind) for i, (w, _) in enumerate(words) for kind, vocab in NEG_ATTRIBUTES.items() if w.lower() in vocab]
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
        options += [(i, j) for n, i in enumerate(found) for j in found[n + 1:] if words[i][0].lower() != words[j][0].lower()]
    if not options:
        return None
    i, j = rng.choice(options)
    out = [list(w) for w in words]
    out[i][0], out[j][0] = _match_case(words[j][0].lower(), words[i][0]), _match_case(words[i][0].lower(), words[j][0])
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
            idx = [i for i, w in enumerate(words) if (w in NEG_NOUNS or w in _ADJECTIVES) == (how == "nouns_adjectives")]
            picked = [words[i] for i in idx]
            rng.shuffle(picked)
            for i, w in zip(idx, picked):
                out[i] = w
        else:
            trigrams = [words[i:i + 3] for i in range(0, len(words), 3)]
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
    "relation_swap": relation_swap, "relation_replace": relation_replace, "attribute_replace": attribute_replace,
    "attribute_swap": attribute_swap, "object_replace": object_replace, "verb_replace": verb_replace,
    "shuffle_nouns_adjectives": functools.partial(_shuffle_order, how="nouns_adjectives"),
    "shuffle_other_words": functools.partial(_shuffle_order, how="other_words"),
    "shuffle_within_trigrams": functools.partial(_shuffle_order, how="within_trigrams"),
    "shuffle_trigrams": functools.partial(_shuffle_order, how="trigrams")}
# the hard-negative *types* a caption gets, one negative each (CE-CLIP's four + ARO's order)
NEGATIVE_TYPES = {"relation": ("relation_swap", "relation_replace"), "attribute": ("attribute_replace", "attribute_swap"),
                  "object": ("object_replace",), "verb": ("verb_replace",),
                  "order": ("shuffle_nouns_adjectives", "shuffle_other_words", "shuffle_within_trigrams", "shuffle_trigrams")}


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
    rows, records = [], csv_rows(path, delimiter="\t")  # text_lines' rules: UTF-8 with or without a BOM, strict quoting
    _, header = next(records, (1, []))
    cols = {name: header.index(name) for name in ("title", "filepath", "neg_caption", "neg_image") if name in header}
    if len(cols) < 4:
        raise DataError(f"{path}:1: expected the tab-separated columns title, filepath, neg_caption, neg_image; got {header}")
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
            raise DataError(f"{where}: neg_caption is not a list literal of strings: {row[cols['neg_caption']][:60]!r}")
        if not (isinstance(neg_rows, list) and all(isinstance(n, int) for n in neg_rows)):
            raise DataError(f"{where}: neg_image is not a list literal of row numbers: {row[cols['neg_image']][:60]!r}")
        image = _image(os.path.join(image_root, row[cols["filepath"]]), where)
        rows.append((where, (image, _caption(row[cols["title"]], where), [n.strip() for n in negs], neg_rows)))
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
    files = sorted(os.path.join(path, f) for f in os.listdir(path) if f.endswith(".npy")) if os.path.isdir(path) else [_need(path)]
    if not files:
        raise DataError(f"{path}: no .npy file in this folder")
    if not allow_pickle:
        raise DataError(f"{files[0]}: CE-CLIP's .npy files are pickled object arrays, and unpickling runs code "
                        "stored in the file: pass --allow_pickle if you trust it")
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
                    raise DataError(f"{where}: valid_caption has {len(valid)} entries, expected 5 (the caption + 4 negatives)")
                caption = _caption(r["caption"], where)
                negs = [r[k].strip() if ok and isinstance(r[k], str) and r[k].strip() not in ("###", "", caption) else None
                        for k, ok in zip(CECLIP_TYPES, valid[1:])]
                image = _image(os.path.join(image_root, "train2014", f"COCO_train2014_{int(r['image_id']):012d}.jpg"), where)
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
                    return buf[pos:pos + 1]

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
    if isinstance(value, dict) and isinstance(value.get("captions"), dict):  # train / val: negatives name their positive
        entries, name = value["captions"], f"{key}.jpg"
        try:
            pos = {str(k): (c["caption"].strip(), []) for k, c in entries.items() if int(c["label"]) == 1}
            orphans = 0
            for k, c in entries.items():
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
        image_root = os.path.join(os.path.dirname(os.path.abspath(path)), "images") if image_root is None else image_root
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

# -----------------------------------------------------------------------------
# CLIPS (Liu et al. 2024): a long synthetic caption is reduced before the text encoder sees it

CAPTION_MASKS = ("none", "truncate", "random", "block", "subcaption")

def reduce_caption(text, mode, K, context_length, rng, fallback=""):
    """CLIPS's token reduction of a synthetic caption -> long [context_length]: SOT, at most K - 2
    content tokens, EOT, zeros (K counts SOT and EOT, as open_clip's context length does). Applied
    only when the caption is longer than K tokens; otherwise the result is exactly tokenizer(text).
      truncate    the first K - 2 tokens (what the tokenizer itself does at context K)
      random      K - 2 tokens drawn at random, kept in their original order
      block       one contiguous span of K - 2 tokens, its start uniform
      subcaption  one random non-empty sentence (split on [.!]+), truncated if it is still too long;
                  `fallback` (the web caption) if the text has no sentence
    rng: a random.Random seeded per sample, so a resumed run reduces exactly as before."""
    tokenizer, keep = get_tokenizer(context_length), K - 2
    ids = tokenizer.encode(text)
    if len(ids) > keep:
        if mode == "truncate":
            ids = ids[:keep]
        elif mode == "random":
            ids = [ids[i] for i in sorted(rng.sample(range(len(ids)), keep))]
        elif mode == "block":
            start = rng.randint(0, len(ids) - keep)
            ids = ids[start:start + keep]
        elif mode == "subcaption":
            sentences = [s for s in re.split(r"[.!]+", text) if s.strip()]
            ids = tokenizer.encode(rng.choice(sentences) if sentences else fallback)[:keep]
        else:
            raise ValueError(f"unknown caption mask {mode!r}, choose from {CAPTION_MASKS[1:]}")
    out = torch.zeros(context_length, dtype=torch.long)
    out[:len(ids) + 2] = torch.tensor([tokenizer.sot_token_id, *ids, tokenizer.eot_token_id])
    return out

# -----------------------------------------------------------------------------
# images, dataset, cache

MEAN = torch.tensor(OPENAI_DATASET_MEAN).view(3, 1, 1)
STD = torch.tensor(OPENAI_DATASET_STD).view(3, 1, 1)
# [3, 256]: (v / 255 - mean) / std for every uint8 value v, in the float32 operations open_clip uses
NORMALISED = ((torch.arange(256.0)[None, :].div(255) - MEAN.view(3, 1)) / STD.view(3, 1)).numpy()

def load_image(path, size):
    """decode, resize the shorter side to size (bicubic), center crop -> uint8 [size, size, 3], None if unreadable"""
    # deterministic, and no random flips: a flip turns "the dog left of the cat" into a false caption
    try:
        with Image.open(path) as im:
            im = im.convert("RGB")
    except (OSError, ValueError, Image.DecompressionBombError):
        return None
    im = TF.center_crop(TF.resize(im, size, interpolation=TF.InterpolationMode.BICUBIC), size)
    return np.asarray(im, dtype=np.uint8)

def check_images(items, what):
    """Fail fast: every image of an evaluation split must open, else DataError naming the files, so
    a bad test image is refused before training rather than at the final evaluation. items:
    [(image path, ...)]; what: the split, for the message. A header read (PIL's Image.open, no
    decode) finds a file that is no image at all: 0.03 ms a 122 KB JPEG vs 1.55 ms for a decode
    (1.0 ms at 1/8 scale). A file cut short after its header passes; the evaluation still refuses it
    by name when it decodes it."""
    bad = []
    for path, *_ in items:
        try:
            with Image.open(path):
                pass
        except (OSError, ValueError, Image.DecompressionBombError):
            bad.append(path)
    if bad:
        raise DataError(f"{what}: {len(bad)} of {len(items)} images do not open: {', '.join(bad[:3])}"
                        f"{', ...' if len(bad) > 3 else ''}; evaluation needs every one (replace or remove them)")

def to_tensor(pixels):
    """uint8 [S, S, 3] -> float [3, S, S], normalised like openai clip's training images: bit for bit
    open_clip's ToTensor + Normalize, looked up per channel (2x faster than computing it on 64 px)"""
    pixels = np.asarray(pixels)
    return torch.from_numpy(np.stack([NORMALISED[c][pixels[..., c]] for c in range(3)]))

def build_image_cache(items, image_size, cache_path, workers=0):
    """decode every image once into a uint8 memmap [N, S, S, 3] at cache_path, with a json sidecar
    (N, S, bad indices, image paths); a matching cache is reused. Returns the unreadable indices."""
    n, s, paths, meta_path = len(items), image_size, [item[0] for item in items], cache_path + ".json"
    try:
        with open(meta_path) as f:
            meta = json.load(f)
        if (meta["n"], meta["size"], meta["paths"]) == (n, s, paths) and os.path.getsize(cache_path) == n * s * s * 3:
            return meta["bad"]
    except (OSError, ValueError, KeyError):
        pass  # no cache, or a stale or broken one: rebuild
    # the sidecar is the commit marker: drop it first, write it last, so a crash mid-build never
    # leaves a cache that looks valid. temp names are per process so concurrent ranks never collide
    if os.path.exists(meta_path):
        os.remove(meta_path)
    tmp = f"{cache_path}.tmp{os.getpid()}"
    cache = np.memmap(tmp, np.uint8, "w+", shape=(n, s, s, 3))
    load, pool = functools.partial(load_image, size=s), multiprocessing.Pool(workers) if workers else None
    bad = []
    for i, pixels in enumerate(pool.imap(load, paths, chunksize=16) if pool else map(load, paths)):
        if pixels is None:
            bad.append(i)
        else:
            cache[i] = pixels
    if pool:
        pool.close()
    cache.flush()
    del cache
    os.replace(tmp, cache_path)
    if bad:
        print(f"{cache_path}: skipped {len(bad)} unreadable image(s): "
              f"{', '.join(os.path.basename(paths[i]) for i in bad[:3])}")
    with open(tmp, "w") as f:
        json.dump({"n": n, "size": s, "bad": bad, "paths": paths}, f)
    os.replace(tmp, meta_path)
    return bad

class ImageTextDataset(torch.utils.data.Dataset):
    """One sample = one image with ONE of its captions -> (image float [3, S, S], caption, synthetic
    caption, rng), or None if the image is unreadable (collate drops it). The synthetic caption
    (CLIPS) is the item's third field (a recaption file), else the image's other captions joined
    into one multi-sentence text; rng is the sample's own random.Random for the training script's
    text transforms. Keys may exceed len: key = epoch * len + i, and the caption and rng are pure
    functions of (seed, epoch, i), so a sampler that yields such keys (StepBatches) resumes
    exactly, whatever the number of dataloader workers."""

    def __init__(self, items, image_size, seed=0, cache_path=None):
        self.items, self.image_size, self.seed = items, image_size, seed
        self.cache_path, self.cache = cache_path, None
        self.bad = set(build_image_cache(items, image_size, cache_path)) if cache_path else set()

    def __len__(self):
        return len(self.items)

    def __getstate__(self):
        return self.__dict__ | {"cache": None}  # never pickle the memmap into workers: it would copy it

    def caption(self, key):
        i, epoch = key % len(self.items), key // len(self.items)
        captions = self.items[i][1]
        # Random(str) seeds from a sha512 of the string: the same in every process, unlike hash()
        return captions[random.Random(f"{self.seed},{epoch},{i}").randrange(len(captions))]

    def synthetic(self, key, caption):
        item = self.items[key % len(self.items)]
        if len(item) > 2:
            return item[2]
        others = [c.rstrip(" .") for c in item[1] if c != caption] or [caption]
        return ". ".join(others) + "."

    def __getitem__(self, key):
        i, s = key % len(self.items), self.image_size
        if self.cache_path is None:
            pixels = load_image(self.items[i][0], s)
        elif i in self.bad:
            pixels = None
        else:
            if self.cache is None:  # opened lazily, once per worker process
                self.cache = np.memmap(self.cache_path, np.uint8, "r", shape=(len(self.items), s, s, 3))
            pixels = self.cache[i]
        if pixels is None:
            return None
        caption, epoch = self.caption(key), key // len(self.items)
        return to_tensor(pixels), caption, self.synthetic(key, caption), random.Random(f"{self.seed},{epoch},{i},clips")

def collate(batch):
    """drop unreadable samples (None) -> (images [B', 3, S, S], captions [B'], synthetic captions [B'],
    rngs [B'], n_skipped); (None, [], [], [], B) if all are."""
    kept = [b for b in batch if b is not None]
    if not kept:
        return None, [], [], [], len(batch)
    images, captions, synthetic, rngs = zip(*kept)
    return torch.stack(images), list(captions), list(synthetic), list(rngs), len(batch) - len(kept)


class StepBatches(torch.utils.data.Sampler):
    """Yields, for each step in [start, max_steps), this rank's list of sample keys. Keys depend
    only on (seed, step, rank), so a resumed run sees exactly the batches it would have seen.
    n=None: an infinite stream (key = global sample index); else epochs over n items, reshuffled
    per epoch, key = epoch * n + item (the dataset decodes both)."""

    def __init__(self, n, batch_size, rank, world, seed, start, max_steps):
        self.n, self.B, self.rank, self.world, self.seed, self.start, self.max_steps = n, batch_size, rank, world, seed, start, max_steps

    def __len__(self):
        return self.max_steps - self.start

    def __iter__(self):
        gB = self.B * self.world
        for step in range(self.start, self.max_steps):
            if self.n is None:
                first = step * gB + self.rank * self.B
                yield list(range(first, first + self.B))
                continue
            per_epoch = self.n // gB
            epoch, pos = divmod(step, per_epoch)
            perm = torch.randperm(self.n, generator=torch.Generator().manual_seed(self.seed * 100003 + epoch))
            idx = perm[pos * gB + self.rank * self.B: pos * gB + (self.rank + 1) * self.B]
            yield (idx + epoch * self.n).tolist()

# -----------------------------------------------------------------------------
# the shapes world: procedural two-object scenes, no files, deterministic per (split, seed, index).
# One scene record yields the image, its caption, exact hard negatives, twin scenes (the hard
# negative *images*), a long description (CLIPS) and true/false statements (DPO/VSR). The
# calibration behind these choices is in README.md ("The shapes world").

COLOURS = {"red": (220, 40, 40), "green": (40, 180, 60), "blue": (50, 90, 230), "yellow": (235, 215, 50),
           "purple": (150, 60, 200), "orange": (245, 140, 30), "white": (240, 240, 240), "cyan": (60, 210, 220),
           "pink": (250, 140, 200), "brown": (150, 95, 45)}
SHAPES = ("circle", "square", "triangle", "diamond", "cross", "ring")
SIZES = {"small": 0.11, "large": 0.19}  # half-extent as a fraction of the image side
BACKGROUNDS = ("plain", "striped", "dotted", "checkered")  # dark, low-contrast textures
RELATIONS = {"h": ("left of", "right of"), "v": ("above", "below")}  # (first object's, second object's)
CONVERSE = {"left of": "right of", "right of": "left of", "above": "below", "below": "above"}
TEST_SEED = 1234  # the fixed test set; train scenes come from a different random stream


@dataclass(frozen=True)
class Obj:
    shape: str
    colour: str
    size: str
    x: float  # centre, in [0, 1] image coordinates
    y: float

    def phrase(self):
        return f"a {self.size} {self.colour} {self.shape}"

    def name(self):
        return f"the {self.colour} {self.shape}"


@dataclass(frozen=True)
class Scene:
    """Two objects on a background. objs[0] is left of (axis 'h') or above (axis 'v') objs[1];
    subj is the object the caption names first ("A left of B" and "B right of A" are both used)."""
    objs: tuple
    axis: str
    background: str
    subj: int

    def relation(self):
        return RELATIONS[self.axis][self.subj]

    def caption(self):
        a, b = self.objs[self.subj], self.objs[1 - self.subj]
        return f"{a.phrase()} {self.relation()} {b.phrase()} on a {self.background} background"

    def key(self):  # what the scene shows
        return tuple((o.shape, o.colour, o.size) for o in self.objs) + (self.axis, self.background)


def scene_rng(split, seed, index):
    return random.Random(f"{split}-{seed}-{index}")  # str seeds hash with sha512: stable across runs


def sample_scene(rng):
    colours, shapes = rng.sample(list(COLOURS), 2), rng.sample(SHAPES, 2)
    sizes = [rng.choice(list(SIZES)) for _ in range(2)]
    axis, background = rng.choice("hv"), rng.choice(BACKGROUNDS)
    # first object in the first half of the axis, second in the other half; free along the other axis
    a_main, b_main = rng.uniform(0.2, 0.38), rng.uniform(0.62, 0.8)
    a_off, b_off = rng.uniform(0.22, 0.78), rng.uniform(0.22, 0.78)
    pos = [(a_main, a_off), (b_main, b_off)] if axis == "h" else [(a_off, a_main), (b_off, b_main)]
    objs = tuple(Obj(s, c, z, x, y) for s, c, z, (x, y) in zip(shapes, colours, sizes, pos))
    return Scene(objs, axis, background, subj=rng.randrange(2))


def test_scenes(n, seed=TEST_SEED):
    """n test scenes with pairwise distinct content, so each caption has exactly one right image."""
    scenes, seen, i = [], set(), 0
    while len(scenes) < n:
        s = sample_scene(scene_rng("test", seed, i))
        i += 1
        if s.key() not in seen:
            seen.add(s.key())
            scenes.append(s)
    return scenes

# twins: the same scene changed in exactly one compositional respect. The twin's caption is, word
# for word, the original's hard negative, so a batch holding both (NegCLIP's hard-negative images,
# TripletCLIP's grouped negatives) shows the same string as a positive and as a negative.


def mirror(s):
    """the objects exchange places; caption == relation_flip(s)."""
    a, b = s.objs
    return replace(s, objs=(replace(b, x=a.x, y=a.y), replace(a, x=b.x, y=b.y)), subj=1 - s.subj)


def swap_colours(s):
    """the objects exchange colours; caption == attribute_swap(s)."""
    a, b = s.objs
    return replace(s, objs=(replace(a, colour=b.colour), replace(b, colour=a.colour)))


def _replace_one(s, attr, choices):
    rng = random.Random(s.caption())  # deterministic per scene
    i, used = rng.randrange(2), {getattr(o, attr) for o in s.objs}
    new = rng.choice([c for c in choices if c not in used])
    return replace(s, objs=tuple(replace(o, **{attr: new}) if j == i else o for j, o in enumerate(s.objs)))

# exact hard-negative captions: each is false of the scene and differs from its caption


def relation_flip(s):
    """relation replaced by its converse ("left of" -> "right of")."""
    return mirror(s).caption()


def attribute_swap(s):
    """the two objects' colours exchanged."""
    return swap_colours(s).caption()


def colour_replace(s):
    """one object's colour replaced by a colour absent from the scene."""
    return _replace_one(s, "colour", list(COLOURS)).caption()


def shape_replace(s):
    """one object's shape replaced by a shape absent from the scene."""
    return _replace_one(s, "shape", SHAPES).caption()


def word_shuffle(s):
    """the caption's words in a (seeded) random order (ARO's order perturbations)."""
    words, caption = s.caption().split(), s.caption()
    rng = random.Random(caption)
    while " ".join(words) == caption:
        rng.shuffle(words)
    return " ".join(words)


NEGATIVES = {"relation": relation_flip, "attribute_swap": attribute_swap, "colour_replace": colour_replace,
             "shape_replace": shape_replace, "word_order": word_shuffle}


def description(s):
    """a long, multi-sentence description (the CLIPS "synthetic caption"), longer than the text
    context: every fact of the scene, one per sentence."""
    a, b = s.objs[s.subj], s.objs[1 - s.subj]
    where = {"left of": "on the left", "right of": "on the right", "above": "at the top", "below": "at the bottom"}
    return (f"The image shows two shapes on a {s.background} dark background. "
            f"{a.name().capitalize()} is {a.size}. {b.name().capitalize()} is {b.size}. "
            f"{a.name().capitalize()} is {s.relation()} {b.name()}. {b.name().capitalize()} is {CONVERSE[s.relation()]} {a.name()}. "
            f"{a.name().capitalize()} is {where[s.relation()]} and {b.name()} is {where[CONVERSE[s.relation()]]}.")


def partial_caption(s, rng):
    """a terse, partial caption of the scene, like web alt-text (--caption_style partial): one of three
    templates, each true of `s` and each leaving facts out (always the sizes or the second object;
    then the relation and background, or the colours and background). description(s) has them all."""
    a, b = s.objs[s.subj], s.objs[1 - s.subj]
    return rng.choice([f"a {a.colour} {a.shape} and a {b.colour} {b.shape}",
                       f"a {a.shape} {s.relation()} a {b.shape}",
                       f"a {a.size} {a.colour} {a.shape} on a {s.background} background"])


def shapes_vocab():
    """the sorted token ids of every word the world's texts use (captions, negatives, descriptions,
    statements) + SOT/EOT: the captioner's output vocabulary on the shapes world"""
    words = [*COLOURS, *SHAPES, *SIZES, *BACKGROUNDS, *CONVERSE, "a the an on is and image shows two shapes of dark background",
             "at top bottom left right", ". ,"]
    tokenizer = get_tokenizer()
    return sorted(set(tokenizer.encode(" ".join(words))) | {tokenizer.sot_token_id, tokenizer.eot_token_id})


def statements(s):
    """true/false spatial statements in VSR's form "The <subj> is <relation> the <obj>." ->
    [(text, label)]: the caption's relation (True) and its converse (False)."""
    a, b = s.objs[s.subj], s.objs[1 - s.subj]
    return [(f"The {a.colour} {a.shape} is {r} the {b.colour} {b.shape}.", r == s.relation())
            for r in (s.relation(), CONVERSE[s.relation()])]


@functools.lru_cache(maxsize=16)
def _canvas(background, size):
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    texture = {"plain": np.zeros_like(xx), "striped": ((xx + yy) // 4) % 2, "dotted": (xx % 6 < 2) & (yy % 6 < 2),
               "checkered": (xx // 8 + yy // 8) % 2}[background]
    return np.repeat((18.0 + 30.0 * texture)[..., None], 3, axis=2), yy + 0.5, xx + 0.5


def _mask(shape, dx, dy):
    """pixels inside a shape centred at 0 with half-extent 1, from the offsets dx, dy"""
    r2 = dx * dx + dy * dy
    if shape == "circle":
        return r2 <= 1.0
    if shape == "ring":
        return (r2 <= 1.0) & (r2 >= 0.3)
    if shape == "square":
        return (np.abs(dx) <= 0.85) & (np.abs(dy) <= 0.85)
    if shape == "diamond":
        return np.abs(dx) + np.abs(dy) <= 1.0
    if shape == "triangle":
        return (dy <= 0.8) & (np.abs(dx) <= (dy + 1.0) * 0.53)
    return ((np.abs(dx) <= 0.3) | (np.abs(dy) <= 0.3)) & (np.abs(dx) <= 1) & (np.abs(dy) <= 1)  # cross


def render(s, size):
    """the scene as a uint8 [size, size, 3] array."""
    canvas, yy, xx = _canvas(s.background, size)
    img = canvas.astype(np.uint8)
    for o in s.objs:
        # every shape lies within half-extent r of its centre: draw only that box (3x faster, same pixels)
        r, cx, cy = SIZES[o.size] * size, o.x * size, o.y * size
        box = slice(max(0, int(cy - r)), int(cy + r) + 1), slice(max(0, int(cx - r)), int(cx + r) + 1)
        img[box][_mask(o.shape, (xx[box] - cx) / r, (yy[box] - cy) / r)] = COLOURS[o.colour]
    return img


CAPTION_STYLES = ("full", "partial")


class ShapesDataset(torch.utils.data.Dataset):
    """Training scenes: an infinite stream, key = global sample index -> (image float [3, S, S],
    caption, synthetic caption, rng: the scene's random stream, for the script's text transforms). Like web alt-text, the training captions do not reliably bind
    attributes: with probability `swap_noise` the caption names the two colours the wrong way
    round (see README for why 0.5). caption_style="partial" makes them terse as well:
    partial_caption() of the (possibly colour-swapped) scene. The synthetic caption (CLIPS) is the
    scene's description(), always true and complete."""

    def __init__(self, image_size, seed=0, swap_noise=0.5, caption_style="full"):
        if caption_style not in CAPTION_STYLES:
            raise ValueError(f"caption_style={caption_style!r}: expected one of {CAPTION_STYLES}")
        self.image_size, self.seed, self.swap_noise, self.caption_style = image_size, seed, swap_noise, caption_style

    def __len__(self):
        return 2 ** 62

    def __getitem__(self, key):
        rng = scene_rng("train", self.seed, key)
        s = sample_scene(rng)
        shown = swap_colours(s) if rng.random() < self.swap_noise else s  # what the caption claims
        caption = shown.caption() if self.caption_style == "full" else partial_caption(shown, rng)
        return to_tensor(render(s, self.image_size)), caption, description(s), rng
