"""--holdout combos: held-out colour-shape pairs and (shape, relation, shape) triples never reach a
training batch of any script (texts read back from the tokens, images by their scenes), the split
is the same in every process, and eval reports seen and unseen scenes apart."""

import json
import os
import subprocess
import sys

import pytest
import torch
from helpers import ROOT, run, run_here, statement_rates, vsr_rates

import clip_dpo
import clip_hardneg
import clip_scratch
import data
import eval as ev
import shapes
from model import CLIP, load_model, model_config

HELD = shapes.holdout_combos()


def texts_of(tokens):
    tok = data.get_tokenizer()
    return [
        tok.decode([int(t) for t in row if t not in (0, tok.sot_token_id, tok.eot_token_id)])
        for row in tokens.flatten(0, -2)
    ]


def leaks(texts):
    return [t for t in texts if (lambda p, q: p & HELD[0] or q & HELD[1])(*shapes.text_combos(t))]


def batches(name, held, n_batches=12, world=2):
    """the token tensors of the first batches of every rank of a 2-process run, through the script's own dataset and make_batch"""
    if name == "scratch":
        # CLIPS: the (colour-misbound) web caption, a sentence of the description, the whole description
        args = clip_scratch.get_args(
            ["--holdout", "combos", "--image_size", "16", "--caption_mask", "subcaption"]
        )
        ds, make = shapes.ShapesDataset(16, 0, 0.5, "full", held), clip_scratch.make_batch
        pick = lambda b: [b[1][0], b[1][1]]  # noqa: E731
    elif name == "hardneg":
        args = clip_hardneg.get_args(["--holdout", "combos", "--neg_types", ",".join(shapes.NEGATIVES)])
        args.context_length = 32
        ds, make = (
            clip_hardneg.ShapesHardNegatives(16, 0, args.neg_types, True, held),
            clip_hardneg.make_batch,
        )
        pick = lambda b: [b[1], b[2]]  # noqa: E731
    else:
        args = clip_dpo.get_args(["--holdout", "combos", "--init", "x"])
        args.context_length = 32
        ds, make = clip_dpo.ShapesPreferences(16, 0, True, "mixed", held), clip_dpo.make_batch
        pick = lambda b: [b[1]]  # noqa: E731
    out = []
    for rank in range(world):
        for keys, _ in zip(data.StepBatches(None, 8, rank, world, 0, 0, n_batches), range(n_batches)):
            batch, _ = make([ds[k] for k in keys], args)
            out += [t for tokens in pick(batch) for t in texts_of(tokens)]
    return out


@pytest.mark.parametrize("name", ["scratch", "hardneg", "dpo"])
def test_no_held_out_combination_reaches_a_training_batch(name):
    texts = batches(name, HELD)
    assert len(texts) > 300 and leaks(texts) == []
    assert leaks(batches(name, None))  # without the hold-out they do appear: the check can fail


def stated(scene):
    """the combinations a scene's caption states, read off its words (not shapes.combos): its pairs, and its
    triple both ways (the converse relation with the objects exchanged)"""
    pairs, triples = shapes.text_combos(scene.caption())
    return pairs, triples | {(b, shapes.CONVERSE[r], a) for a, r, b in triples}


def shows_held(scene):
    pairs, triples = stated(scene)
    return bool(pairs & HELD[0] or triples & HELD[1])


def test_unseen_is_what_the_caption_states():
    scenes = shapes.test_scenes(300)
    assert [shapes.unseen(s, HELD) for s in scenes] == [shows_held(s) for s in scenes]
    assert 50 < sum(map(shows_held, scenes)) < 250  # both kinds occur: the check can be True and False


def test_training_scenes_and_their_twins_avoid_every_held_out_combination():
    keys = list(range(200))
    scenes = [shapes.training_scene("dpo", 0, key, HELD)[0] for key in keys]
    for s in scenes:
        for x in (s, shapes.mirror(s), shapes.swap_colours(s), shapes.mirror(shapes.swap_colours(s))):
            assert not shows_held(x)  # the images of every group and twin row
    # per (seed, key), whatever was drawn before: resumes and ranks agree
    assert [shapes.training_scene("dpo", 0, key, HELD)[0] for key in reversed(keys)] == scenes[::-1]
    assert [shapes.training_scene("dpo", 1, key, HELD)[0] for key in keys] != scenes  # and the seed matters
    unheld = [shapes.training_scene("dpo", 0, key)[0] for key in keys]
    assert any(map(shows_held, unheld))  # without the hold-out they do occur: the check above can fail
    # off: unchanged
    assert shapes.training_scene("train", 0, 5)[0] == shapes.sample_scene(shapes.scene_rng("train", 0, 5))


