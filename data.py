"""
Data shared by the minclip scripts.
- Real image-caption sets in their exact released layouts: Flickr8k (Kaggle, original and
  Karpathy), COCO captions, recaptioned CSV/JSONL files (image, web caption, synthetic caption);
  each reader's docstring gives the layout and its quirks. read_dataset picks one by name.
- VSR (true/false spatial statements and their contrast captions) and ranked-candidate JSONL
  files: clip_dpo.py's preference data.
- CLIPS's four token reductions of a long synthetic caption (reduce_caption).
- Images: decode + resize + crop (load_image), the uint8 memmap cache, ImageTextDataset, and
  StepBatches, the resumable batches every script draws.
- The text-file rules: every text file is opened by text_lines (csv_rows and read_json on top of
  it): UTF-8 with an optional byte-order mark; every bad input raises DataError naming the file
  and line (or flag).
The shapes world is shapes.py; hard-negative captions and their files are negatives.py; webdataset
shards (--data wds), streamed, are wds.py.
Datasets return raw texts; each training script turns them into the tokens its method needs.
"""

import codecs
import csv
import functools
import json
import multiprocessing
import os
import random
import re
from typing import NamedTuple

import numpy as np
import torch
import torch.distributed as dist
import torchvision.transforms.functional as TF
from open_clip.constants import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD
from open_clip.tokenizer import SimpleTokenizer
from PIL import Image

SPLITS = ("train", "val", "test")

# -----------------------------------------------------------------------------
# errors and tokenizer


class DataError(ValueError):
    """a bad dataset file, line or flag; scripts catch it at top level and print `error: <msg>`"""


@functools.cache
def get_tokenizer(context_length=77):
    # open_clip's bpe tokenizer, the one pretrained clip text towers expect; call it with a list of
    # strings -> long tensor [n, context_length]
    return SimpleTokenizer(context_length=context_length)


def trim_tokens(*tokens):
    """token tensors [..., L] (one batch's) cut to its longest text: up to the last EOT (the highest
    id) + 1. The text tower's causal mask makes the rest padding that cannot change a feature; cut
    here, on the CPU in the collate, the model needs no host sync to find where the texts end."""
    L = max(int(t.argmax(-1).max()) + 1 for t in tokens)
    return tuple(t[..., :L] for t in tokens)


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
                    raise DataError(
                        f"{path}:{n}: a NUL byte (column {line.index(chr(0)) + 1}): a damaged file, or not a text file"
                    )
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
    # the bom is no column of line 1
    column = at - max(raw.rfind(b"\n", 0, at), raw.rfind(b"\r", 0, at), bom - 1)
    return (
        f"{path}:{line}: byte 0x{raw[at]:02x} (byte {column} of the line) is not UTF-8: "
        "the file must be UTF-8 (re-save it as UTF-8)"
    )


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
                raise DataError(
                    f"{path}:{start}: a quoted field starting on this line is never closed (csv read on "
                    f'to line {rows.line_num}: {e}); close it, or write a literal quote as ""'
                ) from None
            raise DataError(f"{path}:{start}: malformed CSV ({e})") from None
        if row:
            yield start, row


