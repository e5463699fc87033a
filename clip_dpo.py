"""
Preference fine-tuning of CLIP: DPO and its relatives against a frozen copy of the starting model
(Rafailov et al. 2023, "Direct Preference Optimization"), applied to CLIP's scores as CLIP-PO and
the HNC thesis do: IPO, conservative / robust DPO, hinge, Plackett-Luce rankings, mixtures with the
CLIP loss, and a reference-free Bradley-Terry reward model.

    python clip_dpo.py                                       # CPU: tunes out/clip_scratch/ckpt.pt on the shapes world
    python clip_dpo.py --data vsr --data_root ~/data/vsr --init ViT-B-32:openai --device cuda
    torchrun --standalone --nproc_per_node=8 clip_dpo.py --data vsr --data_root ~/data/vsr --init ViT-B-32:openai
    torchrun --standalone --nproc_per_node=2 clip_dpo.py --device cpu         # DDP on CPU (gloo)
    python clip_dpo.py --loss bt --out_dir out/rm      # a reward model: eval.py --rank, then --data rankings

The method. A query x (an image, or a caption) has candidates y ranked by preference (--direction
i2t: captions for an image; t2i: images for a caption; both). The score is CLIP's logit
z(x, y) = s * cos(f(x), g(y)) with s frozen at the reference's; every loss compares candidates of
one set, so the softmax normaliser over the set cancels and z is used directly. The reward is
r = beta (z_policy - z_ref) and h = r(x, y_w) - r(x, y_l) (preference_loss, listwise_loss).
--alpha mixes in CLIP's loss (dpo_clip), --imc_weight CE-CLIP's intra-modal term, --l2sp
lambda ||theta - theta_ref||^2 (outside the alpha mixture); --replay_root puts another dataset's
image-caption pairs into CLIP's term (each image's captions in turn), --distill_weight a KL to the
reference's rankings of those pairs (distill_loss). The reference is a frozen copy of --init,
never saved (the checkpoint keeps its spec and checksum). The loop is the three scripts' same text.
The equations next to the code, every default and the run that chose it: docs/clip_dpo.md.

Deviations from the papers
1. Tiny models and the shapes world by default; its scenes give exact graded preferences: a scene
   and its twins, captioned by the true caption and the captions with one and two wrong facts
   (seven groups in eight a scene and its mirror only, --both_every).
2. Scores are CLIP logits with the reference's scale, not a language model's log-likelihood; beta
   is therefore in units of that scale (CLIP-PO's rewards are raw cosines: beta 0.5 here ~ 50 there).
3. The shapes default is not pure DPO: dpo_clip (alpha 0.75), the text tower at 0.3x lr, and
   CE-CLIP's intra-modal term for the first 1,000 steps, a symmetry breaker for towers that start
   blind to the relation. What each term adds is measured by controls that remove it alone, from
   three starts x three seeds (docs/clip_dpo.md, made from bench/results/controls/). Real data:
   the same recipe (REAL), with the kick for the first third of the run and, on VSR, mirrored
   twins (--vsr_flips hv), which its rehearsal needed (docs/vsr.md); there it costs the general
   retrieval, as every VSR fine-tune did.
4. VSR: the rejected caption replaces the relation by its contrast (whole words, data.VSR_CONTRAST;
   relations without one are skipped, counted), never inserts one; the evaluation target is the
   row's label, so preferring the unedited caption is not rewarded (CLIP-PO's two protocol flaws).
5. The reward model (--loss bt) is a CLIP trained reference-free on score differences.
6. The global batch is batch_size groups x world size. --accum_steps K runs the step's images and
   texts as K near-equal micro-batches (not split at group boundaries: the towers are row-wise) with
   GradCache's exact loss and gradients for every term (training.MicroBatches, tested).
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
from model import (
    FINETUNE_MODES,
    export_open_clip,
    init_geometry,
    init_preprocess,
    is_checkpoint,
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
    global_mean,
    global_min,
    host_ints,
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
# the method: preference losses against a frozen reference

PAIR_LOSSES = ("dpo", "ipo", "cdpo", "robust", "hinge", "bt")
DEFAULT_INIT = "out/clip_scratch/ckpt.pt"  # clip_scratch.py's default run
# groups hold different numbers of images: the losses handle unequal counts across ranks
EQUAL_BATCHES = False


def preference_loss(
    policy_chosen, policy_rejected, ref_chosen, ref_rejected, beta, kind="dpo", label_smoothing=0.0
):
    """Pairwise preference losses on the scores z of chosen and rejected candidates, all [P].
    Rewards r = beta (z_policy - z_ref), h = r_chosen - r_rejected; per pair:
      dpo     -log sigmoid(h)                                     (Rafailov et al. 2023)
      cdpo    -(1 - eps) log sigmoid(h) - eps log sigmoid(-h)      (conservative DPO: labels flipped w.p. eps)
      robust  [-(1 - eps) log sigmoid(h) + eps log sigmoid(-h)] / (1 - 2 eps)   (Chowdhury et al. 2024: unbiased under that noise)
      hinge   max(0, 1 - h)                                       (SLiC's calibration loss)
      ipo     (h / beta - 1 / (2 beta))^2                         (Azar et al. 2023; h / beta is the log-ratio difference)
      bt      -log sigmoid(beta (z_chosen - z_rejected))          (a Bradley-Terry reward model: no reference, ref_* unused)
    eps = label_smoothing. Returns (loss [P] per pair, chosen rewards [P], rejected rewards [P]),
    fp32 also under autocast; the rewards are detached."""
    with torch.autocast(policy_chosen.device.type, enabled=False):
        pc, pr = policy_chosen.float(), policy_rejected.float()
        if kind == "bt":
            chosen, rejected = beta * pc, beta * pr
        else:
            chosen, rejected = beta * (pc - ref_chosen.float()), beta * (pr - ref_rejected.float())
        h, eps = chosen - rejected, label_smoothing
        if kind in ("dpo", "bt"):
            loss = -F.logsigmoid(h)
        elif kind == "cdpo":
            loss = -(1 - eps) * F.logsigmoid(h) - eps * F.logsigmoid(-h)
        elif kind == "robust":
            loss = (-(1 - eps) * F.logsigmoid(h) + eps * F.logsigmoid(-h)) / (1 - 2 * eps)
        elif kind == "hinge":
            loss = F.relu(1 - h)
        elif kind == "ipo":
            loss = (h / beta - 1 / (2 * beta)) ** 2
        else:
            raise ValueError(f"unknown preference loss {kind!r}")
    return loss, chosen.detach(), rejected.detach()


def listwise_loss(policy, ref, ranks, beta):
    """Plackett-Luce over each query's ranked candidates (DPO paper, appendix A.3).
    policy, ref: scores z [M, K]; ranks long [M, K]: 0 = best, equal = tied, -1 = padding.
    With r = beta (z_policy - z_ref), per query: the sum over every candidate k ranked above some
    other candidate of  logsumexp(r_j over j = k and every j ranked below k) - r_k.
    For a strict ranking y_1 > ... > y_K that is PL's sum_{k<K} [logsumexp(r_k, ..., r_K) - r_k];
    tied candidates are not each other's competitors (one best and the rest tied leaves only the
    first term); K = 2 is DPO's -log sigmoid(r_1 - r_2). Returns (loss [M] per query, r [M, K]
    detached), fp32 also under autocast."""
    with torch.autocast(policy.device.type, enabled=False):
        r = beta * (policy.float() - ref.float())
        valid = ranks >= 0
        # [M, k, j]: j ranked below k
        below = (ranks[:, None, :] > ranks[:, :, None]) & valid[:, None, :] & valid[:, :, None]
        # k itself keeps every logsumexp finite
        own = torch.eye(r.shape[1], dtype=torch.bool, device=r.device).expand_as(below)
        lse = torch.logsumexp(r[:, None, :].masked_fill(~(below | own), float("-inf")), dim=-1)  # [M, K]
        loss = torch.where(below.any(-1), lse - r, torch.zeros_like(r)).sum(-1)
    return loss, r.detach()


def clip_loss(image_features, text_features, logit_scale):
    """Symmetric InfoNCE (clip_scratch.py's) on the true pairs [N, D] of every rank, where N differs
    between ranks (a group holds 2 or 4 images, a VSR group 1 or 2): each rank pads to the largest N,
    gathers with gradient, masks the padding out of the columns; the mean is over every rank's pairs
    (global_mean). -> (loss, image->text accuracy), fp32."""
    with torch.autocast(image_features.device.type, enabled=False):
        image_features, text_features, logit_scale = (
            image_features.float(),
            text_features.float(),
            logit_scale.float(),
        )
        n, device = len(image_features), image_features.device
        counts = host_ints(n, device)  # every rank's n, on the host: no device sync
        rank, N = dist.get_rank() if len(counts) > 1 else 0, int(counts.max())
        counts = counts.to(device)
        pad = (0, 0, 0, N - n)
        all_image, all_text = (
            all_gather_with_grad(F.pad(image_features, pad)),
            all_gather_with_grad(F.pad(text_features, pad)),
        )
        valid = (torch.arange(N, device=device)[None, :] < counts[:, None]).flatten()  # [world*N] real pairs
        # [n, world*N]
        logits_per_image = (logit_scale * image_features @ all_text.T).masked_fill(~valid, float("-inf"))
        logits_per_text = (logit_scale * text_features @ all_image.T).masked_fill(~valid, float("-inf"))
        labels = torch.arange(n, device=device) + rank * N
        total = 0.5 * (
            F.cross_entropy(logits_per_image, labels, reduction="sum")
            + F.cross_entropy(logits_per_text, labels, reduction="sum")
        )
        acc = (logits_per_image.argmax(dim=1) == labels).float().mean()
    return global_mean(total, n), acc.detach()


def imc_loss(query_features, cand_features, ranks, logit_scale):
    """CE-CLIP's intra-modal term (clip_hardneg.py's imc_loss) on the i2t candidate sets: per image v,
    logits [s v.t_best, s t_best.t_k for each t_k ranked below t_best], cross-entropy to 0: the best
    caption closer to its image than its worse candidates are to it. query_features [M, D], cand_features
    [M, K, D], ranks [M, K] (-1 = padding) -> loss [M] (0 without worse candidates), fp32. Not DPO: the
    shapes default's symmetry breaker for a relation-blind text tower (deviation 3)."""
    with torch.autocast(query_features.device.type, enabled=False):
        v, t, s = query_features.float(), cand_features.float(), logit_scale.float()
        rows = torch.arange(len(v), device=v.device)
        best = ranks.masked_fill(ranks < 0, torch.iinfo(ranks.dtype).max).argmin(1)
        t_best = t[rows, best]  # [M, D]
        worse = (ranks > ranks[rows, best][:, None]) & (ranks >= 0)
        text_text = (s * torch.einsum("md,mkd->mk", t_best, t)).masked_fill(~worse, float("-inf"))
        logits = torch.cat([s * (v * t_best).sum(-1, keepdim=True), text_text], dim=1)
        return F.cross_entropy(
            logits, torch.zeros(len(v), dtype=torch.long, device=v.device), reduction="none"
        )


