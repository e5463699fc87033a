"""The loop contract: main() is the same text in the three scripts, the comment above it says which
hooks it calls, and every script has them with those signatures, so a method is its hooks."""

import inspect
import re

import pytest

import clip_dpo
import clip_hardneg
import clip_scratch
import training

SCRIPTS = (clip_scratch, clip_hardneg, clip_dpo)
HOOKS = {
    "get_args": ["argv"],
    "make_data": ["args", "rank", "world"],
    "make_model": ["args", "device"],
    "make_batch": [None, "args"],
    "step_loss": ["model", "batch", "args", "state"],
    "save_state": ["state"],
    "resume": ["path", "clip", "state"],
}


def contract(module):
    """the comment block between the loop's section line and def main"""
    text = inspect.getsource(module)
    end = text.index("\ndef main(argv=None):")
    return text[text.rindex("# ---", 0, end) : end]


def test_main_and_its_contract_are_the_same_text_in_every_script():
    assert (
        inspect.getsource(clip_scratch.main)
        == inspect.getsource(clip_hardneg.main)
        == inspect.getsource(clip_dpo.main)
    )
    assert contract(clip_scratch) == contract(clip_hardneg) == contract(clip_dpo)
    assert len(inspect.getsource(clip_scratch.main).splitlines()) <= 100


@pytest.mark.parametrize("module", SCRIPTS, ids=lambda m: m.__name__)
def test_every_hook_the_contract_names_is_there(module):
    said = set(re.findall(r"^#   (\w+)\(", contract(module), re.M))
    assert said == set(HOOKS)
    for name, params in HOOKS.items():
        got = list(inspect.signature(getattr(module, name)).parameters)
        assert [p for p, want in zip(got, params) if want is not None] == [
            w for w in params if w is not None
        ], (module.__name__, name)
    assert isinstance(module.EQUAL_BATCHES, bool) and set(module.SHAPES) == set(module.REAL)
    assert "State" in vars(module) and {"step", "summary"} <= {
        f.name for f in module.State.__dataclass_fields__.values()
    }


def test_make_model_returns_the_named_tuple(tmp_path):
    args = clip_scratch.get_args(["--image_size", "32", "--out_dir", str(tmp_path)])
    m = clip_scratch.make_model(args, training.torch.device("cpu"))
    assert isinstance(m, training.Model) and m.clip is m.module and m.state.step == 0 and m.param_groups


def test_a_preset_fills_only_what_was_not_given():
    shapes, real = clip_dpo.get_args([]), clip_dpo.get_args(["--data", "vsr", "--init", "x", "--lr", "3e-5"])
    assert all(getattr(shapes, k) == v for k, v in clip_dpo.SHAPES.items())
    assert real.lr == 3e-5 and all(getattr(real, k) == v for k, v in clip_dpo.REAL.items() if k != "lr")
    assert clip_dpo.get_args(["--loss", "ipo"]).alpha == 0.0  # the presets' alpha is dpo_clip's
