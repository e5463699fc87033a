"""explain.explain and eval.py --explain: second-order caption-image attributions against a naive
reference that forms every Jacobian and the full (S F) x (P F) matrix, the exact bilinear
attribution of a hand-built model that is linear after the hooked block, completeness as the
number of steps grows, minclip == open_clip on the same weights, and the picture from the CLI."""

import json
import math
import os
import subprocess
import sys

import numpy as np
import open_clip
import pytest
import torch
import torch.nn as nn
from helpers import tiny_ckpt
from PIL import Image

import data
import eval as ev
import shapes
from model import CLIP, load_model
from tasks import explain

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# a small CLIP: a 4 x 4 patch grid, 16-dim embeddings, so the naive reference's matrices stay small
MINI = dict(
    embed_dim=16,
    vision_cfg=dict(image_size=32, patch_size=8, width=32, layers=2, head_width=16),
    text_cfg=dict(context_length=24, width=32, heads=4, layers=2),
)
CAPTION = "a small red circle left of a large blue square"
TOK = data.get_tokenizer(24)


def mini_models(seed=0):
    """minclip's CLIP and open_clip's CLIP with the same random weights, every tensor off its init"""
    torch.manual_seed(seed)
    mc = CLIP(**MINI).eval()
    with torch.no_grad():
        for p in mc.parameters():
            p.add_(0.05 * torch.randn_like(p))
    oc = open_clip.CLIP(**MINI).eval()
    oc.load_state_dict(mc.state_dict())
    return mc, oc


def inputs(seed=1, caption=CAPTION):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(1, 3, 32, 32, generator=g), TOK([caption])


def naive_explain(model, image, text, layer, steps):
    """The formula with every matrix formed: at each interpolation point the full Jacobian
    d e / d h [D, S, F] (torch.autograd.functional.jacobian, the block's input of row 0 replaced),
    their mean, then (h_t - r_t)^T J_t^T J_i (h_i - r_i) with J_t^T J_i an (S F) x (P F) matrix,
    summed over the feature dimensions of each token and patch."""
    eot = int(text[0].argmax())
    text_ref = torch.zeros_like(text)
    text_ref[0, 0], text_ref[0, 2] = text[0, 0], text[0, eot]

    def tower(encode, block, x, ref):
        batch = torch.cat([x, ref])  # one batch, so minclip's text tower runs both at one length
        seen = []
        handle = block.register_forward_pre_hook(lambda m, args: seen.append(args[0].detach()))
        with torch.no_grad():
            e = encode(batch)[0]
        handle.remove()
        h, r = seen[0][0], seen[0][1]

        def embed(g):  # the input's embedding with the block's input set to g
            handle = block.register_forward_pre_hook(
                lambda m, args: (torch.cat([g[None], args[0][1:]]),) + args[1:]
            )
            try:
                return encode(batch)[0]
            finally:
                handle.remove()

        J = (
            sum(
                torch.autograd.functional.jacobian(embed, r + (1 - k / steps) * (h - r)) for k in range(steps)
            )
            / steps
        )
        return e, J, h - r

    e_i, J_i, d_i = tower(
        model.encode_image, model.visual.transformer.resblocks[layer], image, torch.zeros_like(image)
    )
    e_t, J_t, d_t = tower(model.encode_text, model.transformer.resblocks[layer], text, text_ref)
    M = J_t.reshape(len(e_t), -1).T @ J_i.reshape(len(e_i), -1)  # [S_t F_t, P F_i]
    full = (d_t.reshape(-1, 1) * M * d_i.reshape(1, -1)).reshape(*d_t.shape, *d_i.shape).sum((1, 3))
    full = full / (e_t.norm() * e_i.norm())
    grid = math.isqrt(full.shape[1] - 1)
    return full[: eot + 1, 1:].reshape(eot + 1, grid, grid)


@pytest.mark.parametrize("which", ["minclip", "open_clip"])
@pytest.mark.parametrize("layer,steps", [(-1, 3), (0, 2)])
def test_explain_matches_naive_full_jacobians(which, layer, steps):
    model = dict(zip(("minclip", "open_clip"), mini_models()))[which]
    image, text = inputs()
    A = explain.explain(model, image, text, layer=layer, steps=steps)
    ref = naive_explain(model, image, text, layer, steps)
    assert A.shape == ref.shape == (int(text[0].argmax()) + 1, 4, 4)
    assert A.abs().max() > 1e-4  # not trivially zero
    torch.testing.assert_close(A, ref, atol=1e-7, rtol=1e-4)


