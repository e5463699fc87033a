"""
The prepared GPU benchmark (issue 31): each script's training step at open_clip's ViT-B-32 (224 px,
random init, bf16 autocast), --compile off and on: ms/step, images/s, MFU and peak memory; open_clip's
own training step (open_clip.create_model("ViT-B-32"), open_clip.ClipLoss, AdamW) on the same batch
and GPU, as a ratio; eval.py's encode throughput; with several GPUs visible, the same steps under
torchrun (DDP, compile off) and the scaling efficiency. One command for a lent GPU, meant to end
within 8 minutes on an H100, most of them compiling (not yet run on a GPU: no figure of it exists):

    python bench/gpu.py                        # prints the table, writes bench/results/gpu.json
    python bench/gpu.py --compile off          # without the compile rows (minutes faster)
    python bench/gpu.py --tiny                 # CPU: a tiny model end to end (tests/test_bench_gpu.py)
    python bench/gpu.py --cpu_scaling          # CPU: 2 gloo processes vs 1, --accum_steps 4 vs 1
    python bench/gpu.py --publish              # README's block from bench/results/{gpu,cpu_scaling}.json

Each row is the loop's step without its data loading: the script's own get_args, make_data (the
shapes world rendered at 224 px), make_batch, make_model, training.wrap (DDP, compile) and step_loss,
then backward, fused AdamW and the logit-scale clamp. Batch 256 per GPU: clip_scratch 256 pairs,
clip_hardneg 256 images (128 scenes and their twins) with CE-CLIP's loss, clip_dpo 64 groups;
the `--accum_steps 4` row (compile off) shows what GradCache's micro-batches cost and save. open_clip's text tower
runs all 77 positions; minclip's stops at the batch's longest caption (clip_scratch.py, deviation
4), so the ratio counts that design. MFU = the step's FLOPs (torch's FLOP counter, the model's
FLOPs: a recomputation is not counted) / time / the GPU's dense bf16 peak (training.PEAK_FLOPS).
Peak memory: torch.cuda.max_memory_allocated on CUDA, the process's peak RSS on CPU. A row that
fails is kept with its error, so one broken row does not cost the lent GPU's time for the others.

--cpu_scaling (no GPU needed): clip_scratch.py's default step (tiny, 64 px, global batch 128) in
1 process vs 2 gloo processes (half the batch each), each process on one thread: a core is the
CPU's device, as a GPU is each rank's (threads shared with other jobs would time the contention
of OpenMP's barriers, not DDP); and with
--accum_steps 4 vs 1 in 1 process (time per sample), the three run alternately in rounds so that a
busy machine's noise hits them alike; then the peak RSS of --accum_steps 1, 2, 4 on a step whose
activations outweigh the process (the small model at 128 px) -> bench/results/cpu_scaling.json.
"""

import argparse
import gc
import itertools
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time

import open_clip
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import clip_dpo  # noqa: E402
import clip_hardneg  # noqa: E402
import clip_scratch  # noqa: E402
import data  # noqa: E402
import eval as ev  # noqa: E402
from model import CLIP, model_config  # noqa: E402
from training import autocast_ctx, count_flops, peak_flops, setup_distributed, to_device, wrap  # noqa: E402

SCRIPTS = {"clip_scratch": clip_scratch, "clip_hardneg": clip_hardneg, "clip_dpo": clip_dpo}
# (row, script, extra flags): the rows timed at each --compile setting, then open_clip's step
ROWS = [
    ("clip_scratch", "clip_scratch", []),
    ("clip_scratch --accum_steps 4", "clip_scratch", ["--accum_steps", "4"]),
    ("clip_hardneg (ceclip)", "clip_hardneg", ["--loss", "ceclip", "--cmr_weight", "0.2"]),
    ("clip_dpo (dpo_clip)", "clip_dpo", []),
]


