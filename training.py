"""
The training utilities every minclip script's loop uses, and nothing else: the flag parser, DDP
setup and its one-line errors, precision, the lr schedule and the run's plan, the autograd
all-gather and the sums / means / minima over ranks, FLOP counting and MFU's peak table, and the
run's log (metrics.jsonl, wandb, the printed lines). The model and its checkpoints are model.py's.

Method scripts import this module; it imports none of them.
"""

import argparse
import datetime
import json
import math
import os
import sys
import time
from contextlib import contextmanager, nullcontext
from typing import NamedTuple

import torch
import torch.distributed as dist
from torch.utils.checkpoint import checkpoint

import data

# -----------------------------------------------------------------------------
# flags, processes, precision


class Parser(argparse.ArgumentParser):
    """argparse with every default in --help and a bad flag or value refused in one line"""

    def __init__(self, doc):
        class Help(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
            pass

        super().__init__(
            description=doc.split("\n\n")[0],
            epilog=doc.split("\n\n", 1)[1] if "\n\n" in doc else None,
            formatter_class=Help,
        )

    def add_argument(self, *names, **kw):  # a flag without help text shows its default too
        if "help" not in kw and kw.get("action") not in ("help", "version"):
            kw["help"] = "(default: %(default)s)"
        return super().add_argument(*names, **kw)

    def presets(self, shapes, real, unset="from the run's length"):
        """the defaults that depend on --data, shown at the end of --help: every flag of the presets has
        default None, which apply_preset fills after parsing. unset: what a None means ({flag: words} or
        the words for every flag)"""

        def show(k, v):
            if v is None:
                return (
                    "-"
                    if k == "epochs"
                    else unset.get(k, "from the run's length")
                    if isinstance(unset, dict)
                    else unset
                )
            return f"{v:.4g}" if isinstance(v, float) else str(v)

        rows = [f"  --{k:<16} {show(k, shapes[k]):<12} {show(k, real[k])}" for k in shapes]
        self.epilog = (self.epilog or "") + "\n\nDefaults by --data (shapes | real data):\n" + "\n".join(rows)

    def check_step(self, args):
        """the step's flags every script has, after its presets: --accum_steps divides --batch_size,
        --grad_clip >= 0; else one line"""
        if args.accum_steps < 1 or args.batch_size % args.accum_steps:
            self.error(
                f"--accum_steps {args.accum_steps}: must divide --batch_size {args.batch_size} "
                "(micro-batches of equal size)"
            )
        if args.grad_clip < 0:
            self.error(f"--grad_clip {args.grad_clip}: must be >= 0 (0: off)")

    def error(self, message):  # under torchrun every rank parses the same flags: rank 0 says what is wrong
        self.exit(
            2,
            f"error: {message} (python {self.prog} --help)\n"
            if int(os.environ.get("RANK", 0)) == 0
            else None,
        )


@contextmanager
def one_error():
    """A script's `main()` runs in this. An error a user can fix is a SystemExit with its one line (or
    the parser's exit 2); under torchrun every rank meets the same bad file or flag, so rank 0 alone
    prints it, and the ranks meet before they exit with the same code (torchrun SIGTERMs the ranks still
    running when the first one exits)."""
    try:
        yield
    except SystemExit as e:
        if e.code in (None, 0):
            raise
        code = 1 if isinstance(e.code, str) else e.code
        if isinstance(e.code, str) and int(os.environ.get("RANK", 0)) == 0:
            print(e.code, file=sys.stderr, flush=True)
        if "RANK" not in os.environ:
            raise SystemExit(code) from None
        if not dist.is_initialized():  # an error before setup_distributed: a process group just to meet
            dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=60))
        dist.barrier()
        sys.stdout.flush()
        os._exit(code)


def apply_preset(args, shapes, real):
    """every preset flag left unset (None) takes the script's preset for --data: `shapes` on the shapes
    world, `real` on real data (a pretrained start, epochs over a finite set) -> whether it is real data"""
    is_real = args.data != "shapes"
    for k, v in (real if is_real else shapes).items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    return is_real


