"""clip_hardneg.py: each loss against a naive per-sample loop of its formula, the distributed losses
(2 gloo processes) against one process with the full batch, CE-CLIP's threshold state, HNC's L2-SP
and KL teacher, and the CLI's fine-tune modes, DDP, resume, export, real-data and failure paths."""

import argparse
import copy
import math
import os
import subprocess
import sys

import open_clip
import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from helpers import FIX, ROOT, gloo_processes, killed_and_resumed, load_weights, run, tiny_ckpt, torchrun

import clip_hardneg as hn
import negatives
import shapes
from model import CLIP, model_config, param_groups, set_trainable


def features(B=6, K=3, D=8, seed=0, invalid=((0, 1), (2, 0), (2, 2), (5, 1))):
    g = torch.Generator().manual_seed(seed)
    v, t, n = (
        F.normalize(torch.randn(*shape, generator=g, dtype=torch.float64), dim=-1)
        for shape in ((B, D), (B, D), (B, K, D))
    )
    valid = torch.ones(B, K, dtype=torch.bool)
    for i, k in invalid:
        valid[i, k] = False
    return v, t, n, valid


def naive_negclip(v, t, n, valid, s, w=1.0):
    B, K = valid.shape
    total = 0.0
    for i in range(B):
        row = [s * v[i] @ t[j] for j in range(B)]
        row += [
            s * v[i] @ n[j, k] + (math.log(w) if j == i and w > 0 else 0.0)
            for j in range(B)
            for k in range(K)
            if valid[j, k] and not (j == i and w == 0)
        ]
        col = [s * t[i] @ v[j] for j in range(B)]
        total = total - torch.log_softmax(torch.stack(row), 0)[i] - torch.log_softmax(torch.stack(col), 0)[i]
    return total / (2 * B)


def naive_cmr(pos, neg, valid, tau, ub):
    B, K = len(valid), len(valid[0])
    terms = [max(0.0, tau[k] + neg[i][k] - pos[i]) for i in range(B) for k in range(K) if valid[i][k]]
    loss = sum(terms) / len(terms) if terms else 0.0
    new = []
    for k in range(K):
        col = [neg[i][k] for i in range(B) if valid[i][k]]
        new.append(min(ub, max(0.0, sum(pos) / B - sum(col) / len(col))) if col else tau[k])
    return loss, new


def naive_imc(v, t, n, valid, s):
    total = 0.0
    for i in range(len(v)):
        logits = [s * v[i] @ t[i]] + [s * t[i] @ n[i, k] for k in range(valid.shape[1]) if valid[i, k]]
        total = total - torch.log_softmax(torch.stack(logits), 0)[0]
    return total / len(v)


def naive_kl(student, teacher, T):
    total = 0.0
    for i in range(len(student)):
        p = torch.softmax(teacher[i] / T, 0)
        total = total + sum(
            p[j] * (torch.log(p[j]) - torch.log_softmax(student[i] / T, 0)[j]) for j in range(len(p))
        )
    return T * T * total / len(student)


@pytest.mark.parametrize("w", [1.0, 2.5, 0.3, 0.0])
def test_negclip_and_hnc_weighted_loss_match_naive_loop(w):
    v, t, n, valid = features()
    s = torch.tensor(11.0, dtype=torch.float64)
    loss, stats = hn.negclip_loss(v, t, n, valid, s, hn_weight=w)
    torch.testing.assert_close(
        loss.double(), naive_negclip(v, t, n, valid, 11.0, w).double(), atol=1e-5, rtol=0
    )
    hn_acc = [(v[i] @ t[i] > v[i] @ n[i, k]).item() for i in range(6) for k in range(3) if valid[i, k]]
    assert stats["hn_acc"].item() == pytest.approx(sum(hn_acc) / len(hn_acc))
    # without any valid negative it is plain CLIP
    loss, _ = hn.negclip_loss(v, t, n, torch.zeros_like(valid), s)
    torch.testing.assert_close(
        loss.double(), naive_negclip(v, t, n, torch.zeros_like(valid), 11.0).double(), atol=1e-5, rtol=0
    )


