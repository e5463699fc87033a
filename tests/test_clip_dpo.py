"""clip_dpo.py: each loss against a naive per-example loop, the step-0 sanity of DPO (policy ==
reference), the shapes world's preferences against the scenes' geometry, gradients under 2 gloo
processes, resume, the checkpoint in open_clip, and --data vsr / rankings end to end on files in
their exact formats (tiny settings, CPU)."""

import argparse
import copy
import json
import math
import os
import random

import numpy as np
import open_clip
import pytest
import torch
import torch.nn.functional as F
from helpers import (
    FIX,
    VSR_RATES,
    eval_lines,
    fixture_copy,
    gloo_processes,
    killed_and_resumed,
    load_weights,
    one_and_two_processes,
    run,
    run_here,
    statement_rates,
    tiny_ckpt,
    vsr_rates,
)
from PIL import Image

import clip_dpo
import data
import eval as ev
import model
import negatives
import shapes
from model import CLIP, load_model, model_config

TINY = ["--batch_size", "2", "--eval_every", "0", "--log_every", "1", "--eval_n", "40", "--warmup_steps", "1"]


def logsig(x):
    return -math.log1p(math.exp(-x)) if x > -30 else x


def naive_preference(pc, pr, rc, rr, beta, kind, eps):
    out = []
    for a, b, c, d in zip(pc, pr, rc, rr):
        if kind == "bt":
            out.append(-logsig(beta * (a - b)))
            continue
        h = beta * (a - c) - beta * (b - d)
        out.append(
            {
                "dpo": -logsig(h),
                "cdpo": -(1 - eps) * logsig(h) - eps * logsig(-h),
                "robust": (-(1 - eps) * logsig(h) + eps * logsig(-h)) / (1 - 2 * eps),
                "hinge": max(0.0, 1 - h),
                "ipo": ((a - c) - (b - d) - 1 / (2 * beta)) ** 2,
            }[kind]
        )
    return out


@pytest.mark.parametrize("kind", clip_dpo.PAIR_LOSSES)
def test_preference_losses_match_naive_formulas(kind):
    g = torch.Generator().manual_seed(0)
    pc, pr, rc, rr = (10 * torch.randn(9, generator=g, dtype=torch.float64) for _ in range(4))
    loss, chosen, rejected = clip_dpo.preference_loss(pc, pr, rc, rr, 0.3, kind, 0.2)
    assert torch.allclose(
        loss.double(),
        torch.tensor(
            naive_preference(pc.tolist(), pr.tolist(), rc.tolist(), rr.tolist(), 0.3, kind, 0.2),
            dtype=torch.float64,
        ),
        atol=1e-5,
    )
    if kind != "bt":
        assert torch.allclose(chosen.double(), 0.3 * (pc - rc), atol=1e-5) and torch.allclose(
            rejected.double(), 0.3 * (pr - rr), atol=1e-5
        )


def test_dpo_and_ipo_signs_on_hand_made_cases():
    zero = torch.zeros(1)
    # the policy likes the chosen caption more than the reference does: DPO below log 2, and its
    # gradient still pushes the chosen score up and the rejected one down
    pc, pr = torch.tensor([1.0], requires_grad=True), torch.tensor([0.0], requires_grad=True)
    loss, _, _ = clip_dpo.preference_loss(pc, pr, zero, zero, 1.0, "dpo")
    loss.sum().backward()
    assert loss.item() < math.log(2) and pc.grad.item() < 0 < pr.grad.item()
    # the opposite: above log 2
    assert clip_dpo.preference_loss(torch.tensor([0.0]), torch.tensor([1.0]), zero, zero, 1.0, "dpo")[
        0
    ].item() > math.log(2)
    # IPO regresses the log-ratio difference to 1 / (2 beta): zero there, and past it the gradient
    # pulls the margin back down (DPO would keep pushing it up)
    beta = 0.5
    assert clip_dpo.preference_loss(torch.tensor([1.0]), zero, zero, zero, beta, "ipo")[
        0
    ].item() == pytest.approx(0.0)
    pc = torch.tensor([3.0], requires_grad=True)
    clip_dpo.preference_loss(pc, zero, zero, zero, beta, "ipo")[0].sum().backward()
    assert pc.grad.item() > 0
    pc = torch.tensor([0.0], requires_grad=True)
    clip_dpo.preference_loss(pc, zero, zero, zero, beta, "ipo")[0].sum().backward()
    assert pc.grad.item() < 0


def naive_plackett_luce(r, ranks):
    """sum over every candidate k that beats another of log sum_{j = k or below k} exp r_j - r_k"""
    total = 0.0
    for k in range(len(r)):
        below = [j for j in range(len(r)) if ranks[j] > ranks[k] >= 0 and ranks[j] >= 0]
        if below:
            total += math.log(sum(math.exp(r[j]) for j in [k, *below])) - r[k]
    return total


def test_listwise_matches_naive_plackett_luce_and_k2_is_dpo():
    g = torch.Generator().manual_seed(1)
    policy, ref = torch.randn(5, 4, generator=g), torch.randn(5, 4, generator=g)
    # strict, permuted, tiers, one best, padded
    ranks = torch.tensor([[0, 1, 2, 3], [3, 1, 0, 2], [0, 1, 1, 2], [0, 1, 1, 1], [1, 0, -1, -1]])
    loss, r = clip_dpo.listwise_loss(policy, ref, ranks, 0.7)
    for m in range(5):
        assert loss[m].item() == pytest.approx(
            naive_plackett_luce((0.7 * (policy[m] - ref[m])).tolist(), ranks[m].tolist()), abs=1e-5
        )
    # a strict ranking is exactly PL's sum_{k<K} [logsumexp(r_k..r_K) - r_k]
    rr = 0.7 * (policy[0] - ref[0])
    assert loss[0].item() == pytest.approx(
        sum((torch.logsumexp(rr[k:], 0) - rr[k]).item() for k in range(3)), abs=1e-5
    )
    # K = 2 is DPO
    dpo, _, _ = clip_dpo.preference_loss(policy[:, 0], policy[:, 1], ref[:, 0], ref[:, 1], 0.7, "dpo")
    k2, _ = clip_dpo.listwise_loss(policy[:, :2], ref[:, :2], torch.tensor([[0, 1]] * 5), 0.7)
    assert torch.allclose(k2, dpo, atol=1e-6)
    # padding gives finite gradients
    p = policy.clone().requires_grad_()
    clip_dpo.listwise_loss(p, ref, ranks, 0.7)[0].sum().backward()
    assert torch.isfinite(p.grad).all() and (p.grad[4, 2:] == 0).all()


def scene_facts(scene):
    """ground truth from the geometry: for each (shape) its colour, and the relation the first-named
    object really has to the second"""
    return {o.shape: o for o in scene.objs}


def wrong_facts(scene, caption):
    """how many of the caption's two compositional claims (the relation, the colour binding) are false
    of the scene, read off the objects' coordinates, independently of shapes.mirror / swap_colours"""
    w = caption.split()  # a {size} {colour} {shape} {rel...} a {size} {colour} {shape} on a ...
    rel = " ".join(w[4 : w.index("a", 4)])
    j = w.index("a", 4)
    subj, obj = scene_facts(scene)[w[3]], scene_facts(scene)[w[j + 3]]
    holds = {
        "left of": subj.x < obj.x,
        "right of": subj.x > obj.x,
        "above": subj.y < obj.y,
        "below": subj.y > obj.y,
    }[rel]
    colours_bound = subj.colour == w[2] and obj.colour == w[j + 2]
    return int(not holds) + int(not colours_bound)


@pytest.mark.parametrize("which", ["both", "mirror", "swap"])
def test_shapes_group_ranks_are_the_number_of_wrong_facts(which):
    for key in range(20):
        scene = shapes.sample_scene(shapes.scene_rng("dpo", 0, key))
        twins = {
            "both": [
                scene,
                shapes.mirror(scene),
                shapes.swap_colours(scene),
                shapes.mirror(shapes.swap_colours(scene)),
            ],
            "mirror": [scene, shapes.mirror(scene)],
            "swap": [scene, shapes.swap_colours(scene)],
        }[which]
        n = len(twins)
        g = clip_dpo.shapes_group(scene, 16, with_statements=True, twins=which)
        assert len(g["images"]) == n and len(set(g["texts"])) == 2 * n and len(g["queries"]) == 4 * n
        for i in range(n):
            assert torch.equal(g["images"][i], data.to_tensor(shapes.render(twins[i], 16)))
        for direction, q, cands, ranks in g["queries"]:
            for c, r in zip(cands, ranks):
                image, text = (q, c) if direction == "i2t" else (c, q)
                if text < n:  # a caption
                    assert r == wrong_facts(twins[image], g["texts"][text]), (direction, q, c)
                else:  # a statement: its own twin ranks it first, the others by the same wrong facts
                    assert g["texts"][text] == shapes.statements(twins[text - n])[0][0]
                    assert r == wrong_facts(twins[image], twins[text - n].caption())
        assert g["pos"] == [(i, i) for i in range(n)]


@pytest.mark.parametrize("every", [4, 8])
def test_mixed_twins_are_one_full_group_in_n_and_mirror_groups_between(every):
    kw = {} if every == 8 else {"both_every": every}  # 8 is the default
    mixed = clip_dpo.ShapesPreferences(16, seed=3, twins="mixed", **kw)
    both, mirror = (clip_dpo.ShapesPreferences(16, seed=3, twins=t) for t in ("both", "mirror"))
    for key in range(2 * every):
        g, expected = mixed[key], (both if key % every == 0 else mirror)[key]
        assert g["texts"] == expected["texts"] and g["queries"] == expected["queries"]
        assert len(g["images"]) == (4 if key % every == 0 else 2) and all(
            torch.equal(a, b) for a, b in zip(g["images"], expected["images"])
        )


def batch_of(groups, direction="both", imc_sets="all"):
    args = type("A", (), {"direction": direction, "context_length": 32, "imc_sets": imc_sets})
    batch, _ = clip_dpo.make_batch(groups, args)
    return batch


