"""eval.py: metrics on hand-computed cases, benchmarks on models whose embeddings we control,
open_clip round trips (checkpoint, hub directory), and the CLI end to end."""
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
import eval as ev  # noqa: E402
import data  # noqa: E402
from model import CLIP, model_config  # noqa: E402

EXPECTED_KEYS = ["retrieval/i2t_r1", "retrieval/i2t_r5", "retrieval/t2i_r1", "retrieval/t2i_r5",
                 "probe/relation", "probe/attribute_swap", "diag/relation_text_cos"]

# -----------------------------------------------------------------------------
# metrics


def naive_ranks(sim, text_to_image):
    """loop reference: rank = wrong items scoring >= the right one (ties against the model)."""
    n_img, n_txt = sim.shape
    t2i = [sum(sim[j, t] >= sim[text_to_image[t], t] for j in range(n_img) if j != text_to_image[t]) for t in range(n_txt)]
    i2t = []
    for i in range(n_img):
        own = [t for t in range(n_txt) if text_to_image[t] == i]
        i2t.append(min(sum(sim[i, u] >= sim[i, t] for u in range(n_txt) if text_to_image[u] != i) for t in own))
    return i2t, t2i


def test_retrieval_metrics_hand_computed():
    # 3 images x 5 captions: captions 0-4 describe image 0, 5-9 image 1, 10-14 image 2
    sim = torch.tensor([
        # c0  c1  c2  c3  c4 | c5  c6  c7  c8  c9 | c10 c11 c12 c13 c14
        [90, 80, 50, 20, 70, 45, 19, 22, 36, 31, 5, 40, 42, 43, 2],    # image 0: best own 90 tops the row -> rank 0
        [10, 12, 60, 61, 15, 40, 55, 50, 35, 30, 6, 41, 58, 3, 1],     # image 1: best own is c6 (55), not c5; 60, 61, 58 above -> rank 3
        [11, 13, 14, 62, 16, 30, 21, 23, 37, 24, 15, 9, 8, 7, 12],     # image 2: best own 15; 62 37 30 24 23 21 16 above -> rank 7
    ], dtype=torch.float)
    t2i = torch.arange(15) // 5
    # text->image rank per column (other images above the true one)
    t2i_ranks = [0, 0, 1, 2, 0, 1, 0, 0, 2, 1, 0, 2, 2, 1, 0]
    assert naive_ranks(sim, t2i) == ([0, 3, 7], t2i_ranks)
    m = ev.retrieval_metrics(sim, t2i)
    assert m["retrieval/i2t_r1"] == pytest.approx(1 / 3)
    assert m["retrieval/i2t_r5"] == pytest.approx(2 / 3)
    assert m["retrieval/i2t_r10"] == 1.0
    assert m["retrieval/i2t_medr"] == 4  # median of ranks 0, 3, 7 is 3, 1-based 4 (first caption only would give 5)
    assert m["retrieval/t2i_r1"] == pytest.approx(7 / 15)
    assert m["retrieval/t2i_r5"] == 1.0 and m["retrieval/t2i_r10"] == 1.0
    assert m["retrieval/t2i_medr"] == 2  # sorted ranks: 7 zeros, 4 ones, 4 twos; the 8th is 1
    assert m["retrieval/rsum"] == pytest.approx(100 * (1 / 3 + 2 / 3 + 1 + 7 / 15 + 1 + 1))


def test_retrieval_metrics_ties_count_against_the_model():
    # a collapsed model (all scores equal) must not look perfect
    m = ev.retrieval_metrics(torch.ones(2, 2), torch.tensor([0, 1]))
    assert m["retrieval/i2t_r1"] == 0 and m["retrieval/t2i_r1"] == 0
    assert m["retrieval/i2t_medr"] == 2 and m["retrieval/t2i_medr"] == 2
    # a tie between two of an image's own captions is harmless; a tie with a wrong one is not
    sim = torch.tensor([[3., 3., 1.], [0., 0., 3.]])
    m = ev.retrieval_metrics(sim, torch.tensor([0, 0, 1]))
    assert m["retrieval/i2t_r1"] == 1.0 and m["retrieval/t2i_r1"] == 1.0
    sim = torch.tensor([[3., 1., 3.], [0., 2., 3.]])  # image 0's best (3) ties with image 1's caption
    m = ev.retrieval_metrics(sim, torch.tensor([0, 0, 1]))
    assert m["retrieval/i2t_r1"] == 0.5  # image 0 -> rank 1, image 1 -> rank 0
    assert m["retrieval/t2i_r1"] == pytest.approx(1 / 3)  # caption 1: 1 < 2 -> rank 1; caption 2: 3 ties 3 -> rank 1


