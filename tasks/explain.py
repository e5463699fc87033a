"""
Which words of a caption match which patches of an image: second-order attributions of CLIP's
score (Moeller et al. 2025): in both towers the input of one transformer block is interpolated
from a reference to the input, each tower's Jacobian is averaged along that path, and each
(token, patch) pair gets its share of the cosine. explain() returns the [tokens, patch grid]
matrix; with the class-token column and the reference terms it adds up to the score as the steps
grow. cli() is `eval.py --explain`.

    python eval.py --model out/clip_scratch/ckpt.pt --explain 7 --out explain.png       # shapes test scene 7
    python eval.py --model ViT-B-32:openai --explain photo.jpg --text "a dog on a sofa"
"""

import math

import numpy as np
import torch

import shapes
from data import to_tensor
from eval import LABEL_H, _save_png, open_rgb


def _tower(module, name):
    """-> (the transformer's resblocks, whether they see [batch, seq, width]) of one tower"""
    blocks = getattr(getattr(module, "transformer", None), "resblocks", None)
    if blocks is None:
        raise SystemExit(
            f"error: --explain needs a ViT with open_clip's module names, but {name} is a "
            f"{type(module).__name__} without transformer.resblocks"
        )
    # open_clip < 2.24 ran [seq, batch, width]
    return blocks, getattr(module.transformer, "batch_first", True)


def _path_embeddings(encode, block, batch_first, x, ref, steps):
    """Embed [x] * (steps + 1) + [ref] with the input of `block` replaced: row k by r + a_k (h - r),
    a_k = 1 - k / steps (k = 0 .. steps: a = 1, ..., 1/steps, 0), where h and r are the block inputs
    of x and of ref; the last row keeps r. Row `steps` is r read out the way x is (a text tower
    pools at x's EOT), the last row r read out the way ref is. Works whatever length the tower runs
    at (minclip's text tower stops at the batch's last EOT, open_clip's runs the whole context):
    every row shares it. -> (embeddings [steps + 2, D], the path [steps + 2, S, F], a leaf that
    requires grad)"""
    cache = []

    def hook(module, args):
        h = args[0] if batch_first else args[0].transpose(0, 1)  # [B, S, F]
        h_x, h_r = h[0].detach(), h[-1].detach()
        a = 1 - torch.arange(steps + 1, device=h.device, dtype=h.dtype) / steps
        path = torch.cat([h_r + a[:, None, None] * (h_x - h_r), h_r[None]]).requires_grad_(True)
        cache.append(path)
        return (path if batch_first else path.transpose(0, 1),) + tuple(args[1:])

    handle = block.register_forward_pre_hook(hook)
    try:
        e = encode(torch.cat([x.expand(steps + 1, *x.shape[1:]), ref]))
    finally:
        handle.remove()
    assert len(cache) == 1, "the hooked block ran more than once"
    return e.float(), cache[0]


def _contracted_jacobian(e, path, steps):
    """U[d, s] = sum_f J[d, s, f] (h - r)[s, f] with J the integrated Jacobian: the mean over the
    steps of d e_d / d path. Rows of the batch are independent, so one backward pass of the sum
    over the steps gives every step's gradient; one pass per embedding dimension d. -> [D, S]"""
    delta = (path[0] - path[-1]).detach()  # h - r: row 0 is a = 1
    rows = []
    for d in range(e.shape[1]):
        (g,) = torch.autograd.grad(e[:steps, d].sum(), path, retain_graph=d < e.shape[1] - 1)
        rows.append((g[:steps].float().mean(0) * delta.float()).sum(-1))
    return torch.stack(rows)


