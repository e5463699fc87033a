"""
Evaluation shared by every minclip script, and a CLI.

    python eval.py --model out/clip_scratch/ckpt.pt --bench shapes --json results.json
    python eval.py --model ViT-B-32:openai --bench shapes          # any open_clip NAME:PRETRAINED
    python eval.py --model local-dir:out/export --bench flickr8k --data_root ~/data/flickr8k
    python eval.py --model out/clip_scratch/ckpt.pt --query "a small red circle left of a large blue square" --top 9 --grid grid.png
    python eval.py --model out/clip_scratch/ckpt.pt --export out/export   # open_clip hub directory
    python eval.py --model out/clips/ckpt.pt --caption 7                  # CLIPS captioner, shapes test scene 7

Protocols: the unwrapped model in eval mode under no_grad, on the whole
fixed split. Retrieval: image->text rank = best rank among the image's captions, text->image one
rank per caption; i2t is CLIP_benchmark's `text_retrieval_recall@k`, t2i its
`image_retrieval_recall@k`. Pairwise probes: correct iff the positive scores strictly higher.
Ties count against the model everywhere (retrieval included), so a collapsed model whose
embeddings cannot tell two captions apart never gets credit for either.
"""
import argparse
import json
import math
import os

import torch

from model import CLIP, Captioner

SHAPES_SIZE = 64  # the shapes bench's default resolution, what external models see before their preprocess
LABEL_H = 16      # height of the score strip under each image of a --grid

# -----------------------------------------------------------------------------
# metrics


def retrieval_metrics(sim, text_to_image, ks=(1, 5, 10)):
    """sim: [n_images, n_texts] scores; text_to_image: [n_texts] long, the image each text describes.
    Returns R@k for i2t (an image is found at the best rank among its captions) and t2i (one rank
    per caption), the median ranks (1-based, floor of numpy's median + 1 as in VSE++) and rsum.
    A rank counts every wrong item scoring >= the right one: ties are resolved against the model."""
    sim, text_to_image = sim.float().cpu(), text_to_image.long().cpu()
    cols = torch.arange(sim.shape[1])
    true = torch.zeros_like(sim, dtype=torch.bool)
    true[text_to_image, cols] = True
    # t2i: for each text, the wrong images scoring >= its own image
    t2i_rank = ((sim >= sim[text_to_image, cols][None, :]) & ~true).sum(0)
    # i2t: for each image, the wrong texts scoring >= its best caption
    best = sim.masked_fill(~true, float("-inf")).max(1).values  # [n_images]
    i2t_rank = ((sim >= best[:, None]) & ~true).sum(1)
    out = {}
    for name, ranks in (("i2t", i2t_rank), ("t2i", t2i_rank)):
        for k in ks:
            out[f"retrieval/{name}_r{k}"] = (ranks < k).float().mean().item()
        out[f"retrieval/{name}_medr"] = ranks.float().quantile(0.5).floor().item() + 1
    out["retrieval/rsum"] = 100 * sum(out[f"retrieval/{n}_r{k}"] for n in ("i2t", "t2i") for k in ks)
    return out


def pairwise_accuracy(pos_scores, neg_scores):
    """fraction where the positive scores strictly higher than the negative (ties are wrong)."""
    return (pos_scores > neg_scores).float().mean().item()

# -----------------------------------------------------------------------------
# encoding helpers


@torch.no_grad()
def encode_images(model, images, device, batch_size=256):
    return torch.cat([model.encode_image(images[i:i + batch_size].to(device), normalize=True).float().cpu()
                      for i in range(0, len(images), batch_size)])


@torch.no_grad()
def encode_texts(model, tokenizer, texts, device, batch_size=256):
    return torch.cat([model.encode_text(tokenizer(texts[i:i + batch_size]).to(device), normalize=True).float().cpu()
                      for i in range(0, len(texts), batch_size)])


def open_rgb(image):
    """a PIL image, or a path to one -> RGB PIL image"""
    from PIL import Image
    if isinstance(image, Image.Image):
        return image.convert("RGB")
    try:
        with Image.open(image) as im:
            return im.convert("RGB")
    except (OSError, ValueError) as e:  # a test split must be whole: fail with the file's name
        raise SystemExit(f"error: {image}: unreadable image ({e})")