def distill_loss(image_features, text_features, ref_image, ref_text, logit_scale, ref_scale):
    """Learning without forgetting (Li & Hoiem 2017) on CLIP's pairs: for each image the KL divergence
    from the reference's softmax over the pairs' captions to the policy's, and the same for each caption
    over the images. features [P, D] of P pairs (this rank's), the reference's the same -> loss [P] (the
    two directions' mean), fp32; 0 where the policy scores as the reference does. --distill_weight puts
    it on the --replay_root pairs: the ranking among captions that retrieval lives on, kept."""
    with torch.autocast(image_features.device.type, enabled=False):
        z = logit_scale.float() * image_features.float() @ text_features.float().T  # [P, P]
        z_ref = ref_scale.float() * ref_image.float() @ ref_text.float().T

        def kl(teacher, student):
            return (teacher.softmax(-1) * (teacher.log_softmax(-1) - student.log_softmax(-1))).sum(-1)

        return 0.5 * (kl(z_ref, z) + kl(z_ref.T, z.T))


def scores(features, query, cand, scale):
    """z [M, K] = scale * f(query_m) . f(cand_mk) from features [N, D] (query [M], cand [M, K] index
    it), in fp32 also under autocast, which would run a matmul (einsum's bmm) in bf16: a step of
    0.125-0.25 at z ~ 30 rounds away the policy-minus-reference difference DPO lives on. A product
    and a sum, not a matmul, so TF32 (on in float32 runs on CUDA) does not round it either."""
    with torch.autocast(features.device.type, enabled=False):
        f = features.float()
        return scale.float() * (f[query][:, None, :] * f[cand]).sum(-1)


