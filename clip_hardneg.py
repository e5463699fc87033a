"""
Hard-negative fine-tuning of a CLIP: each image comes with K hard-negative captions (its caption
minimally edited: a relation flipped, two attributes swapped, ...) that the loss must rank below
the true caption. NegCLIP (Yuksekgonul et al. 2023, "When and why vision-language models behave
like bags-of-words"), CE-CLIP (Zhang et al. 2023, "Contrasting Intra-Modal and Ranking Cross-Modal
Hard Negatives") and the HNC thesis's variants (a weighted hard-negative term, L2-SP toward the
initial weights, KL distillation from the initial model).

    python clip_scratch.py && python clip_hardneg.py          # CPU: fine-tunes out/clip_scratch/ckpt.pt
    python clip_hardneg.py --loss negclip --out_dir out/negclip        # also: --cmr_weight 0.2, --loss hnc --kl_weight 1
    python clip_hardneg.py --init ViT-B-32:openai --data negclip --data_root ~/data/negclip/train.csv --image_root ~/data --device cuda
    torchrun --standalone --nproc_per_node=8 clip_hardneg.py --init ViT-B-32:openai --data coco --data_root ~/data/coco
    torchrun --standalone --nproc_per_node=2 clip_hardneg.py --device cpu          # DDP on CPU (gloo)

Data: the shapes world (exact negatives; with --neg_images each batch holds scenes and their twins,
the mirror image and the colour swap), COCO with negatives from negatives.py's generator, NegCLIP's
TSV, CE-CLIP's .npy (--allow_pickle), HNC's JSON, or img2dataset's webdataset shards whose json
holds each sample's hard-negative captions (--data wds; the field is --neg_key, one drawn a sample). The method is the loss functions, `step_loss`
and `make_batch`; the loop at the bottom is the same text in the three scripts.
The equations next to the code, every default and the run that chose it: docs/clip_hardneg.md.

Deviations from the papers
1. Tiny models and the shapes world by default; there the negatives are exact and the hard-negative
   images are the twins.
2. --batch_size counts images per process; with --neg_images half of them are the other half's
   hard-negative images (NegCLIP appends them, doubling the batch).
3. NegCLIP's TSV, HNC and webdataset shards: one negative drawn per sample (K = 1); CE-CLIP's four typed negatives and
   the generator's five types are all used. An invalid negative is masked out and counted.
4. CE-CLIP's IMC is the coherent reading of a term the reference repo changed four times: per image,
   S(i, t_i) against its own negatives' text-text logits s * t_i . n_ik, cross-entropy to the caption.
5. CMR is a mean over the valid (image, negative) pairs of the global batch, and its adaptive
   thresholds are global-batch statistics (N ranks == 1 process); a type with no valid item keeps its threshold.
6. HNC: the weight w multiplies exp(S(i, n_ik)) (logit + log w; the thesis's code multiplied the logit,
   so w = 0 left a logit of 0); the ramp to w is linear (the thesis: a staircase); the KL student
   term has a gradient (the thesis computed it under no_grad) and each model uses its own exp(logit_scale).
7. Shapes only: the text tower learns at 0.1x lr, and CE-CLIP's CMR is off (--cmr_weight 0; 0.2 on
   real data): the default is NegCLIP + IMC (the runs behind both: bench/LOG.md, 2026-11-25).
8. The global batch is batch_size x world size rows. --accum_steps K runs each process's rows as K
   micro-batches for memory, GradCache's way: every term (NegCLIP's candidates, CMR's global
   statistics, IMC, HNC's KL and L2-SP) sees the whole batch, and loss and gradients equal one
   pass's (training.MicroBatches, tested).
"""

import argparse
import copy
import math
import os
import random
import time
from dataclasses import dataclass
from functools import partial

import torch
import torch.distributed as dist
import torch.nn.functional as F

import data
import eval as ev
import negatives
import shapes
import wds
from model import (
    FINETUNE_MODES,
    export_open_clip,
    init_geometry,
    init_preprocess,
    l2sp,
    load_checkpoint,
    load_clip,
    param_groups,
    set_trainable,
)
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
    global_min,
    global_sum,
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
    world_size,
    wrap,
)