def get_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--tiny", action="store_true", help="CPU: tiny model, 32 px, batch 8, 2 steps, compile off"
    )
    p.add_argument("--compile", default=None, help="settings to time: off,on (default; tiny: off)")
    p.add_argument(
        "--batch_size", type=int, default=None, help="per GPU (default 256, tiny 8); DPO: a quarter, groups"
    )
    p.add_argument(
        "--steps", type=int, default=None, help="timed steps per row, after 3 warmup (default 10; tiny 2)"
    )
    p.add_argument(
        "--nproc", type=int, default=None, help="processes of the torchrun part (default: the GPUs, if > 1)"
    )
    p.add_argument("--peak_flops", type=float, default=None, help="MFU's peak (default: training.PEAK_FLOPS)")
    p.add_argument("--cpu_scaling", action="store_true", help="the CPU scaling benchmark (see above)")
    p.add_argument("--rounds", type=int, default=3, help="--cpu_scaling: alternating rounds")
    p.add_argument(
        "--out", default=None, help="the JSON (default bench/results/gpu.json or cpu_scaling.json)"
    )
    p.add_argument(
        "--publish", action="store_true", help="nothing runs: README's block from the committed results"
    )
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)  # internal: a child's part
    p.add_argument("--init", default=None, help=argparse.SUPPRESS)  # internal: the fine-tunes' start
    p.add_argument("--config", default=None, help=argparse.SUPPRESS)  # internal: a --cpu_scaling child's
    args = p.parse_args(argv)
    args.compile = [c == "on" for c in (args.compile or ("off" if args.tiny else "off,on")).split(",")]
    args.batch_size = args.batch_size or (128 if args.cpu_scaling else 8 if args.tiny else 256)
    args.steps = args.steps or (8 if args.cpu_scaling else 2 if args.tiny else 10)
    default = "cpu_scaling.json" if args.cpu_scaling else "gpu.json"
    args.out = args.out or os.path.join(ROOT, "bench", "results", default)
    return args


# -----------------------------------------------------------------------------
# one row: a script's step as the loop runs it


def geometry(tiny):
    """(model size, image size, context length): open_clip's ViT-B-32, or the CPU test's tiny model"""
    return ("tiny", 32, 32) if tiny else ("base32", 224, 77)


def write_init(path, tiny):
    """a random CLIP of the benchmark's geometry as a minclip checkpoint: the fine-tunes' --init"""
    size, image_size, context = geometry(tiny)
    torch.manual_seed(0)
    cfg = model_config(size, image_size, context)
    torch.save({"model": CLIP(**cfg).state_dict(), "model_cfg": cfg}, path)
    return path


def script_flags(script, batch_size, init, tiny, extra):
    size, image_size, context = geometry(tiny)
    common = ["--eval_n", "8", "--workers", "0", *extra]
    if script == "clip_scratch":
        geo = ["--model_size", size, "--image_size", str(image_size), "--context_length", str(context)]
        return [*geo, "--batch_size", str(batch_size), *common]
    groups = batch_size // 4 if script == "clip_dpo" else batch_size  # DPO: 64 groups at 256
    return ["--init", init, "--batch_size", str(groups), *common]


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def reset_peak(device):
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    else:  # the kernel's peak-RSS reset (Linux); where refused, the peak since the start
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
        except OSError:
            pass


def peak_gib(device):
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    try:
        kib = next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith("VmHWM"))
        return kib / 2**20
    except (OSError, StopIteration):
        return float("nan")


def timed(step, device, steps, warmup=3):
    """-> (ms per step over `steps` steps after `warmup`, peak memory over them in GiB)"""
    for _ in range(warmup):
        step()
    sync(device)
    reset_peak(device)
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    sync(device)
    return (time.perf_counter() - t0) / steps * 1000, peak_gib(device)


def time_script(name, extra, compiled, opts, device, rank, world, local_rank):
    """a script's training step -> its row (ms/step, images/s over all ranks, TFLOP per step, peak
    memory) and the batch's images and caption tokens on the host (clip_scratch: open_clip's batch)"""
    module = SCRIPTS[name]
    args = module.get_args(script_flags(name, opts.batch_size, opts.init, opts.tiny, extra))
    args.compile = compiled
    torch.manual_seed(0)
    clip, trained, _, groups, state = module.make_model(args, device)
    dataset, _, _ = module.make_data(args, rank, world)
    keys = range(rank * args.batch_items, (rank + 1) * args.batch_items)
    batch, _ = module.make_batch([dataset[k] for k in keys], args)
    batch = to_device(batch, device)
    optimizer = torch.optim.AdamW(groups, lr=1e-5, betas=(0.9, 0.98), eps=1e-6, fused=True)
    dtype = "float32" if device.type == "cpu" else "bfloat16"

    def step(model):
        with autocast_ctx(device, dtype):
            loss, _ = module.step_loss(model, batch, args, state)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        with torch.no_grad():
            clip.logit_scale.clamp_(0, math.log(100))

    with count_flops(True) as counter:  # the model's FLOPs, eager and unwrapped (the loop's way)
        step(trained)
    model = wrap(trained, args, world, local_rank, device)
    ms, peak = timed(lambda: step(model), device, opts.steps)
    row = dict(
        ms_per_step=ms,
        images_per_s=len(batch[0]) * world / ms * 1000,
        tflop_per_step=counter.get_total_flops() / 1e12,
        peak_memory_gib=peak,
    )
    return row, (batch[0].cpu(), batch[1].cpu() if name == "clip_scratch" else None)