def test_cmr_and_adaptive_threshold_follow_their_definition_over_steps():
    g = torch.Generator().manual_seed(1)
    ub, tau = 10.0, torch.zeros(3)  # starts at 0
    for step in range(4):
        pos = 20 + 3 * torch.randn(5, generator=g)
        neg = 18 + 3 * torch.randn(5, 3, generator=g)
        valid = torch.rand(5, 3, generator=g) > 0.3
        # type 2 has no valid item on even steps: contributes 0, keeps its threshold
        valid[:, 2] = step % 2 == 1
        if step == 2:
            neg[:, 0] -= 50  # a huge gap: clamped to upper_bound
        if step == 3:
            neg[:, 1] += 50  # a negative gap: clamped to 0
        pos.requires_grad_(True)
        loss, new = hn.cmr_loss(pos, neg, valid, tau, ub)
        want_loss, want_tau = naive_cmr(pos.tolist(), neg.tolist(), valid.tolist(), tau.tolist(), ub)
        assert loss.item() == pytest.approx(want_loss, abs=1e-4)
        torch.testing.assert_close(new, torch.tensor(want_tau), atol=1e-4, rtol=0)
        assert not new.requires_grad and torch.isfinite(loss) and torch.isfinite(new).all()
        if step == 2:
            assert new[0].item() == ub
        if step == 3:
            assert new[1].item() == 0.0
        if step % 2 == 0:
            assert new[2].item() == tau[2].item()
        tau = new  # the next step uses this step's statistics
    # no valid negative at all: loss 0, thresholds unchanged, no NaN
    loss, new = hn.cmr_loss(
        torch.ones(3), torch.ones(3, 2), torch.zeros(3, 2, dtype=torch.bool), torch.tensor([1.0, 2.0])
    )
    assert loss.item() == 0.0 and new.tolist() == [1.0, 2.0]


def test_imc_and_kl_match_naive_loops():
    v, t, n, valid = features()
    valid[4] = False  # a row without valid negatives contributes 0
    s = torch.tensor(7.0, dtype=torch.float64)
    torch.testing.assert_close(
        hn.imc_loss(v, t, n, valid, s).double(), naive_imc(v, t, n, valid, 7.0).double(), atol=1e-5, rtol=0
    )
    g = torch.Generator().manual_seed(3)
    student, teacher = 5 * torch.randn(4, 9, generator=g), 5 * torch.randn(4, 9, generator=g)
    torch.testing.assert_close(
        hn.kl_loss(student, teacher, 2.0), naive_kl(student, teacher, 2.0), atol=1e-5, rtol=0
    )
    assert hn.kl_loss(teacher, teacher, 2.0).abs().item() < 1e-6


# -----------------------------------------------------------------------------
# distributed: 2 gloo processes, each with half the batch, == 1 process with the full batch


def _ddp_worker(rank, inputs, out):
    v, t, n, valid, s, tau, teacher = inputs
    B = len(v) // dist.get_world_size()
    part = slice(rank * B, (rank + 1) * B)
    v, t, n = (x[part].clone().requires_grad_(True) for x in (v, t, n))
    s = s.clone().requires_grad_(True)
    results = {}
    for name in ("negclip", "hnc", "cmr", "imc", "kl"):
        for x in (v, t, n, s):
            x.grad = None
        if name in ("negclip", "hnc"):
            loss = hn.negclip_loss(v, t, n, valid[part], s, hn_weight=1.0 if name == "negclip" else 2.0)[0]
        elif name == "cmr":
            loss, new = hn.cmr_loss(
                s * (v * t).sum(-1), s * torch.einsum("bd,bkd->bk", v, n), valid[part], tau, 3.0
            )
            results["tau"] = new
        elif name == "imc":
            loss = hn.imc_loss(v, t, n, valid[part], s)
        else:
            student, _ = hn.candidates(v, t, n, valid[part], s)
            teacher_logits, _ = hn.candidates(*(x[part] for x in teacher[:3]), valid[part], teacher[3])
            loss = hn.kl_loss(student, teacher_logits, 2.0)
        loss.backward()
        results[name] = (loss.detach(), v.grad.clone(), t.grad.clone(), n.grad.clone(), s.grad.clone())
    torch.save(results, f"{out}.{rank}")