def encode_pil(model, preprocess, images, device, batch_size=128):
    """images: PIL images or paths, decoded one batch at a time (coco's 5k test photos decoded at
    once would take ~5 GB) -> [n, D] normalised features"""
    return torch.cat([encode_images(model, torch.stack([preprocess(open_rgb(im)) for im in images[i:i + batch_size]]), device)
                      for i in range(0, len(images), batch_size)])

# -----------------------------------------------------------------------------
# benchmarks


@torch.no_grad()
def eval_shapes(model, tokenizer, image_size, device, n=1000, seed=None, preprocess=None):
    """The built-in shapes benchmark: retrieval over n test scenes with unique content, and one
    pairwise probe per hard-negative kind (the scene's own caption vs the negative)."""
    import data
    was_training = model.training
    model.eval()
    scenes = data.test_scenes(n, data.TEST_SEED if seed is None else seed)
    if preprocess is None:  # minclip models: the world renders at the model's resolution
        images = torch.stack([data.to_tensor(data.render(s, image_size)) for s in scenes])
    else:  # external models: render, then their own preprocessing
        from PIL import Image
        images = torch.stack([preprocess(Image.fromarray(data.render(s, image_size))) for s in scenes])
    img = encode_images(model, images, device)
    txt = encode_texts(model, tokenizer, [s.caption() for s in scenes], device)
    out = retrieval_metrics(img @ txt.T, torch.arange(n))
    pos = (img * txt).sum(-1)
    for kind, fn in data.NEGATIVES.items():
        neg = encode_texts(model, tokenizer, [fn(s) for s in scenes], device)
        out[f"probe/{kind}"] = pairwise_accuracy(pos, (img * neg).sum(-1))
        if kind == "relation":
            out["diag/relation_text_cos"] = (txt * neg).sum(-1).mean().item()
    model.train(was_training)
    return out


@torch.no_grad()
def eval_retrieval(model, preprocess, tokenizer, items, device, batch_size=128):
    """Real-data retrieval over a whole test split. items: [(image path, [captions], ...)]; a
    recaption file's third field, the synthetic caption, is not a test caption."""
    was_training = model.training
    model.eval()
    img = encode_pil(model, preprocess, [item[0] for item in items], device, batch_size)
    txt = encode_texts(model, tokenizer, [c for item in items for c in item[1]], device, batch_size)
    text_to_image = torch.tensor([i for i, item in enumerate(items) for _ in item[1]])
    model.train(was_training)
    return retrieval_metrics(img @ txt.T, text_to_image)


@torch.no_grad()
def find_matches(model, preprocess, tokenizer, images, query, device, k=9):
    """The retrieval demo: rank images (PIL images or paths) by cosine similarity to the query
    text -> [(index, score)] of the top k, best first."""
    model.eval()
    sim = encode_pil(model, preprocess, images, device) @ encode_texts(model, tokenizer, [query], device)[0]
    scores, idx = sim.topk(min(k, len(images)))
    return list(zip(idx.tolist(), scores.tolist()))


