"""eval.py's compositional benchmarks (SugarCrepe, ARO, VALSE, VL-CheckList) and the HNC intrinsic
metrics: readers on tiny fixtures in the released layouts, every score against a hand-computed case
on a stub model whose scores we choose, bad input, and the CLI with a random open_clip model and a
random minclip checkpoint."""

import json
import os
import random
import shutil
import subprocess
import sys
import zlib

import numpy as np
import pytest
import torch
from PIL import Image

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from helpers import FIX, fixture_copy, tiny_ckpt  # noqa: E402

import data  # noqa: E402
import eval as ev  # noqa: E402
import shapes
from model import export_open_clip
from tasks import aro, common, intrinsic, sugarcrepe, valse, vlchecklist

# the fixture images are solid colours from this list (a stub recognises an image by its colour)
PALETTE = [
    (230, 25, 75),
    (60, 180, 75),
    (255, 225, 25),
    (0, 130, 200),
    (245, 130, 48),
    (145, 30, 180),
    (70, 240, 240),
    (240, 50, 230),
    (128, 128, 0),
    (0, 128, 128),
    (170, 110, 40),
    (128, 0, 0),
]


class ScoreStub(torch.nn.Module):
    """A CLIP whose image-text scores we choose: score(colour index, text) -> float. preprocess
    reduces an image to its per-channel max (a crop padded with black keeps its colour); the image
    embedding is one-hot over PALETTE, a text's embedding holds its score with every colour, so
    their dot product is the chosen score. shapes images (any other colour) count as colour -1."""

    def __init__(self, score):
        super().__init__()
        self.score, self.texts = score, {}
        self.logit_scale = torch.nn.Parameter(torch.tensor(0.0))

    @staticmethod
    def preprocess(im):
        return torch.from_numpy(np.array(im.convert("RGB"))).reshape(-1, 3).max(0).values.float()

    def tokenizer(self, texts):
        return torch.tensor([self.texts.setdefault(t, len(self.texts)) for t in texts])

    def encode_image(self, x, normalize=False):
        dist = (x[:, None, :] - torch.tensor(PALETTE, dtype=torch.float)[None]).abs().max(-1).values
        return torch.nn.functional.one_hot(dist.argmin(1), len(PALETTE)).float()

    def encode_text(self, ids, normalize=False):
        text = {i: t for t, i in self.texts.items()}
        return torch.tensor([[float(self.score(c, text[int(i)])) for c in range(len(PALETTE))] for i in ids])


class TruncStub(ScoreStub):
    """a ScoreStub whose tokenizer keeps a text's first `words` words, as a context length cuts a
    caption: the score sees only what is left"""

    def __init__(self, score, words):
        super().__init__(score)
        self.words = words

    def tokenizer(self, texts):
        return super().tokenizer([" ".join(t.split()[: self.words]) for t in texts])


def run(bench, score, words=None, **kwargs):
    stub = ScoreStub(score) if words is None else TruncStub(score, words)
    return ev.task(bench).evaluate(stub, stub.preprocess, stub.tokenizer, "cpu", **kwargs)


def fake_tools(nouns=(), adjectives=()):
    """(tag, tokenize) standing in for spaCy and nltk: a word is NN if listed in nouns, JJ if in
    adjectives, else DT; tokens split on spaces with a trailing full stop split off"""

    def tokenize(text):
        words = text.split()
        if words and words[-1].endswith(".") and len(words[-1]) > 1:
            words[-1:] = [words[-1][:-1], "."]
        return words

    def tag(text):
        return [(w, "NN" if w in nouns else "JJ" if w in adjectives else "DT") for w in tokenize(text)]

    return tag, tokenize


def blind(c, text):
    """an image-blind model with a fixed, arbitrary preference between texts"""
    return zlib.crc32(text.encode()) / 2**32


def sugarcrepe_items():
    return {
        s: [(f, c) for f, c in items]
        for s, items in sugarcrepe.read_sugarcrepe(os.path.join(FIX, "sugarcrepe")).items()
    }


# -----------------------------------------------------------------------------
# the scoring helper


def test_choice_scores_hand_computed_ties_and_batching(tmp_path):
    paths = []
    for k in range(3):
        paths.append(str(tmp_path / f"{k}.png"))
        Image.new("RGB", (4, 3), PALETTE[k]).save(paths[-1])
    table = {
        (0, "a"): 0.9,
        (0, "b"): 0.2,
        (1, "a"): 0.5,
        (1, "b"): 0.5,
        (2, "c"): 0.3,
        (2, "a"): 0.1,
        (2, "b"): 0.7,
    }
    stub = ScoreStub(lambda c, t: table.get((c, t), 0.0))
    items = [
        (paths[0], ["a", "b"]),
        (paths[1], ["a", "b"]),
        (paths[2], ["c", "a"]),
        (paths[2], ["b", "c"]),
        (paths[0], ["b", "a"]),
    ]
    for bs in (1, 2, 128):  # one pass however the batches fall
        scores, readable, _ = common.choice_scores(
            stub, stub.preprocess, stub.tokenizer, items, "cpu", batch_size=bs
        )
        assert readable.all()
        torch.testing.assert_close(
            scores, torch.tensor([[0.9, 0.2], [0.5, 0.5], [0.3, 0.1], [0.7, 0.3], [0.2, 0.9]])
        )
        # item 1 ties (0.5 = 0.5): wrong
        assert common.choice_correct(scores).tolist() == [True, False, True, True, False]
    # a wrong caption identical to the right one is no distractor; with no other, the item is wrong
    three, *_ = common.choice_scores(
        stub, stub.preprocess, stub.tokenizer, [(paths[0], ["a", "a", "b"])], "cpu"
    )
    two, *_ = common.choice_scores(stub, stub.preprocess, stub.tokenizer, [(paths[0], ["a", "a"])], "cpu")
    assert three[0, 1].isnan() and two[0, 1].isnan()
    assert common.choice_correct(three).tolist() == [True] and common.choice_correct(two).tolist() == [False]
    # a missing image leaves its item unscored, the others untouched
    scores, readable, _ = common.choice_scores(
        stub, stub.preprocess, stub.tokenizer, items + [(str(tmp_path / "no.png"), ["a", "b"])], "cpu"
    )
    assert readable.tolist() == [True] * 5 + [False] and scores[5].isnan().all()