@pytest.mark.slow
def test_distributed_losses_equal_single_process_full_batch(tmp_path):
    """rank r's gradient w.r.t. its own features / world == the full-batch gradient of that slice
    (DDP averages), the mean of the ranks' losses == the full-batch loss; invalid negatives sit
    unevenly on the two ranks."""
    v, t, n, valid = features(B=8, invalid=((0, 1), (1, 1), (2, 0), (3, 2), (5, 1)))
    v, t, n = v.float(), t.float(), n.float()
    s, tau = torch.tensor(9.0), torch.tensor([0.5, 1.0, 0.0])
    teacher = (*(F.normalize(x + 0.3 * torch.randn_like(x), dim=-1) for x in (v, t, n)), torch.tensor(12.0))
    gloo_processes(tmp_path, _ddp_worker, (v, t, n, valid, s, tau, teacher), str(tmp_path / "out"))
    ranks = [torch.load(tmp_path / f"out.{r}", weights_only=True) for r in range(2)]
    for name in ("negclip", "hnc", "cmr", "imc", "kl"):
        full = [x.clone().requires_grad_(True) for x in (v, t, n, s)]
        if name in ("negclip", "hnc"):
            loss = hn.negclip_loss(*full[:3], valid, full[3], hn_weight=1.0 if name == "negclip" else 2.0)[0]
        elif name == "cmr":
            fv, ft, fn, fs = full
            loss, new = hn.cmr_loss(
                fs * (fv * ft).sum(-1), fs * torch.einsum("bd,bkd->bk", fv, fn), valid, tau, 3.0
            )
            for r in ranks:
                torch.testing.assert_close(r["tau"], new)
        elif name == "imc":
            loss = hn.imc_loss(*full[:3], valid, full[3])
        else:
            loss = hn.kl_loss(
                hn.candidates(*full[:3], valid, full[3])[0],
                hn.candidates(*teacher[:3], valid, teacher[3])[0],
                2.0,
            )
        loss.backward()
        assert sum(r[name][0] for r in ranks).item() / 2 == pytest.approx(loss.item(), abs=1e-5), name
        for j in range(3):  # v, t, n: each rank holds its half
            got = torch.cat([r[name][1 + j] for r in ranks]) / 2
            torch.testing.assert_close(got, full[j].grad, atol=1e-5, rtol=1e-4, msg=f"{name} grad {j}")
        torch.testing.assert_close(sum(r[name][4] for r in ranks) / 2, full[3].grad, atol=1e-5, rtol=1e-4)


# -----------------------------------------------------------------------------
# step_loss with a real model: CE-CLIP's state, HNC's L2-SP and teacher


def tiny_setup(loss="ceclip", **kw):
    torch.manual_seed(0)
    clip = CLIP(**model_config("tiny", 32, 32))
    args = hn.get_args(["--loss", loss, *sum(([f"--{k}", str(v)] for k, v in kw.items()), [])])
    args.context_length = 32
    ds = hn.ShapesHardNegatives(32, 0, args.neg_types, True)
    batch, _ = hn.make_batch([ds[i] for i in range(4)], args)
    state = argparse.Namespace(step=0, threshold=torch.zeros(2), teacher=None, init_params=None, clip=clip)
    return clip, args, batch, state


