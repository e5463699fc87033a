"""
CLIP trained from scratch: a ViT image tower and a causal text Transformer pulled together by the
symmetric InfoNCE loss over the (global) batch (Radford et al. 2021, "Learning Transferable Visual
Models From Natural Language Supervision").

Run it
    python clip_scratch.py                                   # CPU, built-in shapes world, ~9 min
    python clip_scratch.py --data flickr8k --data_root ~/data/flickr8k --model_size small
    torchrun --standalone --nproc_per_node=8 clip_scratch.py --data coco --data_root ~/data/coco
    torchrun --standalone --nproc_per_node=2 clip_scratch.py --device cpu     # DDP on CPU (gloo)
    torchrun --nnodes=2 --node_rank=0 --master_addr=HOST --master_port=29500 \\
             --nproc_per_node=8 clip_scratch.py ...                          # multi-node
Then
    python eval.py --model out/clip_scratch/ckpt.pt --bench shapes

CLIPS (Liu et al. 2024, synthetic captions) is built in and off by default. `--caption_mask M`
trains on (web caption, long synthetic caption) pairs with the dual-caption loss `clips_loss`;
the text encoder sees the synthetic caption reduced to --mask_len tokens by data.reduce_caption
(M = subcaption | block | random | truncate). `--captioner_weight 2` adds `Captioner`, which
predicts the whole synthetic caption from the image and the web caption.
    python clip_scratch.py --caption_mask subcaption --captioner_weight 2 --caption_style partial --out_dir out/clips
    torchrun --standalone --nproc_per_node=8 clip_scratch.py --data recap --data_root ~/data/recap.jsonl \\
             --caption_mask subcaption --captioner_weight 2        # a CSV/JSONL of image, caption, re_caption
    python eval.py --model out/clips/ckpt.pt --caption 7            # the captioner on shapes test scene 7

The default run (2-core CPU, 9:16, 2,400 steps x 128) reaches shapes retrieval R@1 0.83 both ways
while the relation and attribute-swap probes stay at chance (0.50 / 0.55): CLIP's bag-of-words
failure, reproduced from scratch; a hard-negative fine-tune of that checkpoint lifts them to
0.91 / 0.93 (bench/shapes_hardneg.py). README "The shapes world" has the calibration behind this.

The checkpoint is open_clip-compatible: `open_clip.CLIP(**ckpt["model_cfg"])` loads
`ckpt["model"]` with strict=True, and `--export DIR` writes an open_clip hub directory
(`open_clip.create_model_and_transforms("local-dir:DIR")`).

Deviations from the paper
1. Tiny models and the built-in synthetic shapes world by default, so it runs on a laptop CPU.
2. No random crops or flips: images are resized + center-cropped (a flip would turn "left of"
   into a wrong caption), which also makes resume exact.
3. Shapes only: `--text_lr_mult 0.1`, the text tower learns 10x slower. At full lr it becomes
   *exactly* blind to the relation word within ~100 steps (relation-flip cosine 1.000), and no
   hard-negative fine-tune we tried brought it back; at 0.1x it ends nearly blind (0.997) and
   fails the probes as CLIP does, but fine-tuning can still teach it (README, "The shapes world").
4. The text tower runs only up to the longest caption in the batch: with a causal mask the
   tokens after the last EOT cannot influence it, so the features are unchanged, only cheaper.
5. No gradient accumulation: the global batch is batch_size x world_size (loss / N
   accumulation would shrink the set of negatives each step sees).
6. CLIPS on the shapes world: the web caption is the usual (colour-misbinding) caption, or with
   `--caption_style partial` a terse one that leaves facts out (data.partial_caption; the setting
   of bench/clips_study.py); the synthetic one is the scene's always-true six-sentence description
   (data.description). The captioner's output layer covers only the 47 token ids the world's
   texts use (data.shapes_vocab): a 49,408-way output layer would cost ~10x the FLOPs of the rest
   of the step (6 x 128 captions x 60 tokens x 128 x 49,408 = 291 GFLOP vs 31). Real data: all.
7. CLIPS on coco / flickr8k without a recaption file: the image's other captions, joined, are the
   synthetic caption (so a sub-caption is one other human caption).
8. The captioner is as wide and deep as the text tower, and its queries never read predicted
   tokens, so greedy captioning is one forward pass (eval.py --caption).
"""
import argparse
import json
import math
import os
import time
from contextlib import nullcontext

import open_clip
import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.distributed as dist

import data
import eval as ev

# -----------------------------------------------------------------------------
# the method: the contrastive loss