def explain(model, image, text, layer=-1, steps=10, return_terms=False):
    """Second-order caption-image attributions (Moeller et al. 2025): how much each (token, patch)
    pair contributes to the cosine score of a caption and an image.

    image [1, 3, H, W], preprocessed; text [1, L] token ids (SOT ... EOT, zero padded); any CLIP
    with open_clip's module names (visual.transformer.resblocks, transformer.resblocks), minclip's
    or open_clip's. -> A [T, grid, grid] float on the cpu, T = the tokens through the EOT (SOT
    first), one value per (token, patch) pair, the class token's column dropped.

    The protocol. In both towers the input h of block `layer` (negative counts from the end) is
    interpolated between the reference's r and the input's: r + a (h - r), a = 1, 1 - 1/N, ..., 1/N
    (N = steps). References: the all-zero image in the model's input space (after preprocessing),
    and the text [SOT, 0, EOT, 0, ...] (one placeholder token). J = the mean over the N points of
    d e / d h, the Jacobian of the tower's unnormalised embedding e [D] with respect to h [S, F].
    Then, with U[d, s] = sum_f J[d, s, f] (h - r)[s, f] per tower,

        A[s, p] = sum_d U_t[d, s] U_i[d, p] / (|e_t| |e_i|)

    (e_t, e_i: the embeddings of the text and the image). This is the paper's
    (h_t - r_t)^T J_t^T J_i (h_i - r_i), restricted to token s and patch p and summed over their
    feature dimensions, without ever forming the (S F) x (P F) matrix J_t^T J_i.

    Completeness: sum_s U[:, s] -> e(h) - e(r) as N grows (exactly, for a tower linear in h; the
    sum over the steps is a right Riemann sum, error O(1/N)), so with the score cos(e_t, e_i),

        score = A.sum() + class_token + reference,
        reference = (e_t . e_i(r) + e_t(r) . e_i - e_t(r) . e_i(r)) / (|e_t| |e_i|),

    class_token the dropped column (the text positions after the EOT contribute nothing to a
    causal text tower), e(r) a tower's output for the reference features r at block `layer`, read
    out where the input's is (the text at the caption's EOT, not at the reference's: that is the
    end of the path). return_terms=True returns (A, {"score", "class_token", "reference"})."""
    vis_blocks, vis_bf = _tower(model.visual, "its image tower")
    txt_blocks, txt_bf = _tower(model, "its text tower")
    for blocks, tower in ((vis_blocks, "image"), (txt_blocks, "text")):
        if not -len(blocks) <= layer < len(blocks):
            raise SystemExit(f"error: --layer {layer}: the {tower} tower has {len(blocks)} blocks")
    if image.dim() != 4 or image.shape[0] != 1 or text.dim() != 2 or text.shape[0] != 1:
        raise ValueError(
            f"explain takes one image [1, 3, H, W] and one text [1, L], got {list(image.shape)} and {list(text.shape)}"
        )
    if steps < 1:
        raise SystemExit(f"error: --steps {steps}: needs at least one interpolation step")
    eot = int(text[0].argmax())  # the EOT token has the highest id
    text_ref = torch.zeros_like(text)
    text_ref[0, 0], text_ref[0, 2] = text[0, 0], text[0, eot]
    was_training = model.training
    model.eval()
    try:
        with torch.enable_grad():  # callers may sit under no_grad
            e_i, path_i = _path_embeddings(
                model.encode_image, vis_blocks[layer], vis_bf, image, torch.zeros_like(image), steps
            )
            U_i = _contracted_jacobian(e_i, path_i, steps)  # [D, 1 + grid * grid]
            e_t, path_t = _path_embeddings(
                model.encode_text, txt_blocks[layer], txt_bf, text, text_ref, steps
            )
            U_t = _contracted_jacobian(e_t, path_t, steps)[:, : eot + 1]  # [D, T]
    finally:
        model.train(was_training)
    # row 0 is the input itself (a = 1), row `steps` the reference (a = 0)
    norm = e_t[0].norm() * e_i[0].norm()
    full = (U_t.T @ U_i / norm).detach().cpu()  # [T, 1 + grid * grid]
    grid = math.isqrt(full.shape[1] - 1)
    if grid * grid != full.shape[1] - 1:
        raise SystemExit(
            f"error: --explain: {full.shape[1]} image tokens are not a class token and a square grid"
        )
    A = full[:, 1:].reshape(-1, grid, grid)
    if not return_terms:
        return A
    e_t, e_i = e_t.detach().cpu(), e_i.detach().cpu()
    r_t, r_i = e_t[steps], e_i[steps]
    reference = (e_t[0] @ r_i + r_t @ e_i[0] - r_t @ r_i) / norm.item()
    terms = {
        "score": (e_t[0] @ e_i[0] / norm.item()).item(),
        "class_token": full[:, 0].sum().item(),
        "reference": reference.item(),
    }
    return A, terms


def caption_words(tokenizer, ids):
    """ids: one caption's token ids [L] -> [(word, [token positions])] for the words between SOT and
    EOT, a word's BPE pieces together (open_clip's SimpleTokenizer ends a word's last piece with
    '</w>'; a tokenizer without its `decoder` gets one entry per token)."""
    ids = [int(i) for i in ids]
    eot = max(range(len(ids)), key=ids.__getitem__)
    decoder = getattr(tokenizer, "decoder", None)
    words, piece, positions = [], "", []
    for s in range(1, eot):
        text = decoder[ids[s]] if decoder is not None else tokenizer.decode([ids[s]])
        piece, positions = piece + text.replace("</w>", ""), positions + [s]
        if decoder is None or text.endswith("</w>"):
            words.append((piece.strip(), positions))
            piece, positions = "", []
    if positions:  # a caption cut at the context length
        words.append((piece, positions))
    return words


def span_positions(tokenizer, ids, span):
    """the token positions of `span` (a run of whole words) in a caption's ids [L] -> [positions]"""
    words = caption_words(tokenizer, ids)
    want = [w for w, _ in caption_words(tokenizer, tokenizer([span])[0])]
    for i in range(len(words) - len(want) + 1):
        if want and [w for w, _ in words[i : i + len(want)]] == want:
            return [s for _, pos in words[i : i + len(want)] for s in pos]
    caption = " ".join(w for w, _ in words)
    raise SystemExit(f"error: --span {span!r} is not a run of words of the caption {caption!r}")


