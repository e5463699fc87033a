"""eval.py: metrics on hand-computed cases, benchmarks on models whose embeddings we control,
open_clip round trips (checkpoint, hub directory), and the CLI end to end."""

import argparse
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from helpers import FIX, fixture_copy, tiny_ckpt  # noqa: E402

import data  # noqa: E402
import eval as ev  # noqa: E402
import model  # noqa: E402
import shapes
from model import CLIP, export_open_clip, load_checkpoint, load_model, model_config  # noqa: E402

EXPECTED_KEYS = [
    "retrieval/i2t_r1",
    "retrieval/i2t_r5",
    "retrieval/t2i_r1",
    "retrieval/t2i_r5",
    "probe/relation",
    "probe/attribute_swap",
    "diag/relation_text_cos",
]

# -----------------------------------------------------------------------------
# metrics


def naive_ranks(sim, text_to_image):
    """loop reference: rank = wrong items scoring >= the right one (ties against the model)."""
    n_img, n_txt = sim.shape
    t2i = [
        sum(sim[j, t] >= sim[text_to_image[t], t] for j in range(n_img) if j != text_to_image[t])
        for t in range(n_txt)
    ]
    i2t = []
    for i in range(n_img):
        own = [t for t in range(n_txt) if text_to_image[t] == i]
        if not own:  # no caption: its best is -inf, every text scores above it
            i2t.append(n_txt)
            continue
        i2t.append(
            min(sum(sim[i, u] >= sim[i, t] for u in range(n_txt) if text_to_image[u] != i) for t in own)
        )
    return i2t, t2i


def metrics_of(sim, text_to_image, **kw):
    """retrieval_metrics of a given score matrix: features sim and the identity (sim @ I == sim exactly)"""
    return ev.retrieval_metrics(sim, torch.eye(sim.shape[1]), text_to_image, **kw)


def test_retrieval_metrics_hand_computed():
    # 3 images x 5 captions: captions 0-4 describe image 0, 5-9 image 1, 10-14 image 2
    sim = torch.tensor(
        [
            # c0  c1  c2  c3  c4 | c5  c6  c7  c8  c9 | c10 c11 c12 c13 c14
            # image 0: best own 90 tops the row -> rank 0
            [90, 80, 50, 20, 70, 45, 19, 22, 36, 31, 5, 40, 42, 43, 2],
            # image 1: best own is c6 (55), not c5; 60, 61, 58 above -> rank 3
            [10, 12, 60, 61, 15, 40, 55, 50, 35, 30, 6, 41, 58, 3, 1],
            # image 2: best own 15; 62 37 30 24 23 21 16 above -> rank 7
            [11, 13, 14, 62, 16, 30, 21, 23, 37, 24, 15, 9, 8, 7, 12],
        ],
        dtype=torch.float,
    )
    t2i = torch.arange(15) // 5
    # text->image rank per column (other images above the true one)
    t2i_ranks = [0, 0, 1, 2, 0, 1, 0, 0, 2, 1, 0, 2, 2, 1, 0]
    assert naive_ranks(sim, t2i) == ([0, 3, 7], t2i_ranks)
    m = metrics_of(sim, t2i)
    assert m["retrieval/i2t_r1"] == pytest.approx(1 / 3)
    assert m["retrieval/i2t_r5"] == pytest.approx(2 / 3)
    assert m["retrieval/i2t_r10"] == 1.0
    # median of ranks 0, 3, 7 is 3, 1-based 4 (first caption only would give 5)
    assert m["retrieval/i2t_medr"] == 4
    assert m["retrieval/t2i_r1"] == pytest.approx(7 / 15)
    assert m["retrieval/t2i_r5"] == 1.0 and m["retrieval/t2i_r10"] == 1.0
    assert m["retrieval/t2i_medr"] == 2  # sorted ranks: 7 zeros, 4 ones, 4 twos; the 8th is 1
    assert m["retrieval/rsum"] == pytest.approx(100 * (1 / 3 + 2 / 3 + 1 + 7 / 15 + 1 + 1))