def test_choice_scores_truncated_ties_tie_exactly_and_are_flagged(tmp_path):
    path = str(tmp_path / "0.png")
    Image.new("RGB", (4, 3), PALETTE[0]).save(path)
    stub = TruncStub(lambda c, t: {"a b c": 0.9, "a b d": 0.1}.get(t, 0.5), words=3)
    items = [
        (path, ["a b c x", "a b c y"]),  # differ past the 3rd word: the same tokens, a tie
        (path, ["a b c", "a b d"]),  # differ within: scored apart
        (path, ["a b c x", "a b c x"]),  # the same string: no distractor (NaN), not a truncation
        (str(tmp_path / "no.png"), ["a b c x", "a b c z"]),
    ]  # unreadable: flagged, scored by nobody
    scores, readable, truncated = common.choice_scores(stub, stub.preprocess, stub.tokenizer, items, "cpu")
    assert truncated.tolist() == [True, False, False, True] and readable.tolist() == [True, True, True, False]
    assert scores[0, 0] == scores[0, 1] == pytest.approx(0.9) and common.choice_correct(
        scores[:3]
    ).tolist() == [False, True, False]
    # K = 3: any wrong caption that is the right one's tokens makes the item a tie
    _, _, truncated = common.choice_scores(
        stub, stub.preprocess, stub.tokenizer, [(path, ["a b c x", "a b d", "a b c y"])], "cpu"
    )
    assert truncated.tolist() == [True]
    # the Chooser counts the readable ones, per part, in one line
    choose = common.Chooser("bench", stub, stub.preprocess, stub.tokenizer, "cpu")
    choose.correct(items, "part a"), choose.correct(items[:2], "part b"), choose.correct(items[1:3], "part c")
    assert {k: v for k, v in choose.counts().items() if "ties" in k} == {
        "bench/n_truncated_ties": 2,
        "bench/n_truncated_ties/part a": 1,
        "bench/n_truncated_ties/part b": 1,
    }


def test_valse_truncated_tie_counted_wrong_and_reported(capsys):
    """the fixture's second coreference-standard item: caption and foil differ in their last word
    (the 29th; the 32nd token, past a 32-token context); every other fixture text has <= 15 words"""
    import open_clip

    rows = json.load(open(os.path.join(FIX, "valse", "data", "coreference-standard.json")))
    foils = {r["foil"] for r in rows.values()}
    pair = [rows["coreference_test_1"]["caption"], rows["coreference_test_1"]["foil"]]
    for length, tie in ((32, True), (77, False)):  # a tiny minclip model's context, and CLIP's
        assert torch.equal(*open_clip.tokenizer.SimpleTokenizer(context_length=length)(pair)) == tie
    score = lambda c, text: 0.5 if text in foils else 0.9  # noqa: E731  (right on every full caption)
    full = run("valse", score, root=os.path.join(FIX, "valse"))
    assert full["valse/coreference/coreference-standard"] == 1.0 and full["valse/n_truncated_ties"] == 0
    assert "n_truncated_ties/" not in "".join(full) and "same tokens" not in capsys.readouterr().out
    cut = run("valse", score, words=20, root=os.path.join(FIX, "valse"))
    assert cut["valse/coreference/coreference-standard"] == 0.5  # the cut pair ties: wrong
    assert cut["valse/n_truncated_ties"] == 1 and cut["valse/n_truncated_ties/coreference-standard"] == 1
    same = lambda m: {
        k: v for k, v in m.items() if "coreference" not in k and "ties" not in k and k != "valse/mean"
    }
    assert (
        same(cut) == same(full)
        and cut["valse/coreference/coreference-hard"] == full["valse/coreference/coreference-hard"]
    )
    assert cut["valse/coreference"] == pytest.approx((0.5 + full["valse/coreference/coreference-hard"]) / 2)
    assert cut["valse/mean"] == pytest.approx(full["valse/mean"] - 0.5 / 11)
    assert capsys.readouterr().out == (
        "valse: 1 item(s) whose right and wrong captions are the same tokens at the model's "
        "context length tie, counted wrong: coreference-standard 1\n"
    )


def test_choice_correct_needs_strictly_highest():
    scores = torch.tensor(
        [
            [1.0, 0.5, 0.9, 0.2, 0.0],
            [1.0, 1.0, 0.0, 0.0, 0.0],
            [0.4, 0.5, 0.0, 0.0, 0.0],
            [0.0, -1.0, -2.0, -3.0, -4.0],
        ]
    )
    assert common.choice_correct(scores).tolist() == [True, False, False, True]


@pytest.mark.parametrize("k", [2, 5])
def test_blind_model_gets_exactly_chance_over_the_right_captions_position(k):
    # a model blind to the image prefers the same caption wherever the right one is: over the k
    # choices of which candidate is right, it is correct exactly once per item -> 1/k
    captions = [[f"caption {i} {j}" for j in range(k)] for i in range(20)]
    stub = ScoreStub(blind)
    hits = []
    for shift in range(k):
        items = [(Image.new("RGB", (2, 2), PALETTE[0]), caps[shift:] + caps[:shift]) for caps in captions]
        scores, *_ = common.choice_scores(stub, stub.preprocess, stub.tokenizer, items, "cpu")
        assert len(set(scores[0].tolist())) == k  # no ties in this draw
        hits.append(common.choice_correct(scores).float())
    assert (torch.stack(hits).sum(0) == 1).all()
    assert torch.stack(hits).mean().item() == pytest.approx(1 / k)


# -----------------------------------------------------------------------------
# SugarCrepe


def test_read_sugarcrepe_release_layout(tmp_path):
    sets = sugarcrepe.read_sugarcrepe(os.path.join(FIX, "sugarcrepe"))
    assert [
        len(sets[s])
        for s in ("replace_obj", "replace_att", "replace_rel", "swap_obj", "swap_att", "add_obj", "add_att")
    ] == [3, 2, 2, 3, 1, 2, 1]
    # swap_obj's ids skip "2" (the released file skips "108"): all three items are read, in file order
    assert [c for _, (c, _) in sets["swap_obj"]] == [
        "A cat sits next to a dog.",
        "A dog chews on a bone near a cat.",
        "A sink sits beside a toilet.",
    ]
    assert sets["add_att"][0] == (
        os.path.join(FIX, "sugarcrepe", "val2017", "000000331352.jpg"),
        ["A toilet in a small room.", "A broken toilet in a small room."],
    )
    # the subset files directly in the root, images elsewhere
    flat = tmp_path / "flat"
    shutil.copytree(os.path.join(FIX, "sugarcrepe", "data"), flat)
    sets2 = sugarcrepe.read_sugarcrepe(str(flat), image_root="/coco/val2017")
    assert sets2["add_att"][0][0] == "/coco/val2017/000000331352.jpg"