def clip_loss(image_features, text_features, logit_scale):
    """Symmetric InfoNCE, L = 1/2 [CE(S, I) + CE(S^T, I)] with S = s * V T^T.

    image_features, text_features: [B, D], L2-normalised; logit_scale: scalar, already exp()'d.
    Under torch.distributed every rank all-gathers both feature sets *with gradient* and computes
    its own B rows against all world*B columns (labels offset by rank*B), as open_clip's ClipLoss
    with local_loss=True, gather_with_grad=True. Summed over ranks by DDP's gradient averaging, the
    gradients equal those of a single process holding the full batch.
    Returns (loss, accuracy of the image->text argmax), both fp32.
    """
    image_features, text_features = image_features.float(), text_features.float()
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        from torch.distributed.nn.functional import all_gather
        all_image = torch.cat(all_gather(image_features), dim=0)
        all_text = torch.cat(all_gather(text_features), dim=0)
        offset = dist.get_rank() * image_features.shape[0]
    else:
        all_image, all_text, offset = image_features, text_features, 0
    logits_per_image = logit_scale * image_features @ all_text.T  # [B, world*B]
    logits_per_text = logit_scale * text_features @ all_image.T   # [B, world*B]
    labels = torch.arange(image_features.shape[0], device=image_features.device) + offset
    loss = 0.5 * (F.cross_entropy(logits_per_image, labels) + F.cross_entropy(logits_per_text, labels))
    acc = (logits_per_image.argmax(dim=1) == labels).float().mean()
    return loss, acc.detach()

# CLIPS (Liu et al. 2024, "CLIPS: An Enhanced CLIP Framework for Learning with Synthetic Captions"):
# each image has a web caption and a long synthetic one; the text encoder sees a *reduced* synthetic
# caption (data.reduce_caption), and an optional captioner predicts the full one.


def clips_loss(image_features, text_features, logit_scale):
    """CLIPS's dual-caption contrastive loss, L = 1/2 CLIP(image, web) + 1/2 CLIP(image, reduced synthetic).
    text_features [2B, D]: the B web captions, then the B reduced synthetic captions of the same
    images, from one text-encoder pass. Each half is clip_loss, so the distributed gather is too.
    Returns (loss, image->web-caption accuracy)."""
    web, synthetic = text_features.chunk(2)
    loss_web, acc = clip_loss(image_features, web, logit_scale)
    loss_synthetic, _ = clip_loss(image_features, synthetic, logit_scale)
    return 0.5 * (loss_web + loss_synthetic), acc


def caption_loss(logits, caption, vocab=None):
    """CLIPS's captioner loss: next-token cross-entropy on the full synthetic caption, in fp32.
    logits [B, Q, V'] (query q predicts token q+1); caption long [B, Q+1] (SOT ... EOT, zeros).
    Padding = every position after the EOT, found by position and not by id, because the pad id 0
    is also a real token ("!"). vocab: the sorted token ids the V' logits stand for (None: all).
    The mean is over the caption tokens of the *global* batch: ranks hold captions of different
    lengths and DDP averages gradients, so every rank divides its sum by (global count / world)."""
    target = caption[:, 1:].contiguous()
    pad = torch.arange(target.shape[1], device=caption.device) >= caption.argmax(-1, keepdim=True)  # [B, Q]
    if vocab is not None:  # token id -> its index among the logits
        index = torch.searchsorted(vocab, target).clamp_(max=len(vocab) - 1)
        if (vocab[index] != target)[~pad].any():
            raise ValueError("caption_loss: a caption token is outside the captioner's vocab")
        target = index
    total = F.cross_entropy(logits.float().flatten(0, 1), target.masked_fill(pad, -100).flatten(), ignore_index=-100, reduction="sum")
    count = (~pad).sum().float()
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(count)
        count = count / dist.get_world_size()
    return total / count

# -----------------------------------------------------------------------------
# the model: OpenAI/open_clip CLIP with open_clip's parameter names


class Attention(nn.Module):
    """Multi-head self-attention with open_clip's (nn.MultiheadAttention's) parameter layout:
    one fused in_proj for q, k, v, and out_proj. Uses F.scaled_dot_product_attention."""

    def __init__(self, width, heads):
        super().__init__()
        self.heads = heads
        self.in_proj_weight = nn.Parameter(torch.empty(3 * width, width))
        self.in_proj_bias = nn.Parameter(torch.zeros(3 * width))
        self.out_proj = nn.Linear(width, width)
        nn.init.xavier_uniform_(self.in_proj_weight)
        nn.init.zeros_(self.out_proj.bias)

    def forward(self, x, causal=False, mask=None):
        B, L, D = x.shape
        qkv = F.linear(x, self.in_proj_weight, self.in_proj_bias)
        q, k, v = qkv.view(B, L, 3, self.heads, D // self.heads).permute(2, 0, 3, 1, 4)  # 3 x [B, H, L, Dh]
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal)  # mask: bool, True = may attend
        return self.out_proj(y.transpose(1, 2).reshape(B, L, D))