@pytest.mark.slow
def test_the_split_is_the_same_in_every_process():
    code = "import shapes; print(sorted(shapes.holdout_combos()[0]), sorted(shapes.holdout_combos()[1]))"
    r = subprocess.run(
        [sys.executable, "-c", code],
        cwd=ROOT,
        env=dict(os.environ, PYTHONPATH=ROOT, PYTHONHASHSEED="7"),
        capture_output=True,
        text=True,
    )
    assert r.stdout.strip() == f"{sorted(HELD[0])} {sorted(HELD[1])}"
    assert (len(HELD[0]), len(HELD[1])) == (9, 18)  # 15% of 60 pairs and of 120 triples


def test_eval_reports_seen_and_unseen_scenes_apart():
    torch.manual_seed(0)
    model = CLIP(**model_config("tiny", 32, 32)).eval()
    tok = data.get_tokenizer(32)
    m = ev.eval_shapes(model, tok, 32, "cpu", n=120, holdout=True)
    scenes = shapes.test_scenes(120)
    for part, subset in (
        ("seen", [s for s in scenes if not shows_held(s)]),
        ("unseen", [s for s in scenes if shows_held(s)]),
    ):
        assert m[f"{part}/n"] == len(subset) and 20 < len(subset) < 100
        direct = ev._shapes_metrics(model, tok, subset, 32, "cpu", None)  # each part a benchmark of its own
        assert {k: m[f"{part}/{k}"] for k in direct} == direct, part
    assert (
        m["seen/retrieval/t2i_r1"] != m["unseen/retrieval/t2i_r1"]
        or m["seen/probe/relation"] != m["unseen/probe/relation"]
    )
    # without --holdout: the plain keys
    assert set(ev.eval_shapes(model, tok, 32, "cpu", n=40)) == set(direct)


@pytest.mark.slow
def test_the_scripts_and_eval_take_the_flag(tmp_path):
    out = tmp_path / "o"
    r = run(
        [
            "clip_scratch.py",
            "--holdout",
            "combos",
            "--max_steps",
            "2",
            "--batch_size",
            "8",
            "--image_size",
            "32",
            "--eval_n",
            "40",
            "--out_dir",
            str(out),
        ]
    )
    assert r.returncode == 0, r.stderr
    final = [json.loads(line) for line in open(out / "metrics.jsonl")][-1]
    assert final["split"] == "test" and {
        "seen/probe/relation",
        "unseen/probe/relation",
        "seen/statements/acc",
        "unseen/retrieval/t2i_r1",
    } <= set(final)
    assert set(statement_rates(final)) == {
        f"{part}/statements/{k}" for part in ("seen", "unseen") for k in ("acc", "macro_f1")
    } and not vsr_rates(final)
    r = run(
        [
            "eval.py",
            "--model",
            str(out / "ckpt.pt"),
            "--holdout",
            "combos",
            "--eval_n",
            "40",
            "--json",
            str(tmp_path / "m.json"),
        ]
    )
    assert r.returncode == 0, r.stderr
    m = json.load(open(tmp_path / "m.json"))
    assert m["seen/n"] + m["unseen/n"] == 40 and set(statement_rates(m)) == {
        f"{part}/statements/{k}" for part in ("seen", "unseen") for k in ("acc", "macro_f1")
    }
    # the script's final eval, eval.py's and eval_shapes in process agree on every seen/ and unseen/ value
    model, _, tok = load_model(str(out / "ckpt.pt"))
    direct = ev.eval_shapes(model, tok, 32, "cpu", n=40, holdout=True)
    assert {k: m[k] for k in direct} == pytest.approx(direct, abs=1e-6)
    assert {k: final[k] for k in direct if k in final} == pytest.approx(
        {k: v for k, v in direct.items() if k in final}, abs=1e-6
    )
    assert {k for k in direct if k.startswith("unseen/")} <= set(final)
    r = run_here(
        ["clip_hardneg.py", "--data", "coco", "--data_root", "x", "--init", "x", "--holdout", "combos"]
    )
    assert r.returncode == 2 and r.stderr.startswith(
        "error: --holdout: held-out combinations are the shapes world's"
    )
