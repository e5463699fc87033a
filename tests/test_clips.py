"""CLIPS in clip_scratch.py: the four token reductions as properties, the recaption reader, the
dual-caption loss against a naive one, the captioner's attention mask and loss, and the CLI
(2-process DDP, exact resume, open_clip loading, eval.py --caption) on tiny settings."""

import os
import random
import re

import open_clip
import pytest
import torch
import torch.nn.functional as F
from helpers import (
    FIX,
    TINY,
    fixture_copy,
    killed_and_resumed,
    load_weights,
    one_and_two_processes,
    run,
    run_here,
)
from test_clip_scratch import naive_clip_loss

import clip_scratch
import data
import eval as ev
import shapes
from clip_scratch import caption_loss, clip_loss, clips_loss
from eval import load_captioner
from model import CLIP, Captioner, load_model, model_config, param_groups, prefix_lm_mask

RECAP = os.path.join(FIX, "recap")
LONG = (
    "The image shows two shapes on a striped dark background. The pink square is small. The red ring is large. "
    "The pink square is right of the red ring! The red ring is left of the pink square."
)
TOK = data.get_tokenizer(32)


def content(tokens):
    """long [L] -> the ids between SOT and EOT, checking that both sit where they must"""
    tokens = tokens.tolist()
    assert tokens[0] == TOK.sot_token_id
    eot = tokens.index(TOK.eot_token_id)
    assert all(t == 0 for t in tokens[eot + 1 :])  # nothing but padding after the EOT
    return tokens[1:eot]


def is_subsequence(part, whole):
    it = iter(whole)
    return all(any(x == y for y in it) for x in part)


# -----------------------------------------------------------------------------
# token reductions (data.reduce_caption)


def test_reductions_keep_what_they_promise():
    ids, K = TOK.encode(LONG), 16
    assert len(ids) > 30
    starts, picks = set(), set()
    for seed in range(40):
        rng = lambda seed=seed: random.Random(seed)
        trunc = content(data.reduce_caption(LONG, "truncate", K, 32, rng()))
        assert trunc == ids[: K - 2]  # a prefix
        rand = content(data.reduce_caption(LONG, "random", K, 32, rng()))
        assert len(rand) == K - 2 and is_subsequence(rand, ids)  # K - 2 tokens in their original order
        picks.add(tuple(rand))
        block = content(data.reduce_caption(LONG, "block", K, 32, rng()))
        span = [s for s in range(len(ids) - K + 3) if ids[s : s + K - 2] == block]
        assert len(block) == K - 2 and span  # one contiguous span
        starts.add(span[0])
        sub = content(data.reduce_caption(LONG, "subcaption", K, 32, rng()))
        sentences = [TOK.encode(s)[: K - 2] for s in re.split(r"[.!]+", LONG) if s.strip()]
        assert sub in sentences  # exactly one sentence
        assert data.reduce_caption(LONG, "block", K, 32, rng()).equal(
            data.reduce_caption(LONG, "block", K, 32, rng())
        )
    assert len(picks) > 30 and len(starts) > 10  # random really is random, the block start uniform-ish
    assert starts >= {0} and max(starts) <= len(ids) - (K - 2)


@pytest.mark.parametrize("mode", data.CAPTION_MASKS[1:])
def test_reduction_is_a_no_op_when_the_caption_fits(mode):
    short = "a small red circle left of a large blue square."
    reduced = data.reduce_caption(short, mode, 16, 32, random.Random(0))
    assert reduced.equal(TOK([short])[0])  # exactly the tokenizer's output, SOT/EOT in place
    long_ = data.reduce_caption(LONG, mode, 16, 32, random.Random(0))
    assert long_.shape == (32,) and len(content(long_)) <= 14


def test_subcaption_falls_back_to_the_web_caption_and_rejects_unknown_modes():
    no_sentence = " . ! " * 20  # longer than K, but every piece between [.!]+ is blank
    out = data.reduce_caption(no_sentence, "subcaption", 8, 32, random.Random(0), fallback="two dogs")
    assert content(out) == TOK.encode("two dogs")
    with pytest.raises(ValueError, match="unknown caption mask"):
        data.reduce_caption(LONG, "shuffle", 8, 32, random.Random(0))


def padded(tokens, L=32):
    """tokens cut at the batch's longest text (data.trim_tokens) -> the tokenizer's full context L"""
    return F.pad(tokens, (0, L - tokens.shape[-1]))