def test_retrieval_metrics_ties_count_against_the_model():
    # a collapsed model (all scores equal) must not look perfect
    m = metrics_of(torch.ones(2, 2), torch.tensor([0, 1]))
    assert m["retrieval/i2t_r1"] == 0 and m["retrieval/t2i_r1"] == 0
    assert m["retrieval/i2t_medr"] == 2 and m["retrieval/t2i_medr"] == 2
    # a tie between two of an image's own captions is harmless; a tie with a wrong one is not
    sim = torch.tensor([[3.0, 3.0, 1.0], [0.0, 0.0, 3.0]])
    m = metrics_of(sim, torch.tensor([0, 0, 1]))
    assert m["retrieval/i2t_r1"] == 1.0 and m["retrieval/t2i_r1"] == 1.0
    sim = torch.tensor([[3.0, 1.0, 3.0], [0.0, 2.0, 3.0]])  # image 0's best (3) ties with image 1's caption
    m = metrics_of(sim, torch.tensor([0, 0, 1]))
    assert m["retrieval/i2t_r1"] == 0.5  # image 0 -> rank 1, image 1 -> rank 0
    # caption 1: 1 < 2 -> rank 1; caption 2: 3 ties 3 -> rank 1
    assert m["retrieval/t2i_r1"] == pytest.approx(1 / 3)


def test_retrieval_metrics_matches_loop_on_random_ties():
    g = torch.Generator().manual_seed(0)
    sim = torch.randint(0, 4, (7, 20), generator=g).float()  # few distinct values: many ties
    t2i = torch.randint(0, 7, (20,), generator=g)
    t2i[:7] = torch.arange(7)  # every image has a caption
    i2t_ranks, t2i_ranks = (torch.tensor(r) for r in naive_ranks(sim, t2i))
    m = metrics_of(sim, t2i)
    for k in (1, 5, 10):
        assert m[f"retrieval/i2t_r{k}"] == pytest.approx((i2t_ranks < k).float().mean().item())
        assert m[f"retrieval/t2i_r{k}"] == pytest.approx((t2i_ranks < k).float().mean().item())
    assert m["retrieval/t2i_medr"] == np.floor(np.median(t2i_ranks.numpy())) + 1


def full_matrix_ranks(sim, text_to_image):
    """the former retrieval_metrics' ranks, on the whole [n_images, n_texts] matrix at once"""
    cols = torch.arange(sim.shape[1])
    true = torch.zeros_like(sim, dtype=torch.bool)
    true[text_to_image, cols] = True
    t2i = ((sim >= sim[text_to_image, cols][None, :]) & ~true).sum(0)
    best = sim.masked_fill(~true, float("-inf")).max(1).values
    return ((sim >= best[:, None]) & ~true).sum(1), t2i


@pytest.mark.parametrize("grouped", [True, False])
def test_retrieval_in_tiles_equals_the_whole_matrix(grouped):
    """ranks computed block x block (every tile shape: blocks of 1, 3, 4, 7, 40 for 9 images x 31
    texts) equal the naive loop's and the whole-matrix ones, on integer features (exact scores, many
    ties) with captions grouped per image (eval_retrieval's order) or scattered, and an image with
    no caption (rank = every text)"""
    g = torch.Generator().manual_seed(1 + grouped)
    img, txt = (
        torch.randint(-2, 3, (9, 4), generator=g).float(),
        torch.randint(-2, 3, (31, 4), generator=g).float(),
    )
    # image 8 has no caption
    owner = torch.arange(31) * 8 // 31 if grouped else torch.randint(0, 8, (31,), generator=g)
    owner[:8] = owner[:8] if grouped else torch.arange(8)
    sim = img @ txt.T
    i2t, t2i = naive_ranks(sim, owner)
    full = full_matrix_ranks(sim, owner)
    assert full[0].tolist() == i2t and full[1].tolist() == t2i and i2t[8] == 31
    for block in (1, 3, 4, 7, 40):
        a, b = ev.retrieval_ranks(img, txt, owner, block)
        assert torch.equal(a, full[0]) and torch.equal(b, full[1]), block
    assert ev.retrieval_metrics(img, txt, owner, block=3) == ev.retrieval_metrics(img, txt, owner, block=40)