def state_of(reference, step=0):
    """the loop's state as step_loss sees it"""
    return argparse.Namespace(reference=reference, step=step)


def args_for(loss="dpo", **kw):
    a = clip_dpo.get_args(["--loss", loss])
    # the losses alone, without the shapes default's intra-modal kick
    for k, v in ({"imc_weight": 0.0} | kw).items():
        setattr(a, k, v)
    if "alpha" in kw:  # as get_args makes them from --alpha
        a.clip_weight, a.pref_weight = (
            kw.get("clip_weight", kw["alpha"]),
            kw.get("pref_weight", 1 - kw["alpha"]),
        )
    return a


def tiny_policy_and_batch():
    """a random tiny policy, its reference (policy == reference), and a batch of two shapes groups"""
    torch.manual_seed(0)
    policy = CLIP(**model_config("tiny", 32, 32))
    reference = copy.deepcopy(policy).eval().requires_grad_(False)
    return (
        policy,
        reference,
        batch_of(
            [
                clip_dpo.shapes_group(shapes.sample_scene(shapes.scene_rng("dpo", 0, k)), 32, True)
                for k in range(2)
            ]
        ),
    )


def test_imc_matches_a_naive_loop_and_is_zero_without_worse_candidates():
    torch.manual_seed(0)
    M, K, D, s = 5, 4, 8, 7.0
    v = F.normalize(torch.randn(M, D), dim=-1)
    t = F.normalize(torch.randn(M, K, D), dim=-1)
    ranks = torch.tensor([[0, 1, 1, 2], [2, 0, 1, -1], [1, 1, 0, 0], [0, 0, -1, -1], [0, -1, -1, -1]])
    loss = clip_dpo.imc_loss(v, t, ranks, torch.tensor(s))
    for m in range(M):
        valid = [k for k in range(K) if ranks[m, k] >= 0]
        best = min(valid, key=lambda k: (ranks[m, k].item(), k))  # the first best on ties
        worse = [k for k in valid if ranks[m, k] > ranks[m, best]]
        logits = [s * float(v[m] @ t[m, best])] + [s * float(t[m, best] @ t[m, k]) for k in worse]
        expected = math.log(sum(math.exp(x) for x in logits)) - logits[0]
        assert loss[m].item() == pytest.approx(expected, abs=1e-5), m
    # tied best / a single candidate: nothing below the best
    assert loss[3].item() == 0 and loss[4].item() == 0


def test_imc_weight_adds_the_term_on_image_queries_only():
    policy, reference, batch = tiny_policy_and_batch()
    base, _ = clip_dpo.step_loss(policy, batch, args_for("dpo"), state_of(reference))
    mixed, stats = clip_dpo.step_loss(policy, batch, args_for("dpo", imc_weight=0.5), state_of(reference))
    images, texts, prefs = batch
    f = torch.cat([policy.encode_image(images, normalize=True), policy.encode_text(texts, normalize=True)])
    i2t = prefs["query"] < len(images)
    assert i2t.sum() == 16 and (~i2t).sum() == 16
    expected = clip_dpo.imc_loss(
        f[prefs["query"][i2t]], f[prefs["cand"][i2t]], prefs["rank"][i2t], policy.logit_scale.exp()
    ).mean()
    assert stats["imc"].item() == pytest.approx(expected.item(), rel=1e-5)
    assert mixed.item() == pytest.approx(base.item() + 0.5 * expected.item(), rel=1e-5)
    world, vsr = clip_dpo.get_args([]), clip_dpo.get_args(["--data", "vsr", "--init", "ViT-B-32:openai"])
    assert (world.imc_weight, world.imc_steps) == (0.225, 1000)  # the shapes default's symmetry breaker ...
    # ... and on real data for the first third of the run, as the VSR rehearsal needed, with its mirrored twins
    assert (vsr.imc_weight, vsr.imc_steps, vsr.imc_fraction, vsr.vsr_flips) == (0.225, None, 1 / 3, "hv")
    # a pretrained CLIP gets a fine-tuning lr
    assert (world.lr, world.alpha, vsr.lr, vsr.alpha) == (4e-4, 0.75, 1e-5, 0.75)


def test_imc_steps_switches_the_term_off_after_n_steps(tmp_path, monkeypatch):
    """the real loop, in process: --imc_steps 2 gives the first two steps the term and the rest none,
    and the loss of a step without it is the loss without --imc_weight"""
    init, weights, losses = tiny_ckpt(tmp_path / "init.pt"), [], []
    real = clip_dpo.step_loss

    def spy(model, batch, args, state):
        loss, stats = real(model, batch, args, state)
        weights.append(args.imc_weight if state.step < args.imc_steps else 0.0)
        without = real(model, batch, argparse.Namespace(**{**vars(args), "imc_weight": 0.0}), state)[0].item()
        losses.append((loss.item(), without, "imc" in stats))
        return loss, stats

    monkeypatch.setattr(clip_dpo, "step_loss", spy)
    torch.set_num_threads(1)
    clip_dpo.main(
        [
            "--init",
            init,
            "--max_steps",
            "4",
            "--imc_weight",
            "0.5",
            "--imc_steps",
            "2",
            "--out_dir",
            str(tmp_path / "out"),
            *TINY,
        ]
    )
    assert weights == [0.5, 0.5, 0.0, 0.0]
    assert [has for _, _, has in losses] == [True, True, False, False]
    assert all(a > b for a, b, _ in losses[:2]) and all(a == b for a, b, _ in losses[2:])
    # real data: --imc_fraction of the run
    assert (
        clip_dpo.get_args(
            ["--data", "vsr", "--init", "x", "--imc_weight", "0.3", "--max_steps", "7"]
        ).imc_steps
        is None
    )
    # ... also when --epochs sets them
    assert clip_dpo.get_args(["--data", "vsr", "--init", "x", "--imc_weight", "0.3"]).imc_steps is None


def test_make_batch_indexes_the_concatenated_features():
    g = [
        clip_dpo.shapes_group(shapes.sample_scene(shapes.scene_rng("dpo", 0, k)), 32, True) for k in range(3)
    ]
    images, texts, prefs = batch_of(g)
    assert images.shape == (12, 3, 32, 32) and texts.shape[0] == 24
    assert prefs["query"].shape == (3 * 16,) and prefs["cand"].shape == (48, 4)
    # group 1's image 2 asks about group 1's four captions: features 12 + 8..11
    m = 16 + 2
    assert prefs["query"][m].item() == 4 + 2 and prefs["cand"][m].tolist() == [12 + 8 + j for j in range(4)]
    # every pair is strictly ordered; 5 per ranking [0,1,1,2]-shaped query
    q, a, b = prefs["pairs"].unbind(1)
    assert (prefs["rank"][q, a] < prefs["rank"][q, b]).all() and len(q) == 48 * 5
    assert prefs["pos"][5].tolist() == [5, 8 + 1]  # pos indexes images and texts themselves
    _, _, only = batch_of(g, "t2i")
    assert (only["query"] >= 12).all() and (only["cand"] < 12).all()


def test_step_zero_is_log2_with_half_reward_accuracy_and_the_mixture_adds_clip():
    policy, reference, batch = tiny_policy_and_batch()
    loss, stats = clip_dpo.step_loss(policy, batch, args_for("dpo"), state_of(reference))
    # policy == reference: every reward exactly 0
    assert stats["chosen"].item() == 0 and stats["rejected"].item() == 0
    assert loss.item() == pytest.approx(math.log(2), abs=1e-7) and stats["reward_acc"].item() == 0.5
    loss, stats = clip_dpo.step_loss(policy, batch, args_for("listwise"), state_of(reference))
    # [0, 1, 1, 2]: the best among 4, then each middle one among itself and the worst
    assert (
        loss.item() == pytest.approx(math.log(4) + 2 * math.log(2), abs=1e-6)
        and stats["reward_acc"].item() == 0.5
    )
    # dpo_clip = alpha CLIP + (1 - alpha) DPO, the CLIP loss on the true (image, caption) pairs
    mix, stats = clip_dpo.step_loss(policy, batch, args_for("dpo_clip", alpha=0.3), state_of(reference))
    images, texts, prefs = batch
    v, t = policy.encode_image(images, normalize=True), policy.encode_text(texts, normalize=True)
    pos = prefs["pos"]
    contrastive, _ = clip_dpo.clip_loss(v[pos[:, 0]], t[pos[:, 1]], policy.logit_scale.exp())
    assert mix.item() == pytest.approx(0.3 * contrastive.item() + 0.7 * math.log(2), abs=1e-5)
    # separate weights: each term's own, so a control can remove one and leave the others as they were
    both = clip_dpo.step_loss(
        policy,
        batch,
        args_for("dpo_clip", clip_weight=0.75, pref_weight=0.25, imc_weight=0.225),
        state_of(reference),
    )
    assert both[0].item() == pytest.approx(
        0.75 * contrastive.item() + 0.25 * math.log(2) + 0.225 * both[1]["imc"].item(), abs=1e-5
    )
    alone = clip_dpo.step_loss(
        policy,
        batch,
        args_for("dpo_clip", clip_weight=0.75, pref_weight=0.0, imc_weight=0.225),
        state_of(reference),
    )
    assert alone[0].item() == pytest.approx(
        0.75 * contrastive.item() + 0.225 * both[1]["imc"].item(), abs=1e-5
    )
    # l2sp is zero at the start and the squared distance after a change
    with torch.no_grad():
        policy.text_projection.add_(0.01)
    l2, stats = clip_dpo.step_loss(policy, batch, args_for("dpo", l2sp=2.0), state_of(reference))
    assert stats["l2sp"].item() == pytest.approx(0.01**2 * policy.text_projection.numel(), rel=1e-3)