def make_reference(model, dtype="float32"):
    """The frozen reference: a deep copy of the starting model made before any DDP / compile wrapping,
    in eval mode, never in the optimizer or a checkpoint. dtype "bfloat16" stores its weight matrices
    in bf16 (half the memory), the values bf16 autocast feeds the policy's matmuls: at step 0 its
    outputs are bit-identical to the policy's under that autocast (norms and embeddings stay fp32)."""
    reference = copy.deepcopy(model).eval().requires_grad_(False)
    if dtype == "bfloat16":
        for name, p in reference.named_parameters():
            if p.ndim >= 2 and "embedding" not in name:
                p.data = p.data.to(torch.bfloat16)
    return reference


def step_loss(model, batch, args, state):
    """The method, one step. batch: (images [NI, 3, S, S], texts [NT, L], prefs) from make_batch. prefs:
    query [M] and cand [M, K] index the features [images; texts] (an image's candidates are texts, a
    text's images), rank [M, K] (0 = best, -1 = padding), pairs [P, 3] (query, better, worse: every
    strictly ordered pair), pos [N, 2] (an image, its true caption) for the CLIP term. state:
    reference (None for a reward model without --l2sp; run under no_grad) and step (the intra-modal
    term is on while step < --imc_steps). -> (loss, {name: detached scalar})"""
    images, texts, prefs = batch
    reference = state.reference
    image_features, text_features, logit_scale = model(images, texts)
    features = torch.cat([image_features, text_features])  # [NI + NT, D]
    scale = logit_scale if args.train_logit_scale else logit_scale.detach()
    z = scores(features, prefs["query"], prefs["cand"], scale)  # [M, K], fp32
    z_ref = torch.zeros_like(z)
    if args.loss != "bt":
        with torch.no_grad():
            ref_image, ref_text, ref_scale = reference(images, texts)
            z_ref = scores(torch.cat([ref_image, ref_text]), prefs["query"], prefs["cand"], ref_scale)
    m, a, b = prefs["pairs"].unbind(1)
    if args.loss == "listwise":
        per_query, r = listwise_loss(z, z_ref, prefs["rank"], args.beta)
        loss, chosen, rejected = global_mean(per_query.sum(), len(per_query)), r[m, a], r[m, b]
    else:
        kind = "dpo" if args.loss == "dpo_clip" else args.loss
        per_pair, chosen, rejected = preference_loss(
            z[m, a], z[m, b], z_ref[m, a], z_ref[m, b], args.beta, kind, args.label_smoothing
        )
        loss = global_mean(per_pair.sum(), len(per_pair))
    # reward accuracy counts ties as half: exactly 0.5 at step 0, where policy == reference
    stats = {
        "pref": loss.detach(),
        "reward_acc": ((chosen > rejected).float() + 0.5 * (chosen == rejected).float()).mean(),
        "chosen": chosen.mean(),
        "rejected": rejected.mean(),
        "margin": (chosen - rejected).mean(),
    }
    if args.clip_weight:
        pos = prefs["pos"]
        contrastive, acc = clip_loss(image_features[pos[:, 0]], text_features[pos[:, 1]], logit_scale)
        loss = args.clip_weight * contrastive + args.pref_weight * loss
        stats |= {"clip": contrastive.detach(), "acc": acc}
    else:
        loss = args.pref_weight * loss
    if args.distill_weight:  # the replayed pairs' rankings kept at the reference's
        pos = prefs["pos"][prefs["replay"]]
        i, t = pos[:, 0], pos[:, 1]
        per_pair = distill_loss(
            image_features[i], text_features[t], ref_image[i], ref_text[t], scale, ref_scale
        )
        distill = global_mean(per_pair.sum(), len(per_pair))
        loss = loss + args.distill_weight * distill
        stats["distill"] = distill.detach()
    # the kick: the first --imc_steps steps, else the first --imc_fraction of the run, else every step
    until = (
        args.imc_steps
        if args.imc_steps is not None
        else args.imc_fraction and round(args.imc_fraction * args.max_steps)
    )
    imc_weight = args.imc_weight if not until or state.step < until else 0.0
    if imc_weight:
        i2t = prefs["i2t"]  # image queries: their candidates are captions
        per_query = imc_loss(
            features[prefs["query"][i2t]], features[prefs["cand"][i2t]], prefs["rank"][i2t], scale
        )
        imc = global_mean(per_query.sum(), len(per_query))
        loss = loss + imc_weight * imc
        stats["imc"] = imc.detach()
    if args.l2sp:
        penalty = l2sp(
            (p, p0) for p, p0 in zip(model.parameters(), reference.parameters()) if p.requires_grad
        )
        loss = loss + args.l2sp * penalty
        stats["l2sp"] = penalty.detach()
    return loss, stats