def hand_thresholds(model, batch, previous, upper_bound):
    """CE-CLIP's thresholds after a step on batch, by hand from the model's scores (before the
    update): S(i, x) = s * v_i . x for every row i, one at a time, then naive_cmr's tau_k =
    mean_i S(i, t_i) - mean over valid i of S(i, n_ik) clamped to [0, upper_bound] (previous where no
    i is valid)"""
    images, captions, negs, valid = batch
    B, K = valid.shape
    with torch.no_grad():
        v, text, s = model(images, torch.cat([captions, negs.flatten(0, 1)]))
    pos = [float(s * v[i] @ text[i]) for i in range(B)]
    neg = [[float(s * v[i] @ text[B + i * K + k]) for k in range(K)] for i in range(B)]
    return naive_cmr(pos, neg, valid.tolist(), previous, upper_bound)[1]


def test_step_loss_ceclip_threshold_comes_from_the_previous_step():
    """each step uses the thresholds computed by hand from the previous step's scores (0 at the
    first), over the valid negatives only; --cmr_upper_bound 0.05 makes the run meet both clamps"""
    clip, args, batch, state = tiny_setup("ceclip", cmr_upper_bound=0.05)
    batch[3][0, 0] = batch[3][5, 1] = batch[3][6, 1] = False  # invalid negatives: out of their type's mean
    opt = torch.optim.AdamW(clip.parameters(), lr=1e-3)
    hand, used = [[0.0, 0.0]], []
    for _ in range(3):
        hand.append(hand_thresholds(clip, batch, hand[-1], 0.05))  # this step's scores, before the update
        loss, stats = hn.step_loss(clip, batch, args, state)
        used.append([stats["tau0"].item(), stats["tau1"].item()])
        assert state.threshold.tolist() == pytest.approx(hand[-1], abs=1e-5)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert used == [pytest.approx(h, abs=1e-5) for h in hand[:3]]  # the previous step's: [0, 0] at the first
    # this run's hand values pass through both clamps and between them (so the checks above are not all zeros)
    assert hand[1][1] == 0.0 and 0.0 < hand[1][0] < 0.05 and hand[2][0] == 0.05, hand


def test_l2sp_is_zero_at_start_and_its_gradient_is_2_lambda_delta():
    clip, args, batch, state = tiny_setup("hnc", l2sp=0.05)
    state.init_params = {n: p.detach().clone() for n, p in clip.named_parameters() if n != "logit_scale"}
    _, stats = hn.step_loss(clip, batch, args, state)
    assert stats["l2sp"].item() == 0.0
    with torch.no_grad():
        for p in clip.parameters():
            p.add_(0.01 * torch.randn_like(p))
    grads = []
    for lam in (0.05, 0.0):
        args.l2sp = lam
        clip.zero_grad()
        hn.step_loss(clip, batch, args, state)[0].backward()
        grads.append({n: p.grad.clone() for n, p in clip.named_parameters()})
    for name, p in clip.named_parameters():
        want = (
            2 * 0.05 * (p.detach() - state.init_params[name])
            if name != "logit_scale"
            else torch.zeros_like(p)
        )
        torch.testing.assert_close(grads[0][name] - grads[1][name], want, atol=1e-6, rtol=1e-4, msg=name)


def test_kl_teacher_is_frozen_and_the_student_term_trains():
    clip, args, batch, state = tiny_setup("hnc", kl_weight=1.0)
    state.teacher = copy.deepcopy(clip).eval().requires_grad_(False)
    before = {k: v.clone() for k, v in state.teacher.state_dict().items()}
    with torch.no_grad():
        teacher_out = state.teacher.encode_text(batch[1])
    opt = torch.optim.AdamW(param_groups(clip, 0.1), lr=1e-3)
    assert not any(p is q for g in opt.param_groups for p in g["params"] for q in state.teacher.parameters())
    kls = []
    for _ in range(4):
        loss, stats = hn.step_loss(clip, batch, args, state)
        kls.append(stats["kl"].item())
        opt.zero_grad()
        loss.backward()
        opt.step()
    # student == teacher at step 0, then they part
    assert kls[0] == pytest.approx(0.0, abs=1e-6) and kls[-1] > 0
    assert all(torch.equal(v, before[k]) for k, v in state.teacher.state_dict().items())
    with torch.no_grad():
        assert torch.equal(state.teacher.encode_text(batch[1]), teacher_out)
    # the KL term alone has a gradient and lowers the KL: the student term is not under no_grad
    args.hn_weight, args.kl_weight = 1.0, 1.0
    for _ in range(2):
        clip.zero_grad()
        with_kl, _ = hn.step_loss(clip, batch, args, state)
        args.kl_weight = 0.0
        without, _ = hn.step_loss(clip, batch, args, state)
        args.kl_weight = 1.0
        (with_kl - without).backward()
        assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in clip.parameters())
    kl_before = hn.step_loss(clip, batch, args, state)[1]["kl"]
    with torch.no_grad():
        for p in clip.parameters():
            if p.grad is not None:
                p.sub_(1e-2 * p.grad)
    assert hn.step_loss(clip, batch, args, state)[1]["kl"] < kl_before


