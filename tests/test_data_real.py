"""Readers on fixtures in the exact real formats (tests/fixtures), bad inputs, and ImageTextDataset."""

import codecs
import os
import pickle
import re
import shutil
import sys

import numpy as np
import pytest
import torch
from PIL import Image

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repo root
from helpers import FIX, fixture_copy, gloo_processes  # noqa: E402

from data import (
    DataError,
    ImageTextDataset,
    build_image_cache,
    check_images,
    collate,
    get_tokenizer,
    load_image,
    read_coco,
    read_dataset,
    read_flickr8k,
    read_karpathy,
    to_tensor,
)

F = [
    "1000268201_693b08cb0e.jpg",
    "1001773457_577c3a7d70.jpg",
    "1002674143_1b742ab4b8.jpg",
    "1003163366_44323f5815.jpg",
    "1007129816_e794419615.jpg",
    "1007320043_627395c3d8.jpg",
]


def names(splits):
    return {s: [os.path.basename(p) for p, _ in items] for s, items in splits.items()}


def edit(path, old, new):
    text = open(path, encoding="utf-8").read()
    assert old in text
    with open(path, "w", encoding="utf-8") as f:
        f.write(text.replace(old, new, 1))


def line_of(path, needle):
    return next(n for n, line in enumerate(open(path, encoding="utf-8"), 1) if needle in line)