@pytest.mark.parametrize(
    "bench, read",
    [
        ("sugarcrepe", lambda root: sugarcrepe.read_sugarcrepe(os.path.join(root, "sugarcrepe"))),
        (
            "aro",
            lambda root: aro.read_aro_vg(
                os.path.join(root, "aro", "visual_genome_relation.json"), "/img", "relation"
            ),
        ),
        (
            "aro",
            lambda root: aro.read_karpathy_test(
                os.path.join(root, "aro", "coco_karpathy_test.json"), "/coco"
            ),
        ),
        ("valse", lambda root: valse.read_valse(os.path.join(root, "valse"))),
        (
            "vlchecklist",
            lambda root: vlchecklist.read_vlchecklist_file(
                os.path.join(root, "vlchecklist", "data/Relation/swig_action.json"), "/swig"
            ),
        ),
        (
            "hnc",
            lambda root: intrinsic.read_hnc_test(
                os.path.join(root, "hnc", "hnc_clean_strict_test.json"), "/gqa"
            ),
        ),
    ],
)
def test_every_reader_reads_a_file_with_a_bom_as_the_clean_file(tmp_path, bench, read):
    root = tmp_path / "fixtures"
    fixture_copy(root, bench)
    clean = read(str(root))
    for folder, _, files in os.walk(root):  # what Notepad writes: a utf-8 byte-order mark, windows line ends
        for name in files:
            if name.endswith(".json"):
                path = os.path.join(folder, name)
                raw = open(path, "rb").read()
                with open(path, "wb") as f:
                    f.write(b"\xef\xbb\xbf" + raw.replace(b"\n", b"\r\n"))
    assert read(str(root)) == clean


def test_eval_sugarcrepe_hand_computed():
    sets = sugarcrepe_items()
    # negative scores higher
    wrong = {sets["replace_obj"][1][1][0], sets["swap_obj"][0][1][0], sets["swap_obj"][2][1][0]}
    tie = {sets["add_obj"][0][1][0]}  # scores equal: wrong
    negatives = {c[1] for items in sets.values() for _, c in items}

    def score(c, text):
        if text in negatives:
            return 0.5
        return 0.2 if text in wrong else 0.5 if text in tie else 0.9

    m = run("sugarcrepe", score, root=os.path.join(FIX, "sugarcrepe"))
    expect = {
        "replace_obj": 2 / 3,
        "replace_att": 1.0,
        "replace_rel": 1.0,
        "swap_obj": 1 / 3,
        "swap_att": 1.0,
        "add_obj": 1 / 2,
        "add_att": 1.0,
    }
    for s, v in expect.items():
        assert m[f"sugarcrepe/{s}"] == pytest.approx(v)
    # groups weighted by size: replace 6 of 7, swap 2 of 4, add 2 of 3
    assert m["sugarcrepe/replace"] == pytest.approx(6 / 7)
    assert m["sugarcrepe/swap"] == pytest.approx(2 / 4)
    assert m["sugarcrepe/add"] == pytest.approx(2 / 3)
    assert m["sugarcrepe/mean"] == pytest.approx(sum(expect.values()) / 7)
    assert m["sugarcrepe/n_items"] == 14 and m["sugarcrepe/unreadable_images"] == 0


def test_sugarcrepe_blind_model_sums_to_one_over_swapped_roles(tmp_path):
    # swap caption and negative_caption in every file: an image-blind model's two accuracies add up to 1
    root = fixture_copy(tmp_path, "sugarcrepe")
    before = run("sugarcrepe", blind, root=str(root))
    for f in os.listdir(root / "data"):
        rows = json.load(open(root / "data" / f))
        rows = {
            k: r | {"caption": r["negative_caption"], "negative_caption": r["caption"]}
            for k, r in rows.items()
        }
        json.dump(rows, open(root / "data" / f, "w"))
    after = run("sugarcrepe", blind, root=str(root))
    for s in sugarcrepe.SUGARCREPE["replace"] + sugarcrepe.SUGARCREPE["swap"] + sugarcrepe.SUGARCREPE["add"]:
        assert before[f"sugarcrepe/{s}"] + after[f"sugarcrepe/{s}"] == pytest.approx(1.0)


# -----------------------------------------------------------------------------
# ARO


def test_read_aro_vg_boxes_and_groups():
    items, groups = aro.read_aro_vg(
        os.path.join(FIX, "aro", "visual_genome_relation.json"), "/img", "relation"
    )
    assert groups == ["on", "on", "on", "next to", "next to", "behind"]
    assert items[0] == (
        ("/img/2315855.jpg", (2.0, 1.0, 12.0, 9.0)),
        ["the man is on the horse", "the horse is on the man"],
    )
    items, groups = aro.read_aro_vg(
        os.path.join(FIX, "aro", "visual_genome_attribution.json"), "/img", "attribution"
    )
    assert groups.count("white_black") == 25 and groups.count("red_blue") == 2


def test_aro_crop_past_the_border_is_padded_black():
    # the last relation box (10, 6, 20, 16) runs past the 16 x 12 image, as ARO's loader allows
    items, _ = aro.read_aro_vg(
        os.path.join(FIX, "aro", "visual_genome_relation.json"),
        os.path.join(FIX, "aro", "images"),
        "relation",
    )
    im = np.asarray(common._open_choice_image(items[5][0]))
    assert im.shape == (10, 10, 3)
    assert (im[:6, :6] != 0).all() and (im[6:] == 0).all() and (im[:, 6:] == 0).all()


def order_tools_monkeypatch(monkeypatch):
    tag, tokenize = fake_tools(
        nouns={"man", "helmet", "moped", "road", "bike", "woman", "cake", "hat", "glasses"},
        adjectives={"red", "small", "dirt", "orange", "large", "white"},
    )
    monkeypatch.setattr(aro, "aro_text_tools", lambda: ((tag, tokenize), None))
    return tag, tokenize


def test_eval_aro_hand_computed(monkeypatch):
    order_tools_monkeypatch(monkeypatch)
    rel = json.load(open(os.path.join(FIX, "aro", "visual_genome_relation.json")))
    att = json.load(open(os.path.join(FIX, "aro", "visual_genome_attribution.json")))
    coco = json.load(open(os.path.join(FIX, "aro", "coco_karpathy_test.json")))
    # relations: "on" right on 2 of 3, "next to" (excluded from the macro) on 0 of 2, "behind" on 1 of 1
    right = {rel[i]["true_caption"] for i in (0, 2, 5)}
    # attribution: the 25-item pair right on 20, the 2-item pair (under 25: out of the macro) on 0
    right |= {att[i]["true_caption"] for i in range(20)}
    # coco order: the first image's two captions right, the second image's wrong; flickr all right
    originals = {aro.pre_caption(c) for c in coco[0]["caption"]}
    flickr = {
        aro.pre_caption(c)
        for c in json.load(open(os.path.join(FIX, "aro", "flickr30k_test.json")))[0]["caption"]
    }

    def score(c, text):
        if text in right or text in originals or text in flickr:
            return 1.0
        return 0.5 if c != 3 else 2.0  # the second coco image (colour 3) prefers anything but its captions

    m = run("aro", score, root=os.path.join(FIX, "aro"))
    assert m["aro/relation"] == pytest.approx((2 / 3 + 1) / 2) and m["aro/relation_groups"] == 2
    assert m["aro/relation_micro"] == pytest.approx(3 / 6)
    assert m["aro/attribution"] == pytest.approx(20 / 25) and m["aro/attribution_groups"] == 1
    assert m["aro/attribution_micro"] == pytest.approx(20 / 27)
    assert m["aro/coco_order"] == pytest.approx(2 / 4)
    assert m["aro/flickr30k_order"] == 1.0
    for p in aro.ARO_PERTURBATIONS:
        assert m[f"aro/flickr30k_order/{p}"] == 1.0
    assert m["aro/n_items"] == 6 + 27 + 4 + 2 and m["aro/unreadable_images"] == 0


