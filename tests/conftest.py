"""Helpers shared by the test files: the tiny CLI settings, running a script as a user would, and
killing one mid-run."""
import os
import signal
import subprocess
import sys

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ["--batch_size", "8", "--image_size", "32", "--eval_every", "0", "--log_every", "1", "--eval_n", "40"]


def run(args, **kw):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=ROOT)
    return subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300, **kw)


def load_weights(out_dir):
    return torch.load(os.path.join(out_dir, "ckpt.pt"), weights_only=True)


def run_and_kill(args, prefix="step 3/"):
    """start a run and SIGKILL it when it prints a line starting with prefix (mid-run, between checkpoints)"""
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=ROOT)
    proc = subprocess.Popen([sys.executable, *args], cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    for line in proc.stdout:
        if line.startswith(prefix):
            proc.send_signal(signal.SIGKILL)
            break
    proc.wait()