def test_retrieval_metrics_matches_loop_on_random_ties():
    g = torch.Generator().manual_seed(0)
    sim = torch.randint(0, 4, (7, 20), generator=g).float()  # few distinct values: many ties
    t2i = torch.randint(0, 7, (20,), generator=g)
    t2i[:7] = torch.arange(7)  # every image has a caption
    i2t_ranks, t2i_ranks = (torch.tensor(r) for r in naive_ranks(sim, t2i))
    m = ev.retrieval_metrics(sim, t2i)
    for k in (1, 5, 10):
        assert m[f"retrieval/i2t_r{k}"] == pytest.approx((i2t_ranks < k).float().mean().item())
        assert m[f"retrieval/t2i_r{k}"] == pytest.approx((t2i_ranks < k).float().mean().item())
    assert m["retrieval/t2i_medr"] == np.floor(np.median(t2i_ranks.numpy())) + 1


def test_pairwise_accuracy_ties_are_wrong():
    pos, neg = torch.tensor([1., 2., 3., 4.]), torch.tensor([0., 2., 4., 3.999])
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
    scenes = data.test_scenes(n)
    images = [data.to_tensor(data.render(s, size)) for s in scenes]
    return Stub(images, [text_key(s.caption()) for s in scenes], text_key)


def test_eval_shapes_perfect_stub():
    model = shapes_stub(50, 16)
    m = ev.eval_shapes(model, model.tokenizer, 16, "cpu", n=50)
    assert m["retrieval/i2t_r1"] == 1 and m["retrieval/t2i_r1"] == 1 and m["retrieval/rsum"] == 600
    assert all(m[f"probe/{kind}"] == 1 for kind in data.NEGATIVES)
    assert m["diag/relation_text_cos"] == 0


def test_eval_shapes_relation_blind_stub():
    # a text tower that cannot read the relation word: the relation probe is all ties -> 0, the
    # caption and its flip have cosine 1; the attribute probes are untouched
    def blind(t):
        for r in data.CONVERSE:
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
    assert all(0 <= m[k] <= 1 for k in m if "/" in k and "medr" not in k and "rsum" not in k and "cos" not in k)
    assert m["retrieval/i2t_r1"] <= 0.2 and m["retrieval/t2i_r1"] <= 0.2  # chance is 1/50
    assert all(0.2 <= m[f"probe/{k}"] <= 0.8 for k in data.NEGATIVES)


def test_find_matches_and_eval_retrieval_with_stub(tmp_path):
    # three solid-colour photos with two captions each
    colours = {"red": (255, 0, 0), "green": (0, 255, 0), "blue": (0, 0, 255)}
    paths = []
    for name, rgb in colours.items():
        paths.append(str(tmp_path / f"{name}.png"))
        Image.new("RGB", (5, 4), rgb).save(paths[-1])
    preprocess = lambda im: torch.from_numpy(np.array(im)).float()  # noqa: E731
    model = Stub([preprocess(Image.open(p).convert("RGB")) for p in paths], list(colours), text_key=lambda t: t.split()[-1])
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


def save_ckpt(path, model, cfg):
    torch.save({"model": model.state_dict(), "model_cfg": cfg, "optimizer": {}, "step": 0, "args": {}}, path)
    return str(path)


def embeddings(model, size=64):
    import open_clip
    torch.manual_seed(1)
    x = torch.randn(3, 3, size, size)
    tok = open_clip.tokenizer.SimpleTokenizer(context_length=32)(["a small red circle left of a large blue square", "hi", ""])
    with torch.no_grad():
        return model.encode_image(x), model.encode_text(tok)