def test_pairwise_accuracy_ties_are_wrong():
    pos, neg = torch.tensor([1.0, 2.0, 3.0, 4.0]), torch.tensor([0.0, 2.0, 4.0, 3.999])
    assert ev.pairwise_accuracy(pos, neg) == 0.5
    assert ev.pairwise_accuracy(torch.ones(5), torch.ones(5)) == 0.0


# -----------------------------------------------------------------------------
# benchmarks on a stub model whose embeddings we control


class Stub(torch.nn.Module):
    """one-hot features: an image is looked up by its exact pixels, a text by text_key(text); an
    image and a text match iff they were registered with the same key."""

    def __init__(self, images=(), keys=(), text_key=lambda t: t, dim=4096):
        super().__init__()
        self.ids, self.text_key, self.dim = {}, text_key, dim
        self.image_ids = {x.numpy().tobytes(): self.id(key) for x, key in zip(images, keys)}

    def id(self, key):
        return self.ids.setdefault(key, len(self.ids))

    def tokenizer(self, texts):
        return torch.tensor([self.id(self.text_key(t)) for t in texts])

    def encode_image(self, x, normalize=False):
        return F.one_hot(torch.tensor([self.image_ids[xi.numpy().tobytes()] for xi in x]), self.dim).float()

    def encode_text(self, ids, normalize=False):
        return F.one_hot(ids, self.dim).float()


def shapes_stub(n, size, text_key=lambda t: t):
    scenes = shapes.test_scenes(n)
    images = [data.to_tensor(shapes.render(s, size)) for s in scenes]
    return Stub(images, [text_key(s.caption()) for s in scenes], text_key)


def test_eval_shapes_perfect_stub():
    model = shapes_stub(50, 16)
    m = ev.eval_shapes(model, model.tokenizer, 16, "cpu", n=50)
    assert m["retrieval/i2t_r1"] == 1 and m["retrieval/t2i_r1"] == 1 and m["retrieval/rsum"] == 600
    assert all(m[f"probe/{kind}"] == 1 for kind in shapes.NEGATIVES)
    assert m["diag/relation_text_cos"] == 0
    # the world's statements are statements/, not vsr/ (VSR's data only); a stub that registered
    # only the captions ties every statement with its converse: predicts False, half right
    assert [k for k in m if "statements" in k or "vsr" in k] == ["statements/acc", "statements/macro_f1"]
    assert m["statements/acc"] == 0.5


def test_eval_shapes_relation_blind_stub():
    # a text tower that cannot read the relation word: the relation probe is all ties -> 0, the
    # caption and its flip have cosine 1; the attribute probes are untouched
    def blind(t):
        for r in shapes.CONVERSE:
            t = t.replace(f" {r} ", " REL ")
        return t

    model = shapes_stub(50, 16, blind)
    m = ev.eval_shapes(model, model.tokenizer, 16, "cpu", n=50)
    assert m["probe/relation"] == 0 and m["diag/relation_text_cos"] == 1
    assert m["probe/attribute_swap"] == 1 and m["probe/colour_replace"] == 1


def test_eval_shapes_random_clip_is_near_chance():
    torch.manual_seed(0)
    model = CLIP(**model_config("tiny", 32, 32))
    import open_clip

    m = ev.eval_shapes(model, open_clip.tokenizer.SimpleTokenizer(context_length=32), 32, "cpu", n=50)
    assert model.training  # restored
    assert all(
        0 <= m[k] <= 1 for k in m if "/" in k and "medr" not in k and "rsum" not in k and "cos" not in k
    )
    assert m["retrieval/i2t_r1"] <= 0.2 and m["retrieval/t2i_r1"] <= 0.2  # chance is 1/50
    assert all(0.2 <= m[f"probe/{k}"] <= 0.8 for k in shapes.NEGATIVES)