def clips_args(*argv):
    return clip_scratch.get_args(
        ["--image_size", "32", "--caption_mask", "subcaption", "--mask_len", "16", *argv]
    )


def test_shapes_clips_batch_adds_only_the_synthetic_caption():
    plain, args = shapes.ShapesDataset(32, seed=3), clips_args()
    keys = (0, 5, 123)
    (images, tokens), _ = clip_scratch.make_batch(
        [plain[k] for k in keys], clip_scratch.get_args(["--image_size", "32"])
    )
    (images2, (pair, full)), counts = clip_scratch.make_batch([plain[k] for k in keys], args)
    texts = lambda samples: clip_scratch.make_batch(samples, args)[0][1]  # noqa: E731  (pair, full)
    alone = [texts([plain[k]])[0][0] for k in keys]
    # per-sample randomness: DDP shards reduce as one process would
    assert torch.equal(torch.stack([padded(a) for a in alone]), padded(pair))
    # the web caption is plain CLIP's caption
    assert (
        images.equal(images2)
        and padded(pair[:, 0]).equal(padded(tokens))
        and counts == {"unreadable images": 0}
    )
    for i, key in enumerate(keys):
        s = shapes.sample_scene(shapes.scene_rng("train", 3, key))
        assert plain[key][2] == shapes.description(s)
        # the captioner's target: all of it
        assert full[i].equal(data.get_tokenizer(77)([shapes.description(s)])[0])
        assert len(content(pair[i, 1])) <= 14 and is_subsequence(
            content(pair[i, 1]), TOK.encode(shapes.description(s))
        )
    assert texts([plain[k] for k in keys])[0].equal(pair)  # a resumed run reduces the same way
    other = shapes.ShapesDataset(32, seed=4)
    assert not padded(texts([other[k] for k in keys])[0][:, 1]).equal(padded(pair[:, 1]))  # ... per seed


PHRASE = re.compile(rf"a (?:(small|large) )?(?:({'|'.join(shapes.COLOURS)}) )?({'|'.join(shapes.SHAPES)})")


def claims_hold(caption, s):
    """checks every fact a caption of the form "X [(and | <relation>) X] [on a <bg> background]"
    states against the scene (shapes are distinct within a scene, so a shape names its object)
    -> how many of the 8 facts of a full caption (2 sizes, 2 colours, 2 shapes, relation,
    background) it leaves out"""
    by_shape = {o.shape: (i, o) for i, o in enumerate(s.objs)}
    phrases = PHRASE.findall(caption)
    form = PHRASE.sub("X", caption)
    assert re.fullmatch(
        rf"X(?: (?:and|{'|'.join(shapes.CONVERSE)}) X)?(?: on a {s.background} background)?", form
    ), (caption, s)
    for size, colour, shape in phrases:
        o = by_shape[shape][1]
        assert size in ("", o.size) and colour in ("", o.colour), (caption, s)
    rel = [r for r in shapes.CONVERSE if f" {r} " in caption]
    if rel:  # "A rel B": objs[0] is left of / above objs[1]
        (i, _), (j, _) = by_shape[phrases[0][2]], by_shape[phrases[1][2]]
        assert rel[0] == shapes.RELATIONS[s.axis][i] and i != j, (caption, s)
    stated = sum(bool(x) for p in phrases for x in p) + bool(rel) + ("background" in caption)
    return 8 - stated


def test_partial_captions_are_true_terse_and_varied():
    forms = set()
    for i in range(300):
        s = shapes.sample_scene(shapes.scene_rng("train", 0, i))
        caption = shapes.partial_caption(s, random.Random(i))
        assert claims_hold(s.caption(), s) == 0  # the checker accepts the full caption, all 8 facts
        assert claims_hold(caption, s) >= 3  # true, and at least 3 of the 8 facts left out
        forms.add(re.sub(r"\w+", "w", PHRASE.sub("X", caption)))
    assert len(forms) == 3  # every template is used


