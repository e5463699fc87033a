"""
CLIP trained from scratch: a ViT image tower and a causal text Transformer pulled together by the
symmetric InfoNCE loss over the global batch (Radford et al. 2021, "Learning Transferable Visual
Models From Natural Language Supervision"). CLIPS (Liu et al. 2024, synthetic captions) is built in
and off by default: `--caption_mask subcaption` trains on (web caption, reduced synthetic caption)
pairs with `clips_loss`, `--captioner_weight 2` adds the captioner (model.Captioner).

    python clip_scratch.py                                   # CPU, the built-in shapes world
    python clip_scratch.py --data flickr8k --data_root ~/data/flickr8k --model_size small --device cuda
    torchrun --standalone --nproc_per_node=8 clip_scratch.py --data coco --data_root ~/data/coco
    torchrun --standalone --nproc_per_node=2 clip_scratch.py --device cpu     # DDP on CPU (gloo)
    python clip_scratch.py --caption_mask subcaption --captioner_weight 2 --caption_style partial --out_dir out/clips
    torchrun --standalone --nproc_per_node=8 clip_scratch.py --data wds --data_root 'shards/{00000..00099}.tar' \
        --train_num_samples 1000000 --eval_data coco --eval_root ~/data/coco   # img2dataset's shards (wds.py)
    python eval.py --model out/clip_scratch/ckpt.pt                          # the shapes benchmark

The method is `clip_loss` / `clips_loss` / `caption_loss`, `step_loss` and `make_batch`; the loop at
the bottom is the same text in the three scripts. The checkpoint loads into open_clip.CLIP.
The equations next to the code, every default and the run that chose it: docs/clip_scratch.md.

Deviations from the papers
1. Tiny models and the built-in shapes world by default, so it runs on a laptop CPU.
2. No random crops or flips: a flip turns "left of" into a wrong caption (and resume stays exact).
3. Shapes only: the text tower learns at 0.1x lr (--text_lr_mult); at full lr it turns blind to the
   relation word for good (the runs: bench/LOG.md, 2026-11-23).
4. The text tower runs only up to the longest caption of the batch (causal mask: the same features).
5. The global batch is batch_size x world size. --accum_steps K runs each process's batch as K
   micro-batches for memory, GradCache's way, not a loss / K loop: the loss and its negatives span
   the whole batch, and loss and gradients equal one pass's (training.MicroBatches, tested).
6. CLIPS on shapes: the web caption misbinds colours (or, --caption_style partial, leaves facts
   out); the synthetic caption is the scene's always-true description; the captioner's output
   layer covers only the world's token ids (shapes.shapes_vocab). On coco / flickr8k without a
   recaption file, the image's other captions joined are the synthetic caption.
7. The captioner is as wide and deep as the text tower, and its queries never read predicted
   tokens, so greedy captioning is one forward pass (eval.py --caption).
"""

import math
import os
import time
from dataclasses import dataclass
from functools import partial

import open_clip
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

import data
import eval as ev
import shapes
import wds
from model import CLIP, MODEL_SIZES, Captioner, export_open_clip, load_checkpoint, model_config, param_groups
from training import (
    Model,
    NotFinite,
    Parser,
    RunLog,
    all_gather_with_grad,
    apply_preset,
    autocast_ctx,
    batches,
    clip_grads,
    count_flops,
    global_mean,
    global_min,
    load_data,
    lr_at,
    one_error,
    peak_flops,
    print0,
    resolve_dtype,
    resume_run,
    save_run,
    schedule,
    setup_distributed,
    start_line,
    to_device,
    wrap,
)

# -----------------------------------------------------------------------------
# the method: the contrastive loss

EQUAL_BATCHES = True  # every rank's batch holds the same number of pairs (all_gather_with_grad needs it)