def test_find_matches_and_eval_retrieval_with_stub(tmp_path):
    # three solid-colour photos with two captions each
    colours = {"red": (255, 0, 0), "green": (0, 255, 0), "blue": (0, 0, 255)}
    paths = []
    for name, rgb in colours.items():
        paths.append(str(tmp_path / f"{name}.png"))
        Image.new("RGB", (5, 4), rgb).save(paths[-1])
    preprocess = lambda im: torch.from_numpy(np.array(im)).float()  # noqa: E731
    model = Stub(
        [preprocess(Image.open(p).convert("RGB")) for p in paths],
        list(colours),
        text_key=lambda t: t.split()[-1],
    )
    items = [(p, [f"a photo of {c}", f"something {c}"]) for p, c in zip(paths, colours)]
    m = ev.eval_retrieval(model, preprocess, model.tokenizer, items, "cpu", batch_size=2)
    assert m["retrieval/i2t_r1"] == 1 and m["retrieval/t2i_r1"] == 1
    # captions moved one image along: image i scores 1 on image i-1's two captions and ties (0)
    # with the other wrong image's two -> i2t rank 4; a caption loses to one image, ties another -> rank 2
    shifted = [(p, items[(i + 1) % 3][1]) for i, (p, _) in enumerate(items)]
    m = ev.eval_retrieval(model, preprocess, model.tokenizer, shifted, "cpu")
    assert (m["retrieval/i2t_r1"], m["retrieval/i2t_r5"], m["retrieval/i2t_medr"]) == (0, 1, 5)
    assert (m["retrieval/t2i_r1"], m["retrieval/t2i_r5"], m["retrieval/t2i_medr"]) == (0, 1, 3)
    top = ev.find_matches(model, preprocess, model.tokenizer, paths, "something green", "cpu", k=2)
    assert top[0] == (1, 1.0) and top[1][1] == 0.0


# -----------------------------------------------------------------------------
# checkpoints and the open_clip hub directory


def tiny_model(image_size=64, seed=0):
    torch.manual_seed(seed)
    cfg = model_config("tiny", image_size, 32)
    model = CLIP(**cfg).eval()
    with torch.no_grad():  # move every tensor off its init, so zero-initialised biases are tested too
        for p in model.parameters():
            p.add_(0.02 * torch.randn_like(p))
    return model, cfg


def embeddings(model, size=64):
    import open_clip

    torch.manual_seed(1)
    x = torch.randn(3, 3, size, size)
    tok = open_clip.tokenizer.SimpleTokenizer(context_length=32)(
        ["a small red circle left of a large blue square", "hi", ""]
    )
    with torch.no_grad():
        return model.encode_image(x), model.encode_text(tok)


def test_checkpoint_loads_strict_in_minclip_and_open_clip(tmp_path):
    import open_clip

    model, cfg = tiny_model()
    loaded, preprocess, tokenizer = load_model(
        tiny_ckpt(tmp_path / "ckpt.pt", model=model, cfg=cfg, optimizer={}, step=0, args={})
    )
    assert not loaded.training and loaded.image_size == 64 and loaded.model_cfg == cfg
    assert tokenizer.context_length == 32
    assert preprocess(Image.new("RGB", (100, 80))).shape == (3, 64, 64)
    oc = open_clip.CLIP(**cfg).eval()
    oc.load_state_dict(model.state_dict(), strict=True)
    for other in (loaded, oc):
        for a, b in zip(embeddings(model), embeddings(other)):
            torch.testing.assert_close(a, b, atol=1e-5, rtol=0)


def test_export_loads_with_open_clip_local_dir(tmp_path):
    import open_clip

    model, cfg = tiny_model()
    export_open_clip(model, cfg, str(tmp_path / "hub"))
    assert sorted(os.listdir(tmp_path / "hub")) == ["open_clip_config.json", "open_clip_model.safetensors"]
    oc, _, preprocess = open_clip.create_model_and_transforms(f"local-dir:{tmp_path / 'hub'}")
    oc.eval()
    for a, b in zip(embeddings(model), embeddings(oc)):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=0)
    tok = open_clip.get_tokenizer(f"local-dir:{tmp_path / 'hub'}")
    assert tok.context_length == 32
    # its preprocess is ours: a shapes render at native size goes through unchanged
    img = shapes.render(shapes.test_scenes(1)[0], 64)
    torch.testing.assert_close(preprocess(Image.fromarray(img)), data.to_tensor(img), atol=1e-5, rtol=0)
    # and load_model takes the directory too
    loaded, _, _ = load_model(f"local-dir:{tmp_path / 'hub'}")
    assert loaded.image_size == 64