def test_minclip_and_open_clip_agree_shapes_determinism():
    # minclip's text tower stops at the batch's last EOT, open_clip's runs all 24 positions: same numbers
    mc, oc = mini_models()
    image, text = inputs()
    mc.train()
    modes = []
    mc.visual.register_forward_pre_hook(lambda m, args: modes.append(mc.training))
    A = explain.explain(mc, image, text)
    assert modes == [False] and mc.training  # eval mode inside (dropout would break the path), restored after
    assert A.shape == (len(CAPTION.split()) + 2, 4, 4) and A.dtype == torch.float32  # sot, 10 words, eot
    assert all(p.grad is None for p in mc.parameters())  # only the path's gradients are taken
    assert (
        not mc.visual.transformer.resblocks[-1]._forward_pre_hooks
        and not mc.transformer.resblocks[-1]._forward_pre_hooks
    )
    with torch.no_grad():  # callers under no_grad get the same, bit for bit, and again
        assert torch.equal(explain.explain(mc, image, text), A)
    torch.testing.assert_close(explain.explain(oc, image, text), A, atol=1e-7, rtol=1e-4)
    # the start token sees only itself in a causal tower: its input is the reference's, so its row is zero
    assert A[0].abs().max() == 0
    # a different caption, image or layer changes the picture
    assert not torch.allclose(explain.explain(mc, image, text, layer=0), A)
    assert not torch.allclose(explain.explain(mc, *inputs(seed=2)), A)


@pytest.mark.parametrize("which", ["minclip", "open_clip"])
def test_completeness_approaches_the_score(which):
    model = dict(zip(("minclip", "open_clip"), mini_models()))[which]
    image, text = inputs()
    gaps = []
    for steps in (8, 32, 128):
        A, t = explain.explain(model, image, text, steps=steps, return_terms=True)
        gaps.append(abs(t["score"] - (A.sum().item() + t["class_token"] + t["reference"])))
    with torch.no_grad():
        score = torch.cosine_similarity(model.encode_image(image), model.encode_text(text)).item()
    assert t["score"] == pytest.approx(score, abs=1e-6)
    # a right Riemann sum: the gap shrinks 4x per 4x steps (measured, both models: 0.0155, 0.0039, 0.00098
    # of score - reference = 0.034, the part the attributions carry)
    assert 3.5 < gaps[0] / gaps[1] < 4.5 and 3.5 < gaps[1] / gaps[2] < 4.5
    assert gaps[2] < 0.05 * abs(t["score"] - t["reference"])


# -----------------------------------------------------------------------------
# a model whose towers are affine in every block's input: the attribution is exact for any steps


class Affine(nn.Module):
    def __init__(self, width, batch_first):
        super().__init__()
        self.resblocks = nn.ModuleList([nn.Linear(width, width) for _ in range(2)])
        self.batch_first = batch_first  # open_clip before 2.24 ran its blocks on [seq, batch, width]

    def forward(self, x):  # x [B, S, F]
        x = x if self.batch_first else x.transpose(0, 1)
        for block in self.resblocks:
            x = block(x)
        return x if self.batch_first else x.transpose(0, 1)