# -----------------------------------------------------------------------------
# the methods: losses on features. Shapes: image_features, text_features [B, D] (row i's image and
# caption), neg_features [B, K, D] (row i's K hard-negative captions), neg_valid bool [B, K],
# all L2-normalised, logit_scale already exp()'d. S(i, j) = logit_scale * v_i . t_j. Under
# torch.distributed the candidate sets are the global batch: every rank all-gathers captions,
# negatives and images with gradient and scores its own B rows (labels offset by rank * B).

EQUAL_BATCHES = True  # every rank's batch holds the same number of rows (all_gather_with_grad needs it)


def candidates(image_features, text_features, neg_features, neg_valid, logit_scale, hn_weight=1.0):
    """NegCLIP's image->text candidate set: every caption and every valid hard negative of the
    global batch. -> (logits [B, W*B + valid negatives], labels [B]); hn_weight multiplies
    exp(S(i, n_ik)) of row i's own negatives (adds log hn_weight to their logits, HNC)."""
    B, K, D = neg_features.shape
    all_text, all_neg = (
        all_gather_with_grad(text_features),
        all_gather_with_grad(neg_features.reshape(B * K, D)),
    )
    # invalid negatives are dropped columns
    keep = all_gather_with_grad(neg_valid.reshape(B * K).float()) > 0.5
    offset = dist.get_rank() * B if world_size() > 1 else 0
    logits = logit_scale * image_features @ torch.cat([all_text, all_neg]).T  # [B, W*B + W*B*K]
    if hn_weight != 1.0:
        own = (
            len(all_text)
            + (offset + torch.arange(B, device=logits.device))[:, None] * K
            + torch.arange(K, device=logits.device)
        )
        bias = torch.zeros_like(logits).scatter_(
            1, own, math.log(hn_weight) if hn_weight > 0 else float("-inf")
        )
        logits = logits + bias
    logits = logits[:, torch.cat([keep.new_ones(len(all_text)), keep])]
    return logits, torch.arange(B, device=logits.device) + offset


def negclip_loss(image_features, text_features, neg_features, neg_valid, logit_scale, hn_weight=1.0):
    """NegCLIP: L = 1/2 [CE([S(v, T), S(v, N)], I) + CE(S(T, v), I)]: image->text over the global
    batch's captions T and hard negatives N, text->image over the images only (a negative caption
    has no image). hn_weight: see candidates (HNC's weighted hard-negative term; 1 = NegCLIP).
    -> (loss, {acc: image->text argmax accuracy, hn_acc: fraction of valid (i, k) with
    S(i, t_i) > S(i, n_ik)}), in fp32 also under autocast."""
    with torch.autocast(image_features.device.type, enabled=False):
        v, t, n, s = image_features.float(), text_features.float(), neg_features.float(), logit_scale.float()
        logits, labels = candidates(v, t, n, neg_valid, s, hn_weight)
        logits_per_text = s * t @ all_gather_with_grad(v).T  # [B, W*B]
        loss = 0.5 * (F.cross_entropy(logits, labels) + F.cross_entropy(logits_per_text, labels))
        pos, neg = (v * t).sum(-1), torch.einsum("bd,bkd->bk", v, n)
        # NaN without a valid negative; no host sync
        hn_acc = ((pos[:, None] > neg) & neg_valid).sum() / neg_valid.sum()
    return loss, {"acc": (logits.argmax(1) == labels).float().mean().detach(), "hn_acc": hn_acc.detach()}


def cmr_loss(pos, neg, neg_valid, threshold, upper_bound=10.0):
    """CE-CLIP's cross-modal rank loss. pos [B] = S(i, t_i), neg [B, K] = S(i, n_ik), threshold [K].
    L = sum over valid (i, k) of relu(tau_k + S(i, n_ik) - S(i, t_i)) / number of valid (i, k) in the
    global batch (0 when there is none). Returns (loss, the adaptive thresholds for the next step):
    tau_k = mean_i S(i, t_i) - mean over valid i of S(i, n_ik), detached, clamped to [0, upper_bound],
    unchanged for a type with no valid item (so never NaN)."""
    with torch.autocast(pos.device.type, enabled=False):
        pos, neg, W = pos.float(), neg.float(), world_size()
        terms = F.relu(threshold.to(neg)[None, :] + neg - pos[:, None]) * neg_valid
        stats = global_sum(
            torch.cat(
                [
                    torch.stack([pos.sum(), pos.new_tensor(len(pos))]),
                    (neg * neg_valid).sum(0),
                    neg_valid.sum(0).to(neg),
                ]
            )
        )
        K = neg.shape[1]
        count = stats[2 + K :]
        # each rank divides by (global count / W): DDP's gradient average then gives the global mean
        loss = terms.sum() / (count.sum().clamp(min=1) / W)
        gap = stats[0] / stats[1] - stats[2 : 2 + K] / count.clamp(min=1)
        new = torch.where(count > 0, gap.clamp(0, upper_bound), threshold.to(gap))
    return loss, new.detach()