def save_explanation(image, panels, path, note=""):
    """The picture: the image (PIL, what the model sees), then one panel per (title, total, heat
    [grid, grid]) with the heat map over a grey copy of the image, positive red, negative blue,
    opacity |value| / m on one scale m for all panels (the largest |value|), a patch per cell of
    the grid; laid out like save_grid, two lines under each cell: the title and the panel's sum."""
    from PIL import Image, ImageDraw, ImageOps

    m = max(float(h.abs().max()) for _, _, h in panels) or 1.0  # an all-zero map stays clear
    cols = math.ceil(math.sqrt(len(panels) + 1))
    rows = math.ceil((len(panels) + 1) / cols)
    cell = min(256, max(128, min(image.size)))
    resample = Image.Resampling.NEAREST if min(image.size) < cell else Image.Resampling.BICUBIC
    base = ImageOps.fit(image, (cell, cell), resample)
    # lighter, so colour reads
    grey = np.asarray(base.convert("L").convert("RGB"), dtype=np.float32) * 0.6 + 255 * 0.4
    red, blue = np.array([215, 25, 28], np.float32), np.array([44, 123, 182], np.float32)
    canvas = Image.new("RGB", (cols * cell, rows * (cell + 2 * LABEL_H)), "white")
    draw = ImageDraw.Draw(canvas)
    tiles = [(base, note, f"scale ±{m:.2g}")]
    for title, total, heat in panels:
        t = (heat.float() / m).clamp(-1, 1).numpy()
        t = np.asarray(Image.fromarray(t.astype(np.float32)).resize((cell, cell), Image.Resampling.NEAREST))
        alpha = 0.9 * np.abs(t)[..., None]
        colour = np.where(t[..., None] >= 0, red, blue)
        tiles.append(
            (
                Image.fromarray((grey * (1 - alpha) + colour * alpha).round().astype(np.uint8)),
                title,
                f"{total:+.3g}",
            )
        )
    for j, (tile, *lines) in enumerate(tiles):
        x, y = (j % cols) * cell, (j // cols) * (cell + 2 * LABEL_H)
        canvas.paste(tile, (x, y))
        for k, line in enumerate(lines):
            # pil's default font; its spaces are thin, so a span's words get two
            draw.text((x + 4, y + cell + 2 + k * LABEL_H), line.replace(" ", "  "), fill="black")
    _save_png(canvas, path)


def cli(model, preprocess, tokenizer, args, image_size, native, device):
    """--explain: attributions of one caption and one image, printed per word and drawn to --out"""
    from PIL import Image, ImageOps

    _tower(model.visual, "its image tower")  # a ResNet fails here, before any image is read
    from_scene = args.explain.isdigit()
    if from_scene:
        scene = shapes.test_scenes(int(args.explain) + 1)[-1]
        pil = Image.fromarray(shapes.render(scene, image_size))
        text = scene.caption() if args.text is None else args.text
    else:
        if args.text is None:
            raise SystemExit("error: --explain IMAGE_PATH needs --text CAPTION")
        pil, text = open_rgb(args.explain), args.text
    ids = tokenizer([text])
    panels = (
        [(args.span, span_positions(tokenizer, ids[0], args.span))]
        if args.span is not None
        else caption_words(tokenizer, ids[0])
    )
    # what the model sees: minclip models take a shapes render as is, everything else its preprocess
    image = (to_tensor(np.asarray(pil)) if native and from_scene else preprocess(pil))[None]
    A, terms = explain(model, image.to(device), ids.to(device), args.layer, args.steps, return_terms=True)
    words = sum(A[pos].sum().item() for _, pos in caption_words(tokenizer, ids[0]))
    print(f"shapes test scene {args.explain}" if from_scene else f"image: {args.explain}")
    print(
        f"caption: {text!r}\nlayer {args.layer}, {args.steps} steps, a {A.shape[1]}x{A.shape[2]} patch grid"
    )
    print(f"score (cosine)          {terms['score']:+.4f}")
    print(
        f"sum of attributions     {A.sum().item():+.4f}   (words {words:+.4f}, "
        f"start token {A[0].sum().item():+.4f}, end token {A[-1].sum().item():+.4f})"
    )
    print(f"class-token column      {terms['class_token']:+.4f}")
    print(
        f"reference terms         {terms['reference']:+.4f}   (score = sum + class token + reference as --steps grows)"
    )
    heats = [(word, A[pos].sum(0)) for word, pos in panels]
    for word, heat in heats:
        print(f"{heat.sum().item():+.4f}  {word}")
    # a square view of the image, cropped like the preprocess crops it, so patches line up
    side = min(pil.size)
    out = args.out or "explain.png"
    save_explanation(
        ImageOps.fit(pil, (side, side)),
        [(w, h.sum().item(), h) for w, h in heats],
        out,
        note=f"score {terms['score']:+.3f}",
    )
    print(f"wrote {out}")