def test_shapes_partial_web_captions_in_the_dataset():
    full = shapes.ShapesDataset(32, seed=3)
    noisy = shapes.ShapesDataset(32, seed=3, caption_style="partial")
    clean = shapes.ShapesDataset(32, seed=3, swap_noise=0.0, caption_style="partial")
    swapped, coloured = 0, 0
    for key in range(60):
        s = shapes.sample_scene(shapes.scene_rng("train", 3, key))
        image, text, synthetic, _ = noisy[key]
        image2, text2, _, _ = clean[key]
        assert image.equal(full[key][0]) and image.equal(image2)  # same scenes; only the caption differs
        assert claims_hold(text2, s) >= 3
        assert synthetic == shapes.description(s)  # the synthetic caption is complete
        # a caption naming colours: the noisy one is true or exactly colour-swapped
        if PHRASE.search(text).group(2):
            coloured += 1
            try:
                claims_hold(text, s)
            except AssertionError:
                claims_hold(text, shapes.swap_colours(s))
                swapped += 1
    assert 0.25 < swapped / coloured < 0.75  # swap_noise 0.5 applies to the partial captions too
    with pytest.raises(ValueError, match="caption_style"):
        shapes.ShapesDataset(32, caption_style="short")
    cli, _, _ = clip_scratch.make_data(
        clip_scratch.get_args(["--caption_style", "partial", "--seed", "3", "--image_size", "32"]), 0, 1
    )
    assert all(cli[key][1] == noisy[key][1] for key in range(10))  # the flag reaches the dataset


def test_shapes_vocab_covers_every_text_of_the_world():
    vocab, tok = set(shapes.shapes_vocab()), data.get_tokenizer(77)
    for i in range(300):
        s = shapes.sample_scene(shapes.scene_rng("train", 0, i))
        texts = [
            s.caption(),
            shapes.description(s),
            *(f(s) for f in shapes.NEGATIVES.values()),
            *(t for t, _ in shapes.statements(s)),
        ]
        for t in texts:
            assert set(tok.encode(t)) <= vocab, t


# -----------------------------------------------------------------------------
# recaption files and real data


def test_read_recap_jsonl_and_csv_with_column_flags(capsys):
    j = data.read_recap(os.path.join(RECAP, "recap.jsonl"))
    c = data.read_recap(os.path.join(RECAP, "recap.csv"), "filepath", "org_caption", "re_caption")
    assert j == c and [len(j[s]) for s in data.SPLITS] == [4, 1, 1]
    by_name = {os.path.basename(p): (caps, syn) for items in j.values() for p, caps, syn in items}
    assert by_name["00005.jpg"][0] == ["climber, rock"]  # the quoted comma survives
    assert by_name["00004.jpg"][1].startswith('A man wearing an orange hat holds a sign that reads "stop".')
    assert all(os.path.isabs(p) and os.path.isfile(p) for items in j.values() for p, *_ in items)
    assert (
        data.read_dataset(
            "recap", os.path.join(RECAP, "recap.csv"), ("filepath", "org_caption", "re_caption")
        )
        == j
    )


def test_read_recap_errors_and_skips(tmp_path, capsys):
    root = fixture_copy(tmp_path, "recap")
    with pytest.raises(data.DataError, match=r"recap.csv:1: no column --caption_key caption"):
        data.read_recap(str(root / "recap.csv"), "filepath", "caption")
    lines = open(root / "recap.jsonl").read().splitlines()
    with open(root / "bad.jsonl", "w") as f:
        f.write("\n".join(lines[:2] + ['{"image": "images/00006.jpg", "caption": "x"'] + lines[3:]))
    with pytest.raises(data.DataError, match=r"bad.jsonl:3: malformed JSON"):
        data.read_recap(str(root / "bad.jsonl"))
    with open(root / "bad.jsonl", "w") as f:
        f.write("\n".join(lines[:1] + ['{"image": "images/00002.jpg", "caption": "two dogs"}']))
    with pytest.raises(data.DataError, match=r"bad.jsonl:2: no text field 're_caption' \(--recap_key"):
        data.read_recap(str(root / "bad.jsonl"))
    os.remove(root / "images" / "00002.jpg")
    with open(root / "recap.jsonl", "a") as f:
        f.write(lines[0] + "\n")  # a repeated image
    splits = data.read_recap(str(root / "recap.jsonl"))
    assert sum(map(len, splits.values())) == 5
    assert (
        "skipped 2 row(s) with a missing or repeated image: images/00002.jpg, images/00001.jpg"
        in capsys.readouterr().out
    )
    with pytest.raises(data.DataError, match="must be \\*.csv or \\*.jsonl"):
        data.read_recap(str(root / "images"))


