"""
The shapes world: minclip's built-in dataset and benchmark, no files and no download.

Procedural scenes of two objects (shape, colour, size) on a textured dark background, one
spatial relation between them, deterministic per (split, seed, index). One Scene record gives:
- the image (render) and its caption ("a small red circle left of a large blue square");
- exact hard-negative captions (NEGATIVES: the relation flipped, the two colours swapped, ...);
- twin scenes, the hard-negative *images* (mirror: the objects exchange places; swap_colours);
- a long always-true description (the CLIPS synthetic caption) and a terse partial caption;
- VSR-style true/false statements ("The red circle is left of the blue square.").
ShapesDataset is clip_scratch.py's training stream; eval.eval_shapes is the benchmark on
test_scenes (a fixed seed, a different random stream from training). bench/LOG.md (2026-11-23) has
the calibration behind these choices (colour misbinding, sizes, backgrounds).
"""

import functools
import random
import re
from dataclasses import dataclass, replace

import numpy as np
import torch

from data import get_tokenizer, to_tensor

COLOURS = {
    "red": (220, 40, 40),
    "green": (40, 180, 60),
    "blue": (50, 90, 230),
    "yellow": (235, 215, 50),
    "purple": (150, 60, 200),
    "orange": (245, 140, 30),
    "white": (240, 240, 240),
    "cyan": (60, 210, 220),
    "pink": (250, 140, 200),
    "brown": (150, 95, 45),
}
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


def training_scene(split, seed, key, held=None, negatives=()):
    """scene `key` of a training stream -> (scene, its rng, which the dataset goes on drawing from).
    With held (holdout_combos()), the stream's first scene that is trainable(s, held, negatives)."""
    rng = scene_rng(split, seed, key)
    s = sample_scene(rng)
    while held is not None and not trainable(s, held, negatives):
        s = sample_scene(rng)
    return s, rng


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


NEGATIVES = {
    "relation": relation_flip,
    "attribute_swap": attribute_swap,
    "colour_replace": colour_replace,
    "shape_replace": shape_replace,
    "word_order": word_shuffle,
}


# the systematic-generalisation split (--holdout combos): some colour-shape pairs and some
# (shape, relation, shape) triples never appear in training, in any text or image; test scenes that
# show one are "unseen", the others "seen". Does a fix compose, or memorise the combinations?
HOLDOUT_SEED, HOLDOUT_SHARE = 4321, 0.15
_PAIR = re.compile(rf"\b({'|'.join(COLOURS)}) ({'|'.join(SHAPES)})\b")
_TRIPLE = re.compile(
    rf"\b({'|'.join(SHAPES)}) (?:is )?({'|'.join(CONVERSE)}) (?:a|the) (?:(?:{'|'.join(SIZES)}) )?"
    rf"(?:(?:{'|'.join(COLOURS)}) )?({'|'.join(SHAPES)})\b"
)


@functools.lru_cache(maxsize=4)
def holdout_combos(seed=HOLDOUT_SEED, share=HOLDOUT_SHARE):
    """(held-out (colour, shape) pairs, held-out (shape, relation, shape) triples): a fixed share of
    each, drawn by a seeded stream, the same in every process and run"""
    rng = random.Random(f"holdout-{seed}")
    pairs = [(c, s) for c in COLOURS for s in SHAPES]
    triples = [(a, r, b) for a in SHAPES for r in CONVERSE for b in SHAPES if a != b]
    return frozenset(rng.sample(pairs, round(share * len(pairs)))), frozenset(
        rng.sample(triples, round(share * len(triples)))
    )


def combos(s):
    """the colour-shape pairs and (shape, relation, shape) triples scene s shows (each relation read both ways)"""
    a, b = s.objs[s.subj], s.objs[1 - s.subj]
    r = s.relation()
    return {(o.colour, o.shape) for o in s.objs}, {(a.shape, r, b.shape), (b.shape, CONVERSE[r], a.shape)}


def text_combos(text):
    """the colour-shape pairs and triples a text states, read off its words"""
    return set(_PAIR.findall(text)), set(_TRIPLE.findall(text))


def unseen(s, held):
    """s shows a held-out combination"""
    pairs, triples = combos(s)
    return bool(pairs & held[0] or triples & held[1])