def save_grid(images, scores, path):
    """images (PIL or paths) as a square grid with the score written under each; tiny images
    (the shapes world) are upscaled with nearest neighbour so their pixels stay visible."""
    from PIL import Image, ImageDraw, ImageOps
    images = [open_rgb(im) for im in images]
    cols = math.ceil(math.sqrt(len(images)))
    rows = math.ceil(len(images) / cols)  # k = 9 -> 3 x 3
    cell = min(256, max(128, min(min(im.size) for im in images)))
    grid = Image.new("RGB", (cols * cell, rows * (cell + LABEL_H)), "white")
    draw = ImageDraw.Draw(grid)
    for j, (im, score) in enumerate(zip(images, scores)):
        x, y = (j % cols) * cell, (j // cols) * (cell + LABEL_H)
        small = min(im.size) < cell
        grid.paste(ImageOps.fit(im, (cell, cell), Image.Resampling.NEAREST if small else Image.Resampling.BICUBIC), (x, y))
        draw.text((x + 4, y + cell + 2), f"{score:.3f}", fill="black")  # pil's default bitmap font
    tmp = f"{path}.tmp.{os.getpid()}.png"  # keep the suffix: pil picks the format from it
    grid.save(tmp)
    os.replace(tmp, path)

@torch.no_grad()
def generate_caption(model, captioner, image, web_caption, tokenizer, device="cpu"):
    """The CLIPS captioner's greedy caption of one image (float [3, S, S], preprocessed) given its
    web caption -> text (lowercase, bpe-spaced as the tokenizer decodes it)."""
    model.eval(), captioner.eval()
    web = tokenizer([web_caption]).to(device)
    _, image_tokens = model.encode_image(image[None].to(device), return_tokens=True)
    _, text_tokens = model.encode_text(web, return_tokens=True)
    ids = captioner.greedy(captioner(image_tokens, text_tokens, web))[0].tolist()
    ids = ids[:ids.index(tokenizer.eot_token_id)] if tokenizer.eot_token_id in ids else ids
    return tokenizer.decode(ids).strip()

# -----------------------------------------------------------------------------
# models: load any CLIP, export ours as an open_clip hub directory


def is_checkpoint(spec):
    return spec.endswith(".pt") or os.path.isfile(spec)


def load_model(spec, device="cpu"):
    """spec: a minclip checkpoint (*.pt), 'local-dir:DIR' (open_clip hub directory) or
    'NAME:PRETRAINED' (open_clip, e.g. ViT-B-32:openai) -> (model, preprocess, tokenizer), eval mode.
    model.image_size is the native resolution; minclip models also carry model.model_cfg."""
    import open_clip
    if is_checkpoint(spec):
        if not os.path.isfile(spec):
            raise SystemExit(f"error: --model {spec}: no such checkpoint file")
        ckpt = torch.load(spec, map_location="cpu", weights_only=True)
        model = CLIP(**ckpt["model_cfg"])
        model.load_state_dict(ckpt["model"], strict=True)
        model.model_cfg, model.image_size = ckpt["model_cfg"], int(ckpt["model_cfg"]["vision_cfg"]["image_size"])
        tokenizer = open_clip.tokenizer.SimpleTokenizer(context_length=model.context_length)
        preprocess = open_clip.transform.image_transform(model.image_size, is_train=False)  # openai mean/std, bicubic
        return model.to(device).eval(), preprocess, tokenizer
    kwargs = {}
    if spec.startswith("local-dir:"):
        d, name = spec[len("local-dir:"):], spec
        # open_clip itself only logs a warning and returns a *randomly initialised* model when the
        # directory has a config but no weights file, so check for both here
        if not os.path.isfile(os.path.join(d, "open_clip_config.json")):
            raise SystemExit(f"error: --model {spec}: no open_clip_config.json in {d}")
        if not any(f.endswith((".safetensors", ".bin", ".pth")) for f in os.listdir(d)):
            raise SystemExit(f"error: --model {spec}: no weights (*.safetensors, *.bin, *.pth) in {d}")
        with open(os.path.join(d, "open_clip_config.json")) as f:
            model_cfg = json.load(f).get("model_cfg")
    else:
        name, _, pretrained = spec.partition(":")
        kwargs["pretrained"] = pretrained or None
        # pitfall: OpenAI's ViT-B-32 (and any *-quickgelu tag) was trained with QuickGELU. open_clip
        # 3.x builds plain `ViT-B-32` with GELU and only *warns* about the mismatch, and a fine-tuned
        # checkpoint passed as a file path gets no warning at all: every score silently changes.
        # so follow the tag's flag here; for a file path, name the model ViT-B-32-quickgelu yourself.
        tag = open_clip.pretrained.get_pretrained_cfg(name.replace("/", "-"), pretrained) if pretrained else {}
        kwargs["force_quick_gelu"] = bool(tag.get("quick_gelu", False))
        model_cfg = open_clip.get_model_config(name)
        if model_cfg is not None and kwargs["force_quick_gelu"]:
            model_cfg = {**model_cfg, "quick_gelu": True}
    try:
        model, _, preprocess = open_clip.create_model_and_transforms(name, **kwargs)
        tokenizer = open_clip.get_tokenizer(name)
    except (RuntimeError, ValueError, FileNotFoundError) as e:  # unknown name, no download, bad config
        raise SystemExit(f"error: --model {spec}: {e}")
    size = model.visual.image_size
    model.image_size, model.model_cfg = int(size[0] if isinstance(size, (tuple, list)) else size), model_cfg
    return model.to(device).eval(), preprocess, tokenizer


def load_clip(spec, device="cpu"):
    """The --init of the fine-tuning scripts: any spec load_model accepts -> (minclip CLIP with its
    weights, model_cfg, preprocess, tokenizer). open_clip's weights load into minclip's CLIP with
    strict=True (same names, same maths), so every script trains one model class; a model that is not
    the standard ViT + text Transformer CLIP is one clear error."""
    model, preprocess, tokenizer = load_model(spec, device)
    if isinstance(model, CLIP):
        return model, model.model_cfg, preprocess, tokenizer
    try:
        ours = CLIP(**model.model_cfg)
        ours.load_state_dict(model.state_dict(), strict=True)
    except (TypeError, ValueError, RuntimeError) as e:
        raise SystemExit(f"error: --init {spec}: minclip's CLIP cannot hold this model ({str(e).splitlines()[0]})")
    ours.model_cfg, ours.image_size = model.model_cfg, model.image_size
    return ours.to(device).eval(), model.model_cfg, preprocess, tokenizer


def load_captioner(path, device="cpu"):
    """the CLIPS captioner saved beside the towers in a clip_scratch.py checkpoint, or one clear error"""
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    if not ckpt.get("captioner_cfg"):
        raise SystemExit(f"error: {path} has no captioner: --caption needs a checkpoint trained with "
                         "clip_scratch.py --captioner_weight 2")
    captioner = Captioner(**ckpt["captioner_cfg"])
    captioner.load_state_dict(ckpt["captioner"], strict=True)
    return captioner.to(device).eval()


def export_open_clip(model, model_cfg, out_dir):
    """Write an open_clip hub directory: open_clip_config.json + open_clip_model.safetensors, which
    `open_clip.create_model_and_transforms("local-dir:" + out_dir)` loads with strict=True."""
    from open_clip.constants import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD
    from safetensors.torch import save_file
    os.makedirs(out_dir, exist_ok=True)
    config = {"model_cfg": model_cfg,
              "preprocess_cfg": {"size": model_cfg["vision_cfg"]["image_size"], "mean": list(OPENAI_DATASET_MEAN),
                                 "std": list(OPENAI_DATASET_STD), "interpolation": "bicubic", "resize_mode": "shortest"}}
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}  # safetensors wants contiguous tensors
    # weights first: a crash between the two writes must not leave a config without weights, which
    # open_clip would load as a random model (see load_model)
    weights, cfg_path = os.path.join(out_dir, "open_clip_model.safetensors"), os.path.join(out_dir, "open_clip_config.json")
    save_file(state, f"{weights}.tmp")
    os.replace(f"{weights}.tmp", weights)
    with open(f"{cfg_path}.tmp", "w") as f:
        json.dump(config, f, indent=2)
    os.replace(f"{cfg_path}.tmp", cfg_path)