def time_open_clip(images, tokens, compiled, opts, device, world, local_rank):
    """open_clip's own step on the same images and captions (its text tower at the full context):
    create_model("ViT-B-32") (tiny: open_clip.CLIP of the tiny config), ClipLoss, AdamW with open_clip's
    weight-decay groups (main.py's: none on gains, biases and the logit scale), bf16 autocast"""
    size, image_size, context = geometry(opts.tiny)
    torch.manual_seed(0)
    model = (
        open_clip.CLIP(**model_config(size, image_size, context))
        if opts.tiny
        else open_clip.create_model("ViT-B-32")
    ).to(device)
    exclude = lambda n, p: p.ndim < 2 or "bn" in n or "ln" in n or "bias" in n or "logit_scale" in n  # noqa: E731
    named = list(model.named_parameters())
    optimizer = torch.optim.AdamW(
        [
            {"params": [p for n, p in named if exclude(n, p)], "weight_decay": 0.0},
            {"params": [p for n, p in named if not exclude(n, p)], "weight_decay": 0.2},
        ],
        lr=1e-5,
        betas=(0.9, 0.98),
        eps=1e-6,
    )
    rank = torch.distributed.get_rank() if world > 1 else 0
    loss_fn = open_clip.ClipLoss(local_loss=True, gather_with_grad=True, rank=rank, world_size=world)
    if world > 1:
        model = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[local_rank] if device.type == "cuda" else None
        )
    model = torch.compile(model) if compiled else model
    images, tokens = (
        images.to(device),
        torch.nn.functional.pad(tokens, (0, context - tokens.shape[1])).to(device),
    )
    dtype = "float32" if device.type == "cpu" else "bfloat16"

    def step():
        with autocast_ctx(device, dtype):
            image_features, text_features, logit_scale = model(images, tokens)
            loss = loss_fn(image_features, text_features, logit_scale)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        with torch.no_grad():
            getattr(model, "module", model).logit_scale.clamp_(0, math.log(100))

    ms, peak = timed(step, device, opts.steps)
    return dict(ms_per_step=ms, images_per_s=len(images) * world / ms * 1000, peak_memory_gib=peak)