class StubCLIP(torch.nn.Module):
    """a CLIP that returns fixed features: rows `images` of image, rows `texts` of text, and scale"""

    def __init__(self, image, text, scale):
        super().__init__()
        self.image, self.text = torch.nn.Parameter(image), torch.nn.Parameter(text)
        self.logit_scale = torch.nn.Parameter(torch.tensor(math.log(scale)))

    def forward(self, images, texts):
        return self.image[images], self.text[texts], self.logit_scale.exp()


@pytest.mark.parametrize(
    "loss, kw",
    [
        ("negclip", {}),
        ("ceclip", {"cmr_weight": 0.2}),
        ("hnc", {"hn_weight": 2.0}),
        ("hnc", {"kl_weight": 1.0}),
    ],
)
def test_scores_are_fp32_under_bf16_autocast(loss, kw):
    """the GPU path on CPU (CPU autocast runs matmul / bmm in bf16 as CUDA's does): the same step from
    the same features, under bf16 autocast and in fp32, gives the same loss, stats and CE-CLIP
    thresholds to fp32 precision; the KL teacher is the student, so its KL is 0 under autocast too.
    Features are correlated (cosines ~0.8, logits ~80, where a bf16 step is 0.5)."""
    B, K, D = 8, 2, 32
    g = torch.Generator().manual_seed(0)
    base = torch.randn(D, generator=g)
    image, text = (F.normalize(base + 0.5 * torch.randn(n, D, generator=g), dim=-1) for n in (B, B + B * K))
    model = StubCLIP(image, text, 100.0)
    valid = torch.ones(B, K, dtype=torch.bool)
    valid[1, 0] = valid[4, 1] = False
    batch = (torch.arange(B), torch.arange(B), torch.arange(B, B + B * K).view(B, K), valid)
    args = hn.get_args(["--loss", loss, *sum(([f"--{k}", str(v)] for k, v in kw.items()), [])])
    out = []
    for precision in (torch.float32, torch.bfloat16):
        state = argparse.Namespace(
            step=0,
            threshold=torch.tensor([0.5, 1.0]),
            teacher=copy.deepcopy(model).requires_grad_(False),
            init_params=None,
            clip=model,
        )
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == torch.bfloat16):
            loss_value, stats = hn.step_loss(model, batch, args, state)
        out.append((loss_value, stats, state.threshold))
    (loss32, stats32, tau32), (loss16, stats16, tau16) = out
    assert loss16.dtype == torch.float32 and stats16.keys() == stats32.keys()
    torch.testing.assert_close(loss16, loss32, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(tau16, tau32, rtol=1e-5, atol=1e-6)
    for k in stats32:
        torch.testing.assert_close(stats16[k].float(), stats32[k].float(), rtol=1e-5, atol=1e-6, msg=k)
    if "kl" in stats16:
        assert stats16["kl"].abs().item() < 1e-6


def test_hn_weight_ramps_linearly():
    args = hn.get_args(["--loss", "hnc", "--hn_weight", "3", "--hn_warmup_steps", "10"])
    assert [hn.hn_weight_at(s, args) for s in (0, 5, 10, 50)] == [0.0, 1.5, 3.0, 3.0]


def test_shapes_batches_hold_scenes_and_their_twins():
    clip, args, batch, state = tiny_setup("negclip")
    ds = hn.ShapesHardNegatives(32, 0, ("relation", "attribute_swap"), True)
    for key in range(4):
        (_, cap, negs), (_, twin_cap, twin_negs) = ds[key]
        s = shapes.sample_scene(shapes.scene_rng("hardneg", 0, key))
        assert cap == s.caption() and negs == [shapes.relation_flip(s), shapes.attribute_swap(s)]
        # the mirror's caption is the relation negative, the colour swap's the attribute one
        assert twin_cap == negs[key % 2]
        assert twin_negs[key % 2] == cap
    images, captions, negatives, valid = batch
    assert images.shape == (8, 3, 32, 32) and negatives.shape[:2] == (8, 2) and valid.all()
    # the tokens are cut at the batch's longest text (data.trim_tokens): its EOT is the last column
    L = captions.shape[1]
    assert (
        negatives.shape[2] == L < 32 and max(captions.argmax(-1).max(), negatives.argmax(-1).max()) == L - 1
    )


def test_negclip_samples_bring_one_of_their_neg_image_rows():
    import data

    rows = negatives.read_negclip(os.path.join(FIX, "negclip", "train_neg_clip.tsv"))
    ds = hn.HardNegatives([(p, [(c, [negs])], nr) for p, c, negs, nr in rows], 32, 0, None, True)
    picked = set()
    for key in range(16):  # 4 epochs of 4 items
        i = key % 4
        (image, cap, negs), (twin_image, twin_cap, twin_negs) = ds[key]
        j = [r[1] for r in rows].index(twin_cap)
        assert cap == rows[i][1] and negs[0] in rows[i][2] and j in rows[i][3] and twin_negs[0] in rows[j][2]
        assert torch.equal(twin_image, data.to_tensor(data.load_image(rows[j][0], 32)))
        assert ds[key][1][1] == twin_cap  # a pure function of (seed, key)
        picked.add((i, j))
    assert len(picked) > 4  # the neg image row is drawn per epoch


# -----------------------------------------------------------------------------
# the CLI, for real (tiny settings, CPU)


@pytest.fixture(scope="module")
def init(tmp_path_factory):
    return tiny_ckpt(tmp_path_factory.mktemp("init") / "init.pt")


TINY = ["--batch_size", "8", "--eval_every", "0", "--log_every", "1", "--eval_n", "40", "--warmup_steps", "1"]


@pytest.mark.slow
def test_torchrun_two_cpu_processes_equal_one_process_full_batch(tmp_path, init, monkeypatch):
    """torchrun's 2 gloo ranks x batch 4 == 1 process x batch 8 (run in process, its steps watched):
    the weights, and CE-CLIP's thresholds, which the checkpoint keeps as computed by hand from the
    last step's scores"""
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
        "--loss",
        "ceclip",
        "--cmr_weight",
        "0.2",
        "--neg_images",
    ]
    hand, real = [], hn.step_loss

    def spy(model, batch, args, state):
        hand.append(
            hand_thresholds(
                model, batch, hand[-1] if hand else [0.0] * batch[3].shape[1], args.cmr_upper_bound
            )
        )
        return real(model, batch, args, state)

    monkeypatch.setattr(hn, "step_loss", spy)
    torch.set_num_threads(1)
    hn.main(["--batch_size", "8", "--out_dir", str(tmp_path / "one"), *common])
    ddp = torchrun(["clip_hardneg.py", "--batch_size", "4", "--out_dir", str(tmp_path / "two"), *common])
    assert ddp.returncode == 0, ddp.stderr
    a, b = load_weights(tmp_path / "one"), load_weights(tmp_path / "two")
    start = torch.load(init, weights_only=True)["model"]
    for k in a["model"]:
        assert torch.allclose(a["model"][k], b["model"][k], atol=2e-5), k
    assert len(hand) == 3 and a["threshold"].tolist() == pytest.approx(hand[-1], abs=1e-5), hand
    torch.testing.assert_close(a["threshold"], b["threshold"], atol=1e-4, rtol=0)
    assert any(not torch.equal(a["model"][k], start[k]) for k in start)


