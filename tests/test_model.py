"""model.py's fine-tuning helpers and load_clip (--init): which parameters each fine-tune mode
trains, by name, and open_clip models turned into minclip's CLIP with identical embeddings."""

import json

import open_clip
import pytest
import torch
from helpers import tiny_ckpt

import model
import training
from model import (
    CLIP,
    FINETUNE_MODES,
    export_open_clip,
    load_clip,
    load_model,
    model_config,
    param_groups,
    set_trainable,
)

TEXT = {
    "token_embedding.weight",
    "positional_embedding",
    "ln_final.weight",
    "ln_final.bias",
    "text_projection",
}


def test_set_trainable_freezes_exactly_the_documented_parameters():
    model = CLIP(**model_config("tiny", 32, 32))
    names = [n for n, _ in model.named_parameters()]
    for mode in FINETUNE_MODES:
        trainable = set(set_trainable(model, mode))
        assert trainable == {n for n, p in model.named_parameters() if p.requires_grad}
        for n in names:
            if mode == "full" or n == "logit_scale":
                want = True
            elif mode == "text":
                want = n in TEXT or n.startswith("transformer.")
            elif mode == "vision":
                want = n.startswith("visual.")
            else:  # last: the 4-block vision tower's block 3, the 2-block text tower's block 1
                want = n.startswith(("visual.transformer.resblocks.3.", "transformer.resblocks.1."))
            assert (n in trainable) == want, (mode, n)
        # frozen parameters never reach the optimizer
        in_groups = {id(p) for g in param_groups(model, 0.1) for p in g["params"]}
        assert in_groups == {id(p) for n, p in model.named_parameters() if n in trainable}
    with pytest.raises(ValueError, match="fine-tune mode"):
        set_trainable(model, "head")


@pytest.mark.parametrize("quick_gelu", [False, True])
def test_load_clip_turns_an_open_clip_model_into_minclip(tmp_path, quick_gelu):
    cfg = {**model_config("tiny", 32, 32), "quick_gelu": quick_gelu}
    torch.manual_seed(0)
    theirs = open_clip.CLIP(**cfg).eval()
    with torch.no_grad():
        for p in theirs.parameters():
            p.add_(0.02 * torch.randn_like(p))
    hub = tmp_path / "hub"
    export_open_clip(theirs, cfg, str(hub))
    ours, model_cfg, _, tokenizer = load_clip(f"local-dir:{hub}")
    assert isinstance(ours, CLIP) and model_cfg == json.load(open(hub / "open_clip_config.json"))["model_cfg"]
    images, tokens = torch.randn(2, 3, 32, 32), tokenizer(["a small red circle left of a blue ring", "a"])
    with torch.no_grad():
        torch.testing.assert_close(ours.encode_image(images), theirs.encode_image(images), atol=1e-5, rtol=0)
        torch.testing.assert_close(ours.encode_text(tokens), theirs.encode_text(tokens), atol=1e-5, rtol=0)
    # a minclip checkpoint comes back as itself
    again, cfg2, _, _ = load_clip(tiny_ckpt(tmp_path / "ckpt.pt", model=ours, cfg=model_cfg))
    assert cfg2 == model_cfg and all(
        torch.equal(a, b) for a, b in zip(again.state_dict().values(), ours.state_dict().values())
    )


@pytest.mark.parametrize(
    "where, option",
    [
        ("text_cfg", {"pool_type": "last"}),
        ("vision_cfg", {"ls_init_value": 1e-5}),
        ("vision_cfg", {"attentional_pool": True}),
        ("", {"custom_text": True}),
    ],
)
def test_clip_refuses_open_clip_options_it_would_ignore(where, option):
    cfg = model_config("tiny", 32, 32)
    cfg = {**cfg, where: {**cfg[where], **option}} if where else {**cfg, **option}
    with pytest.raises(ValueError, match="unsupported open_clip options"):
        CLIP(**cfg)
    # the default is fine
    CLIP(
        **{
            **model_config("tiny", 32, 32),
            "text_cfg": {**model_config("tiny", 32, 32)["text_cfg"], "pool_type": "argmax"},
        }
    )


def test_load_clip_refuses_in_one_line(monkeypatch):
    cfg = model_config("tiny", 32, 32)
    theirs = open_clip.CLIP(**cfg)
    theirs.model_cfg, theirs.image_size = {**cfg, "text_cfg": {**cfg["text_cfg"], "pool_type": "last"}}, 32
    monkeypatch.setattr(model, "load_model", lambda spec, device="cpu", flag="--model": (theirs, None, None))
    with pytest.raises(
        SystemExit,
        match=r"^error: --init x: minclip's CLIP cannot hold this model \(unsupported open_clip options",
    ):
        load_clip("x")


@pytest.mark.parametrize(
    "config, message",
    [
        ('{\n  "model_cfg": {,\n}', r"open_clip_config.json:2: malformed JSON"),
        ("[1, 2]", 'has no "model_cfg" object'),
    ],
)
def test_a_broken_hub_config_is_one_line(tmp_path, config, message):
    (tmp_path / "open_clip_config.json").write_text(config)
    (tmp_path / "open_clip_model.safetensors").write_bytes(b"")
    with pytest.raises(SystemExit, match=message):
        load_model(f"local-dir:{tmp_path}")