# -----------------------------------------------------------------------------
# the batches: groups of images and texts with ranked candidates

# a group (one dataset item) is a dict: images (tensors [3, S, S]), texts (strings), queries
# [(direction, query index, [candidate indices], [ranks])] with indices local to the group (an i2t
# query is an image and its candidates texts, t2i the reverse), pos [(image, text)]: true pairs.


# twin codes: bit 0 = objects exchanged, bit 1 = colours exchanged
TWINS = {"both": (0, 1, 2, 3), "mirror": (0, 1), "swap": (0, 2)}


def shapes_group(scene, image_size, with_statements, twins="both"):
    """A training scene and its twins, each with its caption: shapes.mirror (the objects exchange
    places, so the relation flips: code bit 0), shapes.swap_colours (the colours are exchanged: bit 1),
    and with twins="both" the two together (the default: four images). The caption of twin j states
    popcount(code_i xor code_j) wrong facts about twin i, so every image ranks the group's captions
    and every caption ranks the group's images: true (0) > one wrong fact (1) > two (2).
    with_statements: also the twins' VSR-style statements ("The red circle is left of the blue
    square.", shapes.statements), ranked the same way, as a second candidate set in both directions."""
    codes = TWINS[twins]
    shown = [shapes.swap_colours(scene) if c & 2 else scene for c in codes]
    shown = [shapes.mirror(t) if c & 1 else t for c, t in zip(codes, shown)]
    n, idx = len(codes), list(range(len(codes)))
    wrong = [[bin(a ^ b).count("1") for b in codes] for a in codes]  # symmetric
    texts = [t.caption() for t in shown]
    queries = [("i2t", i, idx, wrong[i]) for i in idx] + [("t2i", j, idx, wrong[j]) for j in idx]
    if with_statements:
        texts += [shapes.statements(t)[0][0] for t in shown]  # each twin's true statement
        queries += [("i2t", i, [n + j for j in idx], wrong[i]) for i in idx] + [
            ("t2i", n + j, idx, wrong[j]) for j in idx
        ]
    images = [data.to_tensor(shapes.render(t, image_size)) for t in shown]
    return {
        "images": images,
        "texts": texts,
        "queries": queries,
        "pos": [(i, i) for i in idx],
        "statement_texts": list(range(n, len(texts))),
    }


class ShapesPreferences(torch.utils.data.Dataset):
    """An infinite stream of shapes_group()s, key = global group index, deterministic per (seed, key)."""

    def __init__(self, image_size, seed=0, with_statements=True, twins="both", held=None, both_every=8):
        self.image_size, self.seed, self.with_statements, self.twins, self.held = (
            image_size,
            seed,
            with_statements,
            twins,
            held,
        )
        # twins "mixed": group key has both twins if key % both_every == 0, else the mirror
        self.both_every = both_every

    def __len__(self):
        return 2**62

    def __getitem__(self, key):
        twins = ("mirror" if key % self.both_every else "both") if self.twins == "mixed" else self.twins
        scene, _ = shapes.training_scene("dpo", self.seed, key, self.held)
        return shapes_group(scene, self.image_size, self.with_statements, twins)