def ranking_accuracy(policy, reference, batch):
    """by hand, from the batch's ranks alone: over every query m and every two of its candidates
    k, l with 0 <= rank_k < rank_l, the fraction whose rewards r = beta s (cos_policy - cos_ref) put k
    above l (beta s > 0 and the same for both, so the cosines decide)"""
    images, texts, prefs = batch
    cos = []
    with torch.no_grad():
        for model in (policy, reference):
            f = torch.cat(
                [model.encode_image(images, normalize=True), model.encode_text(texts, normalize=True)]
            )
            cos.append(
                [
                    [float(f[q] @ f[c]) for c in cands]
                    for q, cands in zip(prefs["query"].tolist(), prefs["cand"].tolist())
                ]
            )
    right, pairs = 0, 0
    for m, ranks in enumerate(prefs["rank"].tolist()):
        r = [p - q for p, q in zip(cos[0][m], cos[1][m])]
        for k in range(len(ranks)):
            for j in range(len(ranks)):
                if 0 <= ranks[k] < ranks[j]:
                    pairs, right = pairs + 1, right + (r[k] > r[j])
    return right / pairs


def test_a_few_dpo_steps_on_a_fixed_batch_learn_its_rankings():
    """8 Adam steps of --loss dpo on one batch of two shapes groups: the rewards order the candidates
    as their ranks do (by hand, 0.5 at the start where policy == reference, then above 0.85), the
    logged reward_acc says so, and the loss falls below half of log 2. lr 3e-4, the shapes default's
    order: at 1e-3 this tiny model overshoots and the accuracy wanders near 0.6."""
    policy, reference, batch = tiny_policy_and_batch()
    args = args_for("dpo")
    opt = torch.optim.Adam(policy.parameters(), lr=3e-4)
    for step in range(8):
        loss, stats = clip_dpo.step_loss(policy, batch, args, state_of(reference, step))
        assert step > 0 or stats["reward_acc"].item() == 0.5
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        loss, stats = clip_dpo.step_loss(policy, batch, args, state_of(reference, 8))
    accuracy = ranking_accuracy(policy, reference, batch)
    assert accuracy > 0.85 and stats["reward_acc"].item() == pytest.approx(accuracy, abs=1e-6), (
        accuracy,
        stats["reward_acc"].item(),
    )
    assert loss.item() < math.log(2) / 2, loss.item()


def test_reference_is_frozen_never_trained_and_bit_identical(tmp_path, monkeypatch):
    """the real loop, in process: the reference step_loss sees is the --init weights, untouched and
    without gradients after training, and the policy did move"""
    init = tiny_ckpt(tmp_path / "init.pt")
    seen = []
    real = clip_dpo.step_loss
    monkeypatch.setattr(
        clip_dpo,
        "step_loss",
        lambda model, batch, args, state: (seen.append(state.reference), real(model, batch, args, state))[1],
    )
    torch.set_num_threads(1)
    clip_dpo.main(
        ["--init", init, "--max_steps", "3", "--out_dir", str(tmp_path / "out"), "--lr", "1e-3", *TINY]
    )
    start = torch.load(init, weights_only=True)["model"]
    reference = seen[-1]
    assert all(r is reference for r in seen) and not reference.training
    for name, p in reference.named_parameters():
        assert torch.equal(p, start[name]) and p.grad is None and not p.requires_grad, name
    trained = load_weights(tmp_path / "out")["model"]
    assert any(not torch.equal(trained[k], start[k]) for k in start)
    assert torch.equal(trained["logit_scale"], start["logit_scale"])  # frozen at the reference's


def test_bf16_reference_matches_the_policy_under_autocast():
    """the bf16 reference keeps fp32 norms and embeddings, so under bf16 autocast its outputs are
    bit-identical to the fp32 policy's"""
    torch.manual_seed(0)
    policy = CLIP(**model_config("tiny", 32, 32)).eval()
    reference = clip_dpo.make_reference(policy, "bfloat16")
    assert reference.transformer.resblocks[0].attn.in_proj_weight.dtype == torch.bfloat16
    assert (
        reference.positional_embedding.dtype == torch.float32
        and reference.ln_final.weight.dtype == torch.float32
    )
    images, texts, _ = batch_of(
        [clip_dpo.shapes_group(shapes.sample_scene(shapes.scene_rng("dpo", 0, 0)), 32, False)]
    )
    with torch.autocast("cpu", dtype=torch.bfloat16), torch.no_grad():
        a, b = policy(images, texts), reference(images, texts)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


class StubCLIP(torch.nn.Module):
    """a CLIP that returns fixed features: rows `images` of image, rows `texts` of text, and scale"""

    def __init__(self, image, text, scale):
        super().__init__()
        self.image, self.text = torch.nn.Parameter(image), torch.nn.Parameter(text)
        self.logit_scale = torch.nn.Parameter(torch.tensor(math.log(scale)))

    def forward(self, images, texts):
        return self.image[images], self.text[texts], self.logit_scale.exp()


def stub_policy_reference_and_batch():
    """two shapes groups' preferences over fixed features: the reference's, and the policy's 1e-3
    from them; correlated (cosines ~0.8), so z = 100 cos ~ 80, where a bf16 step is 0.5"""
    images, texts, prefs = batch_of(
        [
            clip_dpo.shapes_group(shapes.sample_scene(shapes.scene_rng("dpo", 0, k)), 32, True)
            for k in range(2)
        ]
    )
    g = torch.Generator().manual_seed(0)
    base = torch.randn(32, generator=g)
    ref = [
        F.normalize(base + 0.5 * torch.randn(n, 32, generator=g), dim=-1) for n in (len(images), len(texts))
    ]
    policy = [F.normalize(f + 1e-3 * torch.randn(f.shape, generator=g), dim=-1) for f in ref]
    batch = (torch.arange(len(images)), torch.arange(len(texts)), prefs)
    return StubCLIP(*policy, 100.0), StubCLIP(*ref, 100.0).requires_grad_(False), batch


@pytest.mark.parametrize(
    "loss, kw",
    [(k, {}) for k in (*clip_dpo.PAIR_LOSSES, "listwise")]
    + [("dpo_clip", {"alpha": 0.5}), ("dpo", {"imc_weight": 0.3})],
)
def test_scores_are_fp32_under_bf16_autocast(loss, kw):
    """the GPU path on CPU (CPU autocast runs bmm in bf16 as CUDA's does): the same step from the same
    features, under bf16 autocast and in fp32, gives the same loss and stats to fp32 precision. With
    bf16 scores, a quarter of the pairs had h exactly 0 and the margin was 2.5x its fp32 value."""
    policy, reference, batch = stub_policy_reference_and_batch()
    args = args_for(loss, label_smoothing=0.1, **kw)
    loss32, stats32 = clip_dpo.step_loss(policy, batch, args, state_of(reference))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss16, stats16 = clip_dpo.step_loss(policy, batch, args, state_of(reference))
    assert loss16.dtype == torch.float32 and stats16.keys() == stats32.keys()
    for k in ["loss", *stats32]:
        a, b = (loss16, loss32) if k == "loss" else (stats16[k], stats32[k])
        torch.testing.assert_close(a.float(), b.float(), rtol=1e-5, atol=1e-6, msg=f"{loss} {k}")
    # the rewards are not all ties
    assert 0 < stats32["reward_acc"].item() < 1 and stats32["margin"].abs().item() > 1e-4


def test_grad_checkpointing_gives_the_same_gradients():
    torch.manual_seed(0)
    model = CLIP(**model_config("tiny", 32, 32))
    images, texts, prefs = batch_of(
        [clip_dpo.shapes_group(shapes.sample_scene(shapes.scene_rng("dpo", 0, 0)), 32, True)]
    )
    grads = []
    for on in (False, True):
        model.set_grad_checkpointing(on)
        model.zero_grad()
        v, t, s = model(images, texts)
        clip_dpo.clip_loss(v, t[:4], s)[0].backward()
        grads.append([p.grad.clone() for p in model.parameters()])
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(*grads))


def _ddp_worker(rank, path, groups, out):
    model = CLIP(**model_config("tiny", 32, 32))
    model.load_state_dict(torch.load(path, weights_only=True)["model"])
    reference = copy.deepcopy(model).requires_grad_(False)
    with torch.no_grad():  # move the policy off the reference so the loss has a non-trivial gradient
        for p in model.parameters():
            p.add_(0.01 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())))
    ddp = torch.nn.parallel.DistributedDataParallel(model)
    for loss in ("dpo_clip", "listwise"):
        model.zero_grad()
        clip_dpo.step_loss(
            ddp, batch_of(groups[rank]), args_for(loss, alpha=0.5, imc_weight=0.3), state_of(reference)
        )[0].backward()
        torch.save([p.grad for p in model.parameters()], f"{out}.{loss}.{rank}")


def ranking_group(rng, k):
    """a synthetic i2t or t2i ranking group with k candidates (images as random tensors)"""
    if rng.random() < 0.5:
        return {
            "images": [torch.randn(3, 32, 32)],
            "texts": [f"a red circle number {rng.randrange(99)}" for _ in range(k)],
            "queries": [("i2t", 0, list(range(k)), list(range(k)))],
            "pos": [(0, 0)],
        }
    return {
        "images": [torch.randn(3, 32, 32) for _ in range(k)],
        "texts": [f"a blue ring number {rng.randrange(99)}"],
        "queries": [("t2i", 0, list(range(k)), [0] + [1] * (k - 1))],
        "pos": [(0, 0)],
    }