def test_aro_parts_missing_or_without_text_tools(tmp_path, monkeypatch, capsys):
    root = fixture_copy(tmp_path, "aro")
    os.remove(root / "visual_genome_attribution.json")
    monkeypatch.setattr(aro, "aro_text_tools", lambda: (None, "needs spaCy"))
    m = run("aro", lambda c, t: 0.0, root=str(root))
    out = capsys.readouterr().out
    assert m["aro/attribution"] is None and "attribution missing" in out
    assert m["aro/coco_order"] is None and m["aro/flickr30k_order"] is None and "needs spaCy" in out
    assert m["aro/relation"] == 0.0  # the present part still runs (all ties: 0)
    for f in os.listdir(root):
        if f.endswith(".json"):
            os.remove(root / f)
    with pytest.raises(data.DataError, match="none of ARO's files"):
        run("aro", lambda c, t: 0.0, root=str(root))


def test_pre_caption_matches_aros_normalisation():
    assert aro.pre_caption("A man (left) rides: a *red* bike!!  ") == "a man left rides a red bike"
    assert aro.pre_caption("Two\tdogs.") == "two\tdogs"  # a single tab is not a run of whitespace
    words = " ".join(f"w{i}" for i in range(35))
    assert aro.pre_caption(words) == " ".join(f"w{i}" for i in range(30))
    assert aro.pre_caption(words, max_words=50) == words


def test_order_perturbations_follow_aros_recipe():
    tag, tokenize = fake_tools(nouns={"man", "helmet", "moped", "road"}, adjectives={"red", "small", "dirt"})
    # no full stop here: it is a token that shuffles with the rest and then normalises away,
    # which would shift the word positions this test compares
    caption = "A man with a red helmet on a small moped on a dirt road"
    words = [w for w, _ in tag(caption)]
    p = aro.order_perturbations(caption, tag, tokenize, np.random.RandomState(1), random.Random(1))
    assert len(p) == 4 and all(x == aro.pre_caption(x) for x in p)
    a, b, c, d = (x.split(" ") for x in p)
    lower = [w.lower() for w in words]
    noun_pos = [i for i, w in enumerate(lower) if w in {"man", "helmet", "moped", "road"}]
    adj_pos = [i for i, w in enumerate(lower) if w in {"red", "small", "dirt"}]
    other = [i for i in range(len(lower)) if i not in noun_pos + adj_pos]
    # nouns among nouns, adjectives among adjectives, the rest in place
    assert sorted(a[i] for i in noun_pos) == sorted(lower[i] for i in noun_pos)
    assert sorted(a[i] for i in adj_pos) == sorted(lower[i] for i in adj_pos)
    assert [a[i] for i in other] == [lower[i] for i in other]
    # the opposite: nouns and adjectives in place, the rest shuffled among themselves
    assert [b[i] for i in noun_pos + adj_pos] == [lower[i] for i in noun_pos + adj_pos]
    assert sorted(b[i] for i in other) == sorted(lower[i] for i in other)
    # ARO's draws, in its order from one numpy generator: the nouns, the adjectives, then the rest
    g = np.random.RandomState(1)
    expect_a, expect_b = list(lower), list(lower)
    for pos in (noun_pos, adj_pos):
        for i, w in zip(pos, g.permutation(np.array([lower[i] for i in pos]))):
            expect_a[i] = w
    for i, w in zip(other, g.permutation(np.array([lower[i] for i in other]))):
        expect_b[i] = w
    assert (a, b) == (expect_a, expect_b) and a != lower and b != lower
    # trigrams: each trigram's words stay in it (the full stop is a token, then normalised away)
    caption += "."
    tokens = tokenize(caption)
    tri = [tokens[i : i + 3] for i in range(0, len(tokens), 3)]
    got_all = aro.order_perturbations(caption, tag, tokenize, np.random.RandomState(1), random.Random(1))
    got = got_all[2]
    expect_within = [w for t in tri for w in sorted(t)]
    assert sorted(got.split()) == sorted(aro.pre_caption(" ".join(expect_within)).split())
    flat = " ".join(tokens).lower().replace(".", " ").split()
    assert sorted(d) == sorted(flat)
    # seeded: same seeds same captions, other seeds others
    again = aro.order_perturbations(caption, tag, tokenize, np.random.RandomState(1), random.Random(1))
    assert again == got_all and again != aro.order_perturbations(
        caption, tag, tokenize, np.random.RandomState(2), random.Random(2)
    )


def test_order_trigram_shuffles_hand_computed():
    # with python's random seeded at 0: shuffle within [a b c] [d e f] [g] one by one
    tag, tokenize = fake_tools()
    rng = random.Random(0)
    expect = []
    for t in (["a", "b", "c"], ["d", "e", "f"], ["g"]):
        rng.shuffle(t)
        expect += t
    # then the trigrams themselves, with the same generator
    trigrams = [["a", "b", "c"], ["d", "e", "f"], ["g"]]
    rng.shuffle(trigrams)
    got = aro.order_perturbations("a b c d e f g", tag, tokenize, np.random.RandomState(0), random.Random(0))
    assert got[2] == " ".join(expect) and got[3] == " ".join(w for t in trigrams for w in t)


# -----------------------------------------------------------------------------
# VALSE


def test_read_valse_validity_and_image_lookup():
    pieces = valse.read_valse(os.path.join(FIX, "valse"))
    assert list(pieces) == list(valse.VALSE_PIECES)
    # items with fewer than 2 caption votes are dropped: 1 of 2 in existence, counting-small-quant, action-replacement
    assert {p: (len(items), n) for p, (items, n) in pieces.items() if len(items) != n} == {
        "existence": (1, 2),
        "counting-small-quant": (1, 2),
        "action-replacement": (1, 2),
    }
    assert sum(len(items) for items, _ in pieces.values()) == 15
    # swig images sit in a per-piece folder, coco ones flat in images/
    assert pieces["actant-swap"][0][0][0] == os.path.join(
        FIX, "valse", "images", "actant-swap", "exercising_255.jpg"
    )
    assert pieces["foil-it"][0][0][0] == os.path.join(FIX, "valse", "images", "COCO_val2014_000000165831.jpg")
    assert all(os.path.isfile(im) for items, _ in pieces.values() for im, _ in items)