def imc_loss(image_features, text_features, neg_features, neg_valid, logit_scale):
    """CE-CLIP's intra-modal contrastive loss (the coherent reading: deviation 4). Per row i, logits
    [S(i, t_i), s * t_i . n_ik for valid k], cross-entropy with target 0: the caption must be closer to
    its image than its own hard negatives are to it. A row without valid negatives contributes 0."""
    with torch.autocast(image_features.device.type, enabled=False):
        v, t, n, s = image_features.float(), text_features.float(), neg_features.float(), logit_scale.float()
        logits = torch.cat([s * (v * t).sum(-1, keepdim=True), s * torch.einsum("bd,bkd->bk", t, n)], dim=1)
        logits = logits.masked_fill(
            torch.cat([neg_valid.new_ones(len(v), 1), neg_valid], dim=1) == 0, float("-inf")
        )
        return F.cross_entropy(logits, torch.zeros(len(v), dtype=torch.long, device=v.device))


def kl_loss(student_logits, teacher_logits, temperature):
    """HNC's distillation: T^2 * mean over rows of KL(softmax(teacher / T) || softmax(student / T)) over
    a candidate set [B, C] (the same columns in both). Gradients reach the student only."""
    with torch.autocast(student_logits.device.type, enabled=False):
        log_p_s = F.log_softmax(student_logits.float() / temperature, dim=1)
        log_p_t = F.log_softmax(teacher_logits.detach().float() / temperature, dim=1)
        return temperature**2 * (log_p_t.exp() * (log_p_t - log_p_s)).sum(1).mean()


def hn_weight_at(step, args):
    """HNC's hard-negative weight at a step: linear from 0 to --hn_weight over --hn_warmup_steps"""
    return args.hn_weight * min(1.0, step / args.hn_warmup_steps) if args.hn_warmup_steps else args.hn_weight


def step_loss(model, batch, args, state):
    """The method, one step. batch: (images [B, 3, S, S], captions [B, L], negatives [B, K, L],
    valid bool [B, K]) as make_batch builds it; one forward of the images and the B + B*K texts.
    state: step, threshold (CE-CLIP, updated here), teacher, init_params and clip (HNC).
    -> (loss, {name: detached scalar} to log)."""
    images, captions, negatives, valid = batch
    B, K = valid.shape
    image_features, text_features, logit_scale = model(images, torch.cat([captions, negatives.flatten(0, 1)]))
    t, n = text_features[:B], text_features[B:].view(B, K, -1)
    if args.loss == "negclip":
        return negclip_loss(image_features, t, n, valid, logit_scale)
    if args.loss == "ceclip":
        itc, stats = negclip_loss(image_features, t, n, valid, logit_scale)
        # fp32 scores: autocast would run a matmul in bf16 (and
        with torch.autocast(images.device.type, enabled=False):
            # TF32 one in tf32): products and sums, as the positives'
            v, s = image_features.float(), logit_scale.float()
            pos, neg = s * (v * t.float()).sum(-1), s * (v[:, None, :] * n.float()).sum(-1)
        threshold = (
            state.threshold
            if args.cmr_threshold == "adaptive"
            else pos.new_full((K,), args.cmr_fixed_threshold)
        )
        cmr, new = cmr_loss(pos, neg, valid, threshold, args.cmr_upper_bound)
        if args.cmr_threshold == "adaptive":
            state.threshold = new  # used at the next step
        imc = imc_loss(image_features, t, n, valid, logit_scale)
        stats |= {"cmr": cmr.detach(), "imc": imc.detach(), **{f"tau{k}": threshold[k] for k in range(K)}}
        return itc + args.cmr_weight * cmr + args.imc_weight * imc, stats
    if args.loss != "hnc":
        raise ValueError(f"unknown --loss {args.loss!r}")
    w = hn_weight_at(state.step, args)
    loss, stats = negclip_loss(image_features, t, n, valid, logit_scale, hn_weight=w)
    stats["w_hn"] = torch.tensor(w)
    if args.kl_weight:
        with torch.no_grad():
            ti, tt, ts = state.teacher(images, torch.cat([captions, negatives.flatten(0, 1)]))
        # both logits in fp32 (candidates' matmul under autocast is bf16)
        with torch.autocast(images.device.type, enabled=False):
            with torch.no_grad():
                teacher_logits, _ = candidates(
                    ti.float(), tt[:B].float(), tt[B:].view(B, K, -1).float(), valid, ts.float()
                )
            student_logits, _ = candidates(
                image_features.float(), t.float(), n.float(), valid, logit_scale.float()
            )
            kl = kl_loss(student_logits, teacher_logits, args.kl_temperature)
        loss, stats["kl"] = loss + args.kl_weight * kl, kl.detach()
    if args.l2sp:
        reg = l2sp(
            (p, state.init_params[n]) for n, p in state.clip.named_parameters() if n in state.init_params
        )
        loss, stats["l2sp"] = loss + args.l2sp * reg, reg.detach()
    return loss, stats