def time_eval(images, opts, device):
    """eval.py's encoders as the evaluation runs them (a CLIP of the benchmark's size, fp32, batches of
    256 moved from the host): images/s and texts/s"""
    clip = CLIP(**model_config(*geometry(opts.tiny))).to(device)
    images = images.repeat(max(1, 1024 // len(images)) if not opts.tiny else 1, 1, 1, 1)
    texts = ["a small red circle left of a large blue square on a striped background"] * len(images)
    tokenizer = data.get_tokenizer(geometry(opts.tiny)[2])
    clip.eval()
    ms_images, _ = timed(lambda: ev.encode_images(clip, images, device), device, opts.steps, warmup=1)
    ms_texts, _ = timed(lambda: ev.encode_texts(clip, tokenizer, texts, device), device, opts.steps, warmup=1)
    return dict(images_per_s=len(images) / ms_images * 1000, texts_per_s=len(texts) / ms_texts * 1000)


def run_rows(opts, device, rank=0, world=1, local_rank=0):
    """every row at every --compile setting -> [row dicts]; a failing row keeps its error"""
    rows, peak = [], opts.peak_flops or peak_flops(device, "bfloat16")
    for compiled in opts.compile:
        first = None
        for label, name, extra in ROWS:
            if compiled and "--accum_steps" in extra:  # its cost is the same recomputation either way
                continue
            row = dict(row=label, compile=compiled, world=world)
            try:
                result, first_batch = time_script(
                    name, extra, compiled, opts, device, rank, world, local_rank
                )
                row |= result
                row["mfu"] = (
                    result["tflop_per_step"] * 1e12 / (result["ms_per_step"] / 1000) / peak if peak else None
                )
                first = first or first_batch
            except Exception as e:  # the lent GPU's time is kept for the other rows
                row["error"] = f"{type(e).__name__}: {e}"[:300]
            rows.append(row)
            gc.collect()
            if device.type == "cuda":
                torch.cuda.empty_cache()
        row = dict(
            row="open_clip ViT-B-32" if not opts.tiny else "open_clip (tiny)", compile=compiled, world=world
        )
        try:
            row |= time_open_clip(first[0], first[1], compiled, opts, device, world, local_rank)
        except Exception as e:
            row["error"] = f"{type(e).__name__}: {e}"[:300]
        rows.append(row)
        for r in rows:  # each row's time over open_clip's at the same compile setting
            if r["compile"] == compiled and "ms_per_step" in r and "ms_per_step" in row:
                r["ratio_to_open_clip"] = r["ms_per_step"] / row["ms_per_step"]
    return rows, first


# -----------------------------------------------------------------------------
# the whole benchmark: one GPU, then torchrun on every GPU, the table and the JSON


def torchrun(opts, nproc, part, out, extra=()):
    """this script's `part` under torchrun with nproc processes -> the JSON rank 0 wrote"""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
    cmd += [os.path.abspath(__file__), "--worker", part, "--out", out, *extra]
    env = dict(os.environ, PYTHONPATH=ROOT)
    result = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=3600)
    if result.returncode:
        raise RuntimeError(f"torchrun {part}: {result.stderr.strip()[-500:]}")
    return json.load(open(out))


def forwarded(opts):
    """the flags a child needs to time the same rows"""
    flags = ["--batch_size", str(opts.batch_size), "--steps", str(opts.steps), "--compile", "off"]
    flags += ["--init", opts.init] + (["--tiny"] if opts.tiny else [])
    return flags + (["--peak_flops", str(opts.peak_flops)] if opts.peak_flops else [])


def ddp_worker(opts):
    """a torchrun child: the rows on every rank (DDP), rank 0 writes them"""
    rank, local_rank, world, device = setup_distributed("auto")
    rows, _ = run_rows(opts, device, rank, world, local_rank)
    if rank == 0:
        json.dump(rows, open(opts.out, "w"))
    torch.distributed.destroy_process_group()


def table(rows):
    fmt = lambda v, f: "-" if v is None or (isinstance(v, float) and math.isnan(v)) else format(v, f)  # noqa: E731
    lines = ["| step | compile | GPUs | ms/step | images/s | MFU | peak memory (GiB) | vs open_clip |"]
    lines.append("|---|---|---|---|---|---|---|---|")
    for r in rows:
        if "error" in r:
            lines.append(
                f"| {r['row']} | {'on' if r['compile'] else 'off'} | {r['world']} | {r['error']} |||||"
            )
            continue
        mfu = None if r.get("mfu") is None else 100 * r["mfu"]
        lines.append(
            f"| {r['row']} | {'on' if r['compile'] else 'off'} | {r['world']} | {fmt(r['ms_per_step'], '.1f')} "
            f"| {fmt(r['images_per_s'], '.0f')} | {fmt(mfu, '.1f')}{'%' if mfu is not None else ''} "
            f"| {fmt(r['peak_memory_gib'], '.2f')} | {fmt(r.get('ratio_to_open_clip'), '.2f')} |"
        )
    return "\n".join(lines)


def gpu_benchmark(opts):
    device = torch.device("cuda" if torch.cuda.is_available() and not opts.tiny else "cpu")
    with tempfile.TemporaryDirectory() as tmp:
        opts.init = write_init(os.path.join(tmp, "init.pt"), opts.tiny)
        t0 = time.time()
        rows, first = run_rows(opts, device)
        result = dict(
            device=torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
            torch=torch.__version__,
            open_clip=open_clip.__version__,
            model=geometry(opts.tiny),
            batch_size=opts.batch_size,
            steps=opts.steps,
            dtype="bfloat16" if device.type == "cuda" else "float32",
            rows=rows,
            eval=time_eval(first[0], opts, device) if first else None,
        )
        nproc = (
            opts.nproc
            if opts.nproc is not None
            else (torch.cuda.device_count() if device.type == "cuda" else 0)
        )
        if nproc > 1:
            try:
                ddp = torchrun(opts, nproc, "ddp", os.path.join(tmp, "ddp.json"), forwarded(opts))
            except RuntimeError as e:
                ddp = [dict(row="torchrun", compile=False, world=nproc, error=str(e)[:300])]
            one = {r["row"]: r for r in rows if not r["compile"] and "images_per_s" in r}
            for r in ddp:  # images/s on N GPUs over N x images/s on one, the same per-GPU batch
                if r["row"] in one and "images_per_s" in r:
                    r["scaling_efficiency"] = r["images_per_s"] / (nproc * one[r["row"]]["images_per_s"])
            result["torchrun"] = ddp
        result["seconds"] = time.time() - t0
    print(
        f"{result['device']}, torch {result['torch']}, open_clip {result['open_clip']}, model {result['model']}, "
        f"batch {opts.batch_size} per GPU, {opts.steps} timed steps a row\n"
    )
    print(table(rows + result.get("torchrun", [])))
    for r in result.get("torchrun", []):
        if "scaling_efficiency" in r:
            print(f"scaling efficiency {r['row']} on {r['world']} GPUs: {100 * r['scaling_efficiency']:.0f}%")
    if result["eval"]:
        print(
            f"\neval encode: {result['eval']['images_per_s']:.0f} images/s, {result['eval']['texts_per_s']:.0f} texts/s"
        )
    return result


# -----------------------------------------------------------------------------
# --cpu_scaling


def scaling_worker(opts):
    """a child of --cpu_scaling (opts.config: batch, k, threads, steps, flags): clip_scratch's step with
    its global batch split over the processes and --accum_steps k, on `threads` threads each -> rank 0
    writes {ms_per_step, peak_rss_gib}"""
    cfg = json.loads(opts.config)
    torch.set_num_threads(cfg["threads"])
    in_torchrun = "RANK" in os.environ
    rank, local_rank, world, device = (
        setup_distributed("cpu") if in_torchrun else (0, 0, 1, torch.device("cpu"))
    )
    B = cfg["batch"] // world
    args = clip_scratch.get_args(["--batch_size", str(B), "--accum_steps", str(cfg["k"]), *cfg["flags"]])
    torch.manual_seed(0)
    clip, trained, _, groups, state = clip_scratch.make_model(args, device)
    dataset, _, _ = clip_scratch.make_data(args, rank, world)
    optimizer = torch.optim.AdamW(groups, lr=1e-5, betas=(0.9, 0.98), eps=1e-6, fused=True)
    model = wrap(trained, args, world, local_rank, device)
    keys = [[s * cfg["batch"] + rank * B + j for j in range(B)] for s in range(2)]
    alternate = itertools.cycle([clip_scratch.make_batch([dataset[k] for k in ks], args)[0] for ks in keys])

    def step():
        loss, _ = clip_scratch.step_loss(model, next(alternate), args, state)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    ms, peak = timed(step, device, cfg["steps"], warmup=2)
    if rank == 0:
        json.dump(dict(ms_per_step=ms, peak_rss_gib=peak), open(opts.out, "w"))
    if world > 1:
        torch.distributed.destroy_process_group()


def scaling_run(opts, nproc, cfg, out):
    """one --cpu_scaling child: nproc processes (torchrun's gloo for 2) -> what its rank 0 wrote"""
    flags = ["--config", json.dumps(cfg)]
    if nproc > 1:
        return torchrun(opts, nproc, "scaling", out, flags)
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", "scaling", "--out", out, *flags]
    env = dict(os.environ, PYTHONPATH=ROOT, OMP_NUM_THREADS=str(cfg["threads"]))
    subprocess.run(cmd, env=env, check=True, timeout=1800)
    return json.load(open(out))


# a step whose activations outweigh the process (the small model at 128 px): --accum_steps' memory
MEMORY_FLAGS = ["--model_size", "small", "--image_size", "128"]


def cpu_scaling(opts):
    """1 process vs 2 gloo processes at the same global batch, and --accum_steps 4 vs 1, alternating in
    rounds; then the peak RSS of K = 1, 2, 4 on a step whose activations dominate, one process each"""
    cores, batch, steps = os.cpu_count(), opts.batch_size, opts.steps
    runs = {  # one thread per process (see above)
        "1 process, K=1": (1, dict(batch=batch, k=1, threads=1, steps=steps, flags=[])),
        "2 gloo processes, K=1": (2, dict(batch=batch, k=1, threads=1, steps=steps, flags=[])),
        "1 process, K=4": (1, dict(batch=batch, k=4, threads=1, steps=steps, flags=[])),
    }
    times, peaks = {name: [] for name in runs}, {}
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "w.json")
        for _ in range(opts.rounds):
            for name, (nproc, cfg) in runs.items():
                times[name].append(scaling_run(opts, nproc, cfg, out)["ms_per_step"])
        for k in (1, 2, 4):
            cfg = dict(batch=batch // 2, k=k, threads=1, steps=2, flags=MEMORY_FLAGS)
            peaks[f"K={k}"] = scaling_run(opts, 1, cfg, out)["peak_rss_gib"]
    ms = {name: statistics.median(t) for name, t in times.items()}
    result = dict(
        what=f"clip_scratch.py's default step (tiny, 64 px, fp32) at global batch {batch} on a CPU of {cores} "
        f"cores shared with other jobs (not quiet): medians of {opts.rounds} alternating rounds of {steps} "
        "steps, one thread per process",
        torch=torch.__version__,
        cores=cores,
        ms_per_step=ms,
        ms_per_step_rounds=times,
        two_processes_over_one=ms["2 gloo processes, K=1"] / ms["1 process, K=1"],
        accum4_over_accum1_per_sample=ms["1 process, K=4"] / ms["1 process, K=1"],
        memory_what=f"peak RSS of one process, {' '.join(MEMORY_FLAGS)}, batch {batch // 2}, by --accum_steps",
        peak_rss_gib=peaks,
    )
    print(json.dumps(result, indent=1))
    return result


# -----------------------------------------------------------------------------
# README's block, made from the committed results

MARKERS = ("<!-- scale-table:start -->", "<!-- scale-table:end -->")
RESULTS = os.path.join(ROOT, "bench", "results")


def readme_block(results=RESULTS):
    """README's text between MARKERS: the GPU table from gpu.json (a GPU's run; "not measured" without
    one) and the CPU ratios from cpu_scaling.json"""
    gpu, cpu = (os.path.join(results, n) for n in ("gpu.json", "cpu_scaling.json"))
    lines = []
    if os.path.exists(gpu) and json.load(open(gpu)).get("device", "cpu") != "cpu":
        g = json.load(open(gpu))
        lines += [
            f"On {g['device']} (torch {g['torch']}, {g['model']}, batch {g['batch_size']} per GPU, {g['dtype']}):",
            "",
            table(g["rows"] + g.get("torchrun", [])),
            "",
        ]
    else:
        lines += ["On a GPU: not measured (`python bench/gpu.py` has not run on one yet).", ""]
    if os.path.exists(cpu):
        c = json.load(open(cpu))
        ms = c["ms_per_step"]
        ratio = {  # 2 processes: step time (each holds half the batch); K = 4: time per sample (the same batch)
            "2 gloo processes, K=1": f"{c['two_processes_over_one']:.2f} (step time)",
            "1 process, K=4": f"{c['accum4_over_accum1_per_sample']:.2f} (time per sample)",
        }
        lines += [f"On a CPU: {c['what']}.", "", "| run | ms/step | vs 1 process, K=1 |", "|---|---|---|"]
        lines += [f"| {k} | {v:.0f} | {ratio.get(k, '1')} |" for k, v in ms.items()]
        lines += [
            "",
            f"Memory, {c['memory_what']}: "
            + ", ".join(f"{k} {v:.2f} GiB" for k, v in c["peak_rss_gib"].items())
            + ".",
        ]
    return "\n".join(lines) + "\n"


def publish(path=os.path.join(ROOT, "README.md")):
    """readme_block() into README.md between its MARKERS, atomically"""
    text = open(path).read()
    start, end = text.index(MARKERS[0]) + len(MARKERS[0]) + 1, text.index(MARKERS[1])
    with open(path + ".tmp", "w") as f:
        f.write(text[:start] + readme_block() + text[end:])
    os.replace(path + ".tmp", path)


def main(argv=None):
    opts = get_args(argv)
    if opts.publish:
        return publish()
    if opts.worker == "ddp":
        return ddp_worker(opts)
    if opts.worker == "scaling":
        return scaling_worker(opts)
    result = cpu_scaling(opts) if opts.cpu_scaling else gpu_benchmark(opts)
    os.makedirs(os.path.dirname(os.path.abspath(opts.out)), exist_ok=True)
    with open(opts.out, "w") as f:
        json.dump(result, f, indent=1)
    print(f"\nwrote {opts.out}")


if __name__ == "__main__":
    main()