# -----------------------------------------------------------------------------
# cli


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=__doc__.split("\n\n", 1)[1])
    # model
    p.add_argument("--model", required=True, help="ckpt.pt | local-dir:DIR | NAME:PRETRAINED (open_clip)")
    # benchmark
    p.add_argument("--bench", default="shapes", choices=("shapes", "flickr8k", "coco"))
    p.add_argument("--data_root", default=None, help="dataset folder (flickr8k, coco)")
    p.add_argument("--n", type=int, default=1000, help="shapes: number of test scenes")
    p.add_argument("--seed", type=int, default=None, help="shapes: draw the test scenes from this seed (default: the fixed test seed)")
    # retrieval demo (replaces the metrics)
    p.add_argument("--query", default=None, help="rank the bench's test images by similarity to this text")
    p.add_argument("--top", type=int, default=9, help="with --query: how many matches to show")
    p.add_argument("--grid", default=None, metavar="PNG", help="with --query: save the top matches as an image grid")
    # captioning demo (replaces the metrics)
    p.add_argument("--caption", default=None, metavar="IMAGE_OR_INDEX",
                   help="print the CLIPS captioner's greedy caption of an image file, or of shapes test scene INDEX")
    p.add_argument("--web_caption", default=None, help="with --caption: the web caption it is conditioned on "
                   "(default: the scene's caption; '' for an image file)")
    # output
    p.add_argument("--json", default=None, metavar="PATH", help="write the metrics as a flat JSON dict")
    p.add_argument("--export", default=None, metavar="DIR", help="write a minclip checkpoint as an open_clip hub directory, then stop")
    # system
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    args = p.parse_args(argv)
    device = torch.device("cuda" if args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available()) else "cpu")

    if args.export and not is_checkpoint(args.model):
        raise SystemExit(f"error: --export needs a minclip checkpoint (*.pt), got --model {args.model}")
    model, preprocess, tokenizer = load_model(args.model, device)
    if args.export:
        export_open_clip(model, model.model_cfg, args.export)
        print(f"wrote {args.export}: open_clip.create_model_and_transforms('local-dir:{args.export}')")
        return
    if args.caption is not None:
        if not is_checkpoint(args.model):
            raise SystemExit(f"error: --caption needs a minclip checkpoint (*.pt), got --model {args.model}")
        captioner = load_captioner(args.model, device)
        if args.caption.isdigit():
            import data
            scene = data.test_scenes(int(args.caption) + 1)[-1]
            image, web = data.to_tensor(data.render(scene, model.image_size)), scene.caption()
            print(f"shapes test scene {args.caption}\ndescription: {data.description(scene)}")
        else:
            image, web = preprocess(open_rgb(args.caption)), ""
        web = web if args.web_caption is None else args.web_caption
        print(f"web caption: {web!r}\ncaption:     {generate_caption(model, captioner, image, web, tokenizer, device)}")
        return
    native = is_checkpoint(args.model)  # minclip models see the world at their own resolution
    image_size = model.image_size if native else SHAPES_SIZE

    # the bench's test images (PIL images or paths) with one caption each, for the demo
    if args.bench == "shapes":
        import data
        from PIL import Image
        scenes = data.test_scenes(args.n, data.TEST_SEED if args.seed is None else args.seed) if args.query else []
        images, labels = [Image.fromarray(data.render(s, image_size)) for s in scenes], [s.caption() for s in scenes]
    else:
        import data
        if args.data_root is None:
            raise SystemExit(f"error: --bench {args.bench} needs --data_root")
        try:
            items = data.read_dataset(args.bench, args.data_root)["test"]
        except data.DataError as e:
            raise SystemExit(f"error: {e}")
        images, labels = [path for path, _ in items], [f"{os.path.basename(path)}  {caps[0]}" for path, caps in items]

    if args.query:
        matches = find_matches(model, preprocess, tokenizer, images, args.query, device, args.top)
        print(f"top {len(matches)} of {len(images)} test images for {args.query!r}:")
        for i, score in matches:
            print(f"{score:8.4f}  {labels[i]}")
        if args.grid:
            save_grid([images[i] for i, _ in matches], [s for _, s in matches], args.grid)
            print(f"wrote {args.grid}")
        return

    if args.bench == "shapes":
        metrics = eval_shapes(model, tokenizer, image_size, device, n=args.n, seed=args.seed,
                              preprocess=None if native else preprocess)
    else:
        metrics = eval_retrieval(model, preprocess, tokenizer, items, device)
    width = max(map(len, metrics))
    print(f"{args.model} on {args.bench}")
    for k, v in metrics.items():
        print(f"{k:<{width}}  {v:8.4f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"model": args.model, "bench": args.bench, **metrics}, f, indent=2)


if __name__ == "__main__":
    main()