class ResidualAttentionBlock(nn.Module):
    """Pre-LN transformer block: x + attn(ln_1(x)), then x + mlp(ln_2(x))."""

    def __init__(self, width, heads, mlp_ratio=4.0, act=nn.GELU):
        super().__init__()
        self.ln_1 = nn.LayerNorm(width)
        self.attn = Attention(width, heads)
        self.ln_2 = nn.LayerNorm(width)
        hidden = int(width * mlp_ratio)
        self.mlp = nn.Sequential()  # named children so the keys read mlp.c_fc / mlp.c_proj
        self.mlp.add_module("c_fc", nn.Linear(width, hidden))
        self.mlp.add_module("gelu", act())
        self.mlp.add_module("c_proj", nn.Linear(hidden, width))

    def forward(self, x, causal=False, mask=None):
        x = x + self.attn(self.ln_1(x), causal=causal, mask=mask)
        return x + self.mlp(self.ln_2(x))


class Transformer(nn.Module):
    def __init__(self, width, layers, heads, mlp_ratio=4.0, act=nn.GELU):
        super().__init__()
        self.resblocks = nn.ModuleList([ResidualAttentionBlock(width, heads, mlp_ratio, act) for _ in range(layers)])

    def forward(self, x, causal=False, mask=None):
        for block in self.resblocks:
            x = block(x, causal=causal, mask=mask)
        return x


class QuickGELU(nn.Module):
    def forward(self, x):
        return x * torch.sigmoid(1.702 * x)


