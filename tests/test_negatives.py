"""data.py's hard negatives: the rule-based caption-negative generator, and the readers of NegCLIP's
TSV, CE-CLIP's pickled .npy and HNC's JSON on fixtures in their exact released formats."""

import json
import os
import random
import re

import numpy as np
import pytest
from helpers import FIX, fixture_copy

import data
import negatives
from data import DataError

CAPTIONS = [
    "A man with a red helmet on a small moped on a dirt road.",
    "Two dogs sitting in front of a wooden bench.",
    "A woman riding a horse next to a blue car",
    "An apple on a table",
    "The cat is left of the dog.",
    "A black and white cat sleeping on top of a laptop.",
    "Three people walking under an umbrella",
    "A giraffe standing behind a tall tree",
    "A large red bus parked near a small white car.",
    "A boy holding a frisbee above his head",
    "a plate with a sandwich and a banana on a wooden table",
    "A woman in a pink shirt is throwing a ball to a brown dog",
    "Several bicycles parked outside a brick building",
    "A T-shirt hanging on a wall",
    "the small boat is below the bridge",
    "Two men in front of a metal fence",
]


def words(text):
    return [w.lower() for w in re.findall(r"[A-Za-z]+(?:[-'][A-Za-z]+)*", text)]


def test_every_negative_differs_from_its_caption_and_is_deterministic_per_seed():
    made = 0
    for seed in range(5):
        for c in CAPTIONS:
            for kind in negatives.CAPTION_NEGATIVES:
                neg = negatives.caption_negative(c, kind, random.Random(seed))
                assert neg is None or (neg != c and words(neg) != words(c)), (kind, c, neg)
                # same seed, same negative
                assert neg == negatives.caption_negative(c, kind, random.Random(seed))
                made += neg is not None
    assert made > 400  # most kinds apply to most captions
    by_seed = [[negatives.caption_negatives(c, random.Random(seed)) for c in CAPTIONS] for seed in (0, 1)]
    assert by_seed[0] == [negatives.caption_negatives(c, random.Random(0)) for c in CAPTIONS]
    assert by_seed[0] != by_seed[1]  # the seed matters


@pytest.mark.parametrize(
    "caption, kind, want",
    [
        ("the cup is left of the plate", "relation_replace", "the cup is right of the plate"),
        ("the cup is to the right of the plate", "relation_replace", "the cup is to the left of the plate"),
        ("a lamp above a bed", "relation_replace", "a lamp below a bed"),
        ("a lamp below a bed", "relation_replace", "a lamp above a bed"),
        ("a cat on a table", "relation_replace", "a cat under a table"),
        ("a cat under a table", "relation_replace", "a cat on a table"),
        ("a dog in front of a car", "relation_replace", "a dog behind a car"),
        ("A dog behind a car", "relation_replace", "A dog in front of a car"),
        # "on" inside "onion" / "lemon" untouched
        ("an onion on a lemon", "relation_replace", "an onion under a lemon"),
        ("an apple on a table", "relation_swap", "a table on an apple"),  # articles follow their nouns
        (
            "Two dogs sitting in front of a wooden bench.",
            "relation_swap",
            "A wooden bench sitting in front of two dogs.",
        ),
        ("The cat is left of the dog.", "relation_swap", "The dog is left of the cat."),
        ("a red car and a blue bus", "attribute_swap", "a blue car and a red bus"),
        ("a small dog", "attribute_replace", "a large dog"),
    ],
)
def test_converses_swaps_and_replacements(caption, kind, want):
    assert negatives.caption_negative(caption, kind, random.Random(0)) == want


def test_replacements_are_whole_words():
    # "man" is a list word; it must never be edited inside "woman", "snowman" or "manhole"
    caption = "a woman and a snowman near a manhole"
    for seed in range(20):
        neg = negatives.caption_negative(caption, "object_replace", random.Random(seed))
        w = words(neg)
        assert (
            w[1] != "woman" and w[1:] != words(caption)[1:] and w[4:] == ["snowman", "near", "a", "manhole"]
        ), neg
    # plural kept: "dogs" -> another object's plural
    neg = negatives.caption_negative("two dogs on the grass", "object_replace", random.Random(0))
    assert words(neg)[1] in {negatives._plural(o) for o in negatives.NEG_OBJECTS if o != "dog"}
    # a verb keeps its form
    assert words(negatives.caption_negative("a man sitting", "verb_replace", random.Random(0)))[-1].endswith(
        "ing"
    )
    assert not words(negatives.caption_negative("a man sits", "verb_replace", random.Random(0)))[-1].endswith(
        "ing"
    )