@pytest.mark.slow
def test_resume_after_sigkill_is_bit_identical(tmp_path, init):
    args = [
        "clip_hardneg.py",
        "--init",
        init,
        "--max_steps",
        "10",
        "--ckpt_every",
        "2",
        "--loss",
        "ceclip",
        "--cmr_weight",
        "0.2",
        "--neg_images",
        *TINY,
    ]
    _, a, b = killed_and_resumed(tmp_path, args)
    assert torch.equal(a["threshold"], b["threshold"])
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["text", "vision"])
def test_finetune_modes_train_exactly_their_parameters(tmp_path, init, mode):
    r = run(
        [
            "clip_hardneg.py",
            "--init",
            init,
            "--max_steps",
            "2",
            "--finetune",
            mode,
            "--lr",
            "1e-3",
            "--out_dir",
            str(tmp_path),
            *TINY,
        ]
    )
    assert r.returncode == 0, r.stderr
    ckpt, start = load_weights(tmp_path), torch.load(init, weights_only=True)["model"]
    model = CLIP(**model_config("tiny", 32, 32))
    trainable = set(set_trainable(model, mode))
    for k, v in ckpt["model"].items():
        assert torch.equal(v, start[k]) != (k in trainable), (mode, k)  # trained iff trainable
    assert len(ckpt["optimizer"]["state"]) == len(trainable)  # frozen parameters are not in the optimizer