class VisionTransformer(nn.Module):
    """Patch conv -> [class token; patches] + learned positions -> ln_pre -> blocks -> ln_post(class) @ proj."""

    def __init__(self, image_size, patch_size, width, layers, head_width, mlp_ratio, output_dim, act):
        super().__init__()
        grid = image_size // patch_size
        scale = width ** -0.5
        self.conv1 = nn.Conv2d(3, width, kernel_size=patch_size, stride=patch_size, bias=False)
        self.class_embedding = nn.Parameter(scale * torch.randn(width))
        self.positional_embedding = nn.Parameter(scale * torch.randn(grid * grid + 1, width))
        self.ln_pre = nn.LayerNorm(width)
        self.transformer = Transformer(width, layers, width // head_width, mlp_ratio, act)
        self.ln_post = nn.LayerNorm(width)
        self.proj = nn.Parameter(scale * torch.randn(width, output_dim))

    def forward(self, x, return_tokens=False):
        x = self.conv1(x).flatten(2).transpose(1, 2)  # [B, grid*grid, width]
        cls = self.class_embedding.to(x.dtype).expand(x.shape[0], 1, -1)
        x = torch.cat([cls, x], dim=1) + self.positional_embedding.to(x.dtype)
        x = self.ln_post(self.transformer(self.ln_pre(x)))  # layernorm is per token: ln_post(x)[:, 0] == ln_post(x[:, 0])
        pooled = x[:, 0] @ self.proj
        return (pooled, x[:, 1:]) if return_tokens else pooled


class CLIP(nn.Module):
    """CLIP with the constructor signature and state-dict keys of `open_clip.CLIP`, so
    `open_clip.CLIP(**model_cfg).load_state_dict(CLIP(**model_cfg).state_dict())` is exact.
    Only the standard ViT + causal text Transformer configuration is supported."""

    def __init__(self, embed_dim, vision_cfg, text_cfg, quick_gelu=False, init_logit_scale=math.log(1 / 0.07), **unsupported):
        super().__init__()
        assert not any(unsupported.values()), f"unsupported open_clip options: {unsupported}"
        v, t = dict(vision_cfg), dict(text_cfg)
        act = QuickGELU if quick_gelu else nn.GELU
        self.visual = VisionTransformer(v.get("image_size", 224), v.get("patch_size", 16), v.get("width", 768),
                                        v.get("layers", 12), v.get("head_width", 64), v.get("mlp_ratio", 4.0), embed_dim, act)
        width, layers = t.get("width", 512), t.get("layers", 12)
        self.context_length, self.vocab_size = t.get("context_length", 77), t.get("vocab_size", 49408)
        self.token_embedding = nn.Embedding(self.vocab_size, width)
        self.positional_embedding = nn.Parameter(torch.empty(self.context_length, width))
        self.transformer = Transformer(width, layers, t.get("heads", 8), t.get("mlp_ratio", 4.0), act)
        self.ln_final = nn.LayerNorm(width)
        self.text_projection = nn.Parameter(torch.empty(width, embed_dim))
        self.logit_scale = nn.Parameter(torch.tensor(float(init_logit_scale)))
        # open_clip's text-tower init (OpenAI's)
        nn.init.normal_(self.token_embedding.weight, std=0.02)
        nn.init.normal_(self.positional_embedding, std=0.01)
        proj_std, attn_std, fc_std = (width ** -0.5) * ((2 * layers) ** -0.5), width ** -0.5, (2 * width) ** -0.5
        for block in self.transformer.resblocks:
            nn.init.normal_(block.attn.in_proj_weight, std=attn_std)
            nn.init.normal_(block.attn.out_proj.weight, std=proj_std)
            nn.init.normal_(block.mlp.c_fc.weight, std=fc_std)
            nn.init.normal_(block.mlp.c_proj.weight, std=proj_std)
        nn.init.normal_(self.text_projection, std=width ** -0.5)
        self.captioner = None  # CLIPS's optional head (a Captioner), not part of open_clip

    def encode_image(self, image, normalize=False, return_tokens=False):
        x, tokens = self.visual(image, return_tokens=True)
        x = F.normalize(x, dim=-1) if normalize else x
        return (x, tokens) if return_tokens else x

    def encode_text(self, text, normalize=False, return_tokens=False):
        eot = text.argmax(dim=-1)  # the EOT token has the highest id (open_clip's 'argmax' pooling)
        L = int(eot.max()) + 1  # causal mask: positions after the last EOT cannot change the result (a host sync; cheap)
        x = self.token_embedding(text[:, :L]) + self.positional_embedding[:L]
        x = self.ln_final(self.transformer(x, causal=True))  # [B, L, width]
        pooled = x[torch.arange(x.shape[0], device=x.device), eot] @ self.text_projection
        pooled = F.normalize(pooled, dim=-1) if normalize else pooled
        return (pooled, x) if return_tokens else pooled

    def forward(self, image, text):
        """-> (image features [B, D], text features [T, D], logit scale, captioner logits or None).
        With a captioner (CLIPS) the first B texts are the web captions it is conditioned on, and
        it reuses this one pass's patch tokens and text-token outputs."""
        image_features, image_tokens = self.encode_image(image, normalize=True, return_tokens=True)
        if self.captioner is None:
            return image_features, self.encode_text(text, normalize=True), self.logit_scale.exp(), None
        text_features, text_tokens = self.encode_text(text, normalize=True, return_tokens=True)
        B, L = image.shape[0], text_tokens.shape[1]
        web_valid = torch.arange(L, device=text.device) <= text[:B].argmax(-1, keepdim=True)  # [B, L]: up to its EOT
        logits = self.captioner(image_tokens, text_tokens[:B], web_valid)
        return image_features, text_features, self.logit_scale.exp(), logits


def prefix_lm_mask(prefix_valid, n_query):
    """The captioner's attention mask, bool [B, 1, P+Q, P+Q], True = may attend. Prefix tokens
    attend to every valid prefix token (bidirectionally) and never to a query; query q attends to
    every valid prefix token and to queries <= q. prefix_valid: bool [B, P], False = padding."""
    B, P = prefix_valid.shape
    T = P + n_query
    allowed = torch.ones(T, T, dtype=torch.bool, device=prefix_valid.device).tril()
    allowed[:, :P] = True  # everyone sees the whole prefix; the triangle keeps queries causal and out of the prefix's view
    keys = torch.cat([prefix_valid, prefix_valid.new_ones(B, n_query)], dim=1)  # [B, T]
    return (allowed[None] & keys[:, None, :])[:, None]


class Captioner(nn.Module):
    """CLIPS's captioner, a prefix-LM Transformer. Prefix = the image's patch tokens and the web
    caption's text-encoder token outputs, each linearly projected; then n_query learnable query
    tokens (prefix_lm_mask); query q's output -> LayerNorm -> logits for token q+1 of the full
    synthetic caption. `vocab`: the token ids the output layer covers (None = all vocab_size).
    Its weights live under `captioner.` in the training checkpoint, apart from the open_clip towers."""

    def __init__(self, vision_width, text_width, width, layers, heads, n_query, vocab_size=49408, vocab=None):
        super().__init__()
        self.image_proj = nn.Linear(vision_width, width)
        self.text_proj = nn.Linear(text_width, width)
        self.queries = nn.Parameter(0.02 * torch.randn(n_query, width))
        self.transformer = Transformer(width, layers, heads)
        self.ln_final = nn.LayerNorm(width)
        self.register_buffer("vocab", torch.tensor(vocab) if vocab is not None else torch.arange(vocab_size))
        self.head = nn.Linear(width, len(self.vocab), bias=False)

    def forward(self, image_tokens, text_tokens, text_valid):
        """image_tokens [B, N, vision_width], text_tokens [B, L, text_width], text_valid bool [B, L]
        -> logits [B, n_query, len(vocab)]"""
        B, Q = image_tokens.shape[0], self.queries.shape[0]
        prefix = torch.cat([self.image_proj(image_tokens), self.text_proj(text_tokens)], dim=1)  # [B, P, width]
        x = torch.cat([prefix, self.queries.to(prefix.dtype).expand(B, -1, -1)], dim=1)   # [B, P+Q, width]
        valid = torch.cat([text_valid.new_ones(B, image_tokens.shape[1]), text_valid], dim=1)
        x = self.transformer(x, mask=prefix_lm_mask(valid, Q))
        return self.head(self.ln_final(x[:, -Q:]))

    @torch.no_grad()
    def greedy(self, logits):
        """logits [B, Q, V'] -> token ids [B, Q]. The queries do not read earlier predictions, so
        greedy decoding is one pass: the argmax at every position (cut at the first EOT to decode)."""
        return self.vocab[logits.argmax(-1)]


# vision width, vision layers, text width, text layers, embed dim, patch size
MODEL_SIZES = {"tiny": (128, 4, 128, 2, 128, 16), "small": (384, 6, 256, 4, 256, 16), "base": (768, 12, 512, 12, 512, 16)}


def model_config(size, image_size, context_length=77, vocab_size=49408):
    """open_clip-style model_cfg for a named size. 'tiny' is the CPU default for the shapes world."""
    w, l, tw, tl, embed, patch = MODEL_SIZES[size]
    return dict(embed_dim=embed,
                vision_cfg=dict(image_size=image_size, patch_size=patch, width=w, layers=l, head_width=64 if w >= 256 else 32),
                text_cfg=dict(context_length=context_length, vocab_size=vocab_size, width=tw, heads=max(tw // 64, 4), layers=tl))

# -----------------------------------------------------------------------------
# system helpers shared by the training scripts (DDP, precision, schedule, checkpoints)


def setup_distributed(device_flag):
    """Returns (rank, local_rank, world_size, device). torchrun sets RANK; nccl on CUDA, gloo on CPU."""
    if device_flag == "cuda" and not torch.cuda.is_available():
        raise SystemExit("error: --device cuda, but torch sees no CUDA device")
    use_cuda = device_flag == "cuda" or (device_flag == "auto" and torch.cuda.is_available())
    if "RANK" in os.environ:
        rank, local_rank, world = int(os.environ["RANK"]), int(os.environ["LOCAL_RANK"]), int(os.environ["WORLD_SIZE"])
        dist.init_process_group("nccl" if use_cuda else "gloo")
    else:
        rank, local_rank, world = 0, 0, 1
    if use_cuda:
        torch.cuda.set_device(local_rank)
    return rank, local_rank, world, torch.device(f"cuda:{local_rank}" if use_cuda else "cpu")


def print0(*a, **kw):
    if int(os.environ.get("RANK", 0)) == 0:
        print(*a, **kw, flush=True)


def autocast_ctx(device, dtype):
    if dtype == "float32":
        return nullcontext()
    return torch.autocast(device.type, dtype={"bfloat16": torch.bfloat16, "float16": torch.float16}[dtype])


def lr_at(step, base_lr, warmup, max_steps):
    """linear warmup then cosine decay to zero."""
    if step < warmup:
        return base_lr * (step + 1) / warmup
    return base_lr * 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, max_steps - warmup)))


def param_groups(model, weight_decay, text_lr_mult=1.0):
    """AdamW groups: no weight decay on tensors with ndim < 2 (biases, norms, class token,
    logit_scale); the text tower (not the CLIPS captioner) gets lr x text_lr_mult (the group's 'lr_mult')."""
    groups = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        text = not name.startswith(("visual.", "captioner.")) and name != "logit_scale"  # the captioner is not the text tower
        key = (p.ndim >= 2, text)
        g = groups.setdefault(key, {"params": [], "weight_decay": weight_decay if key[0] else 0.0,
                                    "lr_mult": text_lr_mult if text else 1.0})
        g["params"].append(p)
    return list(groups.values())


def save_checkpoint(path, obj):
    """atomic: a crash mid-write leaves the previous checkpoint intact."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    tmp = f"{path}.tmp.{os.getpid()}"
    torch.save(obj, tmp)
    os.replace(tmp, path)


# peak dense bf16 tensor FLOP/s per device, for MFU (0 = unknown, MFU not reported)
PEAK_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "L40S": 362e12, "A10": 125e12, "4090": 165e12, "3090": 71e12, "V100": 125e12}


def peak_flops(device):
    if device.type != "cuda":
        return 0.0
    name = torch.cuda.get_device_name(device)
    return next((f for k, f in PEAK_FLOPS.items() if k in name), 0.0)


def flops_per_pair(model_cfg, text_len, texts_per_image=1):
    """training FLOPs (fwd + bwd = 3x fwd) for one image and its texts: 6 x params x tokens for the
    matmuls + 12 x layers x width x tokens^2 for attention, per tower (the CLIPS captioner is not counted)."""
    v, t = model_cfg["vision_cfg"], model_cfg["text_cfg"]
    n_img = (v["image_size"] // v["patch_size"]) ** 2 + 1

    def tower(width, layers, n, mlp_ratio=4.0):
        return 6 * layers * (4 + 2 * mlp_ratio) * width * width * n + 12 * layers * width * n * n
    return tower(v["width"], v["layers"], n_img) + texts_per_image * tower(t["width"], t["layers"], text_len)

# -----------------------------------------------------------------------------
# config


def get_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    # data
    p.add_argument("--data", default="shapes", help="shapes | flickr8k | coco | recap")
    p.add_argument("--data_root", default=None, help="dataset folder (real data); recap: the CSV or JSONL file")
    p.add_argument("--image_size", type=int, default=None, help="default: 64 for shapes, 224 for real data")
    p.add_argument("--context_length", type=int, default=None, help="default: 32 for shapes, 77 for real data")
    p.add_argument("--workers", type=int, default=None, help="DataLoader workers per process (default: 0 shapes, 4 real)")
    p.add_argument("--cache_images", action="store_true", help="decode+resize every image once into a uint8 memmap")
    p.add_argument("--swap_noise", type=float, default=0.5, help="shapes: fraction of captions with the colours misbound (data.ShapesDataset)")
    p.add_argument("--caption_style", default="full", choices=data.CAPTION_STYLES,
                   help="shapes: full captions, or terse partial ones (data.partial_caption; the CLIPS setting)")
    p.add_argument("--image_key", default="image", help="recap: the image column")
    p.add_argument("--caption_key", default="caption", help="recap: the web caption column")
    p.add_argument("--recap_key", default="re_caption", help="recap: the synthetic caption column")
    # CLIPS: synthetic captions (off by default)
    p.add_argument("--caption_mask", default="none", choices=data.CAPTION_MASKS,
                   help="train on (web, synthetic) caption pairs with the synthetic one reduced this way; none = plain CLIP")
    p.add_argument("--mask_len", type=int, default=32, help="K: tokens of the reduced synthetic caption, SOT and EOT included")
    p.add_argument("--captioner_weight", type=float, default=0.0, help="weight of the captioner loss (0: no captioner; CLIPS uses 2.0)")
    p.add_argument("--captioner_len", type=int, default=77, help="tokens of the full synthetic caption the captioner predicts (longer ones are cut)")
    # model
    p.add_argument("--model_size", default="tiny", choices=list(MODEL_SIZES))
    # optim
    p.add_argument("--max_steps", type=int, default=2400)
    p.add_argument("--batch_size", type=int, default=128, help="per process; global batch = batch_size x world size")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--text_lr_mult", type=float, default=None, help="text-tower lr = lr x this (default: 0.1 shapes, see deviation 3; 1 real data)")
    p.add_argument("--weight_decay", type=float, default=0.1)
    p.add_argument("--warmup_steps", type=int, default=100)
    # eval / checkpoints
    p.add_argument("--out_dir", default="out/clip_scratch")
    p.add_argument("--eval_every", type=int, default=500, help="0 disables (a final eval always runs)")
    p.add_argument("--ckpt_every", type=int, default=250, help="0 disables (a final checkpoint is always written)")
    p.add_argument("--resume", action="store_true", help="continue from out_dir/ckpt.pt if it exists")
    p.add_argument("--export", default=None, metavar="DIR", help="also write an open_clip hub directory at the end")
    p.add_argument("--eval_n", type=int, default=1000, help="shapes test scenes per eval")
    p.add_argument("--log_every", type=int, default=10)
    # system
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    p.add_argument("--dtype", default="auto", choices=("auto", "float32", "bfloat16", "float16"), help="auto: bfloat16 on cuda, else float32")
    p.add_argument("--compile", action="store_true")
    args = p.parse_args(argv)
    real = args.data != "shapes"
    args.image_size = args.image_size or (224 if real else 64)
    args.context_length = args.context_length or (77 if real else 32)
    args.workers = (4 if real else 0) if args.workers is None else args.workers
    args.text_lr_mult = (1.0 if real else 0.1) if args.text_lr_mult is None else args.text_lr_mult
    if args.caption_mask != "none" and not 3 <= args.mask_len <= args.context_length:
        p.error(f"--mask_len {args.mask_len}: must be between 3 and --context_length {args.context_length}")
    if args.captioner_weight and args.caption_mask == "none":
        p.error("--captioner_weight needs synthetic captions: set --caption_mask (subcaption, as CLIPS)")
    if args.captioner_weight and args.captioner_len < 2:
        p.error(f"--captioner_len {args.captioner_len}: must be at least 2")
    return args


def make_data(args, rank, world):
    """-> (train dataset, number of items or None for an infinite stream, eval split items or None)."""
    clips = dict(caption_mask=args.caption_mask, mask_len=args.mask_len, target_len=args.captioner_len)
    if args.data == "shapes":
        return data.ShapesDataset(args.image_size, args.context_length, args.seed, args.swap_noise,
                                  caption_style=args.caption_style, **clips), None, None
    if args.data_root is None:
        raise data.DataError(f"--data {args.data} needs --data_root")
    splits = data.read_dataset(args.data, args.data_root, (args.image_key, args.caption_key, args.recap_key))
    cache = os.path.join(args.out_dir, f"cache_{args.data}_train_{args.image_size}.u8") if args.cache_images else None
    if cache and rank > 0:
        dist.barrier()  # rank 0 builds the cache once, the others reuse it
    os.makedirs(args.out_dir, exist_ok=True)
    train = data.ImageTextDataset(splits["train"], args.image_size, args.context_length, args.seed, cache, **clips)
    if cache and rank == 0 and world > 1:
        dist.barrier()
    return train, len(train), splits


class StepBatches(torch.utils.data.Sampler):
    """Yields, for each step in [start, max_steps), this rank's list of sample keys. Keys depend
    only on (seed, step, rank), so a resumed run sees exactly the batches it would have seen.
    n=None: an infinite stream (key = global sample index); else epochs over n items, reshuffled
    per epoch, key = epoch * n + item (the dataset decodes both)."""

    def __init__(self, n, batch_size, rank, world, seed, start, max_steps):
        self.n, self.B, self.rank, self.world, self.seed, self.start, self.max_steps = n, batch_size, rank, world, seed, start, max_steps

    def __len__(self):
        return self.max_steps - self.start

    def __iter__(self):
        gB = self.B * self.world
        for step in range(self.start, self.max_steps):
            if self.n is None:
                first = step * gB + self.rank * self.B
                yield list(range(first, first + self.B))
                continue
            per_epoch = self.n // gB
            epoch, pos = divmod(step, per_epoch)
            perm = torch.randperm(self.n, generator=torch.Generator().manual_seed(self.seed * 100003 + epoch))
            idx = perm[pos * gB + self.rank * self.B: pos * gB + (self.rank + 1) * self.B]
            yield (idx + epoch * self.n).tolist()

# -----------------------------------------------------------------------------
# training


def main(argv=None):
    args = get_args(argv)
    rank, local_rank, world, device = setup_distributed(args.device)
    master = rank == 0
    dtype = args.dtype if args.dtype != "auto" else ("bfloat16" if device.type == "cuda" else "float32")
    torch.manual_seed(args.seed)  # identical init on every rank

    # data
    try:
        dataset, n_items, splits = make_data(args, rank, world)
    except data.DataError as e:
        raise SystemExit(f"error: {e}")
    if n_items is not None and n_items < args.batch_size * world:
        raise SystemExit(f"error: {n_items} training images < global batch {args.batch_size * world} (--batch_size)")
    tokenizer = data.get_tokenizer(args.context_length)

    # model + optimizer
    model_cfg = model_config(args.model_size, args.image_size, args.context_length)
    model = CLIP(**model_cfg)
    captioner_cfg = None
    if args.captioner_weight:  # CLIPS: the optional captioner head, as wide and deep as the text tower
        v, t = model_cfg["vision_cfg"], model_cfg["text_cfg"]
        captioner_cfg = dict(vision_width=v["width"], text_width=t["width"], width=t["width"], layers=t["layers"],
                             heads=t["heads"], n_query=args.captioner_len - 1, vocab_size=t["vocab_size"],
                             vocab=data.shapes_vocab() if args.data == "shapes" else None)  # deviation 6
        model.captioner = Captioner(**captioner_cfg)
    model = model.to(device)
    optimizer = torch.optim.AdamW(param_groups(model, args.weight_decay, args.text_lr_mult), lr=args.lr,
                                  betas=(0.9, 0.98), eps=1e-6, fused=device.type == "cuda")
    start_step, ckpt_path = 0, os.path.join(args.out_dir, "ckpt.pt")
    if args.resume and os.path.exists(ckpt_path):
        ckpt = torch.load(ckpt_path, map_location=device, weights_only=True)
        model.load_state_dict(ckpt["model"] | ckpt.get("captioner", {}))
        optimizer.load_state_dict(ckpt["optimizer"])
        start_step = ckpt["step"]
        torch.set_rng_state(ckpt["rng"]["cpu"])
        print0(f"resumed from {ckpt_path} at step {start_step}")
    raw_model = model
    if args.compile:
        model = torch.compile(model)
    if world > 1:
        model = torch.nn.parallel.DistributedDataParallel(model, device_ids=[local_rank] if device.type == "cuda" else None)
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == "float16")

    loader = torch.utils.data.DataLoader(
        dataset, batch_sampler=StepBatches(n_items, args.batch_size, rank, world, args.seed, start_step, args.max_steps),
        collate_fn=data.collate, num_workers=args.workers, pin_memory=device.type == "cuda")

    def checkpoint(step):
        # "model" holds the open_clip towers only (it loads into open_clip.CLIP strict); the CLIPS
        # captioner, which open_clip has no place for, is saved beside it under its "captioner." keys
        if master:
            state = raw_model.state_dict()
            towers = {k: v for k, v in state.items() if not k.startswith("captioner.")}
            save_checkpoint(ckpt_path, {"model": towers, "model_cfg": model_cfg,
                                        "captioner": {k: v for k, v in state.items() if k not in towers},
                                        "captioner_cfg": captioner_cfg,
                                        "optimizer": optimizer.state_dict(), "step": step, "args": vars(args),
                                        "rng": {"cpu": torch.get_rng_state()}})

    def evaluate(step, split="val"):
        # rank 0 evaluates the unwrapped model on the whole fixed split; the others wait
        if master:
            t = time.time()
            if splits is None:
                metrics = ev.eval_shapes(raw_model, tokenizer, args.image_size, device, n=args.eval_n)
            else:
                preprocess = open_clip.transform.image_transform(args.image_size, is_train=False)
                metrics = ev.eval_retrieval(raw_model, preprocess, tokenizer, splits[split], device)
            print0(f"eval {split} step {step} ({time.time() - t:.1f}s): " + "  ".join(f"{k} {v:.3f}" for k, v in metrics.items()))
            with open(os.path.join(args.out_dir, "metrics.jsonl"), "a") as f:
                f.write(json.dumps({"step": step, "split": split, **metrics}) + "\n")
        if world > 1:
            dist.barrier()

    os.makedirs(args.out_dir, exist_ok=True)
    n_params = sum(p.numel() for p in raw_model.parameters())
    print0(f"model {args.model_size}: {n_params / 1e6:.2f}M params | data {args.data} | world {world} x batch {args.batch_size} | device {device} {dtype}")
    peak = peak_flops(device) * world
    step, last_logged, t0, skipped = start_step, start_step, time.time(), 0
    for images, texts, n_skipped in loader:
        skipped += n_skipped  # unreadable images, dropped by data.collate
        n = 0 if images is None else len(images)
        if world > 1 and splits is not None:  # all_gather needs equal batches: every rank cuts to the smallest
            n = torch.tensor([n], device=device)
            dist.all_reduce(n, op=dist.ReduceOp.MIN)
            n = int(n)
        if n == 0:  # a batch of unreadable images only
            step += 1
            continue
        # CLIPS: texts = ([B, 2, L] web + reduced synthetic captions, [B, captioner_len] full synthetic ones)
        tokens, synthetic = texts if args.caption_mask != "none" else (texts, None)
        images, tokens = images[:n].to(device, non_blocking=True), tokens[:n].to(device, non_blocking=True)
        if tokens.ndim == 3:
            tokens = tokens.transpose(0, 1).flatten(0, 1)  # [2B, L]: the B web captions, then the B reduced synthetic ones
        lr = lr_at(step, args.lr, args.warmup_steps, args.max_steps)
        for g in optimizer.param_groups:
            g["lr"] = lr * g["lr_mult"]
        with autocast_ctx(device, dtype):
            image_features, text_features, logit_scale, caption_logits = model(images, tokens)
        if args.caption_mask == "none":
            loss, acc = clip_loss(image_features, text_features, logit_scale)
        else:
            loss, acc = clips_loss(image_features, text_features, logit_scale)
        if caption_logits is not None:
            cap_loss = caption_loss(caption_logits, synthetic[:n].to(device), raw_model.captioner.vocab)
            loss = loss + args.captioner_weight * cap_loss
        if not math.isfinite(loss.item()):  # stop before the update: the last checkpoint stays good
            raise SystemExit(f"error: loss is not finite ({loss.item()}) at step {step}; stopping. "
                             f"Last good checkpoint: {ckpt_path if os.path.exists(ckpt_path) else 'none written yet'}")
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        with torch.no_grad():
            raw_model.logit_scale.clamp_(0, math.log(100))
        step += 1
        if step % args.log_every == 0 or step == args.max_steps:
            dt, n_steps, t0 = time.time() - t0, step - last_logged, time.time()
            last_logged = step
            ips = n_steps * args.batch_size * world / dt
            text_len = int(tokens.argmax(-1).max()) + 1  # what the text tower really ran (see CLIP.encode_text)
            mfu = flops_per_pair(model_cfg, text_len, len(tokens) // len(images)) * ips / peak if peak else 0.0
            print0(f"step {step}/{args.max_steps} | loss {loss.item():.4f} | acc {acc.item():.3f} | lr {lr:.2e} | "
                   + (f"caption loss {cap_loss.item():.3f} | " if caption_logits is not None else "") +
                   f"scale {logit_scale.item():.1f} | {dt / n_steps * 1000:.0f} ms/step | {ips:.0f} img/s | mfu {mfu * 100:.1f}%"
                   + (f" | skipped {skipped} unreadable images" if skipped else ""))
        if args.ckpt_every and step % args.ckpt_every == 0 and step < args.max_steps:
            checkpoint(step)
        if args.eval_every and step % args.eval_every == 0 and step < args.max_steps:
            evaluate(step)
            t0 = time.time()  # eval time is not training time
    checkpoint(step)
    if skipped:
        print0(f"skipped {skipped} unreadable training images in total (counted per sample drawn)")
    evaluate(step, "val" if splits is None else "test")
    if args.export and master:
        ev.export_open_clip(raw_model, model_cfg, args.export)
        print0(f"exported an open_clip hub directory to {args.export} (open_clip.create_model_and_transforms('local-dir:{args.export}'))")
    if world > 1:
        dist.destroy_process_group()

if __name__ == "__main__":
    main()