@pytest.mark.parametrize("script", ["clip_scratch", "clip_hardneg", "clip_dpo"])
def test_dist_timeout_reaches_init_process_group(monkeypatch, script):
    """--dist_timeout (default 2 h: nccl's own 10 min is shorter than a large image cache or a rank-0
    evaluation) goes from each script's main through setup_distributed to init_process_group"""
    import datetime
    import importlib

    seen = []
    for k, v in {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1"}.items():
        monkeypatch.setenv(k, v)
    monkeypatch.setattr(
        training.dist, "init_process_group", lambda backend, **kw: seen.append((backend, kw.get("timeout")))
    )
    module = importlib.import_module(script)
    assert module.get_args([]).dist_timeout == 7200

    def stop(device, *timeout):  # the real setup_distributed, then stop before any data is read
        training.setup_distributed(device, *timeout)
        raise SystemExit("stopped")

    monkeypatch.setattr(module, "setup_distributed", stop)
    with pytest.raises(SystemExit, match="stopped"):
        module.main(["--device", "cpu", "--dist_timeout", "99"])
    assert seen == [("gloo", datetime.timedelta(seconds=99))]


def test_load_clip_reports_the_preprocessing_init_preprocess_reads(tmp_path):
    """a hub folder whose config squashes with mean / std 0.5: init_preprocess reads it before any
    weights, load_clip's model carries the same (what its preprocess applies), and the fine-tuning
    scripts' get_args take it for their data; a minclip checkpoint keeps open_clip's default"""
    from PIL import Image

    import data

    cfg = model_config("tiny", 32, 32)
    hub = tmp_path / "hub"
    export_open_clip(CLIP(**cfg), cfg, str(hub))
    config = json.load(open(hub / "open_clip_config.json"))
    config["preprocess_cfg"] |= {"mean": [0.5] * 3, "std": [0.5] * 3, "resize_mode": "squash"}
    json.dump(config, open(hub / "open_clip_config.json", "w"))
    spec = f"local-dir:{hub}"
    want = model.init_preprocess(spec)
    assert want["mean"] == (0.5, 0.5, 0.5) and want["resize_mode"] == "squash"
    clip, _, preprocess, _ = load_clip(spec)
    assert clip.preprocess_cfg == want
    Image.fromarray((torch.rand(40, 90, 3) * 255).byte().numpy()).save(tmp_path / "wide.png")
    assert torch.equal(
        preprocess(Image.open(tmp_path / "wide.png")),
        data.to_tensor(data.load_image(tmp_path / "wide.png", 32, want), want),
    )
    import clip_dpo
    import clip_hardneg

    assert (
        clip_dpo.get_args(["--init", spec]).preprocess
        == clip_hardneg.get_args(["--init", spec]).preprocess
        == want
    )
    ckpt = tiny_ckpt(tmp_path / "ckpt.pt")
    assert load_clip(ckpt)[0].preprocess_cfg == model.init_preprocess(ckpt) == data.PREPROCESS


def test_load_clip_converts_on_the_cpu_then_moves_one_copy(tmp_path, monkeypatch):
    """open_clip's model is loaded on the CPU and turned into minclip's CLIP there (built on the meta
    device: its tensors are open_clip's, no random copy), and only then moved: the device never holds
    both (the meta device stands in for a GPU here)"""
    cfg = model_config("tiny", 32, 32)
    torch.manual_seed(0)
    theirs = open_clip.CLIP(**cfg)
    export_open_clip(theirs, cfg, str(tmp_path / "hub"))
    asked, real = [], model.load_model
    monkeypatch.setattr(
        model,
        "load_model",
        lambda spec, device="cpu", flag="--model": (asked.append(str(device)), real(spec, device, flag))[1],
    )
    on_meta, _, _, _ = load_clip(f"local-dir:{tmp_path / 'hub'}", device="meta")
    assert asked == ["cpu"] and all(p.is_meta for p in on_meta.parameters())
    ours, _, _, _ = load_clip(f"local-dir:{tmp_path / 'hub'}")
    assert ours.state_dict().keys() == theirs.state_dict().keys()
    assert all(torch.equal(v, theirs.state_dict()[k]) for k, v in ours.state_dict().items())
    assert all(p.requires_grad for p in ours.parameters())


class OnGPU(torch.Tensor):
    """a CPU tensor that says it lives on cuda:0 (a CPU-only machine has no CUDA tensor to save): every
    op runs on its CPU data, and torch.save would write it as this class on that device"""

    @staticmethod
    def __new__(cls, data):
        t = torch.Tensor._make_wrapper_subclass(cls, data.shape, dtype=data.dtype, device="cuda")
        t.cpu_data = data
        return t

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        unwrap = lambda x: x.cpu_data if isinstance(x, OnGPU) else x  # noqa: E731
        return func(
            *torch.utils._pytree.tree_map(unwrap, args), **torch.utils._pytree.tree_map(unwrap, kwargs or {})
        )


def test_checkpoints_hold_cpu_tensors_that_load_without_map_location(tmp_path):
    """save_checkpoint moves every tensor of the checkpoint (weights, optimizer state, nested) to the CPU:
    a checkpoint written on a GPU loads with torch.load(path, weights_only=True) on a CPU-only machine"""
    w, m = torch.randn(3, 2), torch.randn(3, 2)
    assert OnGPU(w).device.type == "cuda"
    model.save_checkpoint(
        str(tmp_path / "ckpt.pt"),
        {
            "model": {"w": OnGPU(w)},
            "step": 7,
            "args": {"lr": 0.1},
            "optimizer": {
                "state": {0: {"exp_avg": OnGPU(m), "step": torch.tensor(7.0)}},
                "param_groups": [{"params": [0], "lr": 0.1}],
            },
        },
    )
    ckpt = torch.load(tmp_path / "ckpt.pt", weights_only=True)  # no map_location
    assert (
        type(ckpt["model"]["w"]) is torch.Tensor
        and ckpt["model"]["w"].device.type == "cpu"
        and torch.equal(ckpt["model"]["w"], w)
    )
    assert (
        torch.equal(ckpt["optimizer"]["state"][0]["exp_avg"], m)
        and ckpt["optimizer"]["state"][0]["exp_avg"].device.type == "cpu"
    )
    assert ckpt["step"] == 7 and ckpt["optimizer"]["param_groups"] == [{"params": [0], "lr": 0.1}]


@pytest.mark.parametrize(
    "name, dtype, peak",
    [
        ("NVIDIA H100 80GB HBM3", "bfloat16", 989e12),
        ("NVIDIA H100 80GB HBM3", "float32", 495e12),
        ("NVIDIA H100 PCIe", "bfloat16", 756e12),
        ("NVIDIA H100 NVL", "bfloat16", 835e12),
        ("NVIDIA H200", "float16", 989e12),
        ("NVIDIA A100-SXM4-80GB", "float32", 156e12),
        ("NVIDIA L4", "bfloat16", 121e12),
        ("NVIDIA H100 80GB HBM3 MIG 1g.10gb", "bfloat16", 0.0),
        ("Tesla V100-SXM2-16GB", "bfloat16", 0.0),
        ("NVIDIA A10G", "bfloat16", 0.0),
    ],
)
def test_peak_flops_by_exact_name_and_dtype(monkeypatch, name, dtype, peak):
    """MFU's peak: the exact device name (an H100 PCIe or NVL is not the SXM part; a MIG slice or an
    unlisted card is unknown: 0, no MFU) at the run's dtype (float32 runs use TF32's peak)"""
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: name)
    assert training.peak_flops(torch.device("cuda"), dtype) == peak
    assert training.peak_flops(torch.device("cpu"), dtype) == 0.0