def test_image_text_dataset_synthetic_caption(tmp_path):
    items = data.read_recap(os.path.join(RECAP, "recap.jsonl"))["train"]
    ds = data.ImageTextDataset(items, 32)
    (_, (pair, full)), _ = clip_scratch.make_batch(
        [ds[1]], clips_args("--mask_len", "12", "--captioner_len", "40")
    )
    web, synthetic = items[1][1][0], items[1][2]
    assert ds[1][1:3] == (web, synthetic)
    assert padded(pair[0, 0]).equal(TOK([web])[0]) and full[0].equal(data.get_tokenizer(40)([synthetic])[0])
    assert content(pair[0, 1]) in [TOK.encode(s)[:10] for s in re.split(r"[.!]+", synthetic) if s.strip()]
    # coco / flickr8k without a recaption file: the image's other captions, joined, are the synthetic caption
    five = [("x.jpg", ["a dog runs.", "a brown dog", "dog on grass", "a dog plays", "the dog is running"])]
    ds = data.ImageTextDataset(five, 32)
    web = ds.caption(0)
    others = [c.rstrip(" .") for c in five[0][1] if c != web]
    assert ds.synthetic(0, web) == ". ".join(others) + "."


# -----------------------------------------------------------------------------
# the losses


def test_clips_loss_is_half_web_plus_half_synthetic():
    torch.manual_seed(0)
    v, web, syn = (F.normalize(torch.randn(6, 5, dtype=torch.float64), dim=-1) for _ in range(3))
    loss, acc = clips_loss(v, torch.cat([web, syn]), torch.tensor(11.0, dtype=torch.float64))
    naive = 0.5 * naive_clip_loss(v, web, 11.0) + 0.5 * naive_clip_loss(v, syn, 11.0)
    torch.testing.assert_close(loss.double(), naive.double(), atol=1e-6, rtol=0)
    assert acc == clip_loss(v, web, torch.tensor(11.0))[1]  # accuracy is the web caption's


def test_caption_loss_ignores_padding_and_maps_the_vocab():
    torch.manual_seed(0)
    sot, eot = TOK.sot_token_id, TOK.eot_token_id
    caption = torch.tensor(
        [
            [sot, 5, 0, 7, eot, 0, 0, 0],  # 0 is the real token "!" before the EOT
            [sot, 9, eot, 0, 0, 0, 0, 0],
        ]
    )
    logits = torch.randn(2, 7, 49408, dtype=torch.float64)
    naive, n = 0.0, 0
    for b in range(2):
        for q in range(7):
            # query q predicts token q + 1, up to and including the EOT
            if q < caption[b].tolist().index(eot):
                naive, n = naive - torch.log_softmax(logits[b, q], 0)[caption[b, q + 1]], n + 1
    assert n == 4 + 2
    loss = caption_loss(logits, caption)
    torch.testing.assert_close(loss.double(), naive / n, atol=1e-5, rtol=0)  # computed in fp32
    logits2 = logits.clone()
    logits2[0, 4:], logits2[1, 2:] = 1e3, -1e3  # padding positions: nothing changes
    assert caption_loss(logits2, caption) == loss
    # a vocab subset == the full softmax with every other token at -inf
    vocab = torch.tensor(sorted({0, 5, 7, 9, 11, sot, eot}))
    full = torch.full_like(logits, float("-inf"))
    full[..., vocab] = logits[..., vocab]
    torch.testing.assert_close(caption_loss(logits[..., vocab], caption, vocab), caption_loss(full, caption))
    with pytest.raises(ValueError, match="outside the captioner's vocab"):
        caption_loss(logits[..., vocab[:-3]], caption, vocab[:-3])


# -----------------------------------------------------------------------------
# the captioner


def test_prefix_lm_mask_against_the_rule():
    valid = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1]], dtype=torch.bool)
    P, Q = 4, 3
    mask = prefix_lm_mask(valid, Q)
    assert mask.shape == (2, 1, P + Q, P + Q)
    for b in range(2):
        for i in range(P + Q):
            for j in range(P + Q):
                if j < P:
                    want = bool(valid[b, j])  # every valid prefix token, from everywhere
                else:
                    want = i >= P and j <= i  # queries: only from queries, and causally
                assert bool(mask[b, 0, i, j]) == want, (b, i, j)