@pytest.mark.slow
def test_two_gloo_processes_give_the_full_batch_gradients(tmp_path):
    """DDP property on the gradients themselves (AdamW would hide a constant factor in a weights
    test): rank 0 holds more preference pairs and more true pairs (3 groups against 2) than rank 1,
    and the averaged gradients equal one process's on the whole batch, for the pairwise + CLIP
    mixture and for listwise."""
    path = tiny_ckpt(tmp_path / "init.pt")
    torch.manual_seed(0)
    rng = random.Random(0)
    groups = [[ranking_group(rng, 4) for _ in range(3)], [ranking_group(rng, 2) for _ in range(2)]]
    out = str(tmp_path / "grads")
    gloo_processes(tmp_path, _ddp_worker, path, groups, out)
    model = CLIP(**model_config("tiny", 32, 32))
    model.load_state_dict(torch.load(path, weights_only=True)["model"])
    reference = copy.deepcopy(model).requires_grad_(False)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.01 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())))
    for loss in ("dpo_clip", "listwise"):
        model.zero_grad()
        clip_dpo.step_loss(
            model,
            batch_of(groups[0] + groups[1]),
            args_for(loss, alpha=0.5, imc_weight=0.3),
            state_of(reference),
        )[0].backward()
        g0, g1 = torch.load(f"{out}.{loss}.0"), torch.load(f"{out}.{loss}.1")
        for p, a, b in zip(model.parameters(), g0, g1):
            if p.grad is not None:
                assert torch.allclose(a, b) and torch.allclose(a, p.grad, atol=1e-6, rtol=1e-4), loss


@pytest.mark.slow
def test_torchrun_two_cpu_processes_equal_one_process(tmp_path):
    """the CLI's DDP path end to end: 2 gloo ranks x 2 groups == 1 process x 4 groups"""
    init = tiny_ckpt(tmp_path / "init.pt")
    common = [
        "--init",
        init,
        "--max_steps",
        "3",
        "--eval_every",
        "0",
        "--eval_n",
        "20",
        "--lr",
        "1e-3",
        "--warmup_steps",
        "1",
    ]
    _, one, two = one_and_two_processes(tmp_path, "clip_dpo.py", 4, common)
    a, b = one["model"], two["model"]
    start = torch.load(init, weights_only=True)["model"]
    for k in a:
        assert torch.allclose(a[k], b[k], atol=2e-5), k
    assert any(not torch.equal(a[k], start[k]) for k in a)


@pytest.mark.slow
def test_cli_step_zero_resume_after_sigkill_and_open_clip(tmp_path):
    init = tiny_ckpt(tmp_path / "init.pt")
    args = [
        "clip_dpo.py",
        "--init",
        init,
        "--max_steps",
        "8",
        "--ckpt_every",
        "2",
        "--loss",
        "dpo",
        "--imc_weight",
        "0",
        *TINY,
    ]
    ref, a, b = killed_and_resumed(tmp_path, args)
    # the first step's loss is computed with policy == reference
    assert (
        "step 1/8 | loss 0.6931 | pref 0.693 | reward_acc 0.500 | chosen 0.000 | rejected 0.000" in ref.stdout
    )
    # the shapes world's statements: statements/, never vsr/ (VSR's data only)
    last = eval_lines(ref.stdout)[-1]
    assert set(statement_rates(last)) == {"statements/acc", "statements/macro_f1"} and not vsr_rates(last)
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    # the checkpoint names its reference and holds no copy of it; the policy loads strict into open_clip
    assert set(a) == {
        "model",
        "model_cfg",
        "optimizer",
        "step",
        "args",
        "rng",
        "start_metrics",
        "reference",
        "preprocess_cfg",
    }
    # the --init's (a minclip checkpoint: open_clip's default), for eval.py and --export
    assert a["preprocess_cfg"] == data.PREPROCESS
    assert a["reference"] == {
        "spec": init,
        "checksum": sum(
            p.double().sum().item() for p in torch.load(init, weights_only=True)["model"].values()
        ),
    }
    theirs = open_clip.CLIP(**a["model_cfg"])
    theirs.load_state_dict(a["model"], strict=True)
    # resuming against another reference is refused
    tiny_ckpt(init, seed=1)
    with pytest.raises(SystemExit, match="the weights of --init .* changed since"):
        clip_dpo.main([*args[1:], "--out_dir", str(tmp_path / "killed"), "--resume", "--max_steps", "9"])


@pytest.mark.parametrize(
    "argv, message",
    [
        # + the CLI
        pytest.param(
            ["--init", "/nonexistent/ckpt.pt"],
            "error: --init /nonexistent/ckpt.pt: no such checkpoint",
            marks=pytest.mark.slow,
        ),
        (["--data", "hnc", "--data_root", "/x"], "error: missing file: /x"),
        (["--data", "vsr"], "error: --data vsr needs --data_root"),
        (
            ["--data", "vsr", "--data_root", "/nonexistent/vsr"],
            "error: --data_root /nonexistent/vsr: no such directory",
        ),
        (["--label_smoothing", "0.1"], "--label_smoothing is for --loss cdpo or robust"),
        (["--loss", "kto"], "argument --loss: invalid choice"),
    ],
)
def test_bad_flags_give_one_clear_error(tmp_path, capsys, argv, message):
    # in process (SystemExit's message is the one line a user sees); the first case also through the CLI
    with pytest.raises(SystemExit) as e:
        clip_dpo.main(
            [
                "--init",
                tiny_ckpt(tmp_path / "init.pt"),
                *argv,
                "--max_steps",
                "1",
                "--out_dir",
                str(tmp_path / "out"),
            ]
        )
    assert message in str(e.value.code) + capsys.readouterr().err
    if argv[0] == "--init":
        r = run(["clip_dpo.py", *argv, "--max_steps", "1"])
        assert r.returncode != 0 and message in r.stderr and "Traceback" not in r.stderr, r.stderr


# -----------------------------------------------------------------------------
# VSR: the contrast table, the reader on both splits' formats, the evaluation, the CLI

# the 66 relations of VSR's random and zero-shot files
VSR_66 = [
    "above",
    "across",
    "across from",
    "adjacent to",
    "against",
    "ahead of",
    "along",
    "alongside",
    "among",
    "around",
    "at",
    "at the back of",
    "at the edge of",
    "at the left side of",
    "at the right side of",
    "at the side of",
    "attached to",
    "away from",
    "behind",
    "below",
    "beneath",
    "beside",
    "between",
    "beyond",
    "by",
    "close to",
    "congruent",
    "connected to",
    "consists of",
    "contains",
    "detached from",
    "down",
    "down from",
    "enclosed by",
    "facing",
    "facing away from",
    "far away from",
    "far from",
    "has as a part",
    "in",
    "in front of",
    "in the middle of",
    "inside",
    "into",
    "left of",
    "near",
    "next to",
    "off",
    "on",
    "on top of",
    "opposite to",
    "out of",
    "outside",
    "over",
    "parallel to",
    "part of",
    "past",
    "perpendicular to",
    "right of",
    "surrounding",
    "through",
    "touching",
    "toward",
    "under",
    "with",
    "within",
]
FIXTURE = os.path.join(FIX, "vsr")


def test_contrast_table_covers_all_66_relations_by_whole_word_replacement():
    assert len(VSR_66) == 66 and set(data.VSR_CONTRAST) == set(VSR_66)
    assert (
        set(data.VSR_SKIPPED) == {r for r in VSR_66 if data.VSR_CONTRAST[r] is None}
        and len(data.VSR_SKIPPED) == 13
    )
    for rel, con in data.VSR_CONTRAST.items():
        caption = f"The cat {data.relation_phrase(rel)} the dog."
        if con is None:
            assert data.contrast_caption(caption, rel) is None
            continue
        assert con in data.VSR_CONTRAST and con != rel
        # replaced, not inserted: the same caption with the other relation's words
        assert data.contrast_caption(caption, rel) == f"The cat {data.relation_phrase(con)} the dog."
    assert (
        data.contrast_caption("The bowl contains the apple.", "contains") == "The bowl is inside the apple."
    )
    assert data.contrast_caption("The bus is inside the house.", "inside") == "The bus is outside the house."
    # whole words: "in" inside "bin" or "inside", "on" inside "onion", are never touched
    assert data.contrast_caption("The onion is on the bin.", "on") == "The onion is under the bin."
    assert data.contrast_caption("The cat is in the bin.", "in") == "The cat is outside the bin."
    with pytest.raises(ValueError, match="exactly once"):
        data.contrast_caption("The cat is near the dog.", "left of")


@pytest.mark.parametrize("split, sizes", [("random", (6, 4, 6)), ("zeroshot", (3, 2, 4))])
def test_read_vsr_both_split_formats(split, sizes):
    splits = data.read_vsr(FIXTURE, split)
    assert tuple(len(splits[p]) for p in ("train", "dev", "test")) == sizes
    rows = [r for p in splits.values() for r in p]
    assert all(os.path.isfile(r.image) for r in rows)
    assert {os.path.basename(os.path.dirname(r.image)) for r in rows} == {"train2017", "val2017"}
    first = splits["train"][0]
    if split == "random":
        assert first == data.VSRRow(
            os.path.join(FIXTURE, "train2017", "000000451431.jpg"),
            "The person is inside the refrigerator.",
            True,
            "inside",
            os.path.join(FIXTURE, "splits", "random", "train.jsonl") + ":1",
        )
    assert [r.label for r in splits["test"]] == (
        [True, False] * 3 if split == "random" else [True, False, True, False]
    )


def test_read_vsr_reads_a_file_with_bom_and_crlf_as_the_clean_one(tmp_path):
    root = fixture_copy(tmp_path, "vsr")
    for part in ("train", "dev", "test"):
        path = root / "splits" / "random" / f"{part}.jsonl"
        path.write_bytes(b"\xef\xbb\xbf" + path.read_bytes().replace(b"\n", b"\r\n"))
    clean, dirty = data.read_vsr(FIXTURE, "random"), data.read_vsr(str(root), "random")
    assert [(r.caption, r.label, r.relation) for r in clean["test"]] == [
        (r.caption, r.label, r.relation) for r in dirty["test"]
    ]


def broken_copy(tmp_path, line_no, edit):
    root = fixture_copy(tmp_path, "vsr")
    path = root / "splits" / "random" / "dev.jsonl"
    lines = path.read_text().splitlines()
    lines[line_no - 1] = edit(lines[line_no - 1])
    path.write_text("\n".join(lines) + "\n")
    return root, str(path)


