"""The shapes world: determinism, exactness of negatives and twins, and the rendered pixels."""

import numpy as np
import pytest
import torch

import data
import shapes
from shapes import COLOURS, SIZES

SCENES = shapes.test_scenes(200)


def pixel(img, o, dx=0.0):
    size = img.shape[0]
    return tuple(img[int(o.y * size), int((o.x + dx * SIZES[o.size]) * size)])


def test_deterministic_and_train_test_streams_disjoint():
    a = shapes.sample_scene(shapes.scene_rng("train", 0, 7))
    assert a == shapes.sample_scene(shapes.scene_rng("train", 0, 7))
    assert a != shapes.sample_scene(shapes.scene_rng("test", 0, 7))
    assert a != shapes.sample_scene(shapes.scene_rng("train", 1, 7))
    assert shapes.test_scenes(50) == SCENES[:50]
    assert shapes.test_scenes(50, seed=5) != SCENES[:50]


def test_test_scenes_have_unique_content_and_captions():
    scenes = shapes.test_scenes(1000)
    assert len({s.key() for s in scenes}) == len({s.caption() for s in scenes}) == 1000


@pytest.mark.parametrize("kind", list(shapes.NEGATIVES))
def test_every_negative_differs_from_the_caption(kind):
    for s in SCENES:
        neg = shapes.NEGATIVES[kind](s)
        assert neg != s.caption()
        # the swap and the shuffle keep the caption's bag of words (a bag-of-words model cannot tell
        # them apart); the relation flip and the replacements change a word
        assert (sorted(neg.split()) == sorted(s.caption().split())) == (
            kind in ("attribute_swap", "word_order")
        )


def test_negatives_are_exact_edits():
    for s in SCENES:
        cap, words = s.caption(), s.caption().split()
        rel = shapes.relation_flip(s)
        assert rel == cap.replace(s.relation(), shapes.CONVERSE[s.relation()], 1)
        a, b = s.objs
        # whole words: "red" is in "checkered"
        swapped = [{a.colour: b.colour, b.colour: a.colour}.get(w, w) for w in words]
        assert shapes.attribute_swap(s) == " ".join(swapped)
        assert sorted(shapes.word_shuffle(s).split()) == sorted(words)
        new_colours = set(shapes.colour_replace(s).split()) - set(words)
        assert len(new_colours) == 1 and new_colours <= set(COLOURS)
        new_shapes = set(shapes.shape_replace(s).split()) - set(words)
        assert len(new_shapes) == 1 and new_shapes <= set(shapes.SHAPES)


def test_twins_render_the_negative_caption():
    for s in SCENES[:50]:
        m, w = shapes.mirror(s), shapes.swap_colours(s)
        assert m.caption() == shapes.relation_flip(s) and w.caption() == shapes.attribute_swap(s)
        img, img_m, img_w = shapes.render(s, 64), shapes.render(m, 64), shapes.render(w, 64)
        for o, om, ow in zip(s.objs, m.objs, w.objs):
            ring = 0.8 if o.shape == "ring" else 0.0  # a ring's centre is background
            assert pixel(img, o, ring) == COLOURS[o.colour]
            assert (om.x, om.y) == (o.x, o.y)  # a mirror keeps the positions and exchanges the objects
            assert pixel(img_m, om, 0.8 if om.shape == "ring" else 0.0) == COLOURS[om.colour]
            assert pixel(img_w, ow, ring) == COLOURS[ow.colour] and ow.colour != o.colour
        assert {o.shape for o in m.objs} == {o.shape for o in s.objs} and m.objs[0] == shapes.Obj(
            **{**s.objs[1].__dict__, "x": s.objs[0].x, "y": s.objs[0].y}
        )
        # the relation stays true of the rendered geometry
        first, second = m.objs
        assert (first.x < second.x) if m.axis == "h" else (first.y < second.y)


def test_statements_and_description():
    tok = data.get_tokenizer(1000)
    for s in SCENES[:50]:
        (t_true, l_true), (t_false, l_false) = shapes.statements(s)
        assert l_true and not l_false and s.relation() in t_true and shapes.CONVERSE[s.relation()] in t_false
        d = shapes.description(s)
        assert d.count(". ") >= 5 and s.objs[0].colour in d and s.background in d
        assert int((tok([d])[0] > 0).sum()) > 32  # longer than the shapes text context


def test_dataset_is_deterministic_and_noise_swaps_only_the_caption():
    clean, noisy = shapes.ShapesDataset(64, swap_noise=0.0), shapes.ShapesDataset(64, swap_noise=1.0)
    for key in (0, 5, 123456789):
        s = shapes.sample_scene(shapes.scene_rng("train", 0, key))
        img, caption, synthetic, _ = clean[key]
        img2, caption2, synthetic2, _ = noisy[key]
        assert torch.equal(img, img2) and torch.equal(img, clean[key][0])
        assert caption == s.caption() and caption2 == shapes.attribute_swap(s)
        assert synthetic == synthetic2 == shapes.description(s)  # the description is never noisy
    assert img.shape == (3, 64, 64) and abs(float(img.mean())) < 3


def naive_render(s, size):
    """every pixel of the canvas tested against every shape (what shapes.render draws inside boxes)"""
    canvas, yy, xx = shapes._canvas(s.background, size)
    img = canvas.copy()
    for o in s.objs:
        r = shapes.SIZES[o.size] * size
        img[shapes._mask(o.shape, (xx - o.x * size) / r, (yy - o.y * size) / r)] = COLOURS[o.colour]
    return img.astype(np.uint8)


def test_render_equals_the_naive_full_canvas_render():
    for size in (32, 64, 97):
        for s in SCENES[:300]:
            assert np.array_equal(shapes.render(s, size), naive_render(s, size)), (size, s)