def test_eval_valse_filter_and_categories():
    rows = {p: json.load(open(os.path.join(FIX, "valse", "data", f"{p}.json"))) for p in valse.VALSE_PIECES}
    invalid = {r["caption"] for rs in rows.values() for r in rs.values() if r["mturk"]["caption"] < 2}
    hard = {r["caption"] for r in rows["counting-hard"].values()}
    foils = {r["foil"] for rs in rows.values() for r in rs.values()}

    def score(c, text):  # every valid caption right except counting-hard's; every invalid item wrong
        return 0.5 if text in foils else 0.1 if text in invalid | hard else 0.9

    m = run("valse", score, root=os.path.join(FIX, "valse"))
    assert m["valse/counting/counting-hard"] == 0.0
    assert m["valse/counting"] == pytest.approx(2 / 3)
    # invalid items left out
    assert m["valse/existence/existence"] == 1.0 and m["valse/actions/action-replacement"] == 1.0
    # actant-swap's second item has caption == foil: no model can tell them apart, it counts wrong
    assert m["valse/actions/actant-swap"] == 0.5 and m["valse/actions"] == 0.75
    assert m["valse/noun_phrases"] == 1.0 and m["valse/plurality"] == 1.0
    assert m["valse/mean"] == pytest.approx(9.5 / 11)  # the 11 pieces, not the 7 categories
    assert m["valse/n_valid"] == 15 and m["valse/n_items"] == 15


def test_valse_blind_model_sums_to_one_over_swapped_roles(tmp_path):
    root = fixture_copy(tmp_path, "valse")
    before = run("valse", blind, root=str(root))
    for p in valse.VALSE_PIECES:
        path = root / "data" / f"{p}.json"
        rows = json.load(open(path))
        json.dump(
            {k: r | {"caption": r["foil"], "foil": r["caption"]} for k, r in rows.items()}, open(path, "w")
        )
    after = run("valse", blind, root=str(root))
    for p, c in valse.VALSE_PIECES.items():
        items = valse.read_valse(str(root))[p][0]
        same = sum(cands[0] == cands[1] for _, cands in items) / len(items)  # wrong either way
        assert before[f"valse/{c}/{p}"] + after[f"valse/{c}/{p}"] == pytest.approx(1.0 - same)


def test_valse_evaluates_the_pieces_that_are_there_and_names_the_missing(tmp_path, capsys):
    """a user with some pieces' files, or some sources' images, gets those pieces scored and one line
    naming the rest; the mean and the categories are over the evaluated pieces"""
    # any fixed scorer: the kept pieces must score as in a full run
    score = lambda c, text: len(text) % 7
    full = run("valse", score, root=os.path.join(FIX, "valse"))
    root = fixture_copy(tmp_path, "valse")
    for p in ("counting-hard", "foil-it"):
        os.remove(root / "data" / f"{p}.json")
    shutil.rmtree(root / "images" / "actant-swap")  # swig's images not downloaded
    capsys.readouterr()
    m = run("valse", score, root=str(root))
    line = capsys.readouterr().out
    assert (
        "valse: evaluated 8 of 11 pieces; missing: counting-hard (no file); actant-swap (no image on disk (first: "
        in line
    )
    assert line.rstrip().endswith("exercising_255.jpg)); foil-it (no file)") and line.count("\n") == 1
    gone = {"counting-hard", "foil-it", "actant-swap"}
    for p, c in valse.VALSE_PIECES.items():
        assert m[f"valse/{c}/{p}"] == (None if p in gone else full[f"valse/{c}/{p}"]), p
    kept = [full[f"valse/{c}/{p}"] for p, c in valse.VALSE_PIECES.items() if p not in gone]
    assert (
        m["valse/mean"] == pytest.approx(sum(kept) / 8)
        and m["valse/n_pieces"] == 8
        and full["valse/n_pieces"] == 11
    )
    assert m["valse/noun_phrases"] is None  # foil-it was the only noun-phrase piece
    assert m["valse/actions"] == full["valse/actions/action-replacement"]
    for p in valse.VALSE_PIECES:
        if (root / "data" / f"{p}.json").exists():
            os.remove(root / "data" / f"{p}.json")
    with pytest.raises(
        data.DataError,
        match="valse: none of VALSE's piece files in .*: expected <piece>.json for existence, plurals",
    ):
        run("valse", score, root=str(root))


# -----------------------------------------------------------------------------
# VL-CheckList


def test_vlchecklist_file_list_matches_the_release():
    files = vlchecklist.vlchecklist_files()
    assert len(files) == 56 and len({f[4] for f in files}) == 56
    assert (
        "object",
        "location_center",
        "swig",
        "swig_agent",
        "data/Object/Location/swig_location/swig_agent/swig_agent_center.json",
        "swig",
    ) in files
    assert ("relation", "action", "hake", "hake", "data/Relation/hake_action.json", "hake") in files
    assert all(os.path.isfile(os.path.join(FIX, "vlchecklist", f[4])) for f in files)


def test_read_vlchecklist_first_texts_only_as_written():
    items = vlchecklist.read_vlchecklist_file(
        os.path.join(FIX, "vlchecklist", "data/Object/Size/vg_size/vg_obj_small.json"), "/vg"
    )
    assert items[0] == ("/vg/VG_100K/2361911.jpg", ["plant IN pot size_small vg", " customers size_small vg"])
    items = vlchecklist.read_vlchecklist_file(
        os.path.join(FIX, "vlchecklist", "data/Relation/swig_action.json"), "/swig"
    )
    assert items == [
        (
            "/swig/dialing_8.jpg",
            ["an individual dials on a phone at action", "a bird of prey dials on a phone at action"],
        )
    ]