@pytest.mark.parametrize(
    "edit, message",
    [
        pytest.param(lambda s: s[:40], "malformed JSON", marks=pytest.mark.slow),  # + eval.py's CLI
        (
            lambda s: s.replace('"relation": "below"', '"relation": "beneath-ish"'),
            "unknown relation 'beneath-ish'",
        ),
        (lambda s: s.replace("000000461902.jpg", "000000999999.jpg"), "image 000000999999.jpg not found"),
        (lambda s: s.replace('"[2, 9]"', '"[2, 9"'), "vote_true_validator_id"),
        (lambda s: s.replace('"label": 1', '"label": "yes"'), "label must be 1 or 0"),
        (lambda s: s.replace("is below the", "is under the"), "does not contain 'is below'"),
    ],
)
def test_read_vsr_bad_input_names_file_and_line(tmp_path, edit, message):
    root, path = broken_copy(tmp_path, 3, edit)
    with pytest.raises(data.DataError) as e:
        data.read_vsr(str(root), "random")
    assert str(e.value).startswith(f"{path}:3: ") and message in str(e.value)
    # and through the CLI: one line, no traceback
    if "JSON" in message:
        r = run(
            [
                "eval.py",
                "--model",
                tiny_ckpt(tmp_path / "init.pt"),
                "--bench",
                "vsr",
                "--data_root",
                str(root),
            ]
        )
        assert r.returncode != 0 and r.stderr.strip() == f"error: {e.value}"
    with pytest.raises(SystemExit, match=f"^error: {path}:3: "):
        clip_dpo.main(
            [
                "--data",
                "vsr",
                "--data_root",
                str(root),
                "--init",
                tiny_ckpt(tmp_path / "init.pt"),
                "--out_dir",
                str(tmp_path / "out"),
            ]
        )


class Lookup(torch.nn.Module):
    """a stub CLIP: texts (tokenised by index into a list) and images get fixed features, so the
    evaluation's predictions are known exactly"""

    def __init__(self, text_feature):
        super().__init__()
        self.text_feature = text_feature

    def encode_image(self, x, normalize=True):
        return F.normalize(torch.ones(len(x), 2), dim=-1)

    def encode_text(self, ids, normalize=True):
        return torch.stack([self.text_feature(TEXTS[i]) for i in ids.tolist()])


TEXTS = []


def index_tokenizer(texts):
    for t in texts:
        if t not in TEXTS:
            TEXTS.append(t)
    return torch.tensor([TEXTS.index(t) for t in texts])


def test_vsr_contrast_never_rewards_preferring_the_unedited_caption():
    """a model that always scores the unedited caption above its contrast predicts True for every
    row: accuracy = the fraction of true rows (0.5 when balanced), not 1.0"""
    splits = data.read_vsr(FIXTURE, "random")
    originals = {r.caption for p in splits.values() for r in p}
    e = F.normalize(torch.ones(2), dim=0)
    model = Lookup(lambda t: e if t in originals else -e)
    preprocess = lambda im: torch.zeros(3, 4, 4)  # noqa: E731
    m = ev.eval_vsr(model, preprocess, index_tokenizer, splits["test"], splits["dev"], "cpu")
    scored = [r for r in splits["test"] if data.VSR_CONTRAST[r.relation]]
    assert m["vsr/n"] == 5 and m["vsr/skipped"] == 1  # "between" has no contrast
    assert (
        m["vsr/acc"] == pytest.approx(sum(r.label for r in scored) / 5)
        and m["vsr/true_recall"] == 1.0
        and m["vsr/false_recall"] == 0.0
    )
    assert (m["vsr/acc"], m["vsr/macro_f1"]) == pytest.approx(
        hand_acc_and_macro_f1([True] * 5, [r.label for r in scored])
    )
    balanced = scored[:2] + scored[3:5]  # two true, two false
    assert ev.eval_vsr(model, preprocess, index_tokenizer, balanced, splits["dev"], "cpu")["vsr/acc"] == 0.5
    # a model that knows the answer: the true one of caption / contrast scores higher -> 1.0, and the
    # threshold protocol separates the labels on dev and test alike
    truth = {}
    for r in [*splits["test"], *splits["dev"]]:
        if data.VSR_CONTRAST[r.relation]:
            truth[r.caption], truth[data.contrast_caption(r.caption, r.relation)] = r.label, not r.label
    model = Lookup(lambda t: e if truth.get(t) else F.normalize(torch.tensor([1.0, -0.5]), dim=0))
    m = ev.eval_vsr(model, preprocess, index_tokenizer, splits["test"], splits["dev"], "cpu")
    assert m["vsr/acc"] == 1.0 and m["vsr/macro_f1"] == 1.0 and set(vsr_rates(m)) == set(VSR_RATES)


def test_vsr_meta_categories_are_vsrs_list():
    """data.VSR_META is VSR's analysis_scripts/rel_meta_category_dict.txt on the 66 relations: its
    category sizes there, its quirks ("among" twice: the later line; "congruent" in none)"""
    assert set(data.VSR_META) == set(VSR_66) and list(data.VSR_META_LISTS) == [
        "Adjacency",
        "Directional",
        "Orientation",
        "Projective",
        "Proximity",
        "Topological",
        "Unallocated",
    ]
    sizes = {c: sum(v == c for v in data.VSR_META.values()) for c in data.VSR_META_LISTS}
    assert sizes == {
        "Adjacency": 10,
        "Directional": 12,
        "Orientation": 4,
        "Projective": 12,
        "Proximity": 5,
        "Topological": 17,
        "Unallocated": 5,
    }
    assert data.VSR_META["among"] == "Unallocated" and data.VSR_META["congruent"] is None
    assert (
        data.VSR_META["next to"],
        data.VSR_META["beside"],
        data.VSR_META["across from"],
        data.VSR_META["enclosed by"],
    ) == ("Unallocated", "Projective", "Directional", "Unallocated")
    # every scored relation has a category
    assert all(data.VSR_META[r] for r in VSR_66 if data.VSR_CONTRAST[r])


def test_vsr_breakdown_hand_counted_on_the_fixture(capsys, tmp_path):
    """the fixture rows of both splits (24: 23 scored, "between" skipped) through eval_vsr with a model
    that knows every answer except on touching, above and parallel to: accuracy per meta-category
    and per relation counted by hand; eval.py's report prints them as one line a category"""
    rows = [r for s in ("random", "zeroshot") for part in data.read_vsr(FIXTURE, s).values() for r in part]
    # its caption is train:4's, false of another image
    rows = [r for r in rows if not r.where.endswith("random/train.jsonl:5")]
    wrong = {"touching", "above", "parallel to"}
    truth = {}
    for r in rows:
        if data.VSR_CONTRAST[r.relation]:
            truth[r.caption], truth[data.contrast_caption(r.caption, r.relation)] = (
                r.label != (r.relation in wrong),
                r.label == (r.relation in wrong),
            )
    assert len(truth) == 2 * 23  # no caption is another row's caption or contrast
    e = F.normalize(torch.ones(2), dim=0)
    model = Lookup(lambda t: e if truth.get(t) else F.normalize(torch.tensor([1.0, -0.5]), dim=0))
    m = ev.eval_vsr(model, lambda im: torch.zeros(3, 4, 4), index_tokenizer, rows, rows[:4], "cpu")
    assert m["vsr/n"] == 23 and m["vsr/skipped"] == 1 and m["vsr/acc"] == pytest.approx(18 / 23)
    by_meta = {
        k.split("/")[2]: (m[k], m[k[:-3] + "n"])
        for k in m
        if k.startswith("vsr/by_meta/") and k.endswith("/acc")
    }
    # Topological: inside, consists of, contains x2, touching x2 (wrong), in, part of, has as a part, on;
    # Projective: above x2 (wrong), in front of, below, on top of, behind, beneath; no Unallocated row
    assert by_meta == {
        "Adjacency": (1.0, 2),
        "Directional": (1.0, 1),
        "Orientation": (0.5, 2),
        "Projective": (5 / 7, 7),
        "Proximity": (1.0, 1),
        "Topological": (0.8, 10),
    }
    by_rel = {
        k.split("/")[2]: (m[k], m[k[:-3] + "n"])
        for k in m
        if k.startswith("vsr/by_relation/") and k.endswith("/acc")
    }
    assert (
        len(by_rel) == 19
        and "between" not in by_rel
        and by_rel["touching"] == (0.0, 2)
        and by_rel["above"] == (0.0, 2)
    )
    assert (
        by_rel["parallel to"] == (0.0, 1)
        and by_rel["in front of"] == (1.0, 1)
        and by_rel["at the left side of"] == (1.0, 2)
    )
    assert sum(n for _, n in by_rel.values()) == 23 and all(isinstance(n, int) for _, n in by_rel.values())
    # the training scripts' evaluation: the categories only (their eval lines stay readable)
    train = ev.evaluate(
        model,
        lambda im: torch.zeros(3, 4, 4),
        index_tokenizer,
        "cpu",
        {"test": rows, "calib": rows[:4]},
        "test",
        32,
    )
    assert {k: v for k, v in train.items() if "/by_relation/" not in k} == {
        k: v for k, v in m.items() if "/by_relation/" not in k
    }
    assert not any("/by_relation/" in k for k in train)
    # the report: the flat keys, then one line a category with its relations, most rows first; --json every key
    ev.report(argparse.Namespace(model="stub", bench="vsr", json=str(tmp_path / "m.json")), m)
    out = capsys.readouterr().out
    assert "by_meta" not in out and "by_relation" not in out
    assert (
        "  Topological  0.8000     10  contains 1.00 (2), touching 0.00 (2), consists of 1.00 (1),\n"
        + " " * 30
        + "has as a part 1.00 (1), in 1.00 (1), inside 1.00 (1), on 1.00 (1),\n"
        + " " * 30
        + "part of 1.00 (1)\n"
    ) in out
    assert "  Orientation  0.5000      2  parallel to 0.00 (1), perpendicular to 1.00 (1)\n" in out
    # Projective wraps once, Topological twice
    assert len(out.splitlines()) == 1 + len([k for k in m if "/by_" not in k]) + 1 + 6 + 3
    assert json.load(open(tmp_path / "m.json")) == {"model": "stub", "bench": "vsr", **m}