def test_load_model_errors(tmp_path):
    with pytest.raises(SystemExit, match="nowhere/ckpt.pt"):
        load_model(str(tmp_path / "nowhere/ckpt.pt"))
    with pytest.raises(SystemExit, match="no open_clip_config.json"):
        load_model(f"local-dir:{tmp_path}")
    (tmp_path / "open_clip_config.json").write_text("{}")
    with pytest.raises(SystemExit, match="no weights"):  # open_clip alone would return a random model
        load_model(f"local-dir:{tmp_path}")


# damaged and foreign checkpoints: one line each, naming the file and what is wrong with it


def checkpoint_file(tmp_path, case):
    """a checkpoint as people have them, of the tiny model -> its path"""
    model, cfg = tiny_model()
    path, state = tmp_path / f"{case}.pt", model.state_dict()
    full = {"model": state, "model_cfg": cfg, "optimizer": {}, "step": 0, "args": {}}
    if case in ("cut_100", "cut_1mb"):  # a copy made while it was being written
        raw = open(
            tiny_ckpt(tmp_path / "whole.pt", model=model, cfg=cfg, optimizer={}, step=0, args={}), "rb"
        ).read()
        assert len(raw) > 2**20
        path.write_bytes(raw[: 100 if case == "cut_100" else 2**20])
    elif case == "empty":
        path.write_bytes(b"")
    elif case == "text":  # what git clone leaves without git-lfs
        path.write_text(
            "version https://git-lfs.github.com/spec/v1\noid sha256:4d7a214614ab2935c943f9e0ff69d22eadbb8f32b1258daaa5e2ca24d17e2393\n"
        )
    elif case == "bare":
        torch.save(state, path)
    elif case == "open_clip":  # open_clip's training script saves these
        torch.save({"epoch": 3, "name": "run", "state_dict": state, "optimizer": {}}, path)
    elif case == "no_cfg":
        torch.save({"model": state, "step": 3}, path)
    elif case in ("safetensors", "safetensors_named_pt"):
        from safetensors.torch import save_file

        path = tmp_path / ("open_clip_model.safetensors" if case == "safetensors" else "model.pt")
        save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    # 128 -> 64 changes text_projection and visual.proj: [128, 128] -> [128, 64]
    elif case == "other_embed_dim":
        torch.save(full | {"model_cfg": cfg | {"embed_dim": 64}}, path)
    elif case == "missing_key":
        torch.save(full | {"model": {k: v for k, v in state.items() if k != "text_projection"}}, path)
    elif case == "unexpected_key":
        torch.save(full | {"model": state | {"extra.weight": torch.zeros(2)}}, path)
    elif case == "cfg_without_embed_dim":
        torch.save(full | {"model_cfg": {k: v for k, v in cfg.items() if k != "embed_dim"}}, path)
    elif case == "python_objects":  # vars(args) is fine, the Namespace itself is not loaded with weights_only
        torch.save(full | {"args": argparse.Namespace(lr=1e-3)}, path)
    elif case == "list":
        torch.save([state], path)
    return str(path)


N_TENSORS = len(tiny_model()[0].state_dict())