# -----------------------------------------------------------------------------
# the batches: a sample is one image row (or, with --neg_images, an image row and its hard-negative
# image row); each row = (image float [3, S, S], caption, K hard negatives, None where invalid)


class ShapesHardNegatives(torch.utils.data.Dataset):
    """The shapes world's fine-tuning stream, key = global sample index -> [row] or, with
    neg_images, [row, twin row]: the twin is the scene's mirror image (even keys) or its colour swap
    (odd keys), whose caption is word for word the original's relation / attribute negative. The
    negatives are exact (shapes.NEGATIVES[kind] for each kind in types)."""

    def __init__(self, image_size, seed, types, neg_images, held=None):
        self.image_size, self.seed, self.types, self.neg_images, self.held = (
            image_size,
            seed,
            types,
            neg_images,
            held,
        )

    def __len__(self):
        return 2**62

    def row(self, scene):
        return (
            data.to_tensor(shapes.render(scene, self.image_size)),
            scene.caption(),
            [shapes.NEGATIVES[k](scene) for k in self.types],
        )

    def __getitem__(self, key):
        s, _ = shapes.training_scene("hardneg", self.seed, key, self.held, self.types)
        if not self.neg_images:
            return [self.row(s)]
        return [self.row(s), self.row(shapes.mirror(s) if key % 2 == 0 else shapes.swap_colours(s))]


class HardNegatives(torch.utils.data.Dataset):
    """Real image-caption data with hard negatives. items[i] = (image path, [(caption, slots)],
    neg image rows or None); slots = K lists of candidate negatives, one drawn per slot per sample
    (an empty list = no negative), or None to generate them with negatives.caption_negatives(types).
    key = epoch * len + i (data.StepBatches): the caption, the negatives and the hard-negative
    image row are drawn from a random.Random of (seed, epoch, i), so resume and DDP are exact.
    preprocess: the --init's image preprocessing (model.init_preprocess; None: OpenAI's), the pixels
    its evaluation sees. -> [row] or [row, its hard-negative image's row]; None if an image is unreadable."""

    def __init__(self, items, image_size, seed, types, neg_images, preprocess=None):
        self.items, self.image_size, self.seed, self.types, self.neg_images = (
            items,
            image_size,
            seed,
            types,
            neg_images,
        )
        self.preprocess = preprocess

    def __len__(self):
        return len(self.items)

    def row(self, i, epoch):
        rng = random.Random(f"{self.seed},{epoch},{i}")
        path, captions, neg_rows = self.items[i]
        caption, slots = captions[rng.randrange(len(captions))]
        negs = (
            negatives.caption_negatives(caption, rng, self.types)
            if slots is None
            else [rng.choice(c) if c else None for c in slots]
        )
        pixels = data.load_image(path, self.image_size, self.preprocess)
        return (
            None if pixels is None else (data.to_tensor(pixels, self.preprocess), caption, negs),
            rng,
            neg_rows,
        )

    def __getitem__(self, key):
        i, epoch = key % len(self.items), key // len(self.items)
        row, rng, neg_rows = self.row(i, epoch)
        if not self.neg_images or row is None or not neg_rows:
            return row and [row]
        twin = self.row(rng.choice(neg_rows), epoch)[0]
        return twin and [row, twin]