def setup_distributed(device_flag, timeout=7200):
    """Returns (rank, local_rank, world_size, device). torchrun sets RANK; nccl on CUDA, gloo on CPU.
    timeout: seconds a collective waits for every rank (torch's defaults, 10 min for nccl and 30 for
    gloo, are shorter than building the image cache of a large set or a rank-0 evaluation)."""
    if device_flag == "cuda" and not torch.cuda.is_available():
        raise SystemExit("error: --device cuda, but torch sees no CUDA device")
    use_cuda = device_flag == "cuda" or (device_flag == "auto" and torch.cuda.is_available())
    if "RANK" in os.environ:
        global _HOST_GROUP
        rank, local_rank, world = (
            int(os.environ["RANK"]),
            int(os.environ["LOCAL_RANK"]),
            int(os.environ["WORLD_SIZE"]),
        )
        dist.init_process_group("nccl" if use_cuda else "gloo", timeout=datetime.timedelta(seconds=timeout))
        if use_cuda:  # host-side ints (host_ints) travel by gloo: nccl's would wait for the GPU's queue
            _HOST_GROUP = dist.new_group(backend="gloo", timeout=datetime.timedelta(seconds=timeout))
    else:
        rank, local_rank, world = 0, 0, 1
    if use_cuda:
        torch.cuda.set_device(local_rank)
    return rank, local_rank, world, torch.device(f"cuda:{local_rank}" if use_cuda else "cpu")


def print0(*a, **kw):
    if int(os.environ.get("RANK", 0)) == 0:
        print(*a, **kw, flush=True)


def autocast_ctx(device, dtype):
    """the step's precision: bf16 / fp16 autocast, or float32, whose matmuls and convolutions run in
    TF32 on CUDA (switched on here, as nanoGPT does: ~8x the fp32 FLOP/s on A100 / H100; the scores
    the losses compare are products and sums, which TF32 does not touch)"""
    if dtype == "float32":
        if device.type == "cuda":
            torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
        return nullcontext()
    return torch.autocast(device.type, dtype={"bfloat16": torch.bfloat16, "float16": torch.float16}[dtype])


def lr_at(step, base_lr, warmup, max_steps):
    """linear warmup then cosine decay to zero."""
    if step < warmup:
        return base_lr * (step + 1) / warmup
    return base_lr * 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, max_steps - warmup)))


WARMUP_FRACTION = 0.05  # real data: the default warmup, a fraction of the run's steps