def noise_jpg(path, w, h, seed):
    # textured content, so resize/crop differences show up (the fixtures are solid colours)
    rgb = np.random.default_rng(seed).integers(0, 256, (h // 4, w // 4, 3), dtype=np.uint8)
    Image.fromarray(rgb).resize((w, h), Image.BILINEAR).save(path, quality=90)
    return str(path)


# -----------------------------------------------------------------------------
# readers


def test_flickr8k_kaggle():
    splits = read_flickr8k(os.path.join(FIX, "flickr8k_kaggle"))
    n = names(splits)
    assert [len(n[s]) for s in ("train", "val", "test")] == [4, 1, 1]  # round(6 * 1000 / 8091) -> at least 1
    assert sorted(sum(n.values(), [])) == sorted(F)
    for items in splits.values():
        for path, caps in items:
            assert os.path.isabs(path) and os.path.isfile(path) and len(caps) == 5
    caps = dict(sum(splits.values(), []))
    first = caps[os.path.join(FIX, "flickr8k_kaggle", "Images", F[0])]
    assert first[1] == "A girl, in a dress, goes into a wooden building ."  # the quoted comma survives
    assert 'A man with a sign that reads "stop" is wearing an orange hat .' in sum(caps.values(), [])
    assert read_flickr8k(os.path.join(FIX, "flickr8k_kaggle")) == splits  # deterministic
    seeded = [names(read_flickr8k(os.path.join(FIX, "flickr8k_kaggle"), seed=s)) for s in range(6)]
    assert len({tuple(n["test"] + n["val"]) for n in seeded}) > 1  # the seed picks the split


def test_flickr8k_kaggle_uses_karpathy_json(tmp_path):
    root = str(fixture_copy(tmp_path, "flickr8k_kaggle"))
    shutil.copy(os.path.join(FIX, "flickr8k_karpathy", "dataset_flickr8k.json"), root)
    # its split, restval -> train; F[5] is in captions.txt but not in the json, so it is unused
    assert names(read_flickr8k(root)) == {"train": F[:3], "val": [F[3]], "test": [F[4]]}


def test_flickr8k_original(capsys):
    splits = read_flickr8k(os.path.join(FIX, "flickr8k_original"))
    assert names(splits) == {"train": F[:4], "val": [F[4]], "test": [F[5]]}  # dev -> val
    assert all(len(caps) == 5 for items in splits.values() for _, caps in items)
    out = capsys.readouterr().out
    assert "skipped 1 image(s)" in out and "2258277193_586949ec62.jpg.1" in out  # the bogus token entry
    assert out.count("skipped") == 1


def test_flickr8k_karpathy():
    root = os.path.join(FIX, "flickr8k_karpathy")
    splits = read_flickr8k(root)
    assert names(splits) == {"train": F[:3], "val": [F[3]], "test": [F[4]]}  # F[2] is restval
    assert splits == read_karpathy(os.path.join(root, "dataset_flickr8k.json"), os.path.join(root, "images"))
    assert splits["train"][0][1][1] == "A girl, in a dress, goes into a wooden building ."


def test_coco_groups_per_image(capsys):
    splits = read_coco(os.path.join(FIX, "coco"))
    assert names(splits) == {
        "train": [f"COCO_train2014_{i:012d}.jpg" for i in (9, 25, 30)],
        "val": [f"COCO_val2014_{i:012d}.jpg" for i in (42, 391895)],
        "test": [f"COCO_val2014_{i:012d}.jpg" for i in (42, 391895)],
    }
    assert [len(caps) for _, caps in splits["train"]] == [5, 6, 5]  # interleaved annotations, grouped
    giraffe = splits["train"][1][1]
    assert giraffe[0] == "A giraffe eating food from the top of the tree."
    assert giraffe[1] == "A giraffe standing up nearby a tree"  # stripped
    assert giraffe[5] == "A giraffe looking at the camera next to a tree."
    assert all(c == c.strip() for items in splits.values() for _, caps in items for c in caps)
    assert "val and test are both val2014" in capsys.readouterr().out


def test_coco_uses_karpathy_json(tmp_path):
    root = str(fixture_copy(tmp_path, "coco"))
    sentences = lambda raw: [{"tokens": raw.lower().split(), "raw": raw, "imgid": 0, "sentid": 0}]
    images = [
        ("train2014", 9, "train"),
        ("train2014", 25, "test"),
        ("val2014", 42, "restval"),
        ("val2014", 391895, "val"),
    ]
    with open(os.path.join(root, "dataset_coco.json"), "w") as f:
        f.write(
            '{"images": ['
            + ",".join(
                f'{{"filepath": "{part}", "sentids": [0], "filename": "COCO_{part}_{i:012d}.jpg", "imgid": 0, '
                f'"split": "{split}", "sentences": {sentences("A b c.")}, "cocoid": {i}}}'.replace("'", '"')
                for part, i, split in images
            )
            + '], "dataset": "coco"}'
        )
    splits = read_coco(root)
    assert names(splits) == {
        "train": ["COCO_train2014_000000000009.jpg", "COCO_val2014_000000000042.jpg"],
        "val": ["COCO_val2014_000000391895.jpg"],
        "test": ["COCO_train2014_000000000025.jpg"],
    }
    assert splits["train"][1][0] == os.path.join(root, "val2014", "COCO_val2014_000000000042.jpg")


def test_read_dataset(tmp_path):
    assert read_dataset("flickr8k", os.path.join(FIX, "flickr8k_kaggle")) == read_flickr8k(
        os.path.join(FIX, "flickr8k_kaggle")
    )
    with pytest.raises(DataError, match=r"--data flickr30: unknown dataset, choose from flickr8k, coco"):
        read_dataset("flickr30", os.path.join(FIX, "flickr8k_kaggle"))
    with pytest.raises(DataError, match=r"--data_root .*nowhere: no such directory"):
        read_dataset("coco", str(tmp_path / "nowhere"))


# -----------------------------------------------------------------------------
# bad inputs: each names the file and line (or record)


@pytest.mark.parametrize(
    "fix, remove, match",
    [
        ("flickr8k_kaggle", "captions.txt", r"no Flickr8k layout under .*captions.txt \+ Images/"),
        ("flickr8k_kaggle", "Images", r"missing folder: .*flickr8k_kaggle/Images"),
        ("flickr8k_original", "Flickr_8k.devImages.txt", r"missing file: .*Flickr_8k.devImages.txt"),
        ("flickr8k_karpathy", "images", r"no Flickr8k layout under .*dataset_flickr8k.json \+ Images/"),
        ("coco", "annotations/captions_val2014.json", r"missing file: .*annotations/captions_val2014.json"),
    ],
)
def test_missing_file(tmp_path, fix, remove, match):
    root = str(fixture_copy(tmp_path, fix))
    path = os.path.join(root, remove)
    shutil.rmtree(path) if os.path.isdir(path) else os.remove(path)
    with pytest.raises(DataError, match=match):
        read_dataset("coco" if fix == "coco" else "flickr8k", root)


def test_malformed_csv(tmp_path):
    root = str(fixture_copy(tmp_path, "flickr8k_kaggle"))
    path = os.path.join(root, "captions.txt")
    edit(path, f"{F[1]},A black dog and a spotted dog are fighting", f"{F[1]},A black dog,a spotted dog")
    with pytest.raises(DataError, match=r"captions.txt:7: expected 2 columns \(image,caption\), got 3"):
        read_flickr8k(root)
    edit(path, "image,caption", "image\tcaption")
    with pytest.raises(DataError, match=r"captions.txt:1: expected the header 'image,caption'"):
        read_flickr8k(root)


@pytest.mark.parametrize("bad", [f"{F[2]}#2 no tab", f"{F[2]}\tno hash", f"{F[2]}#x\tbad k"])
def test_malformed_token_line(tmp_path, bad):
    root = str(fixture_copy(tmp_path, "flickr8k_original"))
    path = os.path.join(root, "Flickr8k.token.txt")
    edit(path, f"{F[2]}#2\tA small girl in the grass", bad + "\tA small girl in the grass")
    n = line_of(path, bad)
    with pytest.raises(DataError, match=rf"Flickr8k.token.txt:{n}: expected '<image>#<k><TAB><caption>'"):
        read_flickr8k(root)


@pytest.mark.parametrize(
    "fix, rel, key",
    [
        ("flickr8k_karpathy", "dataset_flickr8k.json", '"raw": "A little girl is sitting'),
        ("coco", "annotations/captions_train2014.json", '"caption": "A giraffe eating'),
    ],
)
def test_malformed_json(tmp_path, fix, rel, key):
    root = str(fixture_copy(tmp_path, fix))
    path = os.path.join(root, rel)
    n = line_of(path, key)
    edit(path, key, key.replace(":", ""))  # a missing colon on line n
    with pytest.raises(DataError, match=rf"{rel}:{n}: malformed JSON"):
        read_dataset("coco" if fix == "coco" else "flickr8k", root)


def test_malformed_json_record(tmp_path):
    root = str(fixture_copy(tmp_path, "flickr8k_karpathy"))
    edit(os.path.join(root, "dataset_flickr8k.json"), '"split": "val"', '"split": "dev"')
    with pytest.raises(
        DataError, match=rf"dataset_flickr8k.json: {F[3]} \(images\[3\]\): unknown split 'dev'"
    ):
        read_flickr8k(root)
    edit(os.path.join(root, "dataset_flickr8k.json"), '"raw"', '"caption"')
    with pytest.raises(
        DataError, match=r"dataset_flickr8k.json: images\[0\]: missing or malformed field 'raw'"
    ):
        read_flickr8k(root)


@pytest.mark.parametrize(
    "fix, rel, old, new, match",
    [
        (
            "flickr8k_kaggle",
            "captions.txt",
            "A little girl climbing into a wooden playhouse .",
            "   ",
            r"captions.txt:4: empty caption",
        ),
        (
            "flickr8k_kaggle",
            "captions.txt",
            '"A girl, in a dress, goes into a wooden building ."',
            '""',
            r"captions.txt:3: empty caption",
        ),
        (
            "flickr8k_original",
            "Flickr8k.token.txt",
            "A girl, in a dress, goes into a wooden building .",
            " ",
            r"Flickr8k.token.txt:2: empty caption",
        ),
        (
            "flickr8k_karpathy",
            "dataset_flickr8k.json",
            '"raw": "A black dog and a spotted dog are fighting"',
            '"raw": ""',
            rf"dataset_flickr8k.json: {F[1]} \(images\[1\]\): empty caption",
        ),
        (
            "coco",
            "annotations/captions_train2014.json",
            '"A giraffe standing up nearby a tree "',
            '" \\n"',
            r"captions_train2014.json: annotation id \d+ \(train2014/COCO_train2014_000000000025.jpg\): empty caption",
        ),
    ],
)
def test_empty_caption(tmp_path, fix, rel, old, new, match):
    root = str(fixture_copy(tmp_path, fix))
    edit(os.path.join(root, rel), old, new)
    with pytest.raises(DataError, match=match):
        read_dataset("coco" if fix == "coco" else "flickr8k", root)


# -----------------------------------------------------------------------------
# text files as people have them: a byte-order mark, CRLF, bytes that are not UTF-8, NUL, stray quotes

# every reader: (fixture, its text files, a caption fragment in the first file that occurs once)
TEXT_FILES = {
    "kaggle": ("flickr8k_kaggle", ["captions.txt"], b"goes into a wooden"),
    "original": (
        "flickr8k_original",
        [
            "Flickr8k.token.txt",
            "Flickr_8k.trainImages.txt",
            "Flickr_8k.devImages.txt",
            "Flickr_8k.testImages.txt",
        ],
        b"goes into a wooden",
    ),
    "karpathy": ("flickr8k_karpathy", ["dataset_flickr8k.json"], b"goes into a wooden"),
    "coco": (
        "coco",
        ["annotations/captions_train2014.json", "annotations/captions_val2014.json"],
        b"A giraffe eating",
    ),
    "recap_csv": ("recap", ["recap.csv"], b"two dogs"),
    "recap_jsonl": ("recap", ["recap.jsonl"], b"two dogs"),
}


def read(kind, root):
    if kind == "recap_csv":
        return read_dataset(
            "recap", os.path.join(root, "recap.csv"), ("filepath", "org_caption", "re_caption")
        )
    if kind == "recap_jsonl":
        return read_dataset("recap", os.path.join(root, "recap.jsonl"))
    return read_dataset("coco" if kind == "coco" else "flickr8k", root)


@pytest.mark.parametrize("crlf", [False, True], ids=["bom", "bom+crlf"])
@pytest.mark.parametrize("kind", list(TEXT_FILES))
def test_bom_and_crlf_read_exactly_as_the_clean_file(tmp_path, capsys, kind, crlf):
    fix, files, _ = TEXT_FILES[kind]
    root = str(fixture_copy(tmp_path, fix))
    if kind == "recap_csv":  # drop the unused id column, so the bom lands on a column the reader uses
        path = os.path.join(root, "recap.csv")
        lines = open(path, "rb").read().splitlines(keepends=True)
        open(path, "wb").write(b"".join(line.split(b",", 1)[1] for line in lines))
    clean, clean_out = read(kind, root), capsys.readouterr().out
    for rel in files:  # what Notepad or Excel writes: a byte-order mark, and windows line ends
        raw = open(os.path.join(root, rel), "rb").read()
        assert not raw.startswith(codecs.BOM_UTF8)
        # (recap.csv has crlf already, as the csv module writes)
        with open(os.path.join(root, rel), "wb") as f:
            f.write(codecs.BOM_UTF8 + (raw.replace(b"\n", b"\r\n") if crlf and b"\r" not in raw else raw))
    assert read(kind, root) == clean
    assert capsys.readouterr().out == clean_out  # no image more reported missing


@pytest.mark.parametrize("bad", [b"\xe9", b"\xff", b"\x00"], ids=["latin-1 e-acute", "xff", "NUL"])
@pytest.mark.parametrize("kind", list(TEXT_FILES))
def test_bytes_that_are_not_utf8_text_name_file_line_and_byte(tmp_path, kind, bad):
    fix, files, needle = TEXT_FILES[kind]
    root = str(fixture_copy(tmp_path, fix))
    path = os.path.join(root, files[0])
    raw = open(path, "rb").read()
    assert raw.count(needle) == 1
    lines = raw.split(b"\n")
    n = next(i for i, line in enumerate(lines, 1) if needle in line)
    column = lines[n - 1].index(needle) + 3  # 1-based: the byte goes in after the fragment's first two
    with open(path, "wb") as f:
        f.write(raw.replace(needle, needle[:2] + bad + needle[2:]))
    where = re.escape(f"{path}:{n}: ")
    if bad == b"\x00":
        match = where + rf"a NUL byte \(column {column}\): a damaged file, or not a text file$"
    else:
        match = (
            where
            + rf"byte 0x{bad[0]:02x} \(byte {column} of the line\) is not UTF-8: the file must be UTF-8 \(re-save it as UTF-8\)$"
        )
    with pytest.raises(DataError, match=match):
        read(kind, root)


def test_bad_byte_is_placed_right_after_a_bom_and_crlf(tmp_path):
    root = str(fixture_copy(tmp_path, "flickr8k_kaggle"))
    path = os.path.join(root, "captions.txt")
    raw = open(path, "rb").read().replace(b"\n", b"\r\n")
    with open(path, "wb") as f:  # the bom does not count as a column of line 1
        f.write(codecs.BOM_UTF8 + raw.replace(b"image,", b"imag\xe9,"))
    with pytest.raises(DataError, match=re.escape(f"{path}:1: byte 0xe9 (byte 5 of the line)")):
        read_flickr8k(root)
    with open(path, "wb") as f:  # crlf is one line end, not two
        f.write(codecs.BOM_UTF8 + raw.replace(b"A girl,", b"A g\xffirl,"))
    with pytest.raises(DataError, match=re.escape(f"{path}:3: byte 0xff (byte 31 of the line)")):
        read_flickr8k(root)


@pytest.mark.parametrize(
    "old, new, needle, match",
    [
        # a stray quote opens a field that swallows the next line, up to the next quote
        (
            ",A child in a pink dress",
            ',"A child in a pink dress',
            "A child in a pink",
            r"a quoted field starting on this line is never closed \(csv read on to line 3: ',' expected after '\"'\)",
        ),
        # ... or up to the end of the file
        (
            ",The small child climbs",
            ',"The small child climbs',
            "The small child climbs",
            r"a quoted field starting on this line is never closed \(csv read on to line 31: unexpected end of data\)",
        ),
        # ... or it is closed at the end of a later line: valid csv, but no flickr8k caption holds a line end
        (
            ",A little girl climbing into",
            ',"A little girl climbing into',
            "A little girl climbing into",
            r"the caption runs over several lines: a quoted field starting on this line is closed only on a later one",
        ),
        (
            '"A girl, in a dress, goes',
            '"A girl, in a dress," goes',
            "A girl, in a dress",
            r"malformed CSV \(',' expected after '\"'\)",
        ),
    ],
)
def test_unclosed_quote_names_the_line_where_the_field_starts(tmp_path, old, new, needle, match):
    root = str(fixture_copy(tmp_path, "flickr8k_kaggle"))
    path = os.path.join(root, "captions.txt")
    n = line_of(path, needle)
    edit(path, old, new)
    if "later one" in match:
        edit(path, "to her playhouse .", 'to her playhouse ."')  # line n + 1
    with pytest.raises(DataError, match=re.escape(f"{path}:{n}: ") + match):
        read_flickr8k(root)


def test_unclosed_quote_in_a_recaption_csv(tmp_path):
    root = str(fixture_copy(tmp_path, "recap"))
    path = os.path.join(root, "recap.csv")
    n = line_of(path, "two dogs")
    edit(path, ",two dogs", ',"two dogs')
    with pytest.raises(
        DataError, match=re.escape(f"{path}:{n}: a quoted field starting on this line is never closed")
    ):
        read_dataset("recap", path, ("filepath", "org_caption", "re_caption"))
    edit(path, ',"two dogs', ",two, dogs")  # an unquoted comma shifts the columns
    with pytest.raises(
        DataError,
        match=re.escape(f"{path}:{n}: expected 4 columns (id,filepath,org_caption,re_caption), got 5"),
    ):
        read_dataset("recap", path, ("filepath", "org_caption", "re_caption"))


def test_check_images_refuses_files_that_do_not_open(tmp_path):
    good = noise_jpg(tmp_path / "good.jpg", 200, 150, seed=0)
    raw = open(good, "rb").read()  # ~20 KB, its header ~0.6 KB
    (tmp_path / "html.jpg").write_bytes(b"<html>404 not found</html>")
    (tmp_path / "empty.jpg").write_bytes(b"")
    (tmp_path / "cut.jpg").write_bytes(raw[: len(raw) // 2])
    items = [(str(tmp_path / n), ["a caption"]) for n in ("good.jpg", "html.jpg", "cut.jpg", "empty.jpg")]
    with pytest.raises(
        DataError,
        match=re.escape(
            f"the test split: 2 of 4 images do not open: {tmp_path / 'html.jpg'}, "
            f"{tmp_path / 'empty.jpg'}; evaluation needs every one"
        ),
    ):
        check_images(items, "the test split")
    # a header read: a file cut short after its header passes here; decoding it (the evaluation) fails
    check_images(items[::2], "the test split")
    assert load_image(items[2][0], 16) is None


# -----------------------------------------------------------------------------
# images and the dataset


@pytest.mark.parametrize("damage", ["garbage", "truncated"])
def test_corrupt_image(tmp_path, capsys, damage):
    root = str(fixture_copy(tmp_path, "flickr8k_kaggle"))
    path = os.path.join(root, "Images", F[1])
    noise_jpg(path, 64, 48, seed=0)
    raw = open(path, "rb").read()
    with open(path, "wb") as f:
        f.write(b"not a jpeg at all" * 10 if damage == "garbage" else raw[: len(raw) // 2])
    items = sum(read_flickr8k(root).values(), [])
    bad = [os.path.basename(p) for p, _ in items].index(F[1])
    ds = ImageTextDataset(items, 16)
    assert ds[bad] is None and ds[bad + len(items)] is None
    images, captions, synthetic, _, skipped = collate([ds[k] for k in range(len(items))])
    assert (
        images.shape == (len(items) - 1, 3, 16, 16)
        and len(captions) == len(synthetic) == len(items) - 1
        and skipped == 1
    )
    # with the cache it is found once, at build time
    capsys.readouterr()
    cached = ImageTextDataset(items, 16, cache_path=str(tmp_path / "cache.u8"))
    assert f"skipped 1 unreadable image(s): {F[1]}" in capsys.readouterr().out
    assert cached.bad == {bad} and cached[bad] is None
    assert collate([cached[k] for k in range(len(items))])[4] == 1
    assert collate([None, None]) == (None, [], [], [], 2)


def test_cache_equals_no_cache(tmp_path, capsys):
    items = sum(read_coco(os.path.join(FIX, "coco")).values(), [])[:5]
    items += read_flickr8k(os.path.join(FIX, "flickr8k_kaggle"))["train"]
    items += [
        (noise_jpg(tmp_path / "wide.jpg", 90, 40, 1), ["a wide one"]),
        (noise_jpg(tmp_path / "tall.jpg", 33, 71, 2), ["a tall one"]),
    ]
    cache = str(tmp_path / "cache.u8")
    plain, cached = ImageTextDataset(items, 24), ImageTextDataset(items, 24, cache_path=cache)
    for key in range(2 * len(items)):
        (a, *ta, ra), (b, *tb, rb) = plain[key], cached[key]
        assert (
            a.dtype == torch.float32
            and a.shape == (3, 24, 24)
            and torch.equal(a, b)
            and ta == tb
            and ra.random() == rb.random()
        )
    # reused when it matches, rebuilt when the items or the size change
    stamp = os.stat(cache).st_mtime_ns
    assert build_image_cache(items, 24, cache) == [] and os.stat(cache).st_mtime_ns == stamp
    # same n, other paths
    swapped = ImageTextDataset(items[-1:] + items[1:-1] + items[:1], 24, cache_path=cache)
    assert torch.equal(swapped[0][0], plain[len(items) - 1][0])
    ImageTextDataset(items[:-1], 24, cache_path=cache)
    assert os.path.getsize(cache) == (len(items) - 1) * 24 * 24 * 3
    small = ImageTextDataset(items[:-1], 16, cache_path=cache)
    assert os.path.getsize(cache) == (len(items) - 1) * 16 * 16 * 3
    assert torch.equal(small[3][0], to_tensor(load_image(items[3][0], 16)))
    assert not [p for p in os.listdir(tmp_path) if ".tmp" in p]  # no temp files left behind


def _cache_worker(rank, items, cache, out):
    import torch.distributed as dist

    bad = ImageTextDataset(items, 24, cache_path=cache, rank=rank, world=dist.get_world_size()).bad
    with open(f"{out}.{rank}", "w") as f:
        f.write(repr(sorted(bad)))


@pytest.mark.slow
def test_two_ranks_build_the_cache_of_one_process(tmp_path):
    """2 gloo ranks, each decoding half of the images (rank r: r::2) into the one memmap, build a cache
    byte for byte the one process's, sidecar too; both ranks know every unreadable image (one on
    each rank's half), and a second build reuses it"""
    items = read_flickr8k(os.path.join(FIX, "flickr8k_kaggle"))["train"]
    items += [
        (noise_jpg(tmp_path / f"{w}.jpg", w, h, w), [f"{w}"]) for w, h in ((90, 40), (33, 71), (50, 50))
    ]
    (tmp_path / "bad.jpg").write_bytes(b"not a jpeg")
    items.insert(1, (str(tmp_path / "bad.jpg"), ["broken"]))
    items.insert(4, (str(tmp_path / "gone.jpg"), ["missing"]))
    one, two = str(tmp_path / "one.u8"), str(tmp_path / "two.u8")
    assert build_image_cache(items, 24, one) == [1, 4]
    gloo_processes(tmp_path, _cache_worker, items, two, str(tmp_path / "bad"))
    assert open(one, "rb").read() == open(two, "rb").read()
    assert open(one + ".json").read() == open(two + ".json").read()
    assert [open(tmp_path / f"bad.{r}").read() for r in range(2)] == ["[1, 4]"] * 2
    assert not [p for p in os.listdir(tmp_path) if ".tmp" in p]
    stamp = os.stat(two).st_mtime_ns
    gloo_processes(tmp_path, _cache_worker, items, two, str(tmp_path / "bad"))
    assert os.stat(two).st_mtime_ns == stamp and open(tmp_path / "bad.1").read() == "[1, 4]"


def test_matches_open_clip_preprocess(tmp_path):
    import open_clip

    preprocess = open_clip.transform.image_transform(32, is_train=False)
    for w, h in ((90, 40), (33, 71)):
        path = noise_jpg(tmp_path / f"{w}.jpg", w, h, seed=w)
        assert torch.equal(to_tensor(load_image(path, 32)), preprocess(Image.open(path)))


@pytest.mark.parametrize(
    "spec, expect",
    [
        ("ViT-B-32:openai", {"mean": (0.48145466, 0.4578275, 0.40821073), "resize_mode": "shortest"}),
        (
            "ViT-L-14:laion2b_s32b_b82k",
            {"mean": (0.5, 0.5, 0.5), "std": (0.5, 0.5, 0.5), "resize_mode": "shortest"},
        ),
        ("ViT-H-14-quickgelu:dfn5b", {"resize_mode": "squash", "interpolation": "bicubic"}),
        (
            None,
            {
                "mean": (0.0, 0.0, 0.0),
                "std": (1.0, 1.0, 1.0),
                "interpolation": "bilinear",
                "resize_mode": "longest",
                "fill_color": 7,
            },
        ),
    ],
)
def test_training_pixels_are_open_clips_preprocess_per_tag(tmp_path, spec, expect):
    """load_image + to_tensor with a tag's config (model.init_preprocess: open_clip's pretrained cfg, no
    download) equal open_clip's own evaluation transform (image_transform_v2, is_train=False) bit for
    bit, on random-size images: wide, tall, square, smaller than the target (upscaled), at two sizes.
    None: a made-up config for the modes no tag above uses (bilinear, longest with a fill)."""
    import open_clip

    from model import init_preprocess

    cfg = init_preprocess(spec) if spec else {**init_preprocess("ViT-B-32:openai"), **expect}
    assert {k: cfg[k] for k in expect} == expect
    images = [
        noise_jpg(tmp_path / f"{w}x{h}.jpg", w, h, seed=w + h)
        for w, h in ((90, 40), (33, 71), (50, 50), (20, 17), (301, 255))
    ]
    # not RGB: converted first, as eval.open_rgb does
    Image.open(images[0]).convert("L").save(tmp_path / "grey.png")
    for size in (32, 224):
        transform = open_clip.transform.image_transform_v2(
            open_clip.transform.PreprocessCfg(size=size, **cfg), is_train=False
        )
        for path in [*images, str(tmp_path / "grey.png")]:
            ours = to_tensor(load_image(path, size, cfg), cfg)
            assert ours.shape == (3, size, size) and torch.equal(
                ours, transform(Image.open(path).convert("RGB"))
            ), (path, size)
    if spec != "ViT-B-32:openai":  # the OpenAI default would have given other pixels
        assert not torch.equal(
            to_tensor(load_image(images[0], 32)), to_tensor(load_image(images[0], 32, cfg), cfg)
        )


def test_no_flip_resize_center_crop(tmp_path):
    # 40x20, red left half, blue right half: shorter side -> 16 gives 32x16, center crop keeps
    # columns 8..24, i.e. red on the left half, blue on the right, never mirrored
    rgb = np.zeros((20, 40, 3), np.uint8)
    rgb[:, :20, 0], rgb[:, 20:, 2] = 255, 255
    Image.fromarray(rgb).save(tmp_path / "lr.png")
    pixels = load_image(str(tmp_path / "lr.png"), 16)
    assert pixels.shape == (16, 16, 3) and pixels.dtype == np.uint8
    assert (pixels[:, :6, 0] > 250).all() and (pixels[:, :6, 2] < 5).all()
    assert (pixels[:, -6:, 2] > 250).all() and (pixels[:, -6:, 0] < 5).all()


def test_caption_choice(tmp_path):
    items = read_flickr8k(os.path.join(FIX, "flickr8k_kaggle"))["train"]
    n = len(items)
    ds, again, other = (
        ImageTextDataset(items, 16),
        ImageTextDataset(items, 16),
        ImageTextDataset(items, 16, seed=1),
    )
    choice = lambda d, key: items[key % n][1].index(d.caption(key))
    # a pure function of (seed, epoch, i): pinned, so a change (or a salted hash()) breaks resume and this test
    assert [choice(ds, k) for k in range(2 * n)] == [1, 1, 1, 3, 2, 0, 1, 2]
    assert all(ds.caption(k) == again.caption(k) for k in range(10 * n))
    assert any(ds.caption(k) != other.caption(k) for k in range(10 * n))
    for i in range(n):
        assert len({ds.caption(e * n + i) for e in range(20)}) > 1  # varies across epochs
    key = 3 * n + 2  # epoch 3, item 2
    image, caption, _, _ = ds[key]
    assert torch.equal(image, ds[2][0]) and caption == ds.caption(key)
    tokens = get_tokenizer(77)([caption])[0]
    assert tokens.dtype == torch.long and tokens[0] == 49406  # <start_of_text>
    assert get_tokenizer(77) is get_tokenizer(77) and get_tokenizer(16)([caption]).shape == (1, 16)


def test_dataloader_workers_replay_keys(tmp_path):
    items = read_flickr8k(os.path.join(FIX, "flickr8k_kaggle"))["train"]
    ds = ImageTextDataset(items, 16, cache_path=str(tmp_path / "cache.u8"))
    keys = [9, 2, 14, 7, 0, 11]  # what a resumable sampler yields: epoch * len + i
    ds[0]  # opens the memmap in this process; it must not be pickled into the workers
    assert ds.cache is not None and pickle.loads(pickle.dumps(ds)).cache is None
    loader = torch.utils.data.DataLoader(ds, batch_size=3, sampler=keys, num_workers=2, collate_fn=collate)
    batches = list(loader)
    images, captions, _, _, skipped = collate([ds[k] for k in keys])
    assert (
        torch.equal(torch.cat([b[0] for b in batches]), images)
        and sum([b[1] for b in batches], []) == captions
    )
    assert sum(b[4] for b in batches) == skipped == 0