def test_captioner_queries_see_only_the_prefix_and_earlier_queries():
    torch.manual_seed(0)
    cap = Captioner(
        vision_width=8, text_width=6, width=16, layers=2, heads=2, n_query=5, vocab_size=30
    ).double()
    img = torch.randn(2, 4, 8, dtype=torch.float64, requires_grad=True)
    txt = torch.randn(2, 3, 6, dtype=torch.float64, requires_grad=True)
    ids = torch.tensor([[5, 49407, 0], [5, 6, 49407]])  # the web captions' token ids: EOT at 1 and 2
    valid = torch.tensor([[1, 1, 0], [1, 1, 1]], dtype=torch.bool)
    q = 2
    cap(img, txt, ids)[:, q].sum().backward()
    # no later query leaks in
    assert (cap.queries.grad[q + 1 :] == 0).all() and (cap.queries.grad[: q + 1] != 0).any()
    # padding in the web caption is invisible
    assert (txt.grad[0, 2] == 0).all() and (txt.grad[1, 2] != 0).any()
    # prefix never attends to queries: the prefix's hidden states do not depend on them
    blocks = cap.transformer.resblocks
    x = torch.cat([cap.image_proj(img), cap.text_proj(txt), cap.queries.expand(2, -1, -1)], 1).detach()
    mask = prefix_lm_mask(torch.cat([valid.new_ones(2, 4), valid], 1), 5)
    y1 = blocks[0](x, mask=mask)
    x2 = x.clone()
    x2[:, -5:] += 100
    assert torch.equal(blocks[0](x2, mask=mask)[:, :7], y1[:, :7])


def test_captioner_ignores_web_caption_padding():
    """the captioner's output for an image does not depend on the other captions in the batch,
    although they set how many text positions (padding included) the text tower runs"""
    torch.manual_seed(0)
    model = clip_scratch.CLIPWithCaptioner(
        CLIP(**model_config("tiny", 32, 32)),
        Captioner(128, 128, 128, 1, 4, n_query=6, vocab=shapes.shapes_vocab()),
    ).eval()
    images = torch.randn(2, 3, 32, 32)
    short, long_ = (
        TOK(["a red circle"]),
        TOK(["a small red circle left of a large blue square on a dotted background"]),
    )
    logits = []
    model.captioner.register_forward_hook(lambda m, i, out: logits.append(out))
    target = data.get_tokenizer(7)(["a red circle", "a ring"])
    with torch.no_grad():
        model(images[:1], torch.stack([short, short], 1), target[:1])
        # [B, 2, L]: the web caption and the synthetic one; the second image's long caption pads the first
        model(images, torch.stack([torch.cat([short, long_]), torch.cat([long_, long_])], 1), target)
    assert logits[1].shape[1] == 6 and logits[1].shape[2] == len(shapes.shapes_vocab())
    torch.testing.assert_close(logits[1][:1], logits[0], atol=1e-5, rtol=0)


def test_param_groups_give_the_captioner_the_full_lr():
    clip, captioner = CLIP(**model_config("tiny", 32, 32)), Captioner(128, 128, 128, 1, 4, 7, vocab=[1, 2, 3])
    names = {id(p): n for n, p in clip.named_parameters()}
    for g in param_groups(clip, 0.1, text_lr_mult=0.1):
        for p in g["params"]:
            n = names[id(p)]
            assert g["lr_mult"] == (1.0 if n.startswith("visual.") or n == "logit_scale" else 0.1), n
    groups = param_groups(captioner, 0.1)
    assert all(g["lr_mult"] == 1.0 for g in groups)
    assert sum(len(g["params"]) for g in groups) == len(list(captioner.parameters()))


# -----------------------------------------------------------------------------
# the CLI

CLIPS = [
    "--caption_mask",
    "subcaption",
    "--mask_len",
    "16",
    "--captioner_weight",
    "2",
    "--captioner_len",
    "70",
]


@pytest.mark.slow
def test_torchrun_two_processes_equal_one_with_dual_loss_and_captioner(tmp_path):
    common = [
        "--max_steps",
        "3",
        "--image_size",
        "32",
        "--eval_every",
        "0",
        "--eval_n",
        "20",
        "--warmup_steps",
        "1",
        *CLIPS,
    ]
    single, a, b = one_and_two_processes(tmp_path, "clip_scratch.py", 8, common)
    assert "caption loss" in single.stdout
    assert a["captioner"] and set(a["captioner"]) == set(b["captioner"])
    for part in ("model", "captioner"):
        for k in a[part]:
            assert torch.allclose(a[part][k], b[part][k], atol=2e-5), k


@pytest.mark.slow
def test_resume_after_sigkill_is_exact_with_captioner(tmp_path):
    _, a, b = killed_and_resumed(
        tmp_path, ["clip_scratch.py", "--max_steps", "8", "--ckpt_every", "2", *TINY, *CLIPS]
    )
    for part in ("model", "captioner"):
        for k in a[part]:
            assert torch.equal(a[part][k], b[part][k]), k
    for k, v in a["optimizer"]["state"].items():  # the captioner's adam moments too
        assert torch.equal(v["exp_avg"], b["optimizer"]["state"][k]["exp_avg"])