def test_checkpoint_loads_strict_in_open_clip_and_export(tmp_path, init):
    r = run(
        [
            "clip_hardneg.py",
            "--init",
            init,
            "--max_steps",
            "2",
            "--loss",
            "hnc",
            "--kl_weight",
            "1",
            "--l2sp",
            "0.01",
            "--hn_warmup_steps",
            "2",
            "--export",
            str(tmp_path / "hub"),
            "--out_dir",
            str(tmp_path),
            *TINY,
        ]
    )
    assert r.returncode == 0, r.stderr
    assert "| probe/relation |" in r.stdout  # the start / end table
    ckpt = load_weights(tmp_path)
    theirs = open_clip.CLIP(**ckpt["model_cfg"]).eval()
    theirs.load_state_dict(ckpt["model"], strict=True)
    hub, _, _ = open_clip.create_model_and_transforms(f"local-dir:{tmp_path / 'hub'}")
    hub.eval()
    images = torch.randn(2, 3, 32, 32)
    tokens = open_clip.tokenizer.SimpleTokenizer(context_length=32)(
        ["a small red circle left of a blue ring", "a"]
    )
    with torch.no_grad():
        torch.testing.assert_close(hub.encode_image(images), theirs.encode_image(images), atol=1e-5, rtol=0)
        torch.testing.assert_close(hub.encode_text(tokens), theirs.encode_text(tokens), atol=1e-5, rtol=0)


@pytest.mark.slow
@pytest.mark.parametrize(
    "argv, expect",
    [
        (["--data", "coco", "--data_root", f"{FIX}/coco", "--batch_size", "2"], "eval test step 2"),
        (
            [
                "--data",
                "negclip",
                "--data_root",
                f"{FIX}/negclip/train_neg_clip.tsv",
                "--neg_images",
                "--batch_size",
                "4",
            ],
            "step 2/2",
        ),
        (
            [
                "--data",
                "ceclip",
                "--data_root",
                f"{FIX}/ceclip",
                "--allow_pickle",
                "--loss",
                "ceclip",
                "--batch_size",
                "4",
            ],
            "invalid negatives",
        ),
        (
            ["--data", "hnc", "--data_root", f"{FIX}/hnc/hnc_clean_strict_train.json", "--batch_size", "2"],
            "skipped 2 negative caption(s)",
        ),
    ],
)
def test_real_data_readers_through_the_cli(tmp_path, init, argv, expect):
    r = run(
        [
            "clip_hardneg.py",
            "--init",
            init,
            "--max_steps",
            "2",
            "--workers",
            "0",
            "--log_every",
            "1",
            "--out_dir",
            str(tmp_path),
            *argv,
        ]
    )
    assert r.returncode == 0, r.stderr
    assert expect in r.stdout, r.stdout
    assert load_weights(tmp_path)["step"] == 2