def test_float32_runs_on_cuda_switch_tf32_on():
    was = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    try:
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
        with training.autocast_ctx(torch.device("cpu"), "float32"):
            assert not torch.backends.cuda.matmul.allow_tf32  # CPU runs: untouched
        with training.autocast_ctx(torch.device("cuda"), "float32"):
            assert torch.backends.cuda.matmul.allow_tf32 and torch.backends.cudnn.allow_tf32
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = was


def test_a_fine_tune_keeps_its_inits_preprocessing_through_eval_and_export(tmp_path):
    """a checkpoint with the --init's preprocess_cfg (what clip_hardneg.py / clip_dpo.py save): init_preprocess
    and load_model (eval.py) read it, its preprocess is open_clip's transform of it, --export writes it
    to the hub folder open_clip loads; a checkpoint without one keeps open_clip's default"""
    from PIL import Image

    import data

    cfg = model_config("tiny", 32, 32)
    squash = {**data.PREPROCESS, "mean": (0.5, 0.5, 0.5), "std": (0.5, 0.5, 0.5), "resize_mode": "squash"}
    ckpt = tiny_ckpt(tmp_path / "ckpt.pt", preprocess_cfg=squash)
    assert model.init_preprocess(ckpt) == squash
    loaded, preprocess, _ = load_model(ckpt)
    assert loaded.preprocess_cfg == squash
    Image.fromarray((torch.rand(40, 90, 3) * 255).byte().numpy()).save(tmp_path / "wide.png")
    assert torch.equal(
        preprocess(Image.open(tmp_path / "wide.png")),
        data.to_tensor(data.load_image(tmp_path / "wide.png", 32, squash), squash),
    )
    export_open_clip(loaded, cfg, str(tmp_path / "hub"))
    assert model.init_preprocess(f"local-dir:{tmp_path / 'hub'}") == squash
    _, _, theirs = open_clip.create_model_and_transforms(f"local-dir:{tmp_path / 'hub'}")
    assert torch.equal(
        theirs(Image.open(tmp_path / "wide.png")), preprocess(Image.open(tmp_path / "wide.png"))
    )
    assert load_model(tiny_ckpt(tmp_path / "plain.pt"))[0].preprocess_cfg == data.PREPROCESS