def hand_acc_and_macro_f1(pred, label):
    """accuracy, and the mean over the classes true and false of F1 = 2 tp / (2 tp + fp + fn), by counting"""
    acc = sum(p == t for p, t in zip(pred, label)) / len(label)
    f1 = []
    for c in (True, False):
        tp = sum(p == c and t == c for p, t in zip(pred, label))
        wrong = sum((p == c) != (t == c) for p, t in zip(pred, label))  # fp + fn
        f1.append(2 * tp / (2 * tp + wrong) if tp + wrong else 0.0)
    return acc, sum(f1) / 2


def test_binary_metrics_and_threshold_by_hand():
    m = ev.binary_metrics([True, True, True, False, False], [True, False, True, False, True])
    # true: tp 2 of 3 predicted, of 3 actual; false: tp 1 of 2 predicted, of 2 actual
    assert m["acc"] == pytest.approx(3 / 5)
    assert (
        m["true_precision"] == pytest.approx(2 / 3)
        and m["true_recall"] == pytest.approx(2 / 3)
        and m["true_f1"] == pytest.approx(2 / 3)
    )
    assert m["false_precision"] == 0.5 and m["false_recall"] == 0.5 and m["false_f1"] == 0.5
    assert m["macro_f1"] == pytest.approx((2 / 3 + 0.5) / 2)
    # nothing predicted false
    assert ev.binary_metrics([True] * 4, [True, True, False, False])["false_precision"] == 0.0
    assert ev.calibrate_threshold([0.1, 0.4, 0.2, 0.3], [False, True, False, True]) == pytest.approx(0.25)
    assert ev.calibrate_threshold([0.5, 0.6], [True, True]) < 0.5


def write_shapes_vsr(root, n_train=48, n_eval=24, size=32):
    """the shapes world's true/false statements as a VSR dataset on disk, in the random split's exact
    format, images as COCO-named JPEGs in train2017/ (and the test ones in val2017/)"""
    os.makedirs(root / "splits" / "random")
    key = 0
    for part, n in (("train", n_train), ("dev", n_eval), ("test", n_eval)):
        folder = "val2017" if part == "test" else "train2017"
        os.makedirs(root / folder, exist_ok=True)
        with open(root / "splits" / "random" / f"{part}.jsonl", "w") as f:
            for i in range(n):
                s = shapes.sample_scene(shapes.scene_rng(f"vsr-{part}", 0, i))
                name = f"{key:012d}.jpg"
                key += 1
                Image.fromarray(shapes.render(s, size)).save(root / folder / name, quality=95)
                text, label = shapes.statements(s)[i % 2]
                f.write(
                    json.dumps(
                        {
                            "image": name,
                            "image_link": f"http://images.cocodataset.org/{folder}/{name}",
                            "caption": text,
                            "label": int(label),
                            "relation": text.split(" is ")[1].split(" the ")[0],
                            "annotator_id": 1,
                            "vote_true_validator_id": "[2]" if label else "[]",
                            "vote_false_validator_id": "[]" if label else "[2]",
                            "reference_frame": None,
                        }
                    )
                    + "\n"
                )


def test_vsr_end_to_end_without_a_download(tmp_path, capsys):
    """--data vsr through the real loaders, both directions, then eval.py --bench vsr on the result"""
    root = tmp_path / "vsr"
    write_shapes_vsr(root)
    init = tiny_ckpt(tmp_path / "init.pt")
    clip_dpo.main(
        [
            "--data",
            "vsr",
            "--data_root",
            str(root),
            "--init",
            init,
            "--max_steps",
            "3",
            "--workers",
            "1",
            "--out_dir",
            str(tmp_path / "out"),
            "--vsr_false_rows",
            *TINY,
        ]
    )
    out = capsys.readouterr().out
    # 48 i2t; no caption is both true and false here
    assert "48 train rows -> 48 preference groups (0 rows skipped" in out
    assert "eval test step 3" in out and set(vsr_rates(eval_lines(out)[-1])) == set(VSR_RATES)
    # the scripts' eval lines and metrics.jsonl: VSR's meta-categories (the world's relations are all Projective), no relations
    last = eval_lines(out)[-1]
    assert {k for k in last if "/by_" in k} == {"vsr/by_meta/Projective/acc", "vsr/by_meta/Projective/n"}
    assert last["vsr/by_meta/Projective/n"] == 24 and last["vsr/by_meta/Projective/acc"] == pytest.approx(
        last["vsr/acc"], abs=1e-3
    )
    logged = [json.loads(line) for line in open(tmp_path / "out" / "metrics.jsonl")][-1]
    assert {k for k in logged if "/by_" in k} == {k for k in last if "/by_" in k}
    ckpt = str(tmp_path / "out" / "ckpt.pt")
    ev.main(["--model", ckpt, "--bench", "vsr", "--data_root", str(root), "--json", str(tmp_path / "m.json")])
    m = json.load(open(tmp_path / "m.json"))
    assert (
        m["vsr/n"] == 24
        and m["vsr/skipped"] == 0
        and set(vsr_rates(m)) == set(VSR_RATES)
        and "vsr_threshold/tau" in m
    )
    # eval.py: every key in the JSON, the breakdown printed as one line a category
    assert (
        m["vsr/by_meta/Projective/acc"] == pytest.approx(m["vsr/acc"]) and m["vsr/by_meta/Projective/n"] == 24
    )
    assert sum(m[f"vsr/by_relation/{r}/n"] for r in shapes.CONVERSE if f"vsr/by_relation/{r}/n" in m) == 24
    table = capsys.readouterr().out
    assert "by_relation" not in table and "by_meta" not in table and "\n  Projective   " in table
    # the contrast protocol by hand: true iff the image scores its caption above the contrast caption
    model, preprocess, tokenizer = load_model(ckpt)
    rows = data.read_vsr(str(root))["test"]
    image = ev.encode_pil(model, preprocess, sorted({r.image for r in rows}), "cpu")
    index = {p: i for i, p in enumerate(sorted({r.image for r in rows}))}
    caption = ev.encode_texts(model, tokenizer, [r.caption for r in rows], "cpu")
    contrast = ev.encode_texts(
        model, tokenizer, [data.contrast_caption(r.caption, r.relation) for r in rows], "cpu"
    )
    pred = [
        float(image[index[r.image]] @ caption[i]) > float(image[index[r.image]] @ contrast[i])
        for i, r in enumerate(rows)
    ]
    assert (m["vsr/acc"], m["vsr/macro_f1"]) == pytest.approx(
        hand_acc_and_macro_f1(pred, [r.label for r in rows]), abs=1e-6
    )


def test_vsr_groups_i2t_and_t2i():
    row = lambda img, cap, label, rel: data.VSRRow(img, cap, label, rel, "x:1")  # noqa: E731
    rows = [
        row("a.jpg", "The cat is left of the dog.", True, "left of"),
        row("b.jpg", "The cat is left of the dog.", False, "left of"),
        row("c.jpg", "The cat is left of the dog.", False, "left of"),
        row("d.jpg", "The cat is with the dog.", True, "with"),
        row("e.jpg", "The cat is near the dog.", False, "near"),
    ]
    groups, skipped = clip_dpo.vsr_groups(rows)
    assert skipped == 1  # "with"
    i2t = [g for g in groups if g["queries"][0][0] == "i2t"]
    assert i2t == [
        {
            "images": ["a.jpg"],
            "texts": ["The cat is left of the dog.", "The cat is right of the dog."],
            "queries": [("i2t", 0, [0, 1], [0, 1])],
            "pos": [(0, 0)],
        }
    ]
    t2i = [g["images"] for g in groups if g["queries"][0][0] == "t2i"]
    assert t2i == [["a.jpg", "b.jpg"], ["a.jpg", "c.jpg"]]
    groups, _ = clip_dpo.vsr_groups(rows, false_rows=True)
    assert {
        "images": ["e.jpg"],
        "texts": ["The cat is near the dog.", "The cat is far from the dog."],
        "queries": [("i2t", 0, [0, 1], [1, 0])],
        "pos": [(0, 1)],
    } in groups


