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

    def forward(self, x, causal=False):
        B, L, D = x.shape
        qkv = F.linear(x, self.in_proj_weight, self.in_proj_bias)
        q, k, v = qkv.view(B, L, 3, self.heads, D // self.heads).permute(2, 0, 3, 1, 4)  # 3 x [B, H, L, Dh]
        y = F.scaled_dot_product_attention(q, k, v, is_causal=causal)
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

    def forward(self, x, causal=False):
        x = x + self.attn(self.ln_1(x), causal=causal)
        return x + self.mlp(self.ln_2(x))


class Transformer(nn.Module):
    def __init__(self, width, layers, heads, mlp_ratio=4.0, act=nn.GELU):
        super().__init__()
        self.resblocks = nn.ModuleList([ResidualAttentionBlock(width, heads, mlp_ratio, act) for _ in range(layers)])

    def forward(self, x, causal=False):
        for block in self.resblocks:
            x = block(x, causal=causal)
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

    def forward(self, x):
        x = self.conv1(x).flatten(2).transpose(1, 2)  # [B, grid*grid, width]
        cls = self.class_embedding.to(x.dtype).expand(x.shape[0], 1, -1)
        x = torch.cat([cls, x], dim=1) + self.positional_embedding.to(x.dtype)
        x = self.transformer(self.ln_pre(x))
        return self.ln_post(x[:, 0]) @ self.proj


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

    def encode_image(self, image, normalize=False):
        x = self.visual(image)
        return F.normalize(x, dim=-1) if normalize else x

    def encode_text(self, text, normalize=False, return_tokens=False):
        eot = text.argmax(dim=-1)  # the EOT token has the highest id (open_clip's 'argmax' pooling)
        L = int(eot.max()) + 1  # causal mask: positions after the last EOT cannot change the result (a host sync; cheap)
        x = self.token_embedding(text[:, :L]) + self.positional_embedding[:L]
        x = self.ln_final(self.transformer(x, causal=True))  # [B, L, width]
        pooled = x[torch.arange(x.shape[0], device=x.device), eot] @ self.text_projection
        pooled = F.normalize(pooled, dim=-1) if normalize else pooled
        return (pooled, x) if return_tokens else pooled

    def forward(self, image, text):
        return self.encode_image(image, normalize=True), self.encode_text(text, normalize=True), self.logit_scale.exp()


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
    logit_scale); the text tower gets lr x text_lr_mult (the group's 'lr_mult')."""
    groups = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        text = not name.startswith("visual.") and name != "logit_scale"
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


def flops_per_pair(model_cfg, text_len):
    """training FLOPs (fwd + bwd = 3x fwd) for one image-text pair: 6 x params x tokens for the
    matmuls + 12 x layers x width x tokens^2 for attention, per tower."""
    v, t = model_cfg["vision_cfg"], model_cfg["text_cfg"]
    n_img = (v["image_size"] // v["patch_size"]) ** 2 + 1

    def tower(width, layers, n, mlp_ratio=4.0):
        return 6 * layers * (4 + 2 * mlp_ratio) * width * width * n + 12 * layers * width * n * n
    return tower(v["width"], v["layers"], n_img) + tower(t["width"], t["layers"], text_len)

# -----------------------------------------------------------------------------
# config


def get_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    # data
    p.add_argument("--data", default="shapes", help="shapes | flickr8k | coco")
    p.add_argument("--data_root", default=None, help="dataset folder (real data)")
    p.add_argument("--image_size", type=int, default=None, help="default: 64 for shapes, 224 for real data")
    p.add_argument("--context_length", type=int, default=None, help="default: 32 for shapes, 77 for real data")
    p.add_argument("--workers", type=int, default=None, help="DataLoader workers per process (default: 0 shapes, 4 real)")
    p.add_argument("--cache_images", action="store_true", help="decode+resize every image once into a uint8 memmap")
    p.add_argument("--swap_noise", type=float, default=0.5, help="shapes: fraction of captions with the colours misbound (data.ShapesDataset)")
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
    return args


def make_data(args, rank, world):
    """-> (train dataset, number of items or None for an infinite stream, eval split items or None)."""
    if args.data == "shapes":
        return data.ShapesDataset(args.image_size, args.context_length, args.seed, args.swap_noise), None, None
    if args.data_root is None:
        raise data.DataError(f"--data {args.data} needs --data_root")
    splits = data.read_dataset(args.data, args.data_root)
    cache = os.path.join(args.out_dir, f"cache_{args.data}_train_{args.image_size}.u8") if args.cache_images else None
    if cache and rank > 0:
        dist.barrier()  # rank 0 builds the cache once, the others reuse it
    os.makedirs(args.out_dir, exist_ok=True)
    train = data.ImageTextDataset(splits["train"], args.image_size, args.context_length, args.seed, cache)
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
    model = CLIP(**model_cfg).to(device)
    optimizer = torch.optim.AdamW(param_groups(model, args.weight_decay, args.text_lr_mult), lr=args.lr,
                                  betas=(0.9, 0.98), eps=1e-6, fused=device.type == "cuda")
    start_step, ckpt_path = 0, os.path.join(args.out_dir, "ckpt.pt")
    if args.resume and os.path.exists(ckpt_path):
        ckpt = torch.load(ckpt_path, map_location=device, weights_only=True)
        model.load_state_dict(ckpt["model"])
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
        if master:
            save_checkpoint(ckpt_path, {"model": raw_model.state_dict(), "model_cfg": model_cfg,
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
    for images, tokens, n_skipped in loader:
        skipped += n_skipped  # unreadable images, dropped by data.collate
        if world > 1 and splits is not None:  # all_gather needs equal batches: every rank cuts to the smallest
            n = torch.tensor([0 if images is None else len(images)], device=device)
            dist.all_reduce(n, op=dist.ReduceOp.MIN)
            images, tokens = (None, None) if n == 0 else (images[:n], tokens[:n])
        if images is None:  # a batch of unreadable images only
            step += 1
            continue
        images, tokens = images.to(device, non_blocking=True), tokens.to(device, non_blocking=True)
        lr = lr_at(step, args.lr, args.warmup_steps, args.max_steps)
        for g in optimizer.param_groups:
            g["lr"] = lr * g["lr_mult"]
        with autocast_ctx(device, dtype):
            image_features, text_features, logit_scale = model(images, tokens)
        loss, acc = clip_loss(image_features, text_features, logit_scale)
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
            mfu = flops_per_pair(model_cfg, text_len) * ips / peak if peak else 0.0
            print0(f"step {step}/{args.max_steps} | loss {loss.item():.4f} | acc {acc.item():.3f} | lr {lr:.2e} | "
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