class ImageGroups(torch.utils.data.Dataset):
    """Groups whose images are files (VSR, rankings): key (epoch * len + i) -> the group with its images
    decoded at image_size (data.load_image) as the --init's evaluation does (preprocess:
    model.init_preprocess's; None: OpenAI's) and mirrored where the group's "flips" says ("h" / "v";
    None: as read), or None if one is unreadable (dropped and counted)."""

    def __init__(self, groups, image_size, preprocess=None):
        self.groups, self.image_size, self.preprocess = groups, image_size, preprocess

    def __len__(self):
        return len(self.groups)

    def __getitem__(self, key):
        group = self.groups[key % len(self.groups)]
        if "captions" in group:  # a --replay_root pair: its captions in turn, one an epoch
            group = {**group, "texts": [group["captions"][key // len(self.groups) % len(group["captions"])]]}
        # a twin's file is decoded once
        decoded = {path: data.load_image(path, self.image_size, self.preprocess) for path in group["images"]}
        if any(p is None for p in decoded.values()):
            return None
        flips = group.get("flips") or [None] * len(
            group["images"]
        )  # vsr_groups' twins (--vsr_flips): mirrored pixels
        pixels = [
            decoded[p] if f is None else (decoded[p][:, ::-1] if f == "h" else decoded[p][::-1]).copy()
            for p, f in zip(group["images"], flips)
        ]
        return {**group, "images": [data.to_tensor(p, self.preprocess) for p in pixels]}


class HNCGroups(torch.utils.data.Dataset):
    """HNC as preference groups, read item by item (negatives.read_hnc): key -> an image and one of its
    positives (drawn per (seed, key)) ranked above that positive's negatives (i2t); None (dropped,
    counted) if the image is unreadable or no positive has a negative. preprocess: as ImageGroups'."""

    def __init__(self, hnc, image_size, seed=0, preprocess=None):
        self.hnc, self.image_size, self.seed, self.preprocess = hnc, image_size, seed, preprocess

    def __len__(self):
        return len(self.hnc)

    def __getitem__(self, key):
        path, pairs = self.hnc[key % len(self.hnc)]
        pairs = [(p, negs) for p, negs in pairs if negs]
        if not pairs:
            return None
        positive, negatives = random.Random(f"hnc:{self.seed}:{key}").choice(pairs)
        pixels = data.load_image(path, self.image_size, self.preprocess)
        if pixels is None:
            return None
        image = data.to_tensor(pixels, self.preprocess)
        n = 1 + len(negatives)
        return {
            "images": [image],
            "texts": [positive, *negatives],
            "queries": [("i2t", 0, list(range(n)), [0] + [1] * (n - 1))],
            "pos": [(0, 0)],
        }


def make_batch(groups, args):
    """The DataLoader's collate_fn: groups (None = unreadable) -> (images [NI, 3, S, S], texts [NT, L],
    prefs, n_skipped); see step_loss for prefs. Only queries of --direction are kept; candidate lists
    are padded to the longest (rank -1). -> ((images, texts, prefs) or None if every group was
    unreadable, {"unreadable groups": n})."""
    kept = [g for g in groups if g is not None]
    if not kept:
        return None, {"unreadable groups": len(groups)}
    n_images = sum(len(g["images"]) for g in kept)
    images, texts, rows, pos, statement, replay = [], [], [], [], [], []
    for g in kept:
        if not g["queries"]:  # a --replay_root pair: its rows of pos
            replay += range(len(pos), len(pos) + len(g["pos"]))
        i0, t0 = len(images), n_images + len(texts)  # offsets into [image features; text features]
        images += g["images"]
        texts += g["texts"]
        pos += [(i0 + i, len(texts) - len(g["texts"]) + t) for i, t in g["pos"]]
        # the shapes world's statements: candidate sets of their own
        stated = set(g.get("statement_texts", ()))
        for direction, q, cands, ranks in g["queries"]:
            if args.direction in ("both", direction):
                q0, c0 = (i0, t0) if direction == "i2t" else (t0, i0)
                rows.append((q0 + q, [c0 + c for c in cands], ranks))
                statement.append(direction == "i2t" and set(cands) <= stated)
    K = max((len(c) for _, c, _ in rows), default=1)
    query = torch.tensor([q for q, _, _ in rows])
    cand = torch.tensor([c + [0] * (K - len(c)) for _, c, _ in rows])
    rank = torch.tensor([r + [-1] * (K - len(r)) for _, _, r in rows])
    pairs = torch.tensor(
        [
            (m, a, b)
            for m, (_, _, r) in enumerate(rows)
            for a in range(len(r))
            for b in range(len(r))
            if r[a] < r[b]
        ]
    )
    (tokens,) = data.trim_tokens(data.get_tokenizer(args.context_length)(texts))
    kicked = (query < n_images) & ~(
        torch.tensor(statement) if args.imc_sets == "captions" else torch.zeros(len(rows), dtype=torch.bool)
    )
    # the image queries the intra-modal term runs on (--imc_sets), found here on the CPU
    i2t = kicked.nonzero().squeeze(1)
    prefs = {
        "query": query,
        "cand": cand,
        "rank": rank,
        "pairs": pairs,
        "pos": torch.tensor(pos),
        "i2t": i2t,
        "replay": torch.tensor(replay, dtype=torch.long),
    }
    return (torch.stack(images), tokens, prefs), {"unreadable groups": len(groups) - len(kept)}


# -----------------------------------------------------------------------------
# config


# the defaults that depend on --data, applied after parsing (apply_preset); None = from the run's length. REAL is the
# recipe that moved the relation on the VSR rehearsal (docs/vsr.md: the mirrored twins, the kick for the first third,
# the text tower at 0.3x) at a pretrained CLIP's lr; it applies to every real dataset (the twins to VSR only)
SHAPES = dict(
    max_steps=3000,
    epochs=None,
    warmup_steps=50,
    eval_every=500,
    ckpt_every=250,
    batch_size=26,
    workers=0,
    lr=4e-4,
    text_lr_mult=0.3,
    alpha=0.75,
    imc_weight=0.225,
    imc_steps=1000,
    imc_fraction=None,
    vsr_flips="none",
)
REAL = dict(
    max_steps=None,
    epochs=16,
    warmup_steps=None,
    eval_every=None,
    ckpt_every=None,
    batch_size=32,
    workers=4,
    lr=1e-5,
    text_lr_mult=0.3,
    alpha=0.75,
    imc_weight=0.225,
    imc_steps=None,
    imc_fraction=1 / 3,
    vsr_flips="hv",
)


def get_args(argv=None):
    p = Parser(__doc__)
    p.presets(SHAPES, REAL, unset={"imc_steps": "--imc_fraction of the run", "imc_fraction": "-"})
    # data
    p.add_argument("--data", default="shapes", choices=("shapes", "vsr", "rankings", "hnc"))
    p.add_argument(
        "--data_root", default=None, help="vsr: the dataset folder; rankings: the JSONL file; hnc: the JSON"
    )
    p.add_argument(
        "--image_root",
        default=None,
        help="vsr: the COCO images, when not in the clone's data/images/, "
        "data/trainval2017/ or train2017/ + val2017/ (data.VSR_IMAGE_DIRS); hnc: the GQA images (default: the JSON's "
        "folder's images/)",
    )
    p.add_argument("--vsr_split", default="random", choices=("random", "zeroshot"))
    p.add_argument(
        "--vsr_false_rows",
        action="store_true",
        help="vsr: also learn from false rows (the contrast caption chosen over the false caption: noisier)",
    )
    p.add_argument(
        "--replay_data",
        default="flickr8k",
        choices=("flickr8k", "coco"),
        help="with --replay_root: its format",
    )
    p.add_argument(
        "--replay_root",
        default=None,
        help="real data: image-caption pairs of this dataset join the batches, "
        "for CLIP's term only (an anchor for retrieval)",
    )
    p.add_argument(
        "--replay_share",
        type=float,
        default=0.5,
        help="with --replay_root: the share of groups that are pairs",
    )
    p.add_argument(
        "--distill_weight",
        type=float,
        default=0.0,
        help="with --replay_root: weight of the KL to the reference's rankings of the replayed pairs "
        "(distill_loss)",
    )
    p.add_argument(
        "--vsr_flips",
        default=None,
        choices=("none", "h", "hv"),
        help="vsr: each row of a left/right "
        "relation (h; hv: also above/below) with its image mirrored, of which the contrast caption is true, in "
        "one group (vsr_groups)",
    )
    p.add_argument(
        "--twins",
        default="mixed",
        choices=[*TWINS, "mixed"],
        help="shapes: each scene's twins (shapes_group); mixed: one group in --both_every both, the others mirror",
    )
    p.add_argument(
        "--both_every",
        type=int,
        default=8,
        help="--twins mixed: every N-th group has both twins (the statements "
        "learn from the mirror groups, the attribute swap from these)",
    )
    p.add_argument(
        "--holdout",
        default="none",
        choices=("none", "combos"),
        help="shapes: keep shapes.holdout_combos() out of "
        "every training scene, caption, negative and group; evaluate seen and unseen test scenes apart",
    )
    p.add_argument(
        "--statements",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="shapes: the VSR-style statements as a second candidate set (shapes_group)",
    )
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
        "--train_logit_scale",
        action="store_true",
        help="let the logit scale train (default: frozen at the reference's)",
    )
    p.add_argument(
        "--grad_checkpointing",
        action="store_true",
        help="recompute the towers' activations in backward (large models)",
    )
    # method
    p.add_argument("--loss", default="dpo_clip", choices=(*PAIR_LOSSES, "listwise", "dpo_clip"))
    p.add_argument(
        "--direction",
        default="both",
        choices=("i2t", "t2i", "both"),
        help="i2t: captions ranked for an image; t2i: images ranked for a caption",
    )
    p.add_argument(
        "--beta", type=float, default=0.5, help="reward scale beta (bt: the Bradley-Terry scale a)"
    )
    p.add_argument("--label_smoothing", type=float, default=None, help="eps of cdpo / robust (default 0.1)")
    p.add_argument(
        "--alpha",
        type=float,
        default=None,
        help="shorthand for the mixture: --clip_weight alpha, --pref_weight "
        "1 - alpha (default for dpo_clip: by --data, below; else 0)",
    )
    p.add_argument("--clip_weight", type=float, default=None, help="weight of CLIP's loss (default: alpha)")
    p.add_argument(
        "--pref_weight", type=float, default=None, help="weight of the preference loss (default: 1 - alpha)"
    )
    p.add_argument(
        "--l2sp", type=float, default=0.0, help="lambda of the L2 pull toward the reference weights"
    )
    p.add_argument(
        "--imc_weight",
        type=float,
        default=None,
        help="weight of CE-CLIP's intra-modal term on the i2t candidate sets (default: by --data, below)",
    )
    p.add_argument(
        "--imc_sets",
        default="all",
        choices=("all", "captions"),
        help="the i2t candidate sets the "
        "intra-modal term runs on: all, or the captions only (shapes: not the statements)",
    )
    p.add_argument(
        "--imc_steps",
        type=int,
        default=None,
        help="the intra-modal term is on for the first N steps only (default: 1000 shapes; real data: --imc_fraction)",
    )
    p.add_argument(
        "--imc_fraction",
        type=float,
        default=None,
        help="without --imc_steps: the intra-modal term is on for "
        "this fraction of the run's steps (default: 1/3 real data; 0: every step)",
    )
    # optim
    p.add_argument(
        "--max_steps", type=int, default=None, help="default: 3000 on shapes; real data: from --epochs"
    )
    p.add_argument(
        "--epochs", type=int, default=None, help="real data: passes over the training groups (default: below)"
    )
    p.add_argument(
        "--batch_size",
        type=int,
        default=None,
        help="groups per process (default: by --data, below; 26 shapes groups are ~59 images)",
    )
    p.add_argument(
        "--lr", type=float, default=None, help="default: 4e-4 shapes, 1e-5 real data (a pretrained CLIP)"
    )
    p.add_argument(
        "--text_lr_mult",
        type=float,
        default=None,
        help="text-tower lr = lr x this (default: by --data, below)",
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
    p.add_argument("--out_dir", default="out/clip_dpo")
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
    if args.both_every < 1:
        p.error(f"--both_every {args.both_every}: must be >= 1")
    if args.image_root is not None and args.data not in ("vsr", "hnc"):
        p.error(f"--image_root: --data {args.data} does not read it (it is for --data vsr and hnc)")
    if args.replay_root is not None and (
        args.data not in ("vsr", "rankings") or not 0 < args.replay_share < 1
    ):
        p.error(
            f"--replay_root: for --data vsr or rankings, with 0 < --replay_share < 1 (got {args.replay_share})"
        )
    if args.distill_weight and (args.replay_root is None or args.loss == "bt"):
        p.error("--distill_weight: the KL is on the --replay_root pairs, to the reference (not --loss bt)")
    if args.distill_weight < 0:
        p.error(f"--distill_weight {args.distill_weight}: must be >= 0")
    if args.holdout != "none" and args.data != "shapes":
        p.error("--holdout: held-out combinations are the shapes world's")
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
    if args.alpha is None and args.loss != "dpo_clip":
        args.alpha = 0.0  # the presets' alpha is dpo_clip's
    apply_preset(args, SHAPES, REAL)
    args.batch_items = args.batch_size  # groups per process per step
    if args.label_smoothing is None:
        args.label_smoothing = 0.1 if args.loss in ("cdpo", "robust") else 0.0
    elif args.loss not in ("cdpo", "robust"):
        p.error(f"--label_smoothing is for --loss cdpo or robust, not {args.loss}")
    if not 0 <= args.label_smoothing < 0.5:
        p.error(f"--label_smoothing {args.label_smoothing}: must be in [0, 0.5)")
    if not 0 <= args.alpha <= 1:
        p.error(f"--alpha {args.alpha}: must be in [0, 1]")
    args.clip_weight = args.alpha if args.clip_weight is None else args.clip_weight
    args.pref_weight = 1 - args.alpha if args.pref_weight is None else args.pref_weight
    if args.clip_weight < 0 or args.pref_weight < 0:
        p.error(f"--clip_weight {args.clip_weight} and --pref_weight {args.pref_weight} must be >= 0")
    if args.imc_weight < 0 or args.beta <= 0:
        p.error(f"--imc_weight {args.imc_weight} must be >= 0 and --beta {args.beta} > 0")
    p.check_step(args)  # --accum_steps, --grad_clip
    return args


@dataclass
class State:
    """the method's state beside the weights: what step_loss reads and save_state keeps"""

    # the frozen reference (make_reference); None for a reward model without --l2sp
    reference: object
    spec: str  # --init, which the checkpoint keeps instead of the reference's weights
    checksum: float  # the sum of --init's weights: --resume checks the reference is unchanged
    preprocess_cfg: dict  # the init's image preprocessing, kept in the checkpoint
    summary: str  # the start line's words on the method
    step: int = 0  # set by the loop before each step (the intra-modal kick's --imc_steps)


def make_model(args, device):
    """-> (clip, the module that trains (the policy), preprocess, AdamW parameter groups, state):
    the --init CLIP as the policy, and its frozen reference, a copy made before any wrapping (compiled
    like the policy with --compile)."""
    if is_checkpoint(args.init) and not os.path.isfile(args.init):
        raise SystemExit(
            f"error: --init {args.init}: no such checkpoint (train one with `python clip_scratch.py`, "
            "or pass a checkpoint, local-dir:DIR or NAME:PRETRAINED)"
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
    set_trainable(clip, args.finetune)
    clip.logit_scale.requires_grad_(args.train_logit_scale)
    dtype = args.dtype if args.dtype != "auto" else ("bfloat16" if device.type == "cuda" else "float32")
    reference = None  # a reward model (bt) needs none, unless --l2sp pulls toward it
    if args.loss != "bt" or args.l2sp:
        # l2sp wants the exact fp32 weights
        reference = make_reference(clip, "float32" if args.l2sp else dtype)
        # a forward per step, as the policy's
        reference = torch.compile(reference) if args.compile else reference
    checksum = sum(p.double().sum().item() for p in clip.parameters())
    if args.grad_checkpointing:
        clip.set_grad_checkpointing(True)
    twins = args.twins + (f", both twins every {args.both_every} groups" if args.twins == "mixed" else "")
    what = f"{args.data} (twins {twins})" if args.data == "shapes" else args.data
    state = State(
        reference=reference,
        spec=args.init,
        checksum=checksum,
        preprocess_cfg=clip.preprocess_cfg,
        summary=f"init {args.init} ({args.finetune}) | loss {args.loss} beta {args.beta} clip {args.clip_weight} pref {args.pref_weight:g} "
        f"imc {args.imc_weight} x {args.imc_steps or (f'{args.imc_fraction:.2g} of the' if args.imc_fraction else 'every')} steps | {what}, direction {args.direction} | logit scale "
        f"{clip.logit_scale.exp().item():.1f} {'trained' if args.train_logit_scale else 'frozen'}",
    )
    return Model(clip, clip, preprocess, param_groups(clip, args.weight_decay, args.text_lr_mult), state)


def save_state(state):
    """the checkpoint's method part: which reference it was trained against (never its weights), and
    the --init's preprocessing (model.init_preprocess), which eval.py and --export then apply"""
    return {
        "reference": {"spec": state.spec, "checksum": state.checksum},
        "preprocess_cfg": state.preprocess_cfg,
    }


def resume(path, clip, state):
    """load a checkpoint into this run's policy if it was trained against this reference, or one line
    on what does not fit -> the checkpoint"""
    ckpt = load_checkpoint(path, clip, need=("optimizer", "step", "rng", "reference"))
    if ckpt["reference"]["spec"] != state.spec:
        raise SystemExit(
            f"error: --resume: {path} was trained against --init {ckpt['reference']['spec']}, not {state.spec}"
        )
    if ckpt["reference"]["checksum"] != state.checksum:
        raise SystemExit(
            f"error: --resume: the weights of --init {state.spec} changed since {path} was written (checksum)"
        )
    clip.load_state_dict(ckpt["model"])
    return ckpt


# relations whose contrast (data.VSR_CONTRAST) the mirrored image makes true: "h" left-right, "v" upside down
VSR_FLIPS = {
    "h": ("left of", "right of", "at the left side of", "at the right side of"),
    "v": ("above", "below", "over", "under", "on top of", "beneath"),
}


def vsr_groups(rows, false_rows=False, flips=""):
    """VSR rows -> (groups, n_skipped). i2t: a true row prefers its caption to data.contrast_caption
    (with --vsr_false_rows a false row prefers the contrast caption to its caption); t2i: a caption
    true of some images and false of others prefers an image it is true of to one it is false of.
    Rows whose relation has no contrast are skipped for i2t (counted). Image paths stand in the
    groups' images until ImageGroups loads them. flips (--vsr_flips: "h", "v" or both): an i2t row
    whose relation is one of VSR_FLIPS[axis] gets its image mirrored on that axis as a twin, of which
    the contrast caption is the true one: a 2x2 group (shapes_group's scene and mirror), both
    images ranking both captions, both captions both images, both true pairs for the CLIP term."""
    groups, skipped, by_caption = [], 0, {}
    for r in rows:
        by_caption.setdefault(r.caption, ([], []))[0 if r.label else 1].append(r.image)
        contrast = data.contrast_caption(r.caption, r.relation)
        if contrast is None:
            skipped += 1
        elif r.label or false_rows:
            ranks = [0, 1] if r.label else [1, 0]
            axis = next((a for a in flips if r.relation in VSR_FLIPS[a]), None)
            if axis is None:
                groups.append(
                    {
                        "images": [r.image],
                        "texts": [r.caption, contrast],
                        "queries": [("i2t", 0, [0, 1], ranks)],
                        "pos": [(0, ranks.index(0))],
                    }
                )
            else:  # the twin is the image of the caption's contrast: its ranks are the reverse, in both directions
                twin = ranks[::-1]
                queries = [
                    ("i2t", 0, [0, 1], ranks),
                    ("i2t", 1, [0, 1], twin),
                    ("t2i", 0, [0, 1], ranks),
                    ("t2i", 1, [0, 1], twin),
                ]
                groups.append(
                    {
                        "images": [r.image, r.image],
                        "flips": [None, axis],
                        "texts": [r.caption, contrast],
                        "queries": queries,
                        "pos": [(0, ranks.index(0)), (1, twin.index(0))],
                    }
                )
    for caption, (true, false) in by_caption.items():
        # one group per image of the longer side, paired round-robin with the shorter side: two images
        # per group, so a popular caption (30 images in the random split) does not make one huge group
        for k in range(max(len(true), len(false)) if true and false else 0):
            groups.append(
                {
                    "images": [true[k % len(true)], false[k % len(false)]],
                    "texts": [caption],
                    "pos": [(0, 0)],
                    "queries": [("t2i", 0, [0, 1], [0, 1])],
                }
            )
    return groups, skipped


def ranking_groups(rows):
    """data.read_rankings rows -> groups (the query's best candidate is its true pair for the CLIP term)"""
    groups = []
    for r in rows:
        K, best = len(r["candidates"]), r["ranks"].index(min(r["ranks"]))
        if r["direction"] == "i2t":
            groups.append(
                {
                    "images": [r["query"]],
                    "texts": r["candidates"],
                    "queries": [("i2t", 0, list(range(K)), r["ranks"])],
                    "pos": [(0, best)],
                }
            )
        else:
            groups.append(
                {
                    "images": r["candidates"],
                    "texts": [r["query"]],
                    "queries": [("t2i", 0, list(range(K)), r["ranks"])],
                    "pos": [(best, 0)],
                }
            )
    return groups


def make_data(args, rank, world):
    """-> (train dataset, number of groups or None for an infinite stream, what to evaluate on:
    "shapes-none" | "shapes-combos" (--holdout), VSR's rows {"val": dev, "test", "calib": dev}, or None)."""
    if args.data == "shapes":
        held = shapes.holdout_combos() if args.holdout == "combos" else None
        return (
            ShapesPreferences(args.image_size, args.seed, args.statements, args.twins, held, args.both_every),
            None,
            f"shapes-{args.holdout}",
        )
    if args.data not in ("vsr", "rankings", "hnc"):
        raise data.DataError(f"--data {args.data}: unknown dataset, choose from shapes, vsr, rankings, hnc")
    if args.data_root is None:
        raise data.DataError(f"--data {args.data} needs --data_root")
    if args.data == "hnc":
        if args.direction == "t2i":
            raise data.DataError(
                "--data hnc gives captions ranked for an image only: use --direction i2t or both"
            )
        # one streaming pass: an index of byte offsets
        hnc = negatives.read_hnc(args.data_root, args.image_root)
        print0(
            f"hnc: {len(hnc)} images with a positive caption ({hnc.orphans} negatives without their positive dropped)"
        )
        return HNCGroups(hnc, args.image_size, args.seed, args.preprocess), len(hnc), None
    evalset = None
    if args.data == "vsr":
        splits = data.read_vsr(args.data_root, args.vsr_split, args.image_root)
        groups, skipped = vsr_groups(splits["train"], args.vsr_false_rows, args.vsr_flips.replace("none", ""))
        evalset = {"val": splits["dev"], "test": splits["test"], "calib": splits["dev"]}
        print0(
            f"vsr {args.vsr_split}: {len(splits['train'])} train rows -> {len(groups)} preference groups "
            f"({skipped} rows skipped: relation without a contrast)"
        )
    else:
        groups = ranking_groups(data.read_rankings(args.data_root))
    groups = [g for g in groups if any(args.direction in ("both", q[0]) for q in g["queries"])]
    if not groups:
        raise data.DataError(f"{args.data_root}: no preference of --direction {args.direction}")
    if (
        args.replay_root
    ):  # image-caption pairs for CLIP's term only, so it keeps seeing the captions of another dataset
        groups += replay_groups(
            data.read_dataset(args.replay_data, args.replay_root)["train"], len(groups), args.replay_share
        )
        print0(
            f"replay: {sum(not g['queries'] for g in groups)} {args.replay_data} pairs among {len(groups)} groups"
        )
    return ImageGroups(groups, args.image_size, args.preprocess), len(groups), evalset


def replay_groups(items, n_preference, share):
    """--replay_root's training pairs as groups without a preference: an image and one of its captions
    (the k-th image its caption k mod the captions, the next one the next epoch: ImageGroups), for
    CLIP's term; as many as make them `share` of all the groups (every pair at most once)"""
    n = min(len(items), round(share / (1 - share) * n_preference))
    return [
        {
            "images": [path],
            "texts": [caps[k % len(caps)]],
            "captions": caps[k % len(caps) :] + caps[: k % len(caps)],  # ImageGroups: one an epoch, in turn
            "queries": [],
            "pos": [(0, 0)],
        }
        for k, (path, caps, *_) in enumerate(items[:n])
    ]


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