def test_eval_vlchecklist_radar_aggregation():
    # right on every file except hake's; a later NEG (never compared) outscores everything
    def score(c, text):
        if text.startswith(("a flower", "a threesome")):
            return 9.0
        if text.startswith("person"):  # hake texts: the negative wins
            return 0.8 if ("backpack" in text or "desk" in text) else 0.2
        return 0.1 if text.startswith((" customers", "smoke in front of young", "a bird")) else 0.7

    m = run("vlchecklist", score, root=os.path.join(FIX, "vlchecklist"))
    assert (
        m["vlchecklist/object/location_center/hake"] == 0.0
        and m["vlchecklist/object/location_center/swig_tool"] == 1.0
    )
    # a subtype: mean over sources (vg, swig, hake) of the mean over each source's files
    for sub in (
        "location_center",
        "location_mid",
        "location_margin",
        "size_large",
        "size_medium",
        "size_small",
    ):
        assert m[f"vlchecklist/object/{sub}"] == pytest.approx(2 / 3)
    assert m["vlchecklist/object"] == pytest.approx(2 / 3)
    assert m["vlchecklist/attribute/color"] == 1.0 and m["vlchecklist/attribute"] == 1.0
    assert (
        m["vlchecklist/relation/action"] == pytest.approx(2 / 3) and m["vlchecklist/relation/spatial"] == 1.0
    )
    assert m["vlchecklist/relation"] == pytest.approx(5 / 6)
    assert m["vlchecklist/mean"] == pytest.approx((2 / 3 + 1 + 5 / 6) / 3)
    assert m["vlchecklist/n_items"] == 6 * (2 * 2 + 4 + 2) + 10 * 2 + (2 + 1 + 2 + 2)


def test_vlchecklist_evaluates_the_files_that_are_there_and_names_the_missing(tmp_path, capsys):
    """one annotation file absent and hake's images not downloaded: the other 48 files are scored as
    in a full run, the 8 named on one line, and the radar's means are over the files evaluated"""
    # any fixed scorer: the kept files must score as in a full run
    score = lambda c, text: len(text) % 7
    full = run("vlchecklist", score, root=os.path.join(FIX, "vlchecklist"))
    root = fixture_copy(tmp_path, "vlchecklist")
    os.remove(root / "data/Relation/vg/spatial.json")
    shutil.rmtree(root / "hake")
    capsys.readouterr()
    m = run("vlchecklist", score, root=str(root))
    line = capsys.readouterr().out
    assert (
        line.startswith(
            "vlchecklist: evaluated 48 of 56 files; missing: data/Object/Location/hake_location/hake_obj_center.json "
            "(no image on disk (first: "
        )
        and line.count("\n") == 1
    )
    assert (
        line.rstrip().endswith("HICO_test2015_00000001.jpg)); data/Relation/vg/spatial.json (no file)")
        and line.count("(no image on disk") == 7
    )
    gone = {f[4] for f in vlchecklist.vlchecklist_files() if f[3] == "hake"} | {
        "data/Relation/vg/spatial.json"
    }
    for kind, subtype, _, corpus, rel, _ in vlchecklist.vlchecklist_files():
        assert m[f"vlchecklist/{kind}/{subtype}/{corpus}"] == (
            None if rel in gone else full[f"vlchecklist/{kind}/{subtype}/{corpus}"]
        ), rel
    assert m["vlchecklist/n_files"] == 48 and full["vlchecklist/n_files"] == 56
    # hake: 2 items a file; spatial: 2
    assert m["vlchecklist/n_items"] == full["vlchecklist/n_items"] - 6 * 2 - 2 - 2

    # the radar's means by hand: right everywhere but on hake's files (as in the full-run test above)
    def right_but_hake(c, text):
        if text.startswith(("a flower", "a threesome")):
            return 9.0
        if text.startswith("person"):
            return 0.8 if ("backpack" in text or "desk" in text) else 0.2
        return 0.1 if text.startswith((" customers", "smoke in front of young", "a bird")) else 0.7

    m = run("vlchecklist", right_but_hake, root=str(root))
    # hake's 0.0 is gone
    assert m["vlchecklist/object/location_center"] == 1.0 and m["vlchecklist/object"] == 1.0
    assert (
        m["vlchecklist/relation/spatial"] is None
        and m["vlchecklist/relation/action"] == 1.0
        and m["vlchecklist/relation"] == 1.0
    )
    assert m["vlchecklist/mean"] == 1.0
    # a whole type absent: None, and the mean over the other two
    shutil.rmtree(root / "data" / "Relation")
    m = run("vlchecklist", right_but_hake, root=str(root))
    assert (
        m["vlchecklist/relation"] is None
        and m["vlchecklist/relation/action"] is None
        and m["vlchecklist/mean"] == 1.0
    )
    # nothing to evaluate: one error
    shutil.rmtree(root / "data")
    with pytest.raises(
        data.DataError,
        match=r"vlchecklist: missing all 56 annotation files under .* \(first: data/Object/Location/vg_location/vg_obj_center.json\)",
    ):
        run("vlchecklist", score, root=str(root))


# -----------------------------------------------------------------------------
# intrinsic metrics


def test_intrinsic_metrics_hand_computed():
    pos = torch.tensor([0.30, 0.20, -0.10, 0.25])
    neg = torch.tensor([0.10, 0.20, -0.20, 0.30])
    rand = torch.tensor([0.05, 0.15])
    m = intrinsic.intrinsic_metrics(pos, neg, rand, threshold=1.0)
    assert m["pos_cos"] == pytest.approx(0.1625) and m["hard_neg_cos"] == pytest.approx(0.1)
    assert m["margin"] == pytest.approx(0.0625) and m["rand_neg_cos"] == pytest.approx(0.1)
    # ratios 3, 0.99999995 (a tie: under 1), 0.5 (pos > neg, but negative: the thesis's quirk), 0.833
    assert m["distinguish_acc"] == pytest.approx(1 / 4)
    assert m["pairwise_acc"] == pytest.approx(2 / 4)
    assert intrinsic.intrinsic_metrics(pos, neg, rand, threshold=0.6)["distinguish_acc"] == pytest.approx(
        3 / 4
    )
    # -0.1 / (-0.2 + 1e-8) > 0.5
    assert intrinsic.intrinsic_metrics(pos, neg, rand, threshold=0.5)["distinguish_acc"] == 1.0
    assert intrinsic.intrinsic_metrics(pos, neg, rand, threshold=2.0)["distinguish_acc"] == pytest.approx(
        1 / 4
    )


def test_read_hnc_test_pairs_by_type_in_id_order():
    triplets, skipped = intrinsic.read_hnc_test(
        os.path.join(FIX, "hnc", "hnc_clean_strict_test.json"), "/gqa"
    )
    assert triplets == [
        ("/gqa/n100552.jpg", "the cup is on the table", "the cup is under the table", "relation"),
        ("/gqa/n100552.jpg", "the cup is white", "the cup is black", "attribute"),
        ("/gqa/n100553.jpg", "a dog left of a car", "a dog right of a car", "relation"),
    ]
    assert skipped == 1  # n100553's attributes: one positive, two negatives