def make_batch(samples, args):
    """The DataLoader's collate_fn: samples (lists of rows, None if unreadable) -> ((images [R, 3, S, S],
    caption tokens [R, L], negative tokens [R, K, L], valid bool [R, K]) or None, {"unreadable
    samples": n, "invalid negatives": n}). A negative that is missing, empty or equal to its caption (ignoring case)
    is invalid: tokenised as "" and masked out of every loss."""
    kept = [s for s in samples if s is not None]
    rows = [r for s in kept for r in s]
    if not rows:
        return None, {"unreadable samples": len(samples), "invalid negatives": 0}
    images, captions, negs = zip(*rows)
    valid = torch.tensor(
        [[bool(n) and n.strip().lower() != c.strip().lower() for n in ns] for c, ns in zip(captions, negs)]
    )
    tokenizer, K = data.get_tokenizer(args.context_length), valid.shape[1]
    flat = [n if ok else "" for ns, oks in zip(negs, valid.tolist()) for n, ok in zip(ns, oks)]
    batch = (
        torch.stack(images),
        *data.trim_tokens(tokenizer(list(captions)), tokenizer(flat).view(len(rows), K, -1)),
        valid,
    )
    return batch, {"unreadable samples": len(samples) - len(kept), "invalid negatives": int((~valid).sum())}


# -----------------------------------------------------------------------------
# config


SHAPES_TYPES = ("relation", "attribute_swap")
DEFAULT_INIT = "out/clip_scratch/ckpt.pt"


def n_negatives(args):
    """K, the hard negatives per caption: one per type (shapes, coco, ceclip's 4) or one drawn (negclip, hnc)"""
    return {"negclip": 1, "ceclip": len(negatives.CECLIP_TYPES), "hnc": 1, "wds": 1}.get(
        args.data, len(args.neg_types)
    )


# the defaults that depend on --data, applied after parsing (apply_preset); None = from --epochs
SHAPES = dict(
    max_steps=3000,
    epochs=None,
    warmup_steps=50,
    eval_every=500,
    ckpt_every=250,
    batch_size=64,
    workers=0,
    lr=3e-4,
    text_lr_mult=0.1,
    neg_images=True,
    cmr_weight=0.0,
)
REAL = dict(
    max_steps=None,
    epochs=5,
    warmup_steps=None,
    eval_every=None,
    ckpt_every=None,
    batch_size=256,
    workers=4,
    lr=1e-5,
    text_lr_mult=1.0,
    neg_images=False,
    cmr_weight=0.2,
)