def schedule(args, n_items, world, ckpt_path=None):
    """The run's plan, the same whatever the world size -> the start line's words. Sets args.max_steps,
    warmup_steps, eval_every and ckpt_every where they are None. Shapes (n_items None, an endless
    stream): the flags as given. Real data: an epoch is n_items // global batch steps (data.StepBatches
    drops the last partial batch), the run --epochs of them unless --max_steps says otherwise (the
    epochs are then what those steps make), warmup WARMUP_FRACTION of the steps, and a dev eval and a
    checkpoint at the end of every epoch: 1 and 8 processes train the same epochs with the same
    fraction of warmup and the same number of evals. First, one line if the global batch is larger
    than the data, or if ckpt_path holds a run and neither --resume nor --overwrite says what to do."""
    if n_items is not None and n_items < args.batch_items * world:
        raise SystemExit(
            f"error: {n_items} training items < global batch {args.batch_items * world} (--batch_size)"
        )
    if ckpt_path and os.path.exists(ckpt_path) and not (args.resume or args.overwrite):  # never lose a run
        raise SystemExit(
            f"error: {ckpt_path} exists: --resume continues it, --overwrite starts over (or pick another --out_dir)"
        )
    global_batch = args.batch_items * world
    if n_items is None:
        what = f"{args.max_steps} steps"
    else:
        per_epoch = max(1, n_items // global_batch)
        args.max_steps = args.epochs * per_epoch if args.max_steps is None else args.max_steps
        args.warmup_steps = (
            max(1, round(WARMUP_FRACTION * args.max_steps))
            if args.warmup_steps is None
            else args.warmup_steps
        )
        args.eval_every = per_epoch if args.eval_every is None else args.eval_every
        args.ckpt_every = per_epoch if args.ckpt_every is None else args.ckpt_every
        what = f"{args.max_steps / per_epoch:.3g} epochs of {n_items:,} items = {args.max_steps} steps ({per_epoch} an epoch)"
    every = lambda n: f"every {n} steps" if n else "at the end"  # noqa: E731
    return (
        f"{what} of global batch {global_batch} ({world} x {args.batch_items}) | warmup {args.warmup_steps} steps | "
        f"eval {every(args.eval_every)}, checkpoint {every(args.ckpt_every)}"
    )


class _AllGather(torch.autograd.Function):
    """all_gather with a backward: the gradient w.r.t. the gathered tensor is summed over ranks and
    each rank keeps its own slice (torch.distributed.nn's deprecated all_gather, with all_reduce)"""

    @staticmethod
    def forward(ctx, x):
        out = [torch.empty_like(x) for _ in range(dist.get_world_size())]
        dist.all_gather(out, x.contiguous())
        return torch.cat(out)

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous()
        dist.all_reduce(grad)
        return grad.chunk(dist.get_world_size())[dist.get_rank()]


def all_gather_with_grad(x):
    """[B, ...] on every rank -> [world*B, ...], rank order, differentiable (B must be equal on all ranks).
    A no-op without torch.distributed."""
    if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
        return x
    return _AllGather.apply(x)


def to_device(x, device, n=None):
    """a batch (a tensor, or tuples / dicts of them) on the device; n: keep the first n rows of each tensor"""
    if isinstance(x, (tuple, list, dict)):
        return (
            {k: to_device(v, device, n) for k, v in x.items()}
            if isinstance(x, dict)
            else type(x)(to_device(y, device, n) for y in x)
        )
    return (x if n is None else x[:n]).to(device, non_blocking=True)


def world_size():
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def global_sum(x):
    """a detached tensor summed over ranks (a statistic of the global batch)"""
    x = x.detach().clone()
    if world_size() > 1:
        dist.all_reduce(x)
    return x


_HOST_GROUP = None  # setup_distributed's gloo group beside nccl


def host_ints(n, device):
    """an int from every rank -> long [world] on the CPU, rank order. Under nccl it travels by a gloo
    group of its own (setup_distributed), so reading it waits for the other ranks, never for the GPU"""
    if world_size() == 1:
        return torch.tensor([n])
    on_host = _HOST_GROUP is not None or dist.get_backend() == "gloo"
    x = torch.tensor([n], device="cpu" if on_host else device)
    every = [torch.zeros_like(x) for _ in range(world_size())]
    dist.all_gather(every, x, group=_HOST_GROUP)
    return torch.cat(every).cpu()


def global_min(n, device):
    """an int, the smallest over ranks (host_ints: no device sync)"""
    return n if world_size() == 1 else int(host_ints(n, device).min())


def global_mean(total, count):
    """total / (count summed over ranks / world), count >= 1: DDP averages gradients over ranks, so
    this is the mean over the items of the global batch even when ranks hold different numbers"""
    count = torch.as_tensor(count, dtype=torch.float32, device=total.device)
    if world_size() > 1:
        count = global_sum(count)
    return total / (count.clamp(min=1) / world_size())


# dense peak FLOP/s (NVIDIA's datasheets, without sparsity) by the exact torch.cuda.get_device_name, for
# MFU: "bfloat16" / "float16" the 16-bit tensor cores, "float32" TF32's (autocast_ctx switches it on).
# Exact names, because a substring reads an H100 PCIe or NVL as the SXM part; a name or dtype not here
# (a MIG slice, an A10G) gives 0 and MFU is not reported
_H100_SXM, _NVL = (
    {"bfloat16": 989e12, "float16": 989e12, "float32": 495e12},
    {"bfloat16": 835e12, "float16": 835e12, "float32": 418e12},
)
_A100 = {"bfloat16": 312e12, "float16": 312e12, "float32": 156e12}
PEAK_FLOPS = {
    "NVIDIA H100 80GB HBM3": _H100_SXM,
    "NVIDIA H100 PCIe": {"bfloat16": 756e12, "float16": 756e12, "float32": 378e12},
    "NVIDIA H100 NVL": _NVL,
    "NVIDIA H200": _H100_SXM,
    "NVIDIA H200 NVL": _NVL,
    "NVIDIA A100-SXM4-80GB": _A100,
    "NVIDIA A100-SXM4-40GB": _A100,
    "NVIDIA A100 80GB PCIe": _A100,
    "NVIDIA A100-PCIE-40GB": _A100,
    "NVIDIA L4": {"bfloat16": 121e12, "float16": 121e12, "float32": 60e12},
    "NVIDIA L40S": {"bfloat16": 362e12, "float16": 362e12, "float32": 183e12},
    "NVIDIA A10": {"bfloat16": 125e12, "float16": 125e12, "float32": 62.5e12},
    # fp32 accumulation
    "NVIDIA GeForce RTX 4090": {"bfloat16": 165e12, "float16": 165e12, "float32": 82.6e12},
    "NVIDIA GeForce RTX 3090": {"bfloat16": 71e12, "float16": 71e12, "float32": 35.6e12},
    # no bf16, no TF32
    "Tesla V100-SXM2-16GB": {"float16": 125e12},
    "Tesla V100-SXM2-32GB": {"float16": 125e12},
}


def peak_flops(device, dtype="bfloat16"):
    """a CUDA device's peak FLOP/s at the run's --dtype (PEAK_FLOPS), 0.0 where unknown or not CUDA"""
    if device.type != "cuda":
        return 0.0
    return PEAK_FLOPS.get(torch.cuda.get_device_name(device), {}).get(dtype, 0.0)


@contextmanager
def count_flops(enabled):
    """torch's FLOP counter over a block (-> the counter) when enabled, else nothing (-> None)"""
    if not enabled:
        yield None
        return
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        yield counter


def resolve_dtype(flag, device):
    """--dtype auto: bfloat16 autocast on CUDA, float32 elsewhere"""
    return flag if flag != "auto" else ("bfloat16" if device.type == "cuda" else "float32")


# -----------------------------------------------------------------------------
# the loop's contract and its log


class Model(NamedTuple):
    """What a script's make_model(args, device) returns to the loop.
    clip: the CLIP (unwrapped: checkpoints, evals and the logit-scale clamp use it)
    module: what trains, which the loop wraps in DDP / torch.compile (the CLIP itself, or a module
        holding it: CLIPS's CLIP + captioner)
    preprocess: the evaluation's image transform (open_clip's, for the init's pretrained tag)
    param_groups: AdamW's groups (model.param_groups), each with its 'lr_mult'
    state: the method's state, the script's State dataclass (step_loss reads it; save_state keeps its
        part of a checkpoint; the loop sets state.step before each step)"""

    clip: torch.nn.Module
    module: torch.nn.Module
    preprocess: object
    param_groups: list
    state: object


class RunLog:
    """The run's record, written by rank 0: metrics.jsonl in out_dir (this run's lines only: from its
    start, or up to the step it resumes from), the same records in Weights & Biases with --wandb, and
    the printed lines: one per --log_every steps (loss, stats, lr, ms/step, img/s, MFU, ETA), one per
    eval, the start-vs-end table."""

    def __init__(self, args, start_step, master, world):
        self.master, self.world, self.wandb, self.max_steps = master, world, None, args.max_steps
        self.data, self.ckpt = args.data, os.path.join(args.out_dir, "ckpt.pt")
        self.path = os.path.join(args.out_dir, "metrics.jsonl")
        os.makedirs(args.out_dir, exist_ok=True)
        if master:
            keep = start_step and os.path.exists(self.path)
            kept = (
                [line for line in open(self.path) if json.loads(line)["step"] <= start_step] if keep else []
            )
            with open(self.path, "w") as f:
                f.writelines(kept)
            if args.wandb:
                try:
                    import wandb
                except ImportError:
                    raise SystemExit("error: --wandb needs the wandb package: pip install wandb") from None
                self.wandb = wandb
                wandb.init(project=args.wandb, config=vars(args), resume="allow")
        self.last_step, self.n_images = start_step, 0
        self.restart_clock()

    def restart_clock(self):  # after an eval: eval time is not training time
        self.t0 = time.time()

    def __call__(self, record):
        if self.master:
            with open(self.path, "a") as f:
                f.write(json.dumps(record) + "\n")
            if self.wandb:
                self.wandb.log(
                    {f"{record['split']}/{k}": v for k, v in record.items() if k not in ("step", "split")},
                    step=record["step"],
                )

    def train(self, step, loss, stats, lr, logit_scale, flops, peak, skipped):
        """the log line of the --log_every steps since the last one, and its record (a host sync)"""
        dt, n_steps = time.time() - self.t0, step - self.last_step
        ips, eta = self.n_images * self.world / dt, int((self.max_steps - step) * dt / n_steps)
        self.last_step, self.n_images = step, 0
        self.restart_clock()
        print0(
            f"step {step}/{self.max_steps} | loss {loss.item():.4f} | "
            + "".join(f"{k} {v.item():.3f} | " for k, v in stats.items())
            + f"lr {lr:.2e} | scale {logit_scale.exp().item():.1f} | {dt / n_steps * 1000:.0f} ms/step | {ips:.0f} img/s"
            + (f" | mfu {100 * flops * self.world * n_steps / dt / peak:.1f}%" if peak and flops else "")
            + f" | eta {eta // 3600}:{eta // 60 % 60:02d}:{eta % 60:02d}"
            + "".join(f" | skipped {v} {k}" for k, v in skipped.items() if v)
        )
        self(
            {
                "step": step,
                "split": "train",
                "loss": loss.item(),
                **{k: v.item() for k, v in stats.items()},
                "lr": lr,
            }
        )

    def eval(self, step, split, metrics, seconds):
        if metrics is None:
            return print0(
                f"step {step}: --data {self.data} has no eval split here: eval.py --model {self.ckpt} --bench ..."
            )
        print0(
            f"eval {split} step {step} ({seconds:.1f}s): "
            + "  ".join(f"{k} {v:.3f}" for k, v in metrics.items())
        )
        self({"step": step, "split": split, **metrics})

    def skipped(self, skipped):
        """what make_batch skipped over the whole run, if anything"""
        if any(skipped.values()):
            print0(
                "skipped in total (counted per sample drawn): "
                + ", ".join(f"{v} {k}" for k, v in skipped.items() if v)
            )

    def table(self, start, end, step):
        """the start-vs-end table of every metric of the final eval"""
        if self.master and start and end:
            print0(f"\n| metric | start | step {step} |\n|---|---|---|")
            for k, v in end.items():
                print0(f"| {k} | {start.get(k, float('nan')):.4f} | {v:.4f} |")


class NotFinite:
    """The non-finite-loss stop without a host sync per step: the first bad step is kept on the device
    (update), and read, by every rank together, on log and checkpoint steps only (check): nothing is
    written after a bad step, so the last checkpoint stays good."""

    def __init__(self, device, world):
        self.first, self.world = torch.tensor(math.inf, device=device), world

    def update(self, loss, step):
        self.first = torch.where(torch.isfinite(loss.detach()), self.first, self.first.clamp(max=step))

    def check(self, ckpt_path):
        first = self.first.clone()
        if self.world > 1:
            dist.all_reduce(first, op=dist.ReduceOp.MIN)
        if math.isfinite(first.item()):
            last = ckpt_path if os.path.exists(ckpt_path) else "none written yet"
            raise SystemExit(
                f"error: loss is not finite at step {int(first.item())}; stopping. Last good checkpoint: {last}"
            )


class MicroBatches(torch.nn.Module):
    """--accum_steps K: contrastive gradient accumulation, GradCache (Gao et al. 2021, "Scaling Deep
    Contrastive Learning Batch Size under Memory Limited Setup"; open_clip's --accum-freq) written as
    activation checkpointing. forward(*inputs) splits every input tensor into K parts along dim 0
    (tensor_split), runs the module on each part under torch.utils.checkpoint (non-reentrant) and
    concatenates the parts' outputs (a 0-dim output, the logit scale, is the first part's; None stays
    None). The module must be row-wise: output row i depends on input row i only (CLIP's towers are).
    The step's loss then sees the features of the whole batch, so its negatives span all K parts, and
    loss and gradients are those of one pass over the batch (to float rounding).
    Memory: each part keeps only its inputs and its output features through the forward; in the
    backward, autograd runs the latest part's nodes first (its sequence numbers are the highest), and
    the first of them to need a saved activation recomputes that part's forward, whose activations
    are freed as its backward consumes them: one part's activations at a time, as GradCache's second
    pass holds. The compute is GradCache's too: two forwards and one backward per part (the log line's
    MFU counts the second forward as work, as with --grad_checkpointing). Under DDP this
    module is inside the one DDP forward of the step, so every parameter's gradient is accumulated
    over the K parts before DDP's reducer sees it, once."""

    def __init__(self, module, k):
        super().__init__()
        self.module, self.k = module, k

    def forward(self, *inputs):
        if not torch.is_grad_enabled():
            return self.module(*inputs)
        rows = [len(x) for x in inputs if torch.is_tensor(x) and x.ndim]
        k = min(self.k, *rows)  # a batch cut short (unreadable images) may hold fewer rows than K
        split = [x.tensor_split(k) if torch.is_tensor(x) and x.ndim else [x] * k for x in inputs]
        parts = [checkpoint(self.module, *part, use_reentrant=False) for part in zip(*split)]
        return tuple(out[0] if out[0] is None or out[0].ndim == 0 else torch.cat(out) for out in zip(*parts))


def wrap(module, args, world, local_rank, device):
    """--accum_steps (MicroBatches), then DDP across processes, then torch.compile (--compile):
    compile(DDP(module)) lets dynamo split the graph at DDP's buckets and overlap their all-reduce"""
    if args.accum_steps > 1:
        module = MicroBatches(module, args.accum_steps)
    if world > 1:
        module = torch.nn.parallel.DistributedDataParallel(
            module, device_ids=[local_rank] if device.type == "cuda" else None
        )
    return torch.compile(module) if args.compile else module


def batches(dataset, n_items, collate, args, rank, world, start_step, device):
    """the DataLoader of the steps [start_step, max_steps): this rank's share of each global batch
    (data.StepBatches: keys by (seed, step, rank), so a resumed run sees the batches it would have;
    --data wds: the shards stream their own batches, placed by the step count too, wds.Shards)"""
    if isinstance(dataset, torch.utils.data.IterableDataset):
        return dataset.loader(
            collate, args.batch_items, start_step, args.max_steps, args.workers, device.type == "cuda"
        )
    sampler = data.StepBatches(n_items, args.batch_items, rank, world, args.seed, start_step, args.max_steps)
    return torch.utils.data.DataLoader(
        dataset,
        batch_sampler=sampler,
        collate_fn=collate,
        num_workers=args.workers,
        pin_memory=device.type == "cuda",
    )


def start_line(summary, clip, args, plan, device, dtype):
    """the run's first line: the method, the model's size, the data, the plan (its global batch), with
    --accum_steps the micro-batch, and the device"""
    n_params = sum(p.numel() for p in clip.parameters())
    n_train = sum(p.numel() for p in clip.parameters() if p.requires_grad)
    K = args.accum_steps
    micro = f" | micro-batch {args.batch_size // K} (--batch_size / --accum_steps {K})" if K > 1 else ""
    print0(
        f"{summary} | {n_params / 1e6:.2f}M params, {n_train / 1e6:.2f}M trained | data {args.data} | {plan}"
        f"{micro} | device {device} {dtype}"
    )


def clip_grads(optimizer, scaler, max_norm):
    """--grad_clip: the global norm of every gradient clipped to max_norm (torch's clip_grad_norm_),
    after the float16 GradScaler has unscaled them -> {"grad_norm": the norm before clipping} for the
    step's stats, or {} when max_norm is 0 (off). Under DDP the gradients are already averaged, so
    every rank clips by the same norm."""
    if not max_norm:
        return {}
    scaler.unscale_(optimizer)
    params = [p for g in optimizer.param_groups for p in g["params"] if p.grad is not None]
    return {"grad_norm": torch.nn.utils.clip_grad_norm_(params, max_norm)}


def save_run(path, clip, optimizer, step, args, start_metrics, method_state):
    """the checkpoint (model.save_checkpoint: atomic, CPU tensors): "model" and "model_cfg" load into
    open_clip.CLIP with strict=True; the optimizer, step, flags and CPU rng resume the run exactly;
    method_state is the script's save_state"""
    from model import save_checkpoint

    save_checkpoint(
        path,
        {
            "model": clip.state_dict(),
            "model_cfg": clip.model_cfg,
            "optimizer": optimizer.state_dict(),
            "step": step,
            "args": vars(args),
            "rng": {"cpu": torch.get_rng_state()},
            "start_metrics": start_metrics,
            **method_state,
        },
    )


def resume_run(ckpt_path, args, resume, optimizer):
    """--resume from ckpt_path if it exists: resume(path) (the script's hook, which checks the file
    against this run's models and loads them) -> the checkpoint, whose optimizer state and CPU rng are
    restored here -> (the step to start at, the start eval's metrics); (0, None) for a fresh run"""
    if not (args.resume and os.path.exists(ckpt_path)):
        return 0, None
    ckpt = resume(ckpt_path)
    optimizer.load_state_dict(ckpt["optimizer"])
    torch.set_rng_state(ckpt["rng"]["cpu"])
    print0(f"resumed from {ckpt_path} at step {ckpt['step']}")
    return ckpt["step"], ckpt.get("start_metrics")


def load_data(make_data, args, rank, world):
    """the script's make_data hook, then every image of its val and test splits opened (fail now, not at
    an eval after hours of training): a missing or bad file is one line (data.DataError) before any
    model is built or downloaded -> make_data's (dataset, n_items, evalset)"""
    try:
        dataset, n_items, evalset = make_data(args, rank, world)
        for split in ("val", "test") if isinstance(evalset, dict) else ():
            data.check_images(evalset[split], f"--data {args.data}: the {split} split")
    except data.DataError as e:
        raise SystemExit(f"error: {e}") from None
    return dataset, n_items, evalset