def test_checkpoint_loads_strict_in_minclip_and_open_clip(tmp_path):
    import open_clip
    model, cfg = tiny_model()
    loaded, preprocess, tokenizer = ev.load_model(save_ckpt(tmp_path / "ckpt.pt", model, cfg))
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
    ev.export_open_clip(model, cfg, str(tmp_path / "hub"))
    assert sorted(os.listdir(tmp_path / "hub")) == ["open_clip_config.json", "open_clip_model.safetensors"]
    oc, _, preprocess = open_clip.create_model_and_transforms(f"local-dir:{tmp_path / 'hub'}")
    oc.eval()
    for a, b in zip(embeddings(model), embeddings(oc)):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=0)
    tok = open_clip.get_tokenizer(f"local-dir:{tmp_path / 'hub'}")
    assert tok.context_length == 32
    # its preprocess is ours: a shapes render at native size goes through unchanged
    img = data.render(data.test_scenes(1)[0], 64)
    torch.testing.assert_close(preprocess(Image.fromarray(img)), data.to_tensor(img), atol=1e-5, rtol=0)
    # and load_model takes the directory too
    loaded, _, _ = ev.load_model(f"local-dir:{tmp_path / 'hub'}")
    assert loaded.image_size == 64


def test_load_model_errors(tmp_path):
    with pytest.raises(SystemExit, match="nowhere/ckpt.pt"):
        ev.load_model(str(tmp_path / "nowhere/ckpt.pt"))
    with pytest.raises(SystemExit, match="no open_clip_config.json"):
        ev.load_model(f"local-dir:{tmp_path}")
    (tmp_path / "open_clip_config.json").write_text("{}")
    with pytest.raises(SystemExit, match="no weights"):  # open_clip alone would return a random model
        ev.load_model(f"local-dir:{tmp_path}")

def test_openai_tags_are_built_with_quick_gelu(monkeypatch):
    # open_clip 3.x builds ViT-B-32 + the openai tag with GELU and only warns; load_model must force QuickGELU
    import open_clip
    seen = []

    def fake_create(name, **kwargs):
        seen.append((name, kwargs))
        raise RuntimeError("offline")
    monkeypatch.setattr(open_clip, "create_model_and_transforms", fake_create)
    for spec in ("ViT-B-32:openai", "ViT-B/32:openai", "ViT-B-32:laion2b_s34b_b79k"):
        with pytest.raises(SystemExit, match="offline"):
            ev.load_model(spec)
    assert [k["force_quick_gelu"] for _, k in seen] == [True, True, False]
    assert [k["pretrained"] for _, k in seen] == ["openai", "openai", "laion2b_s34b_b79k"]


# -----------------------------------------------------------------------------
# the CLI end to end


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    model, cfg = tiny_model()
    return save_ckpt(tmp_path_factory.mktemp("ckpt") / "ckpt.pt", model, cfg)


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
        top = data.render(next(s for s in data.test_scenes(50) if s.caption() == lines[0].split(None, 1)[1]), 64)
        cell = np.asarray(im.convert("RGB"))[:128, :128]
        assert (cell == top.repeat(2, 0).repeat(2, 1)).all()  # nearest-neighbour upscale of the best match
    ev.main(["--model", ckpt, "--n", "50", "--query", query, "--top", "4", "--seed", "7"])
    assert capsys.readouterr().out.splitlines()[1:5] != lines


def test_cli_real_data_bench(ckpt, capsys):
    ev.main(["--model", ckpt, "--bench", "coco", "--data_root", os.path.join(ROOT, "tests/fixtures/coco"), "--device=cpu"])
    out = capsys.readouterr().out
    assert "retrieval/t2i_r1" in out and "probe/relation" not in out


def test_cli_errors(tmp_path, ckpt):
    missing = str(tmp_path / "missing" / "ckpt.pt")
    with pytest.raises(SystemExit) as e:
        ev.main(["--model", missing])
    assert missing in str(e.value.code)
    with pytest.raises(SystemExit, match="needs a minclip checkpoint"):
        ev.main(["--model", "local-dir:x", "--export", str(tmp_path / "x")])
    # the real CLI: non-zero exit, one line naming the path, no traceback
    r = subprocess.run([sys.executable, os.path.join(ROOT, "eval.py"), "--model", missing], capture_output=True, text=True,
                       env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode != 0 and missing in r.stderr and "Traceback" not in r.stderr