@pytest.mark.parametrize(
    "case, why",
    [
        (
            "cut_100",
            "cut short (100 bytes, the end of its zip archive is missing): copied while it was being written?",
        ),
        (
            "cut_1mb",
            "cut short (1,048,576 bytes, the end of its zip archive is missing): copied while it was being written?",
        ),
        ("empty", "empty (0 bytes): copied before the checkpoint was written?"),
        (
            "text",
            "a text file, not a torch checkpoint (it begins 'version https://git-lfs.github.com/spec/')",
        ),
        (
            "bare",
            f"a bare state dict ({N_TENSORS} tensors) without the model_cfg that says which model it is: give it as "
            "NAME:PATH with its open_clip architecture NAME (e.g. ViT-B-32; OpenAI's and other QuickGELU weights as ViT-B-32-quickgelu), "
            "or re-save it with the model_cfg of its --model_size",
        ),
        (
            "open_clip",
            "an open_clip training checkpoint without the model_cfg that says which model it is: give it as "
            "NAME:PATH with its open_clip architecture NAME (e.g. ViT-B-32; OpenAI's and other QuickGELU weights as ViT-B-32-quickgelu), "
            "or re-save it with the model_cfg of its --model_size",
        ),
        (
            "no_cfg",
            "'model' without 'model_cfg' (the open_clip config that builds it): re-save it with the model_cfg of its --model_size",
        ),
        (
            "safetensors",
            "a .safetensors file holds weights without the config that builds them: give its folder as "
            "local-dir:DIR (an open_clip hub folder, open_clip_config.json beside it)",
        ),
        (
            "safetensors_named_pt",
            "a .safetensors file holds weights without the config that builds them: give its folder as "
            "local-dir:DIR (an open_clip hub folder, open_clip_config.json beside it)",
        ),
        (
            "other_embed_dim",
            "its weights do not fit its model_cfg: 2 of another shape (e.g. text_projection: [128, 128] in the file, [128, 64] in the model)",
        ),
        ("missing_key", "its weights do not fit its model_cfg: 1 missing (e.g. text_projection)"),
        ("unexpected_key", "its weights do not fit its model_cfg: 1 unexpected (e.g. extra.weight)"),
        (
            "cfg_without_embed_dim",
            "its model_cfg does not describe a model minclip builds "
            "(TypeError: CLIP.__init__() missing 1 required positional argument: 'embed_dim')",
        ),
        (
            "python_objects",
            "it holds Python objects besides tensors, numbers and containers, which are not loaded "
            "(weights_only=True): not a minclip checkpoint",
        ),
        ("list", "holds a list, not a checkpoint dict"),
    ],
)
def test_damaged_or_foreign_checkpoint_is_refused_in_one_line(tmp_path, case, why):
    path = checkpoint_file(tmp_path, case)
    with pytest.raises(SystemExit) as e:
        load_model(path)
    assert e.value.code == f"error: {path}: " + why.replace("PATH", path).replace("DIR", str(tmp_path))


@pytest.mark.slow
def test_damaged_checkpoint_through_the_cli_prints_one_line(tmp_path):
    path = checkpoint_file(tmp_path, "cut_1mb")
    r = subprocess.run(
        [sys.executable, os.path.join(ROOT, "eval.py"), "--model", path],
        capture_output=True,
        text=True,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert r.returncode == 1
    assert r.stderr.splitlines() == [
        f"error: {path}: cut short (1,048,576 bytes, the end of its zip archive is missing): "
        "copied while it was being written?"
    ]


def test_bare_state_dict_loads_as_name_colon_file_as_the_message_says(tmp_path):
    import open_clip

    model, cfg = tiny_model()
    path = checkpoint_file(tmp_path, "bare")
    (tmp_path / "configs").mkdir()
    with open(tmp_path / "configs" / "minclip-tiny-test.json", "w") as f:
        json.dump(cfg, f)
    open_clip.add_model_config(str(tmp_path / "configs"))  # an open_clip architecture of that name
    loaded, _, _ = load_model(f"minclip-tiny-test:{path}")
    for a, b in zip(embeddings(model), embeddings(loaded)):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=0)
    with pytest.raises(SystemExit) as e:  # the wrong architecture: one line too
        load_model(f"minclip-tiny-test:{checkpoint_file(tmp_path, 'text')}")
    assert e.value.code.startswith(
        f"error: --model minclip-tiny-test:{tmp_path / 'text.pt'}: {tmp_path / 'text.pt'}: a text file"
    )