def get_args(argv=None):
    p = Parser(__doc__)
    p.presets(SHAPES, REAL)
    # data
    p.add_argument("--data", default="shapes", choices=("shapes", "coco", "negclip", "ceclip", "hnc", "wds"))
    p.add_argument(
        "--data_root",
        default=None,
        help="coco: the folder; negclip: the TSV; ceclip: a .npy or a folder of them; hnc: the JSON; "
        "wds: the shards, 'shards/{00000..00099}.tar'",
    )
    p.add_argument(
        "--train_num_samples",
        type=int,
        default=None,
        help="wds: the samples an epoch (open_clip's --train-num-samples); the steps are epochs x this / "
        "global batch",
    )
    p.add_argument(
        "--neg_key",
        default="negatives",
        help="wds: the json field holding a sample's hard-negative captions (a list; one is drawn per "
        "sample)",
    )
    p.add_argument(
        "--image_root",
        default=None,
        help="negclip / ceclip: the folder image paths are relative to (default: the file's); hnc: the GQA images (default: the file's images/)",
    )
    p.add_argument(
        "--allow_pickle",
        action="store_true",
        help="ceclip: unpickle the .npy files (this runs code stored in them)",
    )
    p.add_argument(
        "--neg_types",
        default=None,
        help=f"comma list. shapes: of {', '.join(shapes.NEGATIVES)} (default "
        f"{','.join(SHAPES_TYPES)}); coco: of {', '.join(negatives.NEGATIVE_TYPES)} (default all)",
    )
    p.add_argument(
        "--neg_images",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="half of each batch = the other half's hard-negative images (shapes: twins; negclip: neg_image rows); "
        "default: on for shapes, off for real data",
    )
    p.add_argument(
        "--holdout",
        default="none",
        choices=("none", "combos"),
        help="shapes: keep shapes.holdout_combos() out of "
        "every training scene, caption, negative and group; evaluate seen and unseen test scenes apart",
    )
    p.add_argument(
        "--eval_data",
        default=None,
        choices=("coco", "flickr8k"),
        help="real data: retrieval eval set (default: coco for --data coco)",
    )
    p.add_argument("--eval_root", default=None, help="its folder (default: --data_root for --data coco)")
    p.add_argument(
        "--workers", type=int, default=None, help="DataLoader workers per process (default: 0 shapes, 4 real)"
    )
    # model
    p.add_argument(
        "--init",
        default=None,
        help=f"the starting CLIP: ckpt.pt | local-dir:DIR | NAME:PRETRAINED (open_clip); "
        f"default {DEFAULT_INIT} on shapes, required on real data",
    )
    p.add_argument(
        "--finetune",
        default="full",
        choices=FINETUNE_MODES,
        help="which parameters train (model.set_trainable)",
    )
    p.add_argument(
        "--grad_checkpointing",
        action="store_true",
        help="recompute the towers' activations in backward (large models)",
    )
    # method
    p.add_argument("--loss", default="ceclip", choices=("negclip", "ceclip", "hnc"))
    p.add_argument(
        "--cmr_weight",
        type=float,
        default=None,
        help="ceclip: weight of the cross-modal rank loss (default: 0 shapes, "
        "see deviation 7; 0.2 real data)",
    )
    p.add_argument(
        "--imc_weight", type=float, default=0.3, help="ceclip: weight of the intra-modal contrastive loss"
    )
    p.add_argument(
        "--cmr_threshold",
        default="adaptive",
        choices=("adaptive", "fixed"),
        help="ceclip: CMR's threshold per negative type",
    )
    p.add_argument(
        "--cmr_upper_bound",
        type=float,
        default=10.0,
        help="ceclip: the adaptive threshold's upper clamp (logit units)",
    )
    p.add_argument(
        "--cmr_fixed_threshold",
        type=float,
        default=1.0,
        help="ceclip, --cmr_threshold fixed: the threshold (logit units)",
    )
    p.add_argument(
        "--hn_weight",
        type=float,
        default=1.0,
        help="hnc: weight of each image's own hard negatives in its softmax",
    )
    p.add_argument(
        "--hn_warmup_steps",
        type=int,
        default=0,
        help="hnc: ramp the weight linearly from 0 over this many steps",
    )
    p.add_argument("--l2sp", type=float, default=0.0, help="hnc: lambda of lambda * ||theta - theta_0||^2")
    p.add_argument(
        "--kl_weight",
        type=float,
        default=0.0,
        help="hnc: weight of the KL distillation from the frozen initial model",
    )
    p.add_argument("--kl_temperature", type=float, default=4.0, help="hnc: the distillation temperature T")
    # optim
    p.add_argument(
        "--max_steps", type=int, default=None, help="default: 3000 on shapes; real data: from --epochs"
    )
    p.add_argument(
        "--epochs",
        type=int,
        default=None,
        help="real data: passes over the training items (default 5: NegCLIP's 5)",
    )
    p.add_argument(
        "--batch_size",
        type=int,
        default=None,
        help="images per process (with --neg_images, half are hard-negative images (default: 64 shapes, 256 real data)",
    )
    p.add_argument(
        "--lr", type=float, default=None, help="default: 3e-4 shapes, 1e-5 real data (a pretrained CLIP)"
    )
    p.add_argument(
        "--text_lr_mult",
        type=float,
        default=None,
        help="text-tower lr = lr x this (default: 0.1 shapes, see deviation 7; 1 real data)",
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
        help="default: 50 on shapes; real data: 5%% of the steps (training.WARMUP_FRACTION)",
    )
    # eval / checkpoints
    p.add_argument("--out_dir", default="out/clip_hardneg")
    p.add_argument(
        "--eval_every",
        type=int,
        default=None,
        help="default: 500 on shapes; real data: every epoch. 0 disables (a start and a final eval always run)",
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
    if args.image_root is not None and args.data not in ("negclip", "ceclip", "hnc"):
        p.error(
            f"--image_root: --data {args.data} does not read it (it is for --data negclip, ceclip and hnc)"
        )
    if args.holdout != "none" and args.data != "shapes":
        p.error("--holdout: held-out combinations are the shapes world's")
    if args.train_num_samples and args.data != "wds":
        p.error("--train_num_samples is for --data wds")
    if args.data == "wds" and args.eval_data and not args.eval_root:
        p.error("--data wds --eval_data needs --eval_root: the eval set's folder")
    if args.init is None and args.data != "shapes":
        p.error(
            f"--data {args.data} needs --init: a pretrained CLIP, e.g. --init ViT-B-32:openai (open_clip NAME:PRETRAINED), "
            "local-dir:DIR or a minclip ckpt.pt"
        )
    args.init = DEFAULT_INIT if args.init is None else args.init
    # for the data; make_model confirms them
    args.image_size, args.context_length = init_geometry(args.init) or (None, None)
    args.preprocess = init_preprocess(args.init)  # the real data's pixels: those the --init is evaluated on
    if args.data == "shapes" and args.epochs is not None:
        p.error("--epochs: the shapes world is an endless stream; give --max_steps")
    apply_preset(args, SHAPES, REAL)
    # samples (an image and its twin) per process
    args.batch_items = args.batch_size // 2 if args.neg_images else args.batch_size
    if args.neg_types is not None and args.data not in ("shapes", "coco"):
        p.error(f"--neg_types: --data {args.data} brings its own negatives")
    known = shapes.NEGATIVES if args.data == "shapes" else negatives.NEGATIVE_TYPES
    args.neg_types = (
        (SHAPES_TYPES if args.data == "shapes" else tuple(known))
        if args.neg_types is None
        else tuple(args.neg_types.split(","))
    )
    if not args.neg_types or any(t not in known for t in args.neg_types):
        p.error(f"--neg_types {','.join(args.neg_types)}: choose from {', '.join(known)}")
    if args.neg_images and args.data not in ("shapes", "negclip"):
        p.error(f"--neg_images: --data {args.data} has no hard-negative images (shapes and negclip do)")
    if args.neg_images and args.batch_size % 2:
        p.error(
            f"--batch_size {args.batch_size}: must be even with --neg_images (samples and their hard-negative images)"
        )
    if args.hn_weight < 0 or args.l2sp < 0 or args.kl_weight < 0 or args.kl_temperature <= 0:
        p.error("--hn_weight, --l2sp and --kl_weight must be >= 0 and --kl_temperature > 0")
    if args.loss != "hnc" and (args.hn_weight != 1.0 or args.hn_warmup_steps or args.l2sp or args.kl_weight):
        p.error("--hn_weight, --hn_warmup_steps, --l2sp and --kl_weight belong to --loss hnc")
    p.check_step(args)  # --accum_steps, --grad_clip
    return args


@dataclass
class State:
    """the method's state beside the weights: what step_loss reads and save_state keeps"""

    # CE-CLIP's adaptive CMR thresholds, one per negative slot (start at 0; checkpointed)
    threshold: torch.Tensor
    teacher: object  # HNC's frozen KL teacher (--kl_weight), else None
    init_params: object  # HNC's L2-SP anchor theta_0 (--l2sp), else None
    clip: torch.nn.Module  # the CLIP (its preprocess_cfg goes into the checkpoint)
    summary: str  # the start line's words on the method
    step: int = 0  # set by the loop before each step


def make_model(args, device):
    """-> (clip, the module that trains (the same CLIP), preprocess, AdamW parameter groups, state):
    the --init CLIP, whose initial weights are also the KL teacher and L2-SP's theta_0."""
    if args.init == DEFAULT_INIT and not os.path.exists(args.init):
        raise SystemExit(
            f"error: --init {args.init} does not exist: run `python clip_scratch.py` first (or pass --init)"
        )
    clip, _, preprocess, _ = load_clip(args.init, device)
    clip.train()
    # make_data used init_geometry's
    if (args.image_size, args.context_length) != (clip.image_size, clip.context_length):
        raise SystemExit(
            f"error: --init {args.init}: its image size and context length could not be read before loading it"
        )
    if clip.preprocess_cfg != args.preprocess:  # make_data used init_preprocess's
        raise SystemExit(
            f"error: --init {args.init}: its preprocessing {clip.preprocess_cfg} is not the one read before loading it"
        )
    teacher = (
        copy.deepcopy(clip).eval().requires_grad_(False) if args.loss == "hnc" and args.kl_weight else None
    )
    # a forward per step, as the student's
    teacher = torch.compile(teacher) if args.compile and teacher is not None else teacher
    trainable = set_trainable(clip, args.finetune)
    if args.grad_checkpointing:  # both towers recompute their blocks' activations in backward
        clip.set_grad_checkpointing(True)
    init_params = (
        {n: p.detach().clone() for n, p in clip.named_parameters() if n in trainable and n != "logit_scale"}
        if args.l2sp
        else None
    )
    negs = ",".join(args.neg_types) if args.data in ("shapes", "coco") else args.data
    state = State(
        threshold=torch.zeros(n_negatives(args), device=device),  # CE-CLIP's thresholds start at 0
        teacher=teacher,
        init_params=init_params,
        clip=clip,
        summary=f"init {args.init} ({args.finetune}) | loss {args.loss} | negatives {negs}"
        + (" + hard-negative images" if args.neg_images else ""),
    )
    return Model(clip, clip, preprocess, param_groups(clip, args.weight_decay, args.text_lr_mult), state)


def save_state(state):
    """the checkpoint's method part: CE-CLIP's adaptive thresholds, and the --init's preprocessing
    (model.init_preprocess), which eval.py and --export then apply"""
    return {"threshold": state.threshold.cpu(), "preprocess_cfg": state.clip.preprocess_cfg}


def resume(path, clip, state):
    """load a checkpoint into this run's model, or one line on what does not fit -> the checkpoint"""
    ckpt = load_checkpoint(path, clip, need=("optimizer", "step", "rng", "threshold"))
    clip.load_state_dict(ckpt["model"])
    state.threshold = ckpt["threshold"].to(state.threshold.device)
    return ckpt


def make_data(args, rank, world):
    """-> (train dataset, number of items or None for an infinite stream, what to evaluate on:
    "shapes-none" | "shapes-combos" (--holdout), the splits of --eval_data, or None)."""
    if args.data == "shapes":
        held = shapes.holdout_combos() if args.holdout == "combos" else None
        return (
            ShapesHardNegatives(args.image_size, args.seed, args.neg_types, args.neg_images, held),
            None,
            f"shapes-{args.holdout}",
        )
    if args.data_root is None:
        raise data.DataError(f"--data {args.data} needs --data_root")
    if args.data == "wds":  # webdataset shards, streamed: an epoch is --train_num_samples samples
        sample = partial(
            wds.hardneg_sample, image_size=args.image_size, preprocess=args.preprocess, neg_key=args.neg_key
        )
        train, n = wds.open_shards(
            args.data_root, args.train_num_samples, sample, rank, world, args.workers, args.seed
        )
        return train, n, args.eval_data and data.read_dataset(args.eval_data, args.eval_root)
    if args.data == "coco":
        splits = data.read_dataset("coco", args.data_root)
        items = [(path, [(c, None) for c in caps], None) for path, caps in splits["train"]]
    elif args.data == "negclip":
        rows = negatives.read_negclip(args.data_root, args.image_root)
        items = [(path, [(caption, [negs])], neg_rows) for path, caption, negs, neg_rows in rows]
    elif args.data == "ceclip":
        rows = negatives.read_ceclip(args.data_root, args.image_root, args.allow_pickle)
        items = [(path, [(caption, [[n] if n else [] for n in negs])], None) for path, caption, negs in rows]
    else:
        hnc = negatives.read_hnc(args.data_root, args.image_root)
        if hnc.orphans:
            print0(f"{args.data_root}: skipped {hnc.orphans} negative caption(s) whose positive is missing")
        items = HNCItems(hnc)
    if args.eval_data or args.data == "coco":
        root = args.eval_root or args.data_root
        splits = (
            splits
            if args.data == "coco" and root == args.data_root
            else data.read_dataset(args.eval_data or "coco", root)
        )
    else:
        splits = None
    return (
        HardNegatives(items, args.image_size, args.seed, args.neg_types, args.neg_images, args.preprocess),
        len(items),
        splits,
    )


class HNCItems:
    """negatives.read_hnc's images as HardNegatives items: each positive with one slot of its negatives"""

    def __init__(self, hnc):
        self.hnc = hnc

    def __len__(self):
        return len(self.hnc)

    def __getitem__(self, i):
        path, pairs = self.hnc[i]
        return path, [(pos, [negs]) for pos, negs in pairs], None


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