def test_articles_follow_a_replaced_word_and_an_unchanged_result_is_dropped(monkeypatch):
    vowels = 0
    for seed in range(30):
        w = words(
            negatives.caption_negative("a cat sitting on an apple", "object_replace", random.Random(seed))
        )
        for article, noun in ((w[0], w[1]), (w[4], w[5])):
            assert article == ("an" if noun[0] in "aeiou" else "a"), w
            vowels += noun[0] in "aeiou"
    assert vowels > 0
    # whatever a generator returns, a negative equal to the caption (by its lowercase words) is dropped
    monkeypatch.setitem(negatives.CAPTION_NEGATIVES, "object_replace", lambda c, rng: c.upper() + " !")
    assert negatives.caption_negative("a cat on a mat", "object_replace", random.Random(0)) is None


@pytest.mark.parametrize(
    "caption", ["", "   ", "dog", "Dogs.", "Un café à côté d'un chien", "a dog near a café"]
)
def test_empty_one_word_and_non_ascii_captions_give_no_negative(caption):
    assert negatives.caption_negatives(caption, random.Random(0)) == [None] * len(negatives.NEGATIVE_TYPES)
    for kind in negatives.CAPTION_NEGATIVES:
        assert negatives.caption_negative(caption, kind, random.Random(0)) is None


def test_missing_negatives_are_masked_and_counted_in_the_batch():
    import torch

    import clip_hardneg as hn

    args = hn.get_args(["--data", "coco", "--data_root", "x", "--init", "x"])
    args.context_length = 32
    image = torch.zeros(3, 32, 32)
    rows = [
        [(image, c, negatives.caption_negatives(c, random.Random(0), args.neg_types))]
        for c in ("dog", "a cat on a table")
    ]
    # equal to the caption (any case), empty, missing
    rows.append([(image, "a cat", ["a cat", "A CAT ", "", None, "a dog"])])
    (images, captions, negs, valid), counts = hn.make_batch(rows + [None], args)
    assert valid.tolist()[0] == [False] * 5 and valid.tolist()[2] == [False, False, False, False, True]
    assert (
        counts == {"unreadable samples": 1, "invalid negatives": int((~valid).sum())} and images.shape[0] == 3
    )
    # cut at the batch's longest text (data.trim_tokens)
    empty = data.get_tokenizer(32)([""])[0][: negs.shape[-1]]
    assert all(torch.equal(negs[i, k], empty) for i, k in (~valid).nonzero().tolist())


# -----------------------------------------------------------------------------
# NegCLIP's TSV


def edit_line(path, n, fn):
    lines = open(path, encoding="utf-8").read().split("\n")
    lines[n - 1] = fn(lines[n - 1])
    open(path, "w", encoding="utf-8").write("\n".join(lines))


def test_read_negclip_fixture():
    path = os.path.join(FIX, "negclip", "train_neg_clip.tsv")
    rows = negatives.read_negclip(path)
    assert [r[3] for r in rows] == [[1, 2, 3], [0, 2, 3], [0, 1, 3], [0, 1, 2]]
    assert rows[0][0] == os.path.join(FIX, "negclip", "coco", "val2014", "COCO_val2014_000000184613.jpg")
    assert rows[1][1:3] == (
        "A woman's bag sitting on a wooden bench.",
        ["A wooden bag sitting on a woman's bench."],
    )
    # a field with quotes inside is quoted and its quotes doubled (pandas' to_csv)
    assert rows[2][2][2] == 'Two dogs playing with a "frisbee" in the grass' and len(rows[2][2]) == 3