def test_load_checkpoint_for_a_resumed_run(tmp_path):
    model, cfg = tiny_model()
    path = tiny_ckpt(tmp_path / "ckpt.pt", model=model, cfg=cfg, optimizer={}, step=0, args={})
    ckpt = load_checkpoint(path, model, need=("optimizer", "step"))
    assert ckpt["step"] == 0 and all(torch.equal(ckpt["model"][k], v) for k, v in model.state_dict().items())
    with pytest.raises(SystemExit) as e:
        load_checkpoint(path, model, need=("optimizer", "rng"))
    assert (
        e.value.code
        == f"error: {path}: no 'rng' in the checkpoint (keys: model, model_cfg, optimizer, step, args)"
    )
    # the run's flags build another model: 32 px images have 2 x 2 + 1 patch positions, 64 px 4 x 4 + 1
    other = CLIP(**model_config("tiny", 32, 32))
    with pytest.raises(SystemExit) as e:
        load_checkpoint(path, other)
    assert e.value.code == (
        f"error: {path}: its weights do not fit the model this run builds from its flags: 1 of another "
        "shape (e.g. visual.positional_embedding: [17, 128] in the file, [5, 128] in the model)"
    )
    # a CLIPS checkpoint resumed without its captioner (--captioner_weight 0), and the other way round
    from model import Captioner

    captioner_cfg = dict(
        vision_width=128, text_width=128, width=64, layers=1, heads=4, n_query=7, vocab=[3, 5, 49407]
    )
    captioner = Captioner(**captioner_cfg)
    n = len(captioner.state_dict())
    tiny_ckpt(
        tmp_path / "clips.pt",
        model=model,
        cfg=cfg,
        captioner=captioner.state_dict(),
        captioner_cfg=captioner_cfg,
    )
    # fits its own configs
    assert load_checkpoint(str(tmp_path / "clips.pt"))["captioner_cfg"] == captioner_cfg
    assert load_checkpoint(str(tmp_path / "clips.pt"), model, captioner)["captioner_cfg"] == captioner_cfg
    with pytest.raises(SystemExit) as e:
        load_checkpoint(str(tmp_path / "clips.pt"), model)
    assert e.value.code.endswith(
        f"do not fit the model this run builds from its flags: {n} unexpected (e.g. captioner.queries)"
    )
    with pytest.raises(SystemExit) as e:
        load_checkpoint(path, model, captioner)
    assert e.value.code.endswith(
        f"do not fit the model this run builds from its flags: {n} missing (e.g. captioner.queries)"
    )


def test_unknown_model_spec_is_one_short_line(tmp_path):
    cases = [
        (
            "ViT-B-32x:openai",
            "neither a checkpoint file, a local-dir: folder nor a known open_clip NAME:PRETRAINED (close names: ViT-B-32",
        ),
        (
            str(tmp_path),
            f"neither a checkpoint file, a local-dir: folder nor a known open_clip NAME:PRETRAINED; an open_clip "
            f"hub folder is given as local-dir:{tmp_path}",
        ),
        (
            "ViT-B-32:laion2b",
            "'laion2b' is neither a pretrained tag of ViT-B-32 nor a file (close tags: laion2b_",
        ),
    ]
    for spec, why in cases:
        with pytest.raises(SystemExit) as e:
            load_model(spec)
        assert e.value.code.startswith(f"error: --model {spec}: {why}"), e.value.code
        # open_clip's own error lists ~3,000 characters of names
        assert len(e.value.code.replace(spec, "")) < 200 and "\n" not in e.value.code


def test_openai_tags_are_built_with_quick_gelu(monkeypatch):
    # open_clip 3.x builds ViT-B-32 + the openai tag with GELU and only warns; load_model must force QuickGELU
    import open_clip

    seen = []

    def fake_create(name, **kwargs):
        seen.append((name, kwargs))
        raise RuntimeError("offline")

    monkeypatch.setattr(open_clip, "create_model_and_transforms", fake_create)
    monkeypatch.setattr(model, "_check_download", lambda *a: None)  # as if the weights were cached
    for spec in ("ViT-B-32:openai", "ViT-B/32:openai", "ViT-B-32:laion2b_s34b_b79k"):
        with pytest.raises(SystemExit, match="offline"):
            load_model(spec)
    assert [k["force_quick_gelu"] for _, k in seen] == [True, True, False]
    assert [k["pretrained"] for _, k in seen] == ["openai", "openai", "laion2b_s34b_b79k"]


# -----------------------------------------------------------------------------
# the CLI end to end


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    model, cfg = tiny_model()
    return tiny_ckpt(
        tmp_path_factory.mktemp("ckpt") / "ckpt.pt", model=model, cfg=cfg, optimizer={}, step=0, args={}
    )