class LinearToy(nn.Module):
    """open_clip's module names; features -> tanh (not linear before the blocks) -> two affine
    blocks -> a sum over tokens (the text's up to its EOT) -> a projection"""

    PATCH, WIDTH, EMBED, VOCAB = 4, 6, 5, 50

    def __init__(self, batch_first=True):
        super().__init__()
        torch.manual_seed(0)
        self.visual = nn.Module()
        self.visual.patch = nn.Linear(3 * self.PATCH**2, self.WIDTH)
        self.visual.class_embedding = nn.Parameter(torch.randn(self.WIDTH))
        self.visual.transformer = Affine(self.WIDTH, batch_first)
        self.visual.proj = nn.Linear(self.WIDTH, self.EMBED, bias=False)
        self.token_embedding = nn.Embedding(self.VOCAB, self.WIDTH)
        self.transformer = Affine(self.WIDTH, batch_first)
        self.text_projection = nn.Linear(self.WIDTH, self.EMBED, bias=False)

    def image_tokens(self, image):  # -> tanh features [B, 1 + P, F], class token first
        B, P = image.shape[0], self.PATCH
        patches = image.unfold(2, P, P).unfold(3, P, P).permute(0, 2, 3, 1, 4, 5).reshape(B, -1, 3 * P * P)
        return torch.tanh(
            torch.cat([self.visual.class_embedding.expand(B, 1, -1), self.visual.patch(patches)], 1)
        )

    def encode_image(self, image, normalize=False):
        return self.visual.proj(self.visual.transformer(self.image_tokens(image)).sum(1))

    def encode_text(self, text, normalize=False):
        keep = torch.arange(text.shape[1]) <= text.argmax(-1, keepdim=True)  # [B, L]: up to the EOT
        return self.text_projection(
            (self.transformer(torch.tanh(self.token_embedding(text))) * keep[..., None]).sum(1)
        )


@pytest.mark.parametrize("batch_first", [True, False])
@pytest.mark.parametrize("layer", [0, 1, -1])
def test_linear_toy_gives_the_exact_bilinear_attribution_for_any_steps(layer, batch_first):
    toy = LinearToy(batch_first)
    g = torch.Generator().manual_seed(3)
    image = torch.randn(1, 3, 12, 12, generator=g)  # a 3 x 3 grid
    text = torch.tensor([[48, 7, 30, 12, 49, 0, 0, 0]])  # SOT = 48, EOT = 49 (the highest id), zero padded
    text_ref = torch.tensor([[48, 0, 49, 0, 0, 0, 0, 0]])
    l = layer % 2

    def through(blocks, h):  # blocks[:l] applied: the hooked block's input
        for block in blocks[:l]:
            h = block(h)
        return h

    # d e / d h_s for every token: the remaining blocks' weights, then the projection
    def chain(blocks, proj):
        W = torch.eye(LinearToy.WIDTH)
        for block in blocks[l:]:
            W = W @ block.weight.T
        return W @ proj.weight.T  # [F, D]

    with torch.no_grad():
        # [1 + 9, F]
        d_i = (
            through(toy.visual.transformer.resblocks, toy.image_tokens(image))[0]
            - through(toy.visual.transformer.resblocks, toy.image_tokens(torch.zeros_like(image)))[0]
        )
        d_t = (
            through(toy.transformer.resblocks, torch.tanh(toy.token_embedding(text)))
            -
            # [5, F] through the EOT
            through(toy.transformer.resblocks, torch.tanh(toy.token_embedding(text_ref)))
        )[0, :5]
        U_i = d_i @ chain(toy.visual.transformer.resblocks, toy.visual.proj)  # [1 + 9, D]
        U_t = d_t @ chain(toy.transformer.resblocks, toy.text_projection)  # [5, D]
        e_i, e_t = toy.encode_image(image)[0], toy.encode_text(text)[0]
        exact = U_t @ U_i.T / (e_t.norm() * e_i.norm())  # [5, 1 + 9]
    for steps in (1, 2, 7):
        A, t = explain.explain(toy, image, text, layer=layer, steps=steps, return_terms=True)
        torch.testing.assert_close(A, exact[:, 1:].reshape(5, 3, 3), atol=1e-6, rtol=1e-5)
        assert t["class_token"] == pytest.approx(exact[:, 0].sum().item(), abs=1e-6)
        # and completeness holds exactly, whatever the number of steps
        assert A.sum().item() + t["class_token"] + t["reference"] == pytest.approx(t["score"], abs=1e-6)


def test_explain_errors():
    toy = LinearToy()
    image, text = torch.randn(1, 3, 12, 12), torch.tensor([[48, 7, 49, 0]])
    with pytest.raises(SystemExit, match="--layer 2: the image tower has 2 blocks"):
        explain.explain(toy, image, text, layer=2)
    with pytest.raises(SystemExit, match="--steps 0"):
        explain.explain(toy, image, text, steps=0)
    with pytest.raises(ValueError, match="one image"):
        explain.explain(toy, torch.cat([image, image]), text)
    toy.visual = nn.Conv2d(3, 5, 3)  # a ResNet-like image tower
    with pytest.raises(SystemExit, match="needs a ViT.*Conv2d without transformer.resblocks"):
        explain.explain(toy, image, text)