def trainable(s, held, negatives=()):
    """no text or image a training stream makes of s shows a held-out combination: s and its twins
    (their captions, statements, descriptions and partial captions state nothing else), and the
    hard negatives of `negatives` (NEGATIVES keys) besides the twins' (relation, attribute_swap)"""
    twins = (s, mirror(s), swap_colours(s), mirror(swap_colours(s)))
    extra = [
        _replace_one(x, k, list(COLOURS) if k == "colour" else SHAPES)
        for x in twins
        for k, kind in (("colour", "colour_replace"), ("shape", "shape_replace"))
        if kind in negatives
    ]
    if any(unseen(x, held) for x in (*twins, *extra)):
        return False
    shuffled = [text_combos(word_shuffle(x)) for x in twins] if "word_order" in negatives else []
    return not any(pairs & held[0] or triples & held[1] for pairs, triples in shuffled)


def description(s):
    """a long, multi-sentence description (the CLIPS "synthetic caption"), longer than the text
    context: every fact of the scene, one per sentence."""
    a, b = s.objs[s.subj], s.objs[1 - s.subj]
    where = {
        "left of": "on the left",
        "right of": "on the right",
        "above": "at the top",
        "below": "at the bottom",
    }
    return (
        f"The image shows two shapes on a {s.background} dark background. "
        f"{a.name().capitalize()} is {a.size}. {b.name().capitalize()} is {b.size}. "
        f"{a.name().capitalize()} is {s.relation()} {b.name()}. {b.name().capitalize()} is {CONVERSE[s.relation()]} {a.name()}. "
        f"{a.name().capitalize()} is {where[s.relation()]} and {b.name()} is {where[CONVERSE[s.relation()]]}."
    )


def partial_caption(s, rng):
    """a terse, partial caption of the scene, like web alt-text (--caption_style partial): one of three
    templates, each true of `s` and each leaving facts out (always the sizes or the second object;
    then the relation and background, or the colours and background). description(s) has them all."""
    a, b = s.objs[s.subj], s.objs[1 - s.subj]
    return rng.choice(
        [
            f"a {a.colour} {a.shape} and a {b.colour} {b.shape}",
            f"a {a.shape} {s.relation()} a {b.shape}",
            f"a {a.size} {a.colour} {a.shape} on a {s.background} background",
        ]
    )


def shapes_vocab():
    """the sorted token ids of every word the world's texts use (captions, negatives, descriptions,
    statements) + SOT/EOT: the captioner's output vocabulary on the shapes world"""
    words = [
        *COLOURS,
        *SHAPES,
        *SIZES,
        *BACKGROUNDS,
        *CONVERSE,
        "a the an on is and image shows two shapes of dark background",
        "at top bottom left right",
        ". ,",
    ]
    tokenizer = get_tokenizer()
    return sorted(set(tokenizer.encode(" ".join(words))) | {tokenizer.sot_token_id, tokenizer.eot_token_id})


def statements(s):
    """true/false spatial statements in VSR's form "The <subj> is <relation> the <obj>." ->
    [(text, label)]: the caption's relation (True) and its converse (False)."""
    a, b = s.objs[s.subj], s.objs[1 - s.subj]
    return [
        (f"The {a.colour} {a.shape} is {r} the {b.colour} {b.shape}.", r == s.relation())
        for r in (s.relation(), CONVERSE[s.relation()])
    ]


@functools.lru_cache(maxsize=16)
def _canvas(background, size):
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    texture = {
        "plain": np.zeros_like(xx),
        "striped": ((xx + yy) // 4) % 2,
        "dotted": (xx % 6 < 2) & (yy % 6 < 2),
        "checkered": (xx // 8 + yy // 8) % 2,
    }[background]
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
    round (bench/LOG.md, 2026-11-23, has why 0.5). caption_style="partial" makes them terse as well:
    partial_caption() of the (possibly colour-swapped) scene. The synthetic caption (CLIPS) is the
    scene's description(), always true and complete."""

    def __init__(self, image_size, seed=0, swap_noise=0.5, caption_style="full", held=None):
        if caption_style not in CAPTION_STYLES:
            raise ValueError(f"caption_style={caption_style!r}: expected one of {CAPTION_STYLES}")
        self.image_size, self.seed, self.swap_noise, self.caption_style = (
            image_size,
            seed,
            swap_noise,
            caption_style,
        )
        self.held = held  # holdout_combos() or None

    def __len__(self):
        return 2**62

    def __getitem__(self, key):
        s, rng = training_scene("train", self.seed, key, self.held)
        shown = swap_colours(s) if rng.random() < self.swap_noise else s  # what the caption claims
        caption = shown.caption() if self.caption_style == "full" else partial_caption(shown, rng)
        return to_tensor(render(s, self.image_size)), caption, description(s), rng