def test_eval_intrinsic_hnc_hand_computed():
    table = {
        "the cup is on the table": 0.3,
        "the cup is under the table": 0.1,
        "the cup is white": 0.2,
        "the cup is black": 0.4,
        "a dog left of a car": 0.25,
        "a dog right of a car": 0.25,
    }
    # image n100552 is colour 5, n100553 colour 6; the random negative of each is the other's first caption
    m = run(
        "intrinsic",
        lambda c, t: table[t] + (0.01 if c == 6 else 0.0),
        source="hnc",
        root=os.path.join(FIX, "hnc"),
    )
    assert m["intrinsic/pos_cos"] == pytest.approx((0.3 + 0.2 + 0.26) / 3)
    assert m["intrinsic/hard_neg_cos"] == pytest.approx((0.1 + 0.4 + 0.26) / 3)
    assert m["intrinsic/rand_neg_cos"] == pytest.approx((0.25 + 0.31) / 2)
    assert m["intrinsic/pairwise_acc"] == pytest.approx(1 / 3)  # the third is a tie
    assert m["intrinsic/distinguish_acc"] == pytest.approx(1 / 3)
    assert m["intrinsic/n_items"] == 3


class ShapesStub(torch.nn.Module):
    """exact embeddings for the shapes world: an image is its scene, a text the scene it captions
    (text_key maps a text to what the model can read of it)"""

    def __init__(self, scenes, size, text_key=lambda t: t):
        super().__init__()
        self.ids, self.text_key = {}, text_key
        self.image_ids = {shapes.render(s, size).tobytes(): self.id(text_key(s.caption())) for s in scenes}

    def id(self, key):
        return self.ids.setdefault(key, len(self.ids))

    def preprocess(self, im):
        return torch.tensor(self.image_ids[np.asarray(im).tobytes()])

    def tokenizer(self, texts):
        return torch.tensor([self.id(self.text_key(t)) for t in texts])

    def encode_image(self, x, normalize=False):
        return torch.nn.functional.one_hot(x, 8192).float()

    def encode_text(self, ids, normalize=False):
        return torch.nn.functional.one_hot(ids, 8192).float()


def test_eval_intrinsic_shapes_perfect_and_relation_blind():
    scenes = shapes.test_scenes(40)
    stub = ShapesStub(scenes, 16)
    m = intrinsic.evaluate(stub, stub.preprocess, stub.tokenizer, "cpu", n=40, image_size=16)
    assert (m["intrinsic/pos_cos"], m["intrinsic/hard_neg_cos"], m["intrinsic/rand_neg_cos"]) == (1, 0, 0)
    assert m["intrinsic/distinguish_acc"] == 1 and m["intrinsic/pairwise_acc"] == 1
    assert m["intrinsic/n_items"] == 40 * len(shapes.NEGATIVES)

    def blind(t):
        for r in shapes.CONVERSE:
            t = t.replace(f" {r} ", " REL ")
        return t

    stub = ShapesStub(scenes, 16, blind)
    m = intrinsic.evaluate(stub, stub.preprocess, stub.tokenizer, "cpu", n=40, image_size=16)
    assert m["intrinsic/relation/hard_neg_cos"] == 1 and m["intrinsic/relation/distinguish_acc"] == 0
    assert m["intrinsic/relation/pairwise_acc"] == 0 and m["intrinsic/attribute_swap/pairwise_acc"] == 1
    k = len(shapes.NEGATIVES)
    assert m["intrinsic/hard_neg_cos"] == pytest.approx(1 / k) and m[
        "intrinsic/pairwise_acc"
    ] == pytest.approx((k - 1) / k)


# -----------------------------------------------------------------------------
# every benchmark: ties are wrong, unreadable images are counted


ALL = {
    "sugarcrepe": dict(root=os.path.join(FIX, "sugarcrepe")),
    "aro": dict(root=os.path.join(FIX, "aro")),
    "valse": dict(root=os.path.join(FIX, "valse")),
    "vlchecklist": dict(root=os.path.join(FIX, "vlchecklist")),
}


def accuracies(m):
    return {
        k: v
        for k, v in m.items()
        if not k.endswith(("n_items", "unreadable_images", "n_valid", "n_pieces", "n_files", "_groups"))
        and "/n_truncated_ties" not in k
    }


@pytest.mark.parametrize("bench", list(ALL))
def test_a_model_that_scores_every_caption_equal_gets_zero(bench, monkeypatch):
    order_tools_monkeypatch(monkeypatch)
    m = run(bench, lambda c, t: 0.25, **ALL[bench])
    assert accuracies(m) and all(v == 0 for v in accuracies(m).values())


def test_intrinsic_equal_scores_are_wrong():
    m = run("intrinsic", lambda c, t: 0.25, source="hnc", root=os.path.join(FIX, "hnc"))
    assert (
        m["intrinsic/pairwise_acc"] == 0
        and m["intrinsic/distinguish_acc"] == 0
        and m["intrinsic/margin"] == 0
    )


def test_unreadable_images_are_counted_not_dropped_silently(tmp_path, capsys):
    root = fixture_copy(tmp_path, "sugarcrepe")
    (root / "val2017" / "000000219578.jpg").write_bytes(b"not a jpeg")  # image B: in 5 items
    m = run("sugarcrepe", lambda c, t: 1.0 if "negative" not in t else 0.0, root=str(root))
    assert m["sugarcrepe/unreadable_images"] == 1 and m["sugarcrepe/n_items"] == 14
    assert "1 image(s) could not be read" in capsys.readouterr().out
    # swap_obj loses its first two items (image B): its accuracy is over the one left
    negatives = {c[1] for items in sugarcrepe_items().values() for _, c in items}
    m = run("sugarcrepe", lambda c, t: 0.0 if t in negatives else 1.0, root=str(root))
    assert m["sugarcrepe/swap_obj"] == 1.0 and m["sugarcrepe/swap"] == 1.0
    # a subset none of whose images can be read stops the run, naming it
    (root / "val2017" / "000000331352.jpg").unlink()
    with pytest.raises(
        data.DataError, match=r"swap_obj: none of its 3 images could be read \(first: .*000000219578.jpg\)"
    ):
        run("sugarcrepe", lambda c, t: 0.0, root=str(root))


# -----------------------------------------------------------------------------
# bad input: one line naming the file, the item, or the flag