def jsonl_rows(path):
    """a JSON-lines file (text_lines' rules) -> (line number, object) per non-blank line; a line that
    is not a JSON object -> DataError with file:line"""
    for n, line in enumerate(text_lines(path), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}:{n}: malformed JSON ({e.msg})") from None
        if not isinstance(row, dict):
            raise DataError(f"{path}:{n}: expected a JSON object")
        yield n, row


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
        print(
            f"{source}: skipped {len(missing)} image(s) without an image file or captions: "
            f"{', '.join(list(missing)[:3])}"
        )
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
    split = {n: "test" for n in order[:k]} | {n: "val" for n in order[k : 2 * k]}
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
                raise DataError(
                    f"{where}: the caption runs over several lines: a quoted field starting on this "
                    "line is closed only on a later one"
                )
            captions.setdefault(row[0], []).append(_caption(row[1], where))
        split_of = (
            _parse_karpathy(karpathy)[1] if os.path.exists(karpathy) else _seeded_split(list(captions), seed)
        )
        return _assemble(captions, split_of, _need(j("Images"), "folder"), path)
    if os.path.exists(j("Flickr8k.token.txt")):  # (b) original: "<file>.jpg#<k>\t<caption>"
        path, captions = j("Flickr8k.token.txt"), {}
        for n, line in enumerate(text_lines(path), 1):
            if not line.strip():
                continue
            key, tab, text = line.rstrip("\r\n").partition("\t")
            name, hash_, k = key.rpartition("#")
            if not tab or not hash_ or not k.isdigit():
                raise DataError(
                    f"{path}:{n}: expected '<image>#<k><TAB><caption>', got {line.strip()[:60]!r}"
                )
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
    raise DataError(
        f"no Flickr8k layout under {root}: looked for captions.txt + Images/ (Kaggle), "
        "Flickr8k.token.txt + Flicker8k_Dataset/ + Flickr_8k.*Images.txt (original), "
        "dataset_flickr8k.json + Images/ or Flicker8k_Dataset/ or images/ (Karpathy)"
    )


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
                raise DataError(
                    f"{path}:{n}: expected {len(header)} columns ({','.join(header)}), got {len(row)}"
                )
            rows.append((n, dict(zip(header, row))))
    else:
        rows = list(jsonl_rows(path))
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
        print(
            f"{path}: skipped {len(skipped)} row(s) with a missing or repeated image: {', '.join(skipped[:3])}"
        )
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
    "above": "below",
    "below": "above",
    "over": "under",
    "under": "on top of",
    "on top of": "beneath",
    "beneath": "on top of",
    "on": "under",
    "off": "on",
    "left of": "right of",
    "right of": "left of",
    "at the left side of": "at the right side of",
    "at the right side of": "at the left side of",
    "in front of": "behind",
    "behind": "in front of",
    "ahead of": "behind",
    "at the back of": "in front of",
    "inside": "outside",
    "outside": "inside",
    "in": "outside",
    "within": "outside",
    "into": "out of",
    "out of": "into",
    "contains": "inside",
    "surrounding": "enclosed by",
    "enclosed by": "surrounding",
    "part of": "has as a part",
    "has as a part": "part of",
    "consists of": "part of",
    "touching": "away from",
    "away from": "touching",
    "against": "away from",
    "toward": "away from",
    "attached to": "detached from",
    "connected to": "detached from",
    "detached from": "attached to",
    "near": "far from",
    "close to": "far from",
    "next to": "far from",
    "beside": "far from",
    "by": "far from",
    "adjacent to": "far from",
    "alongside": "far from",
    "at the side of": "far from",
    "far from": "near",
    "far away from": "close to",
    "across from": "next to",
    "opposite to": "next to",
    "facing": "facing away from",
    "facing away from": "facing",
    "parallel to": "perpendicular to",
    "perpendicular to": "parallel to",
    "at the edge of": "in the middle of",
    "in the middle of": "at the edge of",
    # no contrast that is false whenever the caption is true (directions of motion, vague or rare relations)
    "across": None,
    "along": None,
    "among": None,
    "around": None,
    "at": None,
    "between": None,
    "beyond": None,
    "congruent": None,
    "down": None,
    "down from": None,
    "past": None,
    "through": None,
    "with": None,
}
# VSR's meta-categories of its relations, exactly as its repository lists them in
# analysis_scripts/rel_meta_category_dict.txt (github.com/cambridgeltl/visual-spatial-reasoning, read by
# analysis_scripts/eval_compute_acc_by_rel_meta_cat.py for the paper's by-category figure). The file
# also lists five relations that are in neither split (after, deep down, from, to, up), and "among"
# twice: VSR's script keeps the later line (Unallocated), and so does VSR_META. "congruent" is in no
# list (VSR's script prints it as having no category): None. Neither has a contrast, so the contrast
# protocol never scores them.
VSR_META_LISTS = {
    "Adjacency": (
        "adjacent to",
        "alongside",
        "at the side of",
        "at the right side of",
        "at the left side of",
        "attached to",
        "at the back of",
        "ahead of",
        "against",
        "at the edge of",
    ),
    "Directional": (
        "off",
        "past",
        "toward",
        "down",
        "deep down",
        "up",
        "away from",
        "along",
        "around",
        "from",
        "into",
        "to",
        "across",
        "across from",
        "through",
        "down from",
    ),
    "Orientation": ("facing", "facing away from", "parallel to", "perpendicular to"),
    "Projective": (
        "on top of",
        "beneath",
        "beside",
        "behind",
        "left of",
        "right of",
        "under",
        "in front of",
        "below",
        "above",
        "over",
        "in the middle of",
    ),
    "Proximity": ("by", "close to", "near", "far from", "far away from"),
    "Topological": (
        "connected to",
        "detached from",
        "has as a part",
        "part of",
        "contains",
        "within",
        "at",
        "on",
        "in",
        "with",
        "surrounding",
        "among",
        "consists of",
        "out of",
        "between",
        "inside",
        "outside",
        "touching",
    ),
    "Unallocated": ("beyond", "next to", "opposite to", "after", "among", "enclosed by"),
}
VSR_META = {r: None for r in VSR_CONTRAST} | {
    r: c for c, rs in VSR_META_LISTS.items() for r in rs if r in VSR_CONTRAST
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
        raise ValueError(
            f"caption {caption!r} does not contain {relation_phrase(relation)!r} exactly once as whole words"
        )
    return pattern.sub(relation_phrase(VSR_CONTRAST[relation]), caption)


class VSRRow(NamedTuple):
    image: str  # absolute path
    caption: str
    label: bool  # the caption is true of the image
    relation: str
    where: str  # "file:line", for messages


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


VSR_IMAGE_DIRS = (
    "images",
    "data/images",
    "trainval2017",
    "data/trainval2017",
    "train2017",
    "val2017",
    "data/train2017",
    "data/val2017",
)  # under --data_root, in this order


def _vsr_file(root, split, part):
    for path in (
        os.path.join(root, "splits", split, f"{part}.jsonl"),
        os.path.join(root, "data", "splits", split, f"{part}.jsonl"),
        os.path.join(root, f"{part}.jsonl"),
    ):
        if os.path.isfile(path):
            return path
    raise DataError(
        f"--data_root {root}: no VSR {split} {part} file (looked for splits/{split}/{part}.jsonl, "
        f"data/splits/{split}/{part}.jsonl, {part}.jsonl)"
    )


def vsr_image_dirs(root, image_root=None):
    """where VSR's images may be -> [(folder, the set of its file names)] of the folders that exist, and
    the words naming every folder looked in. VSR's README puts them in data/images/ (its zip, or
    select_only_revlevant_images.py) or merges COCO 2017 into data/trainval2017/; COCO's own layout
    has train2017/ and val2017/; --data_root may be the clone or its data/ folder (VSR_IMAGE_DIRS).
    image_root: the images are there, or in its train2017/ and val2017/ (a COCO root), instead."""
    if image_root is not None:
        if not os.path.isdir(image_root):
            raise DataError(f"--image_root {image_root}: no such directory")
        dirs = [image_root, os.path.join(image_root, "train2017"), os.path.join(image_root, "val2017")]
        words = f"--image_root {image_root} (or its train2017/, val2017/)"
    else:
        dirs = [os.path.join(root, d) for d in VSR_IMAGE_DIRS]
        words = f"{', '.join(d + '/' for d in VSR_IMAGE_DIRS)} under {root} (or give --image_root)"
    return [(d, set(os.listdir(d))) for d in dirs if os.path.isdir(d)], words


def read_vsr(root, split="random", image_root=None, parts=VSR_SPLIT_FILES):
    """VSR's split files of one split (random | zeroshot) -> {"train" | "dev" | "test": [VSRRow]}, the
    parts asked for (an evaluation needs only dev and test, and only their images).
    One JSON object per line: image (a COCO 2017 file name), image_link (.../train2017/... or
    .../val2017/...), caption ("The <subj> is <relation> the <obj>."), label (1 / 0), relation (one
    of VSR_RELATIONS), annotator_id, vote_true_validator_id and vote_false_validator_id (JSON-encoded
    strings "[2, 9]" in the current files, lists in older ones; both accepted), reference_frame
    (random split) or subj and obj (zero-shot split). Files are found as splits/<split>/<part>.jsonl,
    data/splits/<split>/<part>.jsonl or <part>.jsonl under root (a clone of VSR's repository, its
    data/ folder, or a folder of the three files); images as vsr_image_dirs says. A malformed line,
    an unknown relation, a caption without its relation's words, or a missing image is one error
    naming the file and line (and, for an image, every folder looked in)."""
    if split not in ("random", "zeroshot"):
        raise DataError(f"--vsr_split {split}: choose random or zeroshot")
    if not os.path.isdir(root):
        raise DataError(f"--data_root {root}: no such directory")
    # every split file before any image folder is listed
    paths = {part: _vsr_file(root, split, part) for part in parts}
    image_dirs, looked_in = vsr_image_dirs(root, image_root)
    out = {}
    for part in parts:
        path, rows, missing = paths[part], [], []
        for n, row in jsonl_rows(path):
            where = f"{path}:{n}"
            for key in ("image", "caption", "relation"):
                if not isinstance(row.get(key), str) or not row[key].strip():
                    raise DataError(f"{where}: missing or empty field {key!r}")
            if row.get("label") not in (0, 1):  # True / False compare equal to 1 / 0
                raise DataError(f"{where}: label must be 1 or 0, got {row.get('label')!r}")
            if row["relation"] not in VSR_CONTRAST:
                raise DataError(f"{where}: unknown relation {row['relation']!r} (not one of VSR's 66)")
            if (
                len(
                    re.findall(
                        r"(?<![\w-])" + re.escape(relation_phrase(row["relation"])) + r"(?![\w-])",
                        row["caption"],
                    )
                )
                != 1
            ):
                raise DataError(
                    f"{where}: caption {row['caption']!r} does not contain {relation_phrase(row['relation'])!r} once"
                )
            for key in ("vote_true_validator_id", "vote_false_validator_id"):
                if key in row:
                    _vote_ids(row[key], where, key)
            folder = next((d for d, names in image_dirs if row["image"] in names), None)
            if folder is None:
                missing.append((where, row["image"]))
                continue
            rows.append(
                VSRRow(
                    os.path.abspath(os.path.join(folder, row["image"])),
                    row["caption"].strip(),
                    bool(row["label"]),
                    row["relation"],
                    where,
                )
            )
        if missing:
            (where, name), more = missing[0], len(missing) - 1
            raise DataError(
                f"{where}: image {name} not found in {looked_in}"
                + (f"; {more} more rows of {path} lack their image" if more else "")
            )
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
    for n, row in jsonl_rows(path):
        where = f"{path}:{n}"
        if ("image" in row) == ("text" in row):
            raise DataError(f'{where}: expected an object with either "image" + "texts" or "text" + "images"')
        direction = "i2t" if "image" in row else "t2i"
        query, key = (row["image"], "texts") if direction == "i2t" else (row["text"], "images")
        candidates = row.get(key)
        if not isinstance(query, str) or not query.strip():
            raise DataError(f"{where}: empty {'image' if direction == 'i2t' else 'text'}")
        if (
            not isinstance(candidates, list)
            or len(candidates) < 2
            or not all(isinstance(c, str) and c.strip() for c in candidates)
        ):
            raise DataError(f'{where}: "{key}" must be a list of at least 2 non-empty strings')
        ranks = list(range(len(candidates)))
        if ranked and "ranks" in row:
            ranks = row["ranks"]
            if (
                not isinstance(ranks, list)
                or len(ranks) != len(candidates)
                or not all(isinstance(r, int) and not isinstance(r, bool) and r >= 0 for r in ranks)
            ):
                raise DataError(f'{where}: "ranks" must be {len(candidates)} integers >= 0, got {ranks!r}')
            if len(set(ranks)) < 2:
                raise DataError(f'{where}: "ranks" are all equal: no preference to learn')
        images = [query] if direction == "i2t" else candidates
        for image in images:
            if not os.path.isfile(os.path.join(folder, image)):
                raise DataError(f"{where}: image {image} not found (paths are relative to {folder})")
        absolute = lambda p: os.path.abspath(os.path.join(folder, p))  # noqa: E731
        if direction == "i2t":
            query = absolute(query)
        else:
            candidates = [absolute(c) for c in candidates]
        out.append(
            {"direction": direction, "query": query, "candidates": candidates, "ranks": ranks, "where": where}
        )
    if not out:
        raise DataError(f"{path}: no rows")
    return out


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
            ids = ids[start : start + keep]
        elif mode == "subcaption":
            sentences = [s for s in re.split(r"[.!]+", text) if s.strip()]
            ids = tokenizer.encode(rng.choice(sentences) if sentences else fallback)[:keep]
        else:
            raise ValueError(f"unknown caption mask {mode!r}, choose from {CAPTION_MASKS[1:]}")
    out = torch.zeros(context_length, dtype=torch.long)
    out[: len(ids) + 2] = torch.tensor([tokenizer.sot_token_id, *ids, tokenizer.eot_token_id])
    return out


# -----------------------------------------------------------------------------
# images, dataset, cache

# open_clip's evaluation preprocessing, PreprocessCfg's fields less size and mode: the default is OpenAI's
# (and every minclip checkpoint's); a pretrained tag may change any of them (model.init_preprocess)
PREPROCESS = {
    "mean": OPENAI_DATASET_MEAN,
    "std": OPENAI_DATASET_STD,
    "interpolation": "bicubic",
    "resize_mode": "shortest",
    "fill_color": 0,
}


@functools.cache
def _normalised(mean, std):
    """[3, 256]: (v / 255 - mean) / std for every uint8 value v, in the float32 operations open_clip uses"""
    mean, std = torch.tensor(mean).view(3, 1), torch.tensor(std).view(3, 1)
    return ((torch.arange(256.0)[None, :].div(255) - mean) / std).numpy()


def load_image(path, size, preprocess=None):
    """decode and resize -> uint8 [size, size, 3], None if unreadable. preprocess: open_clip's
    evaluation config (PREPROCESS's keys; None = PREPROCESS: the shorter side to size, bicubic,
    centre crop), followed bit for bit: resize_mode shortest (resize, centre crop), squash (both
    sides to size, the aspect ratio lost) or longest (the longer side to size, padded with fill_color);
    interpolation bicubic or bilinear ('random' is bicubic, as open_clip evaluates it)."""
    # deterministic, and no random flips: a flip turns "the dog left of the cat" into a false caption
    cfg = PREPROCESS | (preprocess or {})
    try:
        with Image.open(path) as im:
            im = im.convert("RGB")  # before resizing, as eval.open_rgb does before open_clip's transform
    except (OSError, ValueError, Image.DecompressionBombError):
        return None
    mode = (
        TF.InterpolationMode.BILINEAR if cfg["interpolation"] == "bilinear" else TF.InterpolationMode.BICUBIC
    )
    if cfg["resize_mode"] == "shortest":
        im = TF.center_crop(TF.resize(im, size, interpolation=mode), size)
    elif cfg["resize_mode"] == "squash":
        im = TF.resize(im, [size, size], interpolation=mode)
    elif cfg["resize_mode"] == "longest":
        # open_clip's own, for its rounding and padding
        from open_clip.transform import ResizeKeepRatio, center_crop_or_pad

        im = center_crop_or_pad(
            ResizeKeepRatio(size, longest=1, interpolation=mode)(im), [size, size], fill=cfg["fill_color"]
        )
    else:
        raise ValueError(
            f"unknown resize_mode {cfg['resize_mode']!r} (open_clip's: shortest, squash, longest)"
        )
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
        raise DataError(
            f"{what}: {len(bad)} of {len(items)} images do not open: {', '.join(bad[:3])}"
            f"{', ...' if len(bad) > 3 else ''}; evaluation needs every one (replace or remove them)"
        )


def to_tensor(pixels, preprocess=None):
    """uint8 [S, S, 3] -> float [3, S, S], normalised with preprocess's mean and std (None: OpenAI's,
    as openai clip's training images): bit for bit open_clip's ToTensor + Normalize, looked up per
    channel (2x faster than computing it on 64 px)"""
    cfg = PREPROCESS | (preprocess or {})
    table = _normalised(
        *(tuple(x) if isinstance(x, (list, tuple)) else (x,) * 3 for x in (cfg["mean"], cfg["std"]))
    )
    pixels = np.asarray(pixels)
    return torch.from_numpy(np.stack([table[c][pixels[..., c]] for c in range(3)]))


def build_image_cache(items, image_size, cache_path, workers=0, rank=0, world=1):
    """decode every image once into a uint8 memmap [N, S, S, 3] at cache_path, with a json sidecar
    (N, S, bad indices, image paths); a matching cache is reused. Returns the unreadable indices.
    Under torch.distributed every rank calls it with its (rank, world) and decodes the items
    rank::world into the one file, so no rank waits alone in a collective while one process decodes
    a whole large set; the file system must be shared by the ranks (as out_dir is)."""
    n, s, paths, meta_path = len(items), image_size, [item[0] for item in items], cache_path + ".json"
    plan = [None]  # rank 0 decides for every rank: the reused cache's bad indices, or the file to fill
    if rank == 0:
        try:
            with open(meta_path) as f:
                meta = json.load(f)
            if (meta["n"], meta["size"], meta["paths"]) == (n, s, paths) and os.path.getsize(
                cache_path
            ) == n * s * s * 3:
                plan = [{"bad": meta["bad"]}]
        except (OSError, ValueError, KeyError):
            pass  # no cache, or a stale or broken one: rebuild
        if plan[0] is None:
            # the sidecar is the commit marker: drop it first, write it last, so a crash mid-build never
            # leaves a cache that looks valid. the temp name is rank 0's pid: two runs never collide
            if os.path.exists(meta_path):
                os.remove(meta_path)
            plan = [{"tmp": f"{cache_path}.tmp{os.getpid()}"}]
            np.memmap(plan[0]["tmp"], np.uint8, "w+", shape=(n, s, s, 3)).flush()
    if world > 1:
        dist.broadcast_object_list(plan, src=0)
    if "bad" in plan[0]:
        return plan[0]["bad"]
    tmp = plan[0]["tmp"]
    cache = np.memmap(tmp, np.uint8, "r+", shape=(n, s, s, 3))
    load, pool = functools.partial(load_image, size=s), multiprocessing.Pool(workers) if workers else None
    mine, bad = [paths[i] for i in range(rank, n, world)], []
    for i, pixels in zip(
        range(rank, n, world), pool.imap(load, mine, chunksize=16) if pool else map(load, mine)
    ):
        if pixels is None:
            bad.append(i)
        else:
            cache[i] = pixels
    if pool:
        pool.close()
    cache.flush()
    del cache
    if world > 1:  # every shard is written (the barrier), and every rank has every unreadable index
        shards = [None] * world
        dist.all_gather_object(shards, bad)
        bad = sorted(i for shard in shards for i in shard)
    if rank == 0:
        os.replace(tmp, cache_path)
        if bad:
            print(
                f"{cache_path}: skipped {len(bad)} unreadable image(s): "
                f"{', '.join(os.path.basename(paths[i]) for i in bad[:3])}"
            )
        with open(tmp, "w") as f:
            json.dump({"n": n, "size": s, "bad": bad, "paths": paths}, f)
        os.replace(tmp, meta_path)
    if world > 1:
        dist.barrier()  # the sidecar exists before any rank reads the cache
    return bad


class ImageTextDataset(torch.utils.data.Dataset):
    """One sample = one image with ONE of its captions -> (image float [3, S, S], caption, synthetic
    caption, rng), or None if the image is unreadable (collate drops it). The synthetic caption
    (CLIPS) is the item's third field (a recaption file), else the image's other captions joined
    into one multi-sentence text; rng is the sample's own random.Random for the training script's
    text transforms. Keys may exceed len: key = epoch * len + i, and the caption and rng are pure
    functions of (seed, epoch, i), so a sampler that yields such keys (StepBatches) resumes
    exactly, whatever the number of dataloader workers. cache_path: build_image_cache's, every rank
    (rank, world) building its shard of it."""

    def __init__(self, items, image_size, seed=0, cache_path=None, rank=0, world=1):
        self.items, self.image_size, self.seed = items, image_size, seed
        self.cache_path, self.cache = cache_path, None
        self.bad = (
            set(build_image_cache(items, image_size, cache_path, rank=rank, world=world))
            if cache_path
            else set()
        )

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
        return (
            to_tensor(pixels),
            caption,
            self.synthetic(key, caption),
            random.Random(f"{self.seed},{epoch},{i},clips"),
        )


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
        self.n, self.B, self.rank, self.world, self.seed, self.start, self.max_steps = (
            n,
            batch_size,
            rank,
            world,
            seed,
            start,
            max_steps,
        )

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
            idx = perm[pos * gB + self.rank * self.B : pos * gB + (self.rank + 1) * self.B]
            yield (idx + epoch * self.n).tolist()