def clip_loss(image_features, text_features, logit_scale):
    """Symmetric InfoNCE, L = 1/2 [CE(S, I) + CE(S^T, I)] with S = s * V T^T.

    image_features, text_features: [B, D], L2-normalised; logit_scale: scalar, already exp()'d.
    Under torch.distributed every rank all-gathers both feature sets *with gradient* and computes
    its own B rows against all world*B columns (labels offset by rank*B), as open_clip's ClipLoss
    with local_loss=True, gather_with_grad=True. Summed over ranks by DDP's gradient averaging, the
    gradients equal those of a single process holding the full batch.
    Returns (loss, accuracy of the image->text argmax), both fp32, also when called under autocast.
    """
    with torch.autocast(image_features.device.type, enabled=False):
        image_features, text_features, logit_scale = (
            image_features.float(),
            text_features.float(),
            logit_scale.float(),
        )
        all_image, all_text = all_gather_with_grad(image_features), all_gather_with_grad(text_features)
        offset = dist.get_rank() * image_features.shape[0] if all_image is not image_features else 0
        logits_per_image = logit_scale * image_features @ all_text.T  # [B, world*B]
        logits_per_text = logit_scale * text_features @ all_image.T  # [B, world*B]
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
    The mean is over the caption tokens of the *global* batch: ranks hold captions of different
    lengths and DDP averages gradients, so every rank divides its sum by (global count / world)."""
    total, count = caption_token_losses(logits, caption, vocab)
    return global_mean(total.sum(), count.sum())


def caption_token_losses(logits, caption, vocab=None):
    """caption_loss per caption, row-wise (so that --accum_steps can split it): -> (the cross-entropy
    summed over each caption's tokens [B], fp32, and its number of tokens [B]). Padding = every position
    after the EOT, found by position and not by id, because the pad id 0 is also a real token ("!").
    vocab: the sorted token ids the V' logits stand for (None: all)."""
    target = caption[:, 1:].contiguous()
    pad = torch.arange(target.shape[1], device=caption.device) >= caption.argmax(-1, keepdim=True)  # [B, Q]
    if vocab is not None:  # token id -> its index among the logits
        index = torch.searchsorted(vocab, target).clamp_(max=len(vocab) - 1)
        if (vocab[index] != target)[~pad].any():
            raise ValueError("caption_loss: a caption token is outside the captioner's vocab")
        target = index
    per_token = F.cross_entropy(
        logits.float().flatten(0, 1),
        target.masked_fill(pad, -100).flatten(),
        ignore_index=-100,
        reduction="none",
    )
    return per_token.view(target.shape).sum(1), (~pad).sum(1)


class CLIPWithCaptioner(nn.Module):
    """CLIPS with a captioner: the CLIP and its Captioner as one module, so that DDP and
    torch.compile see one forward. The checkpoint keeps them apart (`model`, `captioner`)."""

    def __init__(self, clip, captioner):
        super().__init__()
        self.clip, self.captioner = clip, captioner

    def forward(self, image, pair, synthetic):
        """pair [B, 2, L]: each image's web caption and reduced synthetic caption; synthetic [B, Q+1]:
        its full synthetic caption -> CLIP's (image features [B, D], text features [B, 2, D], logit
        scale) + the captioner's loss on the full synthetic captions, per row (caption_token_losses:
        sums [B], token counts [B]). Row-wise, so --accum_steps can split it (training.MicroBatches).
        The captioner is conditioned on the web captions and reuses this pass's patch tokens and
        text-token outputs."""
        B = image.shape[0]
        image_features, image_tokens = self.clip.encode_image(image, normalize=True, return_tokens=True)
        tokens = pair.transpose(0, 1).flatten(0, 1)  # [B, 2, L] -> [2B, L]: the web captions first
        text_features, text_tokens = self.clip.encode_text(tokens, normalize=True, return_tokens=True)
        logits = self.captioner(image_tokens, text_tokens[:B], tokens[:B])
        return (
            image_features,
            text_features.view(2, B, -1).transpose(0, 1),
            self.clip.logit_scale.exp(),
            *caption_token_losses(logits, synthetic, self.captioner.vocab),
        )


def step_loss(model, batch, args, state):
    """The method, one step: CLIP's loss on (image, caption) pairs, or with CLIPS the dual-caption
    loss (+ the captioner's). batch: (images [B, 3, S, S], texts) as make_batch builds it; state:
    unused here (the fine-tunes keep their reference models in it) -> (loss, {name: detached scalar})."""
    images, texts = batch
    if args.caption_mask == "none":  # plain CLIP
        image_features, text_features, logit_scale = model(images, texts)
        loss, acc = clip_loss(image_features, text_features, logit_scale)
        return loss, {"acc": acc}
    pair, synthetic = texts
    # [B, 2, L] -> [2B, L]: the B web captions, then the B reduced synthetic ones
    tokens = pair.transpose(0, 1).flatten(0, 1)
    if not args.captioner_weight:
        image_features, text_features, logit_scale = model(images, tokens)
        loss, acc = clips_loss(image_features, text_features, logit_scale)
        return loss, {"acc": acc}
    image_features, text_features, logit_scale, cap_sums, cap_tokens = model(images, pair, synthetic)
    loss, acc = clips_loss(image_features, text_features.transpose(0, 1).flatten(0, 1), logit_scale)
    cap_loss = global_mean(cap_sums.sum(), cap_tokens.sum())  # caption_loss over the whole batch
    return loss + args.captioner_weight * cap_loss, {"acc": acc, "caption loss": cap_loss.detach()}


# -----------------------------------------------------------------------------
# the batches: which texts the text tower sees


def make_batch(samples, args):
    """The DataLoader's collate_fn (so it runs in the loader workers): samples (image, caption,
    synthetic caption, rng), None for an unreadable image -> ((images [B, 3, S, S], texts) or None if
    every image was unreadable, {"unreadable images": n}).
    texts: the captions' tokens [B, L]; with CLIPS, ([B, 2, L] the web caption and its image's
    synthetic caption reduced to --mask_len tokens, [B, captioner_len] the whole synthetic caption).
    Each reduction draws from its sample's own rng, so resume and DDP see the same reductions."""
    images, captions, synthetic, rngs, skipped = data.collate(samples)
    tokenizer, counts = data.get_tokenizer(args.context_length), {"unreadable images": skipped}
    if images is None:
        return None, counts
    if args.caption_mask == "none":
        return (images, *data.trim_tokens(tokenizer(captions))), counts
    reduced = [
        data.reduce_caption(syn, args.caption_mask, args.mask_len, args.context_length, rng, fallback=web)
        for web, syn, rng in zip(captions, synthetic, rngs)
    ]
    (pair,) = data.trim_tokens(torch.stack([tokenizer(captions), torch.stack(reduced)], dim=1))  # [B, 2, L]
    return (images, (pair, data.get_tokenizer(args.captioner_len)(synthetic))), counts


# -----------------------------------------------------------------------------
# config


# the defaults that depend on --data, applied after parsing (apply_preset); None = from --epochs
SHAPES = dict(
    max_steps=1750,
    epochs=None,
    warmup_steps=100,
    eval_every=500,
    ckpt_every=250,
    image_size=64,
    context_length=32,
    workers=0,
    lr=2e-3,
    text_lr_mult=0.1,
)
REAL = dict(
    max_steps=None,
    epochs=32,
    warmup_steps=None,
    eval_every=None,
    ckpt_every=None,
    image_size=224,
    context_length=77,
    workers=4,
    lr=1e-3,
    text_lr_mult=1.0,
)


def get_args(argv=None):
    p = Parser(__doc__)
    p.presets(SHAPES, REAL)
    # data
    p.add_argument("--data", default="shapes", choices=("shapes", "flickr8k", "coco", "recap", "wds"))
    p.add_argument(
        "--data_root",
        default=None,
        help="dataset folder (real data); recap: the CSV or JSONL file; wds: the shards, "
        "'shards/{00000..00099}.tar'",
    )
    p.add_argument(
        "--train_num_samples",
        type=int,
        default=None,
        help="wds: the samples an epoch (open_clip's --train-num-samples); the steps are epochs x this / "
        "global batch",
    )
    p.add_argument(
        "--eval_data",
        default=None,
        choices=("flickr8k", "coco", "recap"),
        help="wds: the retrieval eval set (default: none, the run only trains)",
    )
    p.add_argument("--eval_root", default=None, help="wds: the --eval_data folder (recap: its file)")
    p.add_argument("--image_size", type=int, default=None, help="default: 64 for shapes, 224 for real data")
    p.add_argument(
        "--context_length", type=int, default=None, help="default: 32 for shapes, 77 for real data"
    )
    p.add_argument(
        "--workers", type=int, default=None, help="DataLoader workers per process (default: 0 shapes, 4 real)"
    )
    p.add_argument(
        "--cache_images", action="store_true", help="decode+resize every image once into a uint8 memmap"
    )
    p.add_argument(
        "--swap_noise",
        type=float,
        default=0.5,
        help="shapes: fraction of captions with the colours misbound (shapes.ShapesDataset)",
    )
    p.add_argument(
        "--holdout",
        default="none",
        choices=("none", "combos"),
        help="shapes: keep shapes.holdout_combos() out of "
        "every training scene, caption, negative and group; evaluate seen and unseen test scenes apart",
    )
    p.add_argument(
        "--caption_style",
        default="full",
        choices=shapes.CAPTION_STYLES,
        help="shapes: full captions, or terse partial ones (shapes.partial_caption; the CLIPS setting)",
    )
    p.add_argument("--image_key", default="image", help="recap: the image column")
    p.add_argument("--caption_key", default="caption", help="recap: the web caption column")
    p.add_argument(
        "--recap_key", default="re_caption", help="recap: the synthetic caption column; wds: its json field"
    )
    # CLIPS: synthetic captions (off by default)
    p.add_argument(
        "--caption_mask",
        default="none",
        choices=data.CAPTION_MASKS,
        help="train on (web, synthetic) caption pairs with the synthetic one reduced this way; none = plain CLIP",
    )
    p.add_argument(
        "--mask_len",
        type=int,
        default=32,
        help="K: tokens of the reduced synthetic caption, SOT and EOT included",
    )
    p.add_argument(
        "--captioner_weight",
        type=float,
        default=0.0,
        help="weight of the captioner loss (0: no captioner; CLIPS uses 2.0)",
    )
    p.add_argument(
        "--captioner_len",
        type=int,
        default=77,
        help="tokens of the full synthetic caption the captioner predicts (longer ones are cut)",
    )
    # model
    p.add_argument("--model_size", default="tiny", choices=list(MODEL_SIZES))
    p.add_argument(
        "--grad_checkpointing",
        action="store_true",
        help="recompute the towers' activations in backward (large models)",
    )
    # optim
    p.add_argument(
        "--max_steps", type=int, default=None, help="default: 1750 on shapes; real data: from --epochs"
    )
    p.add_argument(
        "--epochs",
        type=int,
        default=None,
        help="real data: passes over the training items (default 32: CLIP's 32)",
    )
    p.add_argument(
        "--batch_size", type=int, default=128, help="per process; global batch = batch_size x world size"
    )
    p.add_argument("--lr", type=float, default=None, help="peak lr (default: 2e-3 shapes, 1e-3 real data)")
    p.add_argument(
        "--text_lr_mult",
        type=float,
        default=None,
        help="text-tower lr = lr x this (default: 0.1 shapes, see deviation 3; 1 real data)",
    )
    p.add_argument("--weight_decay", type=float, default=0.1)
    p.add_argument(
        "--accum_steps",
        type=int,
        default=1,
        help="K: each process's batch runs as K micro-batches, the loss and its negatives over the whole "
        "batch (GradCache: training.MicroBatches); the memory of a micro-batch, about twice the forwards",
    )
    p.add_argument(
        "--grad_clip",
        type=float,
        default=0.0,
        help="clip the global gradient norm to this (0: off); logs grad_norm",
    )
    p.add_argument(
        "--warmup_steps",
        type=int,
        default=None,
        help="default: 100 on shapes; real data: 5%% of the steps (training.WARMUP_FRACTION)",
    )
    # eval / checkpoints
    p.add_argument("--out_dir", default="out/clip_scratch")
    p.add_argument(
        "--eval_every",
        type=int,
        default=None,
        help="default: 500 on shapes; real data: every epoch. 0 disables (a final eval always runs)",
    )
    p.add_argument(
        "--ckpt_every",
        type=int,
        default=None,
        help="default: 250 on shapes; real data: every epoch. 0 disables (a final checkpoint is always written)",
    )
    p.add_argument("--resume", action="store_true", help="continue from out_dir/ckpt.pt if it exists")
    p.add_argument(
        "--overwrite", action="store_true", help="start over in an out_dir that holds a checkpoint"
    )
    p.add_argument(
        "--wandb",
        default=None,
        metavar="PROJECT",
        help="also log to this Weights & Biases project (pip install wandb)",
    )
    p.add_argument(
        "--export", default=None, metavar="DIR", help="also write an open_clip hub directory at the end"
    )
    p.add_argument("--eval_n", type=int, default=1000, help="shapes test scenes per eval")
    p.add_argument("--log_every", type=int, default=10)
    # system
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    p.add_argument(
        "--dtype",
        default="auto",
        choices=("auto", "float32", "bfloat16", "float16"),
        help="auto: bfloat16 on cuda, else float32",
    )
    p.add_argument("--compile", action="store_true")
    p.add_argument(
        "--dist_timeout",
        type=int,
        default=7200,
        help="torchrun: seconds a rank waits in a collective (the "
        "image cache, a rank-0 evaluation) before torch.distributed gives up (nccl's own default: 600)",
    )
    args = p.parse_args(argv)
    if args.holdout != "none" and args.data != "shapes":
        p.error("--holdout: held-out combinations are the shapes world's")
    if (args.train_num_samples or args.eval_data or args.eval_root) and args.data != "wds":
        p.error("--train_num_samples, --eval_data and --eval_root are for --data wds")
    if args.cache_images and args.data == "wds":
        p.error("--cache_images: --data wds streams its shards, there is no image list to cache")
    if bool(args.eval_data) != bool(args.eval_root):
        p.error("--eval_data and --eval_root go together: the eval set and its folder")
    if args.data == "shapes" and args.epochs is not None:
        p.error("--epochs: the shapes world is an endless stream; give --max_steps")
    apply_preset(args, SHAPES, REAL)
    args.batch_items = args.batch_size  # dataset items per process per step
    if args.caption_mask != "none" and not 3 <= args.mask_len <= args.context_length:
        p.error(f"--mask_len {args.mask_len}: must be between 3 and --context_length {args.context_length}")
    if args.captioner_weight and args.caption_mask == "none":
        p.error("--captioner_weight needs synthetic captions: set --caption_mask (subcaption, as CLIPS)")
    if args.captioner_weight and args.captioner_len < 2:
        p.error(f"--captioner_len {args.captioner_len}: must be at least 2")
    p.check_step(args)  # --accum_steps, --grad_clip
    return args


@dataclass
class State:
    """the method's state beside the weights: what step_loss reads and save_state keeps"""

    summary: str  # the start line's words on the method
    captioner: object = None  # CLIPS's captioner (--captioner_weight > 0), else None
    captioner_cfg: dict = None  # its constructor arguments, kept in the checkpoint
    step: int = 0  # set by the loop before each step


def make_model(args, device):
    """-> (clip, the module that trains (the CLIP, or the CLIP and its captioner), preprocess for eval,
    AdamW parameter groups, state): a fresh CLIP of --model_size, and with --captioner_weight the
    CLIPS captioner, as wide and deep as the text tower."""
    model_cfg = model_config(args.model_size, args.image_size, args.context_length)
    clip, captioner, captioner_cfg = CLIP(**model_cfg).to(device), None, None
    clip.model_cfg = model_cfg
    groups = param_groups(clip, args.weight_decay, args.text_lr_mult)
    if args.captioner_weight:
        v, t = model_cfg["vision_cfg"], model_cfg["text_cfg"]
        captioner_cfg = dict(
            vision_width=v["width"],
            text_width=t["width"],
            width=t["width"],
            layers=t["layers"],
            heads=t["heads"],
            n_query=args.captioner_len - 1,
            vocab_size=t["vocab_size"],
            vocab=shapes.shapes_vocab() if args.data == "shapes" else None,
        )  # deviation 6
        captioner = Captioner(**captioner_cfg).to(device)
        groups += param_groups(captioner, args.weight_decay)  # full lr: it is not the text tower
    preprocess = open_clip.transform.image_transform(args.image_size, is_train=False)
    if args.grad_checkpointing:  # the towers (and the captioner) recompute their blocks in backward
        clip.set_grad_checkpointing(True)
        if captioner is not None:
            captioner.transformer.grad_checkpointing = True
    model = clip if captioner is None else CLIPWithCaptioner(clip, captioner)
    state = State(
        captioner=captioner,
        captioner_cfg=captioner_cfg,
        summary=f"model {args.model_size}"
        + (f" | CLIPS {args.caption_mask} {args.mask_len}" if args.caption_mask != "none" else ""),
    )
    return Model(clip, model, preprocess, groups, state)


def save_state(state):
    """the checkpoint's method part: the CLIPS captioner (open_clip's CLIP has no place for it)"""
    return {
        "captioner": state.captioner and state.captioner.state_dict(),
        "captioner_cfg": state.captioner_cfg,
    }


def resume(path, clip, state):
    """load a checkpoint into this run's models, or one line on what does not fit -> the checkpoint"""
    ckpt = load_checkpoint(path, clip, state.captioner, need=("optimizer", "step", "rng"))
    clip.load_state_dict(ckpt["model"])
    if state.captioner is not None:
        state.captioner.load_state_dict(ckpt["captioner"])
    return ckpt


def make_data(args, rank, world):
    """-> (train dataset, number of items or None for an infinite stream, what to evaluate on:
    "shapes-none" | "shapes-combos" (--holdout), the dataset's splits, or with --data wds the
    --eval_data's splits or None)."""
    if args.data == "shapes":
        held = shapes.holdout_combos() if args.holdout == "combos" else None
        return (
            shapes.ShapesDataset(args.image_size, args.seed, args.swap_noise, args.caption_style, held),
            None,
            f"shapes-{args.holdout}",
        )
    if args.data_root is None:
        raise data.DataError(f"--data {args.data} needs --data_root")
    keys = (args.image_key, args.caption_key, args.recap_key)
    if args.data == "wds":  # webdataset shards, streamed: an epoch is --train_num_samples samples
        sample = partial(
            wds.clip_sample,
            image_size=args.image_size,
            recap_key=args.recap_key,
            need_recap=args.caption_mask != "none",
        )
        train, n = wds.open_shards(
            args.data_root, args.train_num_samples, sample, rank, world, args.workers, args.seed
        )
        return train, n, args.eval_data and data.read_dataset(args.eval_data, args.eval_root, keys)
    splits = data.read_dataset(args.data, args.data_root, keys)
    cache = (
        os.path.join(args.out_dir, f"cache_{args.data}_train_{args.image_size}.u8")
        if args.cache_images
        else None
    )
    os.makedirs(args.out_dir, exist_ok=True)
    # every rank decodes its shard
    train = data.ImageTextDataset(splits["train"], args.image_size, args.seed, cache, rank, world)
    return train, len(train), splits


# -----------------------------------------------------------------------------
# the loop: the same text in clip_scratch.py, clip_hardneg.py and clip_dpo.py (a test keeps it so).
# It calls this file's hooks, and only these:
#   get_args(argv) -> args                       flags, with this script's shapes / real-data presets applied
#   make_data(args, rank, world) -> (dataset, n_items, evalset)   n_items None = an endless stream;
#                                                evalset: what eval.evaluate scores ("shapes-none", splits, VSR rows)
#   make_model(args, device) -> training.Model(clip, module, preprocess, param_groups, state)
#   make_batch(samples, args) -> (batch, {what was skipped: count})   the DataLoader's collate_fn
#   step_loss(module, batch, args, state) -> (loss, {name: detached scalar})   the method, one step
#   save_state(state) -> dict                    the method's part of a checkpoint
#   resume(path, clip, state) -> checkpoint      a checkpoint checked against this run's models, loaded
#   EQUAL_BATCHES                                every rank keeps the smallest rank's number of rows


def main(argv=None):
    args = get_args(argv)
    rank, local_rank, world, device = setup_distributed(args.device, args.dist_timeout)
    master, dtype = rank == 0, resolve_dtype(args.dtype, device)
    torch.manual_seed(args.seed)  # identical init on every rank
    ckpt_path = os.path.join(args.out_dir, "ckpt.pt")

    # data first: a missing or bad file is one line before any model is built or downloaded
    dataset, n_items, evalset = load_data(make_data, args, rank, world)
    clip, model, preprocess, groups, state = make_model(args, device)
    # the run's plan: the batch fits the data, out_dir holds no run to lose, real data in epochs
    plan = schedule(args, n_items, world, ckpt_path)
    tokenizer = data.get_tokenizer(args.context_length)

    # optimizer, resume, DDP, batches
    optimizer = torch.optim.AdamW(groups, lr=args.lr, betas=(0.9, 0.98), eps=1e-6, fused=True)
    # --resume: the checkpoint checked against this run's models by the resume hook, or one line on what is wrong
    start_step, start_metrics = resume_run(
        ckpt_path, args, partial(resume, clip=clip, state=state), optimizer
    )
    model = wrap(model, args, world, local_rank, device)  # --accum_steps micro-batches, DDP, torch.compile
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == "float16")
    loader = batches(dataset, n_items, partial(make_batch, args=args), args, rank, world, start_step, device)
    not_finite = NotFinite(device, world)  # the non-finite-loss stop, read on log and checkpoint steps

    def checkpoint(step):  # after the non-finite check, rank 0 saves the run and the method's state
        not_finite.check(ckpt_path)
        if master:
            save_run(ckpt_path, clip, optimizer, step, args, start_metrics, save_state(state))

    def evaluate(step, split):  # rank 0 evaluates the unwrapped CLIP on the whole split; the others wait
        metrics, t = None, time.time()
        if master:
            metrics = ev.evaluate(
                clip, preprocess, tokenizer, device, evalset, split, args.image_size, args.eval_n
            )
            log.eval(step, split, metrics, time.time() - t)
        if world > 1:
            dist.barrier()
        log.restart_clock()  # eval time is not training time
        return metrics

    # the loop
    log = RunLog(
        args, start_step, master, world
    )  # metrics.jsonl (this run's lines), --wandb, the printed lines
    start_line(state.summary, clip, args, plan, device, dtype)
    if start_step == 0:
        start_metrics = evaluate(0, "test")
    peak, flops = peak_flops(device, dtype) * world, None
    step, skipped = start_step, {}
    for batch, counts in loader:
        for k, v in counts.items():  # what make_batch skipped (unreadable images, invalid negatives)
            skipped[k] = skipped.get(k, 0) + v
        n = global_min(0 if batch is None else len(batch[0]), device)
        if n == 0:  # some rank drew only unreadable samples: every rank skips the step
            step += 1
            continue
        batch = to_device(
            batch, device, n if EQUAL_BATCHES else None
        )  # EQUAL_BATCHES: keep the smallest rank's n
        log.n_images += len(batch[0])
        lr = lr_at(step, args.lr, args.warmup_steps, args.max_steps)
        for g in optimizer.param_groups:
            g["lr"] = lr * g["lr_mult"]
        state.step = step
        # FLOPs counted on one step (GPUs with a known peak), run eager: the module inside torch.compile's
        with count_flops(peak and flops is None) as counter:
            with autocast_ctx(device, dtype):
                loss, stats = step_loss(
                    getattr(model, "_orig_mod", model) if counter else model, batch, args, state
                )
            not_finite.update(loss, step)  # no host sync
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
        flops = counter.get_total_flops() if counter else flops
        stats |= clip_grads(optimizer, scaler, args.grad_clip)  # --grad_clip: {"grad_norm": before clipping}
        scaler.step(optimizer)
        scaler.update()
        with torch.no_grad():
            clip.logit_scale.clamp_(0, math.log(100))
        step += 1
        if step % args.log_every == 0 or step == args.max_steps:
            not_finite.check(ckpt_path)
            log.train(step, loss, stats, lr, clip.logit_scale, flops, peak, skipped)
        if args.ckpt_every and step % args.ckpt_every == 0 and step < args.max_steps:
            checkpoint(step)
        if args.eval_every and step % args.eval_every == 0 and step < args.max_steps:
            evaluate(step, "val")
    checkpoint(step)
    log.skipped(skipped)
    log.table(start_metrics, evaluate(step, "test"), step)
    if args.export and master:
        export_open_clip(clip, clip.model_cfg, args.export)
        print0(
            f"exported an open_clip hub directory to {args.export} "
            f"(open_clip.create_model_and_transforms('local-dir:{args.export}'))"
        )
    if world > 1:
        dist.destroy_process_group()


if __name__ == "__main__":
    with one_error():
        main()