# -----------------------------------------------------------------------------
# words, spans and the picture


def test_caption_words_and_spans():
    ids = TOK(["a pinkish-orange circle, left of a checkered square"])[0]
    words = explain.caption_words(TOK, ids)
    assert [w for w, _ in words] == [
        "a",
        "pinkish",
        "-",
        "orange",
        "circle",
        ",",
        "left",
        "of",
        "a",
        "checkered",
        "square",
    ]
    # every token, once, in order
    assert [s for _, pos in words for s in pos] == list(range(1, int(ids.argmax())))
    assert [len(words[k][1]) for k in (1, 9)] == [2, 2]  # pink|ish, chec|kered: two bpe pieces each
    assert explain.span_positions(TOK, ids, "left of") == words[6][1] + words[7][1]
    # the tokenizer lowercases
    assert explain.span_positions(TOK, ids, "Checkered  square") == words[9][1] + words[10][1]
    for bad in ("right of", "of left", "pink", "kered", ""):  # not a run of whole words
        with pytest.raises(SystemExit, match="is not a run of words of the caption 'a pinkish - orange"):
            explain.span_positions(TOK, ids, bad)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    model, _ = mini_models()
    return tiny_ckpt(
        tmp_path_factory.mktemp("ckpt") / "ckpt.pt", model=model, cfg=MINI, optimizer={}, step=0, args={}
    )


def printed(out, label):
    return float(
        next(line for line in out.splitlines() if line.startswith(label)).split()[len(label.split())]
    )


def panel_rows(out):
    """the per-panel lines the CLI prints after the totals -> [(value, title)]"""
    lines = out.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("reference terms")) + 1
    return [(float(line.split(None, 1)[0]), line.split(None, 1)[1]) for line in lines[start:-1]]