def test_bad_input_names_the_file_and_item(tmp_path):
    stub = ScoreStub(lambda c, t: 0.0)
    go = lambda bench, **kw: ev.task(bench).evaluate(stub, stub.preprocess, stub.tokenizer, "cpu", **kw)
    with pytest.raises(
        data.DataError, match="--data_root None is not a folder; it should hold the 7 subset files"
    ):
        go("sugarcrepe", root=None)
    root = fixture_copy(tmp_path, "sugarcrepe")
    os.remove(root / "data" / "swap_att.json")
    with pytest.raises(data.DataError, match=r"missing .*swap_att.json \(or .*data/swap_att.json\)"):
        go("sugarcrepe", root=str(root))
    shutil.copy(os.path.join(FIX, "sugarcrepe", "data", "swap_att.json"), root / "data")
    rows = json.load(open(root / "data" / "add_obj.json"))
    del rows["1"]["negative_caption"]
    json.dump(rows, open(root / "data" / "add_obj.json", "w"))
    with pytest.raises(data.DataError, match=r"add_obj.json: item '1': missing or empty 'negative_caption'"):
        go("sugarcrepe", root=str(root))

    root = fixture_copy(tmp_path, "valse")
    rows = json.load(open(root / "data" / "plurals.json"))
    del next(iter(rows.values()))["mturk"]
    json.dump(rows, open(root / "data" / "plurals.json", "w"))
    with pytest.raises(
        data.DataError, match=r"plurals.json: item 'plurals:coco2017:308510': missing or malformed 'mturk'"
    ):
        go("valse", root=str(root))

    root = fixture_copy(tmp_path, "vlchecklist")
    (root / "data/Relation/vg/spatial.json").write_text(
        '[["VG_100K/2361911.jpg", {"POS": ["a"], "NEG": []}]]'
    )
    with pytest.raises(data.DataError, match=r"spatial.json: item 0: expected \[image path"):
        go("vlchecklist", root=str(root))
    (root / "data/Relation/vg/spatial.json").write_text('[["VG_100K/2361911.jpg", {"POS": ["a"]')
    with pytest.raises(data.DataError, match=r"spatial.json:1: malformed JSON"):
        go("vlchecklist", root=str(root))

    root = fixture_copy(tmp_path, "aro")
    rows = json.load(open(root / "visual_genome_relation.json"))
    rows[3]["bbox_w"] = 0
    json.dump(rows, open(root / "visual_genome_relation.json", "w"))
    with pytest.raises(data.DataError, match=r"visual_genome_relation.json: item 3: empty box"):
        go("aro", root=str(root))
    rows[3]["bbox_w"] = "wide"
    json.dump(rows, open(root / "visual_genome_relation.json", "w"))
    with pytest.raises(
        data.DataError, match=r"visual_genome_relation.json: item 3: missing or malformed field"
    ):
        go("aro", root=str(root))


# -----------------------------------------------------------------------------
# the CLI with a random open_clip model and a random minclip checkpoint


TINY = dict(
    embed_dim=32,
    vision_cfg=dict(image_size=32, layers=1, width=32, patch_size=16, head_width=16),
    text_cfg=dict(context_length=32, vocab_size=49408, width=32, heads=2, layers=1),
)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """{kind: --model spec}: an open_clip CLIP with random weights as a hub directory, and a randomly
    initialised minclip checkpoint"""
    import open_clip

    d = tmp_path_factory.mktemp("models")
    torch.manual_seed(0)
    export_open_clip(open_clip.CLIP(**TINY), TINY, str(d / "hub"))
    ckpt = tiny_ckpt(d / "ckpt.pt", seed=None, optimizer={}, step=0, args={})
    return {"open_clip": f"local-dir:{d / 'hub'}", "minclip": ckpt}


EXPECTED = {
    "sugarcrepe": ["sugarcrepe/replace_obj", "sugarcrepe/swap", "sugarcrepe/mean"],
    "aro": ["aro/relation", "aro/attribution", "aro/coco_order", "aro/flickr30k_order"],
    "valse": ["valse/existence", "valse/counting/counting-hard", "valse/noun_phrases", "valse/mean"],
    "vlchecklist": [
        "vlchecklist/object",
        "vlchecklist/attribute/color",
        "vlchecklist/relation/spatial",
        "vlchecklist/mean",
    ],
    "intrinsic": ["intrinsic/pos_cos", "intrinsic/margin", "intrinsic/distinguish_acc"],
}


@pytest.mark.parametrize("kind", ["open_clip", "minclip"])
def test_cli_runs_every_benchmark(kind, models, tmp_path, monkeypatch, capsys):
    order_tools_monkeypatch(monkeypatch)
    for bench, keys in EXPECTED.items():
        out = tmp_path / f"{bench}.json"
        extra = (
            ["--data", "hnc", "--data_root", os.path.join(FIX, "hnc")]
            if bench == "intrinsic"
            else ["--data_root", os.path.join(FIX, bench)]
        )
        ev.main(["--model", models[kind], "--bench", bench, *extra, "--json", str(out), "--device", "cpu"])
        m = json.load(open(out))
        assert m["bench"] == bench and m["model"] == models[kind]
        assert all(isinstance(m[k], float) for k in keys)
        assert m[f"{bench}/unreadable_images"] == 0
        # the 32-token context cuts one coreference pair
        assert m[f"{bench}/n_truncated_ties"] == (bench == "valse")
        assert all(
            0 <= v <= 1
            for k, v in accuracies(m).items()
            if k not in ("model", "bench") and "cos" not in k and "margin" not in k
        )
        table = capsys.readouterr().out
        assert f"on {bench}" in table and keys[0] in table
        assert (
            "valse: 1 item(s) whose right and wrong captions are the same tokens at the model's context length (32) "
            "tie, counted wrong: coreference-standard 1\n" in table
        ) == (bench == "valse")
    # intrinsic on the shapes world, at the model's resolution
    ev.main(
        [
            "--model",
            models[kind],
            "--bench",
            "intrinsic",
            "--n",
            "20",
            "--threshold",
            "1.5",
            "--device",
            "cpu",
        ]
    )
    assert "intrinsic/relation/distinguish_acc" in capsys.readouterr().out


@pytest.mark.slow
def test_cli_missing_part_is_null_in_json_and_errors_are_one_line(models, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(aro, "aro_text_tools", lambda: (None, "needs spaCy"))
    out = tmp_path / "aro.json"
    ev.main(
        [
            "--model",
            models["minclip"],
            "--bench",
            "aro",
            "--data_root",
            os.path.join(FIX, "aro"),
            "--json",
            str(out),
        ]
    )
    m = json.load(open(out))
    assert m["aro/coco_order"] is None and isinstance(m["aro/relation"], float)
    assert "missing" in capsys.readouterr().out
    with pytest.raises(SystemExit, match="error: valse: --data_root .*nowhere is not a folder"):
        ev.main(["--model", models["minclip"], "--bench", "valse", "--data_root", str(tmp_path / "nowhere")])
    with pytest.raises(SystemExit, match="error: --query ranks"):
        ev.main(["--model", models["minclip"], "--bench", "valse", "--query", "a dog"])
    r = subprocess.run(
        [
            sys.executable,
            os.path.join(ROOT, "eval.py"),
            "--model",
            models["minclip"],
            "--bench",
            "vlchecklist",
            "--data_root",
            str(tmp_path),
        ],
        capture_output=True,
        text=True,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert r.returncode != 0 and "Traceback" not in r.stderr
    assert (
        r.stderr.strip().count("\n") == 0
        and "vlchecklist: missing" in r.stderr
        and "vg_obj_center.json" in r.stderr
    )