@pytest.mark.parametrize(
    "argv, message",
    [
        (
            ["--data", "ceclip", "--data_root", f"{FIX}/ceclip"],
            "train_neg_0.npy: CE-CLIP's .npy files are pickled",
        ),
        (
            ["--data", "coco", "--data_root", f"{FIX}/coco", "--neg_images"],
            "--neg_images: --data coco has no hard-negative images",
        ),
        (["--neg_types", "relation,colour"], "--neg_types relation,colour: choose from"),
        (["--l2sp", "0.1"], "belong to --loss hnc"),
        (["--data", "negclip"], "--data negclip needs --data_root"),
        (["--data", "negclip", "--data_root", f"{FIX}/negclip/missing.tsv"], "missing file: "),
    ],
)
def test_bad_input_gives_one_clear_line(tmp_path, init, argv, message, capsys):
    # in-process (the CLI path is the same: every error is a SystemExit with one line)
    with pytest.raises(SystemExit) as e:
        hn.main(["--init", init, *argv, "--max_steps", "1", "--out_dir", str(tmp_path)])
    text = str(e.value.code) + capsys.readouterr().err
    assert message in text and e.value.code != 0, text


@pytest.mark.slow
def test_missing_default_init_says_to_run_clip_scratch_first(tmp_path):
    # run from an empty folder, where the default out/clip_scratch/ckpt.pt cannot exist
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=ROOT)
    r = subprocess.run(
        [sys.executable, os.path.join(ROOT, "clip_hardneg.py"), "--max_steps", "1"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode != 0 and "Traceback" not in r.stderr
    assert "out/clip_scratch/ckpt.pt does not exist: run `python clip_scratch.py` first" in r.stderr, r.stderr


def test_real_images_follow_the_inits_preprocessing(tmp_path):
    """--init ViT-H-14-quickgelu:dfn5b (resize_mode squash): make_data's rows hold the pixels open_clip's
    evaluation transform of that tag gives (read from its config: no weights, no download), not the
    shorter side's centre crop (the fixture's images textured, so the two differ)"""
    import numpy as np
    from helpers import fixture_copy
    from PIL import Image

    import data
    from model import init_preprocess

    init, tsv = "ViT-H-14-quickgelu:dfn5b", str(fixture_copy(tmp_path, "negclip") / "train_neg_clip.tsv")
    for i, (path, *_) in enumerate(negatives.read_negclip(tsv)):
        Image.fromarray(np.random.default_rng(i).integers(0, 256, (18, 24, 3), dtype=np.uint8)).save(
            path, quality=95
        )
    args = hn.get_args(["--data", "negclip", "--data_root", tsv, "--init", init])
    assert args.preprocess == init_preprocess(init) and args.preprocess["resize_mode"] == "squash"
    dataset, _, _ = hn.make_data(args, 0, 1)
    transform = open_clip.transform.image_transform_v2(
        open_clip.transform.PreprocessCfg(size=args.image_size, **args.preprocess), is_train=False
    )
    for key in range(2):
        ((image, _, _),) = dataset[key]
        path = dataset.items[key][0]
        assert torch.equal(image, transform(Image.open(path).convert("RGB")))
        # the OpenAI default's crop
        assert not torch.equal(image, data.to_tensor(data.load_image(path, args.image_size)))