def test_cli_draws_one_panel_per_word(ckpt, tmp_path, capsys):
    png = tmp_path / "explain.png"
    ev.main(["--model", ckpt, "--explain", "7", "--out", str(png), "--device", "cpu"])
    out = capsys.readouterr().out
    assert out.splitlines()[-1] == f"wrote {png}"
    scene = shapes.test_scenes(8)[-1]
    words = explain.caption_words(TOK, TOK([scene.caption()])[0])
    model, _, _ = load_model(ckpt)
    image, text = data.to_tensor(shapes.render(scene, 32))[None], TOK([scene.caption()])
    A, t = explain.explain(model, image, text, return_terms=True)
    # the printed numbers are the model's
    assert printed(out, "score (cosine)") == pytest.approx(t["score"], abs=1e-4)
    assert printed(out, "sum of attributions") == pytest.approx(A.sum().item(), abs=1e-4)
    assert [title for _, title in panel_rows(out)] == scene.caption().split()
    for (value, _), (_, pos) in zip(panel_rows(out), words):
        assert value == pytest.approx(A[pos].sum().item(), abs=1e-4)
    cols = math.ceil(math.sqrt(len(words) + 1))  # the image, then a panel per word
    with Image.open(png) as im:
        assert im.size == (cols * 128, math.ceil((len(words) + 1) / cols) * (128 + 2 * ev.LABEL_H))
        pixels = np.asarray(im.convert("RGB")).astype(int)
    # the first cell is the scene as the model saw it, upscaled 4x with nearest neighbour
    assert (pixels[:128, :128] == shapes.render(scene, 32).repeat(4, 0).repeat(4, 1)).all()
    # panel of word k: each patch's centre is red where its value is positive, blue where negative,
    # and the strongest patch of all panels is the most saturated
    m = max(A[pos].sum(0).abs().max() for _, pos in words)
    for k, (_, pos) in enumerate(words):
        heat, (x, y) = A[pos].sum(0), ((k + 1) % cols * 128, (k + 1) // cols * (128 + 2 * ev.LABEL_H))
        centres = pixels[
            y + 16 : y + 128 : 32, x + 16 : x + 128 : 32
        ]  # [4, 4, 3]: a 4 x 4 grid of 32-pixel patches
        red_minus_blue = centres[..., 0] - centres[..., 2]
        strong = heat.abs() > 0.1 * m
        assert (np.sign(red_minus_blue[strong]) == np.sign(heat[strong].numpy())).all()
        if heat.abs().max() == m:
            assert abs(red_minus_blue).max() > 100


def test_cli_span_and_image_file(ckpt, tmp_path, capsys):
    relation = shapes.test_scenes(8)[-1].relation()  # "left of", "right of", "above" or "below"
    ev.main(["--model", ckpt, "--explain", "7", "--out", str(tmp_path / "all.png"), "--device", "cpu"])
    words = dict((title, value) for value, title in panel_rows(capsys.readouterr().out))
    ev.main(
        [
            "--model",
            ckpt,
            "--explain",
            "7",
            "--span",
            relation,
            "--out",
            str(tmp_path / "s.png"),
            "--device",
            "cpu",
        ]
    )
    ((value, title),) = panel_rows(capsys.readouterr().out)
    # one panel: the sum of its words' panels
    assert title == relation and value == pytest.approx(sum(words[w] for w in relation.split()), abs=2e-4)
    with Image.open(tmp_path / "s.png") as im:
        assert im.size == (2 * 128, 128 + 2 * ev.LABEL_H)  # the image and one panel
    # any image file and caption (a 100 x 80 photo: the model sees its centre square, and so does the picture)
    photo = tmp_path / "photo.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (80, 100, 3), dtype=np.uint8)).save(photo)
    ev.main(
        [
            "--model",
            ckpt,
            "--explain",
            str(photo),
            "--text",
            "a dog on a beach",
            "--out",
            str(tmp_path / "p.png"),
        ]
    )
    assert [title for _, title in panel_rows(capsys.readouterr().out)] == ["a", "dog", "on", "a", "beach"]
    with Image.open(tmp_path / "p.png") as im:
        assert im.size == (3 * 128, 2 * (128 + 2 * ev.LABEL_H))


def tiny_resnet_dir(tmp_path):
    """an open_clip hub directory holding a tiny ModifiedResNet CLIP (random weights)"""
    from safetensors.torch import save_file

    cfg = dict(
        embed_dim=16,
        vision_cfg=dict(image_size=32, layers=[1, 1, 1, 1], width=8, head_width=16),
        text_cfg=dict(context_length=24, width=32, heads=4, layers=1),
    )
    model = open_clip.CLIP(**cfg)
    d = tmp_path / "rn"
    d.mkdir()
    save_file(
        {k: v.contiguous() for k, v in model.state_dict().items()}, str(d / "open_clip_model.safetensors")
    )
    (d / "open_clip_config.json").write_text(json.dumps({"model_cfg": cfg, "preprocess_cfg": {"size": 32}}))
    return f"local-dir:{d}"


def test_cli_errors(ckpt, tmp_path):
    out = str(tmp_path / "x.png")
    with pytest.raises(SystemExit, match="--span 'above all' is not a run of words of the caption"):
        ev.main(["--model", ckpt, "--explain", "7", "--span", "above all", "--out", out])
    broken = tmp_path / "broken.png"
    broken.write_text("not a png")
    with pytest.raises(SystemExit, match=f"{broken}: unreadable image"):
        ev.main(["--model", ckpt, "--explain", str(broken), "--text", "a dog", "--out", out])
    with pytest.raises(SystemExit, match="needs --text"):
        ev.main(["--model", ckpt, "--explain", str(broken), "--out", out])
    with pytest.raises(SystemExit, match="--layer 5: the image tower has 2 blocks"):
        ev.main(["--model", ckpt, "--explain", "7", "--layer", "5", "--out", out])
    assert not os.path.exists(out)
    # a ResNet: the real CLI, one line, no traceback
    r = subprocess.run(
        [
            sys.executable,
            os.path.join(ROOT, "eval.py"),
            "--model",
            tiny_resnet_dir(tmp_path),
            "--explain",
            "7",
            "--out",
            out,
        ],
        capture_output=True,
        text=True,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert r.returncode != 0 and "Traceback" not in r.stderr
    assert r.stderr.strip().splitlines()[-1] == (
        "error: --explain needs a ViT with open_clip's module names, "
        "but its image tower is a ModifiedResNet without transformer.resblocks"
    )
    assert not os.path.exists(out)
