"""Helpers shared by the test files (imported as `helpers`; conftest.py holds the fixtures): the tiny
CLI settings, running a script as a user would (one process, torchrun's 2 gloo processes, killed
mid-run and resumed; a run that stops on a bad flag or file in this process, run_here), 2 gloo
processes in-process, tiny checkpoints, and private copies of the fixtures."""

import contextlib
import importlib
import io
import os
import random
import shutil
import signal
import subprocess
import sys

import numpy as np
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from model import CLIP, model_config
from training import one_error

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIX = os.path.join(ROOT, "tests", "fixtures")
TINY = ["--batch_size", "8", "--image_size", "32", "--eval_every", "0", "--log_every", "1", "--eval_n", "40"]


def run(args, **kw):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=ROOT)
    return subprocess.run(
        [sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300, **kw
    )


def start(args):
    """run(args) begun in the background (a second core's worth): finish(start(args)) == run(args)"""
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=ROOT)
    return subprocess.Popen(
        [sys.executable, *args], cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )


def finish(proc):
    out, err = proc.communicate(timeout=300)
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def run_here(args):
    """run(args) for a run that stops on a bad flag or file, without a process start (~4 s of imports on
    the 2-core CI machine): the script's main(argv) in this process inside one_error(), as its
    `__main__` block runs it (sys.argv set as `python script ...` sets it), with its stdout, stderr and
    exit code captured and the random states put back. A run that trains, or anything under torchrun,
    goes through run()."""
    script, *argv = args
    module = importlib.import_module(script.removesuffix(".py"))
    out, err, code = io.StringIO(), io.StringIO(), 0
    saved = sys.argv, random.getstate(), np.random.get_state()
    sys.argv = list(args)
    try:
        with torch.random.fork_rng(), contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                with one_error():
                    module.main(argv)
            except SystemExit as e:  # as the interpreter exits: a message to stderr and 1, else the code
                code = 0 if e.code is None else 1 if isinstance(e.code, str) else e.code
                if isinstance(e.code, str):
                    print(e.code, file=sys.stderr)
    finally:
        sys.argv = saved[0]
        random.setstate(saved[1])
        np.random.set_state(saved[2])
    return subprocess.CompletedProcess(args, code, out.getvalue(), err.getvalue())


def load_weights(out_dir):
    return torch.load(os.path.join(out_dir, "ckpt.pt"), weights_only=True)


def run_and_kill(args, prefix="step 3/"):
    """start a run and SIGKILL it when it prints a line starting with prefix (mid-run, between checkpoints)"""
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=ROOT)
    proc = subprocess.Popen(
        [sys.executable, *args],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    for line in proc.stdout:
        if line.startswith(prefix):
            proc.send_signal(signal.SIGKILL)
            break
    proc.wait()


def torchrun(args, nproc=2):
    """args = [script, flags...] under torchrun, nproc gloo processes on CPU"""
    return run(
        [
            "-m",
            "torch.distributed.run",
            "--standalone",
            f"--nproc_per_node={nproc}",
            args[0],
            "--device",
            "cpu",
            *args[1:],
        ]
    )


def one_and_two_processes(tmp_path, script, batch_size, common):
    """the DDP property's two runs: 1 process x batch_size in tmp_path/one, torchrun's 2 gloo
    processes x batch_size / 2 in tmp_path/two, both to the end -> (the 1-process run's result,
    its checkpoint, the 2-process checkpoint)"""
    single = run([script, "--batch_size", str(batch_size), "--out_dir", str(tmp_path / "one"), *common])
    assert single.returncode == 0, single.stderr
    ddp = torchrun(
        [script, "--batch_size", str(batch_size // 2), "--out_dir", str(tmp_path / "two"), *common]
    )
    assert ddp.returncode == 0, ddp.stderr
    return single, load_weights(tmp_path / "one"), load_weights(tmp_path / "two")


def killed_and_resumed(tmp_path, args):
    """args (with --max_steps N and --ckpt_every 2) run to the end in tmp_path/ref, and again in
    tmp_path/killed, SIGKILLed at step 3 (after the step-2 checkpoint) and then --resumed to the
    end -> (the uninterrupted run's result, its checkpoint, the resumed run's checkpoint)"""
    steps = int(args[args.index("--max_steps") + 1])
    ref = start([*args, "--out_dir", str(tmp_path / "ref")])  # beside the other two, on the other core
    out = tmp_path / "killed"
    run_and_kill([*args, "--out_dir", str(out)])
    assert 2 <= load_weights(out)["step"] < steps
    resumed = run([*args, "--out_dir", str(out), "--resume"])
    assert resumed.returncode == 0, resumed.stderr
    ref = finish(ref)
    assert ref.returncode == 0, ref.stderr
    assert "resumed from" in resumed.stdout
    a, b = load_weights(tmp_path / "ref"), load_weights(out)
    assert a["step"] == b["step"] == steps
    return ref, a, b


def eval_lines(stdout):
    """the metrics of every 'eval <split> step <n> (<t>s): key value  key value ...' line a script
    printed, in order -> [{key: float}]"""
    lines = [
        line.split("): ", 1)[1] for line in stdout.splitlines() if line.startswith("eval ") and "): " in line
    ]
    return [{k: float(v) for k, v in (pair.split(" ") for pair in line.split("  "))} for line in lines]


VSR_RATES = ("vsr/acc", "vsr/macro_f1", "vsr_threshold/acc", "vsr_threshold/macro_f1")
STATEMENT_RATES = ("statements/acc", "statements/macro_f1")  # the shapes world's statements, not VSR's data


def vsr_rates(metrics, rates=VSR_RATES):
    """the VSR accuracies and macro F1s among metrics (seen/ and unseen/ ones too; rates=
    STATEMENT_RATES: the shapes world's statements'), each checked to lie in [0, 1] -> {key: value}"""
    rates = {k: v for k, v in metrics.items() if k.endswith(rates)}
    assert all(0 <= v <= 1 for v in rates.values()), rates
    return rates


def statement_rates(metrics):
    return vsr_rates(metrics, STATEMENT_RATES)


def _gloo_worker(rank, world, store, fn, args):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    try:
        fn(rank, *args)
    finally:
        dist.destroy_process_group()


def gloo_processes(tmp_path, fn, *args, world=2):
    """fn(rank, *args) in `world` spawned processes joined in one gloo process group (CPU), as DDP
    runs them; fn must be a module-level function, and hands its results back through files"""
    mp.spawn(_gloo_worker, args=(world, str(tmp_path / "gloo_store"), fn, args), nprocs=world, join=True)


def tiny_ckpt(path, image_size=32, context_length=32, seed=0, model=None, cfg=None, **extra):
    """a minclip checkpoint at path, {"model", "model_cfg", **extra}: model's weights, or a random
    tiny CLIP's (image_size, context_length; torch.manual_seed(seed) first, unless seed is None) ->
    the path, as --init and --model take it"""
    if model is None:
        cfg = model_config("tiny", image_size, context_length)
        if seed is not None:
            torch.manual_seed(seed)
        model = CLIP(**cfg)
    torch.save({"model": model.state_dict(), "model_cfg": cfg, **extra}, path)
    return str(path)


def fixture_copy(tmp_path, name):
    """a private copy of the committed fixture tests/fixtures/<name>, safe to break -> its path"""
    return shutil.copytree(os.path.join(FIX, name), tmp_path / name)