@pytest.mark.slow
def test_captioner_checkpoint_loads_into_open_clip_and_captions(tmp_path):
    r = run(
        [
            "clip_scratch.py",
            "--max_steps",
            "2",
            "--export",
            str(tmp_path / "hub"),
            "--out_dir",
            str(tmp_path),
            *TINY,
            *CLIPS,
        ]
    )
    assert r.returncode == 0, r.stderr
    ckpt = load_weights(tmp_path)
    captioner = Captioner(**ckpt["captioner_cfg"]).eval()
    captioner.load_state_dict(ckpt["captioner"], strict=True)  # two state dicts, no key prefixes
    theirs = open_clip.CLIP(**ckpt["model_cfg"]).eval()
    theirs.load_state_dict(ckpt["model"], strict=True)  # the towers, as always
    ours, _, tokenizer = load_model(str(tmp_path / "ckpt.pt"))
    hub, _, _ = open_clip.create_model_and_transforms(f"local-dir:{tmp_path / 'hub'}")
    images, tokens = torch.randn(2, 3, 32, 32), tokenizer(["a small red circle", "a ring"])
    with torch.no_grad():
        for other in (theirs, hub.eval()):
            torch.testing.assert_close(
                ours.encode_image(images), other.encode_image(images), atol=1e-5, rtol=0
            )
            torch.testing.assert_close(ours.encode_text(tokens), other.encode_text(tokens), atol=1e-5, rtol=0)
    # eval.py --caption: the greedy caption is the per-position argmax, cut at the first EOT
    scene = shapes.test_scenes(4)[3]
    image = data.to_tensor(shapes.render(scene, 32))
    web = tokenizer([scene.caption()])
    with torch.no_grad():
        logits = captioner(
            ours.encode_image(image[None], return_tokens=True)[1],
            ours.encode_text(web, return_tokens=True)[1],
            web,
        )
    ids = captioner.vocab[logits[0].argmax(-1)].tolist()
    ids = ids[: ids.index(tokenizer.eot_token_id)] if tokenizer.eot_token_id in ids else ids
    want = tokenizer.decode(ids).strip()
    assert (
        ev.generate_caption(
            ours, load_captioner(str(tmp_path / "ckpt.pt")), image, scene.caption(), tokenizer
        )
        == want
    )
    out = run_here(["eval.py", "--model", str(tmp_path / "ckpt.pt"), "--caption", "3"])
    assert out.returncode == 0, out.stderr
    assert f"caption:     {want}" in out.stdout and shapes.description(scene) in out.stdout
    plain = run_here(["eval.py", "--model", str(tmp_path / "ckpt.pt"), "--caption", "nowhere.jpg"])
    assert plain.returncode != 0 and "nowhere.jpg" in plain.stderr and "Traceback" not in plain.stderr


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--caption_mask", "block", "--mask_len", "40"], "--mask_len 40"),
        (["--captioner_weight", "2"], "--captioner_weight needs"),
        (["--caption_mask", "sentence"], "--caption_mask"),
        (["--data", "recap", "--data_root", os.path.join(RECAP, "recap.csv")], "--image_key image"),
    ],
)
def test_bad_clips_flags_give_one_clear_error(argv, message, tmp_path):
    r = run_here(["clip_scratch.py", *argv, "--max_steps", "1", "--out_dir", str(tmp_path)])
    assert r.returncode != 0
    assert message in r.stderr and "Traceback" not in r.stderr, r.stderr


@pytest.mark.slow
def test_recap_and_flickr8k_cli_end_to_end(tmp_path):
    for argv in (
        [
            "--data",
            "recap",
            "--data_root",
            os.path.join(RECAP, "recap.jsonl"),
            "--caption_mask",
            "block",
            "--captioner_weight",
            "2",
        ],
        [
            "--data",
            "flickr8k",
            "--data_root",
            os.path.join(FIX, "flickr8k_kaggle"),
            "--caption_mask",
            "subcaption",
        ],
    ):
        r = run(
            [
                "clip_scratch.py",
                *argv,
                "--batch_size",
                "4",
                "--max_steps",
                "2",
                "--log_every",
                "1",
                "--image_size",
                "32",
                "--eval_every",
                "0",
                "--workers",
                "0",
                "--out_dir",
                str(tmp_path / argv[1]),
            ]
        )
        assert r.returncode == 0, r.stderr
        assert "eval test step 2" in r.stdout and "retrieval/t2i_r1" in r.stdout