@pytest.mark.parametrize(
    "line, fn, message",
    [
        (
            3,
            lambda l: l.replace("\t[0, 2, 3]", ""),
            "train_neg_clip.tsv:3: expected 5 tab-separated fields, got 4",
        ),
        (
            2,
            lambda l: l.replace("['A man with a red helmet on a small road on a dirt moped.'", "A man ['x'"),
            "train_neg_clip.tsv:2: neg_caption is not a list literal of strings",
        ),
        (
            5,
            lambda l: l.replace("['A laptop sleeping on top of a cat.']", "__import__('os').system('true')"),
            "train_neg_clip.tsv:5: neg_caption is not a list literal",
        ),  # literal_eval: never runs code
        (
            5,
            lambda l: l.replace("[0, 1, 2]", "[0, 1, 9]"),
            "train_neg_clip.tsv:5: neg_image row 9 is outside the file's 4 rows",
        ),
        (4, lambda l: l.replace("000000562150", "000000000001"), "train_neg_clip.tsv:4: missing image"),
    ],
)
def test_read_negclip_bad_rows_name_file_and_line(tmp_path, line, fn, message):
    path = str(fixture_copy(tmp_path, "negclip") / "train_neg_clip.tsv")
    edit_line(path, line, fn)
    with pytest.raises(DataError, match=re.escape(message)):
        negatives.read_negclip(path)


def test_read_negclip_follows_the_text_file_rules(tmp_path):
    """the TSV is read by data.csv_rows: a byte-order mark changes nothing, a latin-1 byte and a
    stray quote are one error naming the file and line"""
    root = str(fixture_copy(tmp_path, "negclip"))
    path = os.path.join(root, "train_neg_clip.tsv")
    raw = open(path, "rb").read()
    open(path, "wb").write(b"\xef\xbb\xbf" + raw)
    assert [r[1:] for r in negatives.read_negclip(path)] == [
        r[1:] for r in negatives.read_negclip(os.path.join(FIX, "negclip", "train_neg_clip.tsv"))
    ]
    open(path, "wb").write(raw.replace(b"woman's bag", "woman\xe9s bag".encode("latin-1"), 1))
    with pytest.raises(DataError, match=r"train_neg_clip\.tsv:3: .*UTF-8"):
        negatives.read_negclip(path)
    open(path, "w", encoding="utf-8").write(raw.decode().replace("\tA woman's bag", "\t\"A woman's bag", 1))
    with pytest.raises(DataError, match=r"train_neg_clip\.tsv:3: malformed CSV"):
        negatives.read_negclip(path)


# -----------------------------------------------------------------------------
# CE-CLIP's pickled .npy


def test_read_ceclip_needs_allow_pickle_and_masks_invalid_negatives(tmp_path):
    with pytest.raises(DataError, match=r"train_neg_0\.npy: .* pass --allow_pickle"):
        negatives.read_ceclip(os.path.join(FIX, "ceclip"))
    rows = negatives.read_ceclip(os.path.join(FIX, "ceclip"), allow_pickle=True)
    assert rows[0][0].endswith("train2014/COCO_train2014_000000000009.jpg")
    assert rows[0][2] == [
        None,
        "A white bus parked next to a red car.",
        "A red truck parked next to a white car.",
        "A red bus driving next to a white car.",
    ]  # '###' with valid 0
    assert [r[2].count(None) for r in rows] == [1, 1, 1, 1]
    # a string negative whose valid flag is 0 is invalid too; a missing image is one clear error
    root = str(fixture_copy(tmp_path, "ceclip"))
    recs = np.load(os.path.join(root, "train_neg_0.npy"), allow_pickle=True)
    recs[1]["valid_caption"] = [1, 0, 0, 1, 1]
    recs[3]["image_id"] = 77
    np.save(os.path.join(root, "train_neg_0.npy"), recs, allow_pickle=True)
    with pytest.raises(
        DataError, match=r"train_neg_0\.npy: record 3: missing image .*COCO_train2014_000000000077\.jpg"
    ):
        negatives.read_ceclip(root, allow_pickle=True)
    recs[3]["image_id"] = 42
    del recs[2]["caption"]
    np.save(os.path.join(root, "train_neg_0.npy"), recs, allow_pickle=True)
    with pytest.raises(DataError, match=r"record 2: missing or malformed field 'caption'"):
        negatives.read_ceclip(root, allow_pickle=True)