def test_vsr_flips_make_a_scene_and_its_mirror_group(tmp_path):
    """--vsr_flips: a left/right row's image and its left-right mirror, of which the contrast caption is
    true, in one 2x2 group (both images rank both captions and back); above/below rows only with "v";
    ImageGroups' twin is exactly the decoded pixels mirrored"""
    pixels = np.random.default_rng(0).integers(0, 256, (16, 16, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(tmp_path / "a.png")
    a = str(tmp_path / "a.png")
    row = lambda cap, label, rel: data.VSRRow(a, cap, label, rel, "x:1")  # noqa: E731
    rows = [
        row("The cat is left of the dog.", True, "left of"),
        row("The cup is above the bowl.", True, "above"),
        row("The cat is near the dog.", True, "near"),
        row("The cat is at the right side of the dog.", False, "at the right side of"),
    ]
    assert clip_dpo.vsr_groups(rows, flips="") == clip_dpo.vsr_groups(rows)  # off: the groups as before
    groups, skipped = clip_dpo.vsr_groups(rows, flips="h")
    assert skipped == 0 and len(groups) == 3  # the false row is no i2t group without --vsr_false_rows
    left, above, near = groups
    assert left == {
        "images": [a, a],
        "flips": [None, "h"],
        "texts": ["The cat is left of the dog.", "The cat is right of the dog."],
        "queries": [
            ("i2t", 0, [0, 1], [0, 1]),
            ("i2t", 1, [0, 1], [1, 0]),
            ("t2i", 0, [0, 1], [0, 1]),
            ("t2i", 1, [0, 1], [1, 0]),
        ],
        "pos": [(0, 0), (1, 1)],
    }
    assert "flips" not in above and "flips" not in near and len(above["images"]) == len(near["images"]) == 1
    groups, _ = clip_dpo.vsr_groups(rows, flips="hv")
    assert groups[1]["flips"] == [None, "v"] and groups[1]["texts"] == [
        "The cup is above the bowl.",
        "The cup is below the bowl.",
    ]
    assert "flips" not in groups[2]  # "near": no mirror makes "far from" true
    # a false row (--vsr_false_rows): its image prefers the contrast caption, the mirror the row's caption
    groups, _ = clip_dpo.vsr_groups(rows, false_rows=True, flips="h")
    false = groups[3]
    assert false["texts"] == [
        "The cat is at the right side of the dog.",
        "The cat is at the left side of the dog.",
    ]
    assert [q[3] for q in false["queries"]] == [[1, 0], [0, 1], [1, 0], [0, 1]] and false["pos"] == [
        (0, 1),
        (1, 0),
    ]
    # the pixels: the twin is the decoded image mirrored, the first image as read
    size = 8
    read = data.load_image(a, size)
    h, v = (
        clip_dpo.ImageGroups(groups, size)[0]["images"],
        clip_dpo.ImageGroups(clip_dpo.vsr_groups(rows, flips="hv")[0], size)[1]["images"],
    )
    assert torch.equal(h[0], data.to_tensor(read)) and torch.equal(h[1], data.to_tensor(read[:, ::-1].copy()))
    assert (
        torch.equal(h[1], h[0].flip(-1)) and torch.equal(v[1], v[0].flip(-2)) and not torch.equal(h[1], h[0])
    )
    # through make_batch: every image's best caption is its pos pair, and each caption's best image is its own
    args = argparse.Namespace(direction="both", context_length=16, imc_sets="all")
    (images, tokens, prefs), _ = clip_dpo.make_batch(
        [clip_dpo.ImageGroups(groups, size)[3]], args
    )  # the false row's group
    assert images.shape[0] == 2 and prefs["pos"].tolist() == [[0, 1], [1, 0]]
    best = {
        (q, c[r.index(0)])
        for q, c, r in zip(prefs["query"].tolist(), prefs["cand"].tolist(), prefs["rank"].tolist())
    }
    assert best == {
        (0, 3),
        (1, 2),
        (2, 1),
        (3, 0),
    }  # features [image, twin, caption, contrast]: image <-> contrast (false row), twin <-> caption


# -----------------------------------------------------------------------------
# rankings: the JSONL format, the reward model ranking candidates, DPO on the rankings


def write_candidates(root, n=6, size=32):
    os.makedirs(root / "imgs")
    with open(root / "candidates.jsonl", "w") as f:
        for i in range(n):
            s = shapes.sample_scene(shapes.scene_rng("rank", 0, i))
            twins = [s, shapes.mirror(s), shapes.swap_colours(s)]
            for j, t in enumerate(twins):
                Image.fromarray(shapes.render(t, size)).save(root / "imgs" / f"{i}_{j}.png")
            if i % 2:
                f.write(
                    json.dumps({"image": f"imgs/{i}_0.png", "texts": [t.caption() for t in twins][::-1]})
                    + "\n"
                )
            else:
                f.write(
                    json.dumps({"text": s.caption(), "images": [f"imgs/{i}_{j}.png" for j in (2, 0, 1)]})
                    + "\n"
                )


def test_read_rankings_format_and_errors(tmp_path):
    write_candidates(tmp_path)
    path = tmp_path / "candidates.jsonl"
    rows = data.read_rankings(str(path))
    assert [r["direction"] for r in rows] == ["t2i", "i2t"] * 3 and rows[0]["ranks"] == [0, 1, 2]
    assert rows[0]["candidates"][0] == str(tmp_path / "imgs" / "0_2.png") and rows[1]["query"] == str(
        tmp_path / "imgs" / "1_0.png"
    )
    bad = tmp_path / "bad.jsonl"
    for line, message in [
        ('{"image": "imgs/0_0.png", "texts": ["one"]}', "at least 2"),
        ('{"image": "imgs/0_0.png", "text": "x", "texts": ["a", "b"]}', "either"),
        ('{"image": "imgs/nope.png", "texts": ["a", "b"]}', "image imgs/nope.png not found"),
        ('{"text": "x", "images": ["imgs/0_0.png", "imgs/0_1.png"], "ranks": [1, 1]}', "all equal"),
        ('{"text": "x", "images": ["imgs/0_0.png", "imgs/0_1.png"], "ranks": [0]}', "2 integers"),
        ('{"text": "x", "images": [', "malformed JSON"),
    ]:
        bad.write_text(
            '{"text": "x", "images": ["imgs/0_0.png", "imgs/0_1.png"], "ranks": [0, 1]}\n' + line + "\n"
        )
        with pytest.raises(data.DataError, match=f"^{bad}:2: .*{message}"):
            data.read_rankings(str(bad))


def test_reward_model_ranks_candidates_and_dpo_learns_the_rankings(tmp_path, capsys):
    """--loss bt trains a reward model; eval.py --rank orders each row's candidates by its cosine
    (checked here against the model) and writes --data rankings' input; DPO trains on it."""
    write_candidates(tmp_path)
    init = tiny_ckpt(tmp_path / "init.pt")
    clip_dpo.main(
        ["--loss", "bt", "--init", init, "--max_steps", "2", "--out_dir", str(tmp_path / "rm"), *TINY]
    )
    os.makedirs(tmp_path / "elsewhere")
    out = tmp_path / "elsewhere" / "rankings.jsonl"
    ev.main(
        [
            "--model",
            str(tmp_path / "rm" / "ckpt.pt"),
            "--rank",
            str(tmp_path / "candidates.jsonl"),
            "--out",
            str(out),
        ]
    )
    ranked = data.read_rankings(str(out))  # readable from its own folder: paths were rewritten relative to it
    model, preprocess, tokenizer = load_model(str(tmp_path / "rm" / "ckpt.pt"))
    for line, row in zip(open(out), ranked):
        scores = json.loads(line)["scores"]
        assert scores == sorted(scores, reverse=True) and row["ranks"] == list(range(3))
        with torch.no_grad():
            if row["direction"] == "i2t":
                q = ev.encode_pil(model, preprocess, [row["query"]], "cpu")
                c = ev.encode_texts(model, tokenizer, row["candidates"], "cpu")
            else:
                q = ev.encode_texts(model, tokenizer, [row["query"]], "cpu")
                c = ev.encode_pil(model, preprocess, row["candidates"], "cpu")
        assert np.allclose((c @ q[0]).tolist(), scores, atol=1e-5)
    capsys.readouterr()
    clip_dpo.main(
        [
            "--data",
            "rankings",
            "--data_root",
            str(out),
            "--loss",
            "listwise",
            "--init",
            init,
            "--max_steps",
            "3",
            "--workers",
            "0",
            "--out_dir",
            str(tmp_path / "dpo"),
            *TINY,
        ]
    )
    stdout = capsys.readouterr().out
    assert (
        "step 1/3 | loss" in stdout
        and "reward_acc 0.500" in stdout
        and load_weights(tmp_path / "dpo")["step"] == 3
    )


@pytest.mark.slow
def test_hnc_groups_rank_a_positive_above_its_own_negatives(tmp_path):
    """--data hnc: each image (read item by item from negatives.read_hnc's index) asks about one of its
    positives with negatives, ranked above exactly those negatives; a positive without negatives is
    never chosen; the pick is deterministic per (seed, key) and differs across keys"""
    path = os.path.join(FIX, "hnc", "hnc_clean_strict_train.json")
    hnc = negatives.read_hnc(path)
    groups = clip_dpo.HNCGroups(hnc, 32, seed=0)
    seen = set()
    for key in range(16):
        g = groups[key]
        image, pairs = hnc[key % len(hnc)]
        assert (g["texts"][0], g["texts"][1:]) in [(p, n) for p, n in pairs if n]
        assert g["queries"] == [("i2t", 0, list(range(len(g["texts"]))), [0] + [1] * (len(g["texts"]) - 1))]
        assert g["texts"] == groups[key]["texts"]  # deterministic
        seen.add(g["texts"][0])
    assert (
        "the table is brown" in seen
        and "the cup is to the left of the plate" in seen
        and "a black dog" not in seen
    )
    init = tiny_ckpt(tmp_path / "init.pt")
    r = run(
        [
            "clip_dpo.py",
            "--data",
            "hnc",
            "--data_root",
            path,
            "--init",
            init,
            "--max_steps",
            "2",
            "--batch_size",
            "2",
            "--out_dir",
            str(tmp_path / "out"),
            "--eval_every",
            "0",
            "--workers",
            "0",
        ]
    )
    assert r.returncode == 0, r.stderr
    assert "hnc: 2 images with a positive caption (2 negatives without their positive dropped)" in r.stdout
    assert "step 2/2" in r.stdout and "has no eval split here" in r.stdout
    r = run_here(
        [
            "clip_dpo.py",
            "--data",
            "hnc",
            "--data_root",
            path,
            "--init",
            init,
            "--direction",
            "t2i",
            "--out_dir",
            str(tmp_path / "o2"),
        ]
    )
    assert r.returncode != 0 and "--data hnc gives captions ranked for an image only" in r.stderr


@pytest.mark.parametrize("which", ["vsr", "hnc"])
def test_real_images_follow_the_inits_preprocessing(which):
    """--init ViT-L-14:laion2b_s32b_b82k (mean / std 0.5): make_data's groups hold the pixels open_clip's
    evaluation transform of that tag gives (read from its config: no weights, no download)"""
    init = "ViT-L-14:laion2b_s32b_b82k"
    root = FIXTURE if which == "vsr" else os.path.join(FIX, "hnc", "hnc_clean_strict_train.json")
    args = clip_dpo.get_args(
        [
            "--data",
            which,
            "--data_root",
            root,
            "--init",
            init,
            "--direction",
            "i2t" if which == "hnc" else "both",
        ]
    )
    assert args.preprocess == model.init_preprocess(init) and args.preprocess["mean"] == (0.5, 0.5, 0.5)
    dataset, _, _ = clip_dpo.make_data(args, 0, 1)
    key = next(k for k in range(len(dataset)) if dataset[k] is not None)
    path = (dataset.groups[key]["images"] if which == "vsr" else [dataset.hnc[key][0]])[0]
    transform = open_clip.transform.image_transform_v2(
        open_clip.transform.PreprocessCfg(size=224, **args.preprocess), is_train=False
    )
    assert torch.equal(dataset[key]["images"][0], transform(Image.open(path).convert("RGB")))
    # OpenAI's mean and std
    assert not torch.equal(dataset[key]["images"][0], data.to_tensor(data.load_image(path, 224)))


def test_each_weight_is_its_own_flag_and_alpha_a_shorthand():
    default = clip_dpo.get_args([])
    assert (default.alpha, default.clip_weight, default.pref_weight, default.imc_weight) == (
        0.75,
        0.75,
        0.25,
        0.225,
    )
    control = clip_dpo.get_args(["--pref_weight", "0"])  # the preference term removed, nothing else changed
    assert (control.clip_weight, control.pref_weight, control.imc_weight, control.imc_steps) == (
        0.75,
        0.0,
        0.225,
        1000,
    )
    assert (
        clip_dpo.get_args(["--alpha", "1"]).clip_weight,
        clip_dpo.get_args(["--alpha", "1"]).pref_weight,
    ) == (1.0, 0.0)
    assert clip_dpo.get_args(["--loss", "dpo"]).clip_weight == 0.0


def test_the_kick_can_skip_the_statement_sets():
    """--imc_sets captions: the intra-modal term's i2t sets are the caption sets only, never the statements"""
    groups = [
        clip_dpo.shapes_group(shapes.sample_scene(shapes.scene_rng("dpo", 0, k)), 32, True, "mirror")
        for k in range(3)
    ]
    every, captions = batch_of(groups)[2], batch_of(groups, imc_sets="captions")[2]
    n_images = 2 * 3
    texts = [t for g in groups for t in g["texts"]]

    def candidates(prefs):
        return [[texts[int(c) - n_images] for c in prefs["cand"][m]] for m in prefs["i2t"].tolist()]

    # per image: its caption set and its statement set
    assert len(every["i2t"]) == 12 and len(captions["i2t"]) == 6
    # captions only: no statement
    assert all(" is " not in t for cands in candidates(captions) for t in cands)
    assert sum(all(" is " in t for t in cands) for cands in candidates(every)) == 6


def test_the_kick_can_last_a_fraction_of_the_run():
    """--imc_fraction (the real-data preset's 1/3): the intra-modal term on for round(fraction x max_steps)
    steps when --imc_steps is not given; --imc_steps wins; 0 or None: every step"""
    policy, reference, batch = tiny_policy_and_batch()
    on = lambda step, **kw: (
        "imc"
        in clip_dpo.step_loss(
            policy, batch, args_for("dpo", imc_weight=0.3, **kw), state_of(reference, step)
        )[1]
    )  # noqa: E731
    fraction = {"imc_steps": None, "imc_fraction": 1 / 3, "max_steps": 10}  # the first round(3.33) = 3 steps
    assert [on(s, **fraction) for s in (0, 2, 3, 9)] == [True, True, False, False]
    assert [on(s, **fraction | {"imc_steps": 5}) for s in (4, 5)] == [True, False]
    assert on(9, imc_steps=None, imc_fraction=None, max_steps=10) and on(
        9, imc_steps=None, imc_fraction=0.0, max_steps=10
    )


def test_replay_pairs_join_clips_term_only(tmp_path):
    """--replay_root: another dataset's image-caption pairs as groups without a preference: `share` of
    all groups, each pair once; in a batch they add true pairs to CLIP's term and no preference row"""
    items = [(f"{k}.jpg", [f"caption {k} a", f"caption {k} b"]) for k in range(10)]
    replay = clip_dpo.replay_groups(items, n_preference=4, share=0.5)
    assert [g["texts"] for g in replay] == [
        ["caption 0 a"],
        ["caption 1 b"],
        ["caption 2 a"],
        ["caption 3 b"],
    ]
    assert all(g["queries"] == [] and g["pos"] == [(0, 0)] for g in replay)
    assert len(clip_dpo.replay_groups(items, n_preference=30, share=0.5)) == 10  # every pair at most once
    vsr = clip_dpo.shapes_group(shapes.sample_scene(shapes.scene_rng("dpo", 0, 0)), 32, False, "mirror")
    pair = {"images": [vsr["images"][0]], "texts": ["a photo"], "queries": [], "pos": [(0, 0)]}
    images, tokens, prefs = batch_of([vsr, pair])
    assert len(images) == 3 and len(tokens) == 3  # the group's 2 images and 2 captions, and the pair
    # (image, text): the pair is image 2 with its text 2 (text 3 + 2 of [images; texts])
    assert prefs["pos"].tolist() == [[0, 0], [1, 1], [2, 2]]
    # no preference row of the pair: 4 rows, the group's
    assert len(prefs["query"]) == 4 and (prefs["query"] != 2).all() and (prefs["query"] != 3 + 2).all()


@pytest.mark.parametrize(
    "argv",
    [
        ["--replay_root", "x"],
        ["--data", "hnc", "--replay_root", "x"],
        ["--data", "vsr", "--replay_root", "x", "--replay_share", "1"],
    ],
)
def test_replay_where_it_would_be_ignored_is_refused(argv, capsys):
    with pytest.raises(SystemExit):
        clip_dpo.get_args([*argv, "--init", "x"])
    assert "--replay_root: for --data vsr or rankings" in capsys.readouterr().err


def test_distill_matches_a_naive_kl_and_is_zero_at_the_reference():
    """distill_loss: per pair, the mean of the two directions' KL(reference softmax || policy softmax)
    over the pairs' captions (images), against F.kl_div row by row; 0 where policy == reference"""
    torch.manual_seed(0)
    P, D = 5, 8
    image, text, ref_image, ref_text = (F.normalize(torch.randn(P, D), dim=-1) for _ in range(4))
    s, s_ref = torch.tensor(7.0), torch.tensor(5.0)
    got = clip_dpo.distill_loss(image, text, ref_image, ref_text, s, s_ref)
    for p in range(P):
        i2t = F.kl_div(
            F.log_softmax(s * image[p] @ text.T, -1),
            F.log_softmax(s_ref * ref_image[p] @ ref_text.T, -1),
            log_target=True,
            reduction="sum",
        )
        t2i = F.kl_div(
            F.log_softmax(s * text[p] @ image.T, -1),
            F.log_softmax(s_ref * ref_text[p] @ ref_image.T, -1),
            log_target=True,
            reduction="sum",
        )
        assert got[p].item() == pytest.approx(0.5 * (i2t + t2i).item(), rel=1e-5)
    assert clip_dpo.distill_loss(image, text, image, text, s, s).abs().max() < 1e-6


def test_distill_is_on_the_replayed_pairs_only():
    """--distill_weight adds w * distill over the pos rows of the groups without queries (the
    --replay_root pairs): prefs["replay"] marks exactly them, and step_loss's term is distill_loss on them"""
    policy, reference, _ = tiny_policy_and_batch()
    with torch.no_grad():  # the policy moved off the reference, so the KL is not 0
        for p in policy.parameters():
            p.add_(0.05 * torch.randn_like(p))
    group = clip_dpo.shapes_group(shapes.sample_scene(shapes.scene_rng("dpo", 0, 0)), 32, False, "mirror")
    pairs = [
        {"images": [group["images"][k]], "texts": [f"a photo {k}"], "queries": [], "pos": [(0, 0)]}
        for k in range(2)
    ]
    batch = batch_of([pairs[0], group, pairs[1]])
    prefs = batch[2]
    assert prefs["pos"][prefs["replay"]].tolist() == [[0, 0], [3, 3]]  # the pairs: images 0 and 3
    args = args_for("dpo_clip", alpha=0.75)
    base, _ = clip_dpo.step_loss(policy, batch, args, state_of(reference))
    args.distill_weight = 2.0
    loss, stats = clip_dpo.step_loss(policy, batch, args, state_of(reference))
    images, texts, _ = batch
    with torch.no_grad():
        f_img, f_txt, scale = policy(images, texts)
        r_img, r_txt, r_scale = reference(images, texts)
    i, t = torch.tensor([0, 3]), torch.tensor([0, 3])
    expected = clip_dpo.distill_loss(f_img[i], f_txt[t], r_img[i], r_txt[t], scale, r_scale).mean()
    assert stats["distill"].item() == pytest.approx(expected.item(), rel=1e-5) and expected > 1e-4
    assert loss.item() == pytest.approx(base.item() + 2.0 * expected.item(), rel=1e-5)


@pytest.mark.parametrize("argv", [["--distill_weight", "1"], ["--data", "vsr", "--distill_weight", "1"]])
def test_distill_without_replay_is_refused(argv, capsys):
    with pytest.raises(SystemExit):
        clip_dpo.get_args([*argv, "--init", "x"])
    assert "--distill_weight: the KL is on the --replay_root pairs" in capsys.readouterr().err


def test_replayed_pairs_take_their_captions_in_turn(tmp_path):
    """A replayed image sees its captions one an epoch, in turn from caption k mod n (the first epoch
    as before), so the anchor is the start's whole training signal, not one caption per image"""
    for k in range(3):
        Image.fromarray(np.full((8, 8, 3), 40 * k, np.uint8)).save(tmp_path / f"{k}.png")
    items = [(str(tmp_path / f"{k}.png"), [f"{k} a", f"{k} b", f"{k} c"]) for k in range(3)]
    groups = clip_dpo.ImageGroups(clip_dpo.replay_groups(items, n_preference=3, share=0.5), 8)
    seen = [[groups[epoch * 3 + k]["texts"][0] for epoch in range(4)] for k in range(3)]
    assert seen == [["0 a", "0 b", "0 c", "0 a"], ["1 b", "1 c", "1 a", "1 b"], ["2 c", "2 a", "2 b", "2 c"]]