def run_json(tmp_path, *argv):
    out = str(tmp_path / "m.json")
    ev.main([*argv, "--n", "50", f"--json={out}", "--device", "cpu"])
    return json.load(open(out))


def test_cli_json_seed_and_local_dir(ckpt, tmp_path, capsys):
    m = run_json(tmp_path, "--model", ckpt)
    assert m["model"] == ckpt and m["bench"] == "shapes"
    assert all(isinstance(m[k], float) for k in EXPECTED_KEYS)
    assert "retrieval/i2t_r1" in capsys.readouterr().out
    assert run_json(tmp_path, "--model", ckpt, "--seed", "7") != m
    # the exported hub directory, rendered at 64 and put through open_clip's preprocess, scores the same
    ev.main(["--model", ckpt, "--export", str(tmp_path / "hub")])
    m2 = run_json(tmp_path, "--model", f"local-dir:{tmp_path / 'hub'}")
    assert m2.pop("model") != m.pop("model")
    assert m2 == pytest.approx(m, abs=1e-5)


def test_cli_query_grid(ckpt, tmp_path, capsys):
    query = "a small red circle left of a large blue square"
    grid = tmp_path / "grid.png"
    ev.main(["--model", ckpt, "--n", "50", "--query", query, "--top", "4", "--grid", str(grid)])
    out = capsys.readouterr().out
    lines = out.splitlines()[1:5]
    assert len(lines) == 4 and all(len(line.split()) > 5 for line in lines)
    scores = [float(line.split()[0]) for line in lines]
    assert scores == sorted(scores, reverse=True)
    with Image.open(grid) as im:  # 2 x 2 cells, 64 px renders upscaled to 128, a score strip under each
        assert im.size == (2 * 128, 2 * (128 + ev.LABEL_H))
        top = shapes.render(
            next(s for s in shapes.test_scenes(50) if s.caption() == lines[0].split(None, 1)[1]), 64
        )
        cell = np.asarray(im.convert("RGB"))[:128, :128]
        assert (cell == top.repeat(2, 0).repeat(2, 1)).all()  # nearest-neighbour upscale of the best match
    ev.main(["--model", ckpt, "--n", "50", "--query", query, "--top", "4", "--seed", "7"])
    assert capsys.readouterr().out.splitlines()[1:5] != lines


def test_cli_real_data_bench(ckpt, capsys):
    ev.main(["--model", ckpt, "--bench", "coco", "--data_root", os.path.join(FIX, "coco"), "--device=cpu"])
    out = capsys.readouterr().out
    assert "retrieval/t2i_r1" in out and "probe/relation" not in out


def test_cli_real_data_with_a_latin1_byte_names_file_line_and_byte(ckpt, tmp_path):
    root = fixture_copy(tmp_path, "flickr8k_kaggle")
    path = root / "captions.txt"
    # latin-1 'e-acute'
    path.write_bytes(path.read_bytes().replace(b"A girl, in a dress", b"A girl, in a dr\xe9ss"))
    with pytest.raises(SystemExit) as e:
        ev.main(["--model", ckpt, "--bench", "flickr8k", "--data_root", str(root), "--device=cpu"])
    # line 3 is '1000268201_693b08cb0e.jpg,"A girl, in a dress, ...': 26 + 1 + 15 bytes before it
    assert (
        e.value.code
        == f"error: {path}:3: byte 0xe9 (byte 43 of the line) is not UTF-8: the file must be UTF-8 (re-save it as UTF-8)"
    )


@pytest.mark.slow
def test_cli_errors(tmp_path, ckpt):
    missing = str(tmp_path / "missing" / "ckpt.pt")
    with pytest.raises(SystemExit) as e:
        ev.main(["--model", missing])
    assert missing in str(e.value.code)
    with pytest.raises(SystemExit, match="needs a minclip checkpoint"):
        ev.main(["--model", "local-dir:x", "--export", str(tmp_path / "x")])
    # the real CLI: non-zero exit, one line naming the path, no traceback
    r = subprocess.run(
        [sys.executable, os.path.join(ROOT, "eval.py"), "--model", missing],
        capture_output=True,
        text=True,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert r.returncode != 0 and missing in r.stderr and "Traceback" not in r.stderr