# -----------------------------------------------------------------------------
# HNC's JSON


def test_read_hnc_train_pairs_negatives_with_their_positive_by_cpt_p_id():
    hnc = negatives.read_hnc(os.path.join(FIX, "hnc", "hnc_clean_strict_train.json"))
    assert hnc.items is None  # not held in memory: each item is read from disk by its byte offset
    assert len(hnc) == 2 and hnc.orphans == 2  # "5" names a missing positive; image 2400001 has no positive
    assert hnc[0] == (
        os.path.join(FIX, "hnc", "images", "2354786.jpg"),
        [
            (
                "the cup is to the left of the plate",
                ["the cup is to the right of the plate", "the plate is to the right of the cup"],
            ),
            ("the table is brown", ["the table is white"]),
        ],
    )
    # cpt_p_id 7 (an int)
    assert hnc[1][1] == [("the dog is under the table", ["the dog is on the table"]), ("a black dog", [])]
    in_memory = negatives.read_hnc(os.path.join(FIX, "hnc", "hnc_clean_strict_train.json"), in_memory=True)
    assert [in_memory[i] for i in range(2)] == [hnc[i] for i in range(2)]


def test_read_hnc_test_format_pairs_a_negative_with_the_latest_positive_of_its_type():
    hnc = negatives.read_hnc(os.path.join(FIX, "hnc", "hnc_clean_strict_test.json"))
    images = os.path.join(FIX, "hnc", "images")
    assert [hnc[i] for i in range(len(hnc))] == [
        (
            os.path.join(images, "n100552.jpg"),
            [
                ("the cup is on the table", ["the cup is under the table"]),
                ("the cup is white", ["the cup is black"]),
            ],
        ),
        (
            os.path.join(images, "n100553.jpg"),
            [("a dog left of a car", ["a dog right of a car"]), ("a red car", ["a blue car", "a green car"])],
        ),
    ]


@pytest.mark.parametrize("chunk", [1, 2, 3, 7, 64, 1 << 20])
def test_json_streaming_matches_json_load_at_any_chunk_size(tmp_path, chunk):
    obj = {
        "a": {"x": [1, 2.5e3, None, True]},
        "ü-key": 'naïve "quoted" \\ text',
        "n": 12345678,
        "e": {},
        "l": [],
        "s": "é" * 40,
    }
    path = tmp_path / "x.json"
    path.write_text(json.dumps(obj, ensure_ascii=False, indent=2).replace("\n", "\r\n"), encoding="utf-8")
    raw = path.read_bytes()
    got = list(negatives._json_object_items(str(path), chunk=chunk))
    assert {k: v for k, v, _, _ in got} == obj
    # exact byte offsets, multi-byte text included
    assert all(json.loads(raw[s : s + n]) == v for _, v, s, n in got)


@pytest.mark.parametrize(
    "text, message",
    [
        ('{"1": {"captions": {}}', "malformed JSON"),
        ("[1, 2]", "expected '{'"),
        ('{"1": 3}', "image 1: expected an object"),
        ('{"1": {"captions": {"0": {"label": 1}}}}', "image 1: missing or malformed caption field 'caption'"),
    ],
)
def test_read_hnc_bad_input_names_the_file(tmp_path, text, message):
    path = tmp_path / "hnc.json"
    path.write_text(text)
    with pytest.raises(DataError, match=re.escape(message)) as e:
        negatives.read_hnc(str(path))
    assert str(path) in str(e.value)


def test_read_hnc_missing_image_names_the_image(tmp_path):
    root = str(fixture_copy(tmp_path, "hnc"))
    os.remove(os.path.join(root, "images", "2368310.jpg"))
    with pytest.raises(
        DataError, match=r"hnc_clean_strict_train\.json: image 2368310: missing image .*2368310\.jpg"
    ):
        negatives.read_hnc(os.path.join(root, "hnc_clean_strict_train.json"))
