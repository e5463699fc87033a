"""VSR as its publishers lay it out (cambridgeltl/visual-spatial-reasoning's README): the split files
in a clone's data/splits/, the images in data/images/ (its zip) or COCO 2017 merged into
data/trainval2017/, or COCO's own train2017/ + val2017/, or anywhere via --image_root; --data_root
at the clone, at its data/, or at a folder of the three files. Each layout is made from the fixture
(tests/fixtures/vsr: splits/ and COCO's train2017/ + val2017/) and must read the same rows."""

import json
import os
import shutil

import pytest
from helpers import FIX, eval_lines, tiny_ckpt, torchrun

import data
import eval as ev

FIXTURE = os.path.join(FIX, "vsr")
IMAGES = [
    os.path.join(FIXTURE, d, f)
    for d in ("train2017", "val2017")
    for f in sorted(os.listdir(os.path.join(FIXTURE, d)))
]


def rows(splits):
    """what a layout must not change: each part's (image file name, caption, label, relation)"""
    return {
        part: [(os.path.basename(r.image), r.caption, r.label, r.relation) for r in rs]
        for part, rs in splits.items()
    }


def copy_images(folder, only=None):
    os.makedirs(folder, exist_ok=True)
    for path in IMAGES:
        if only is None or os.path.basename(path) in only:
            shutil.copy(path, folder)


def layout(tmp_path, name):
    """the fixture in one of VSR's layouts -> (--data_root, --image_root or None)"""
    clone = tmp_path / "visual-spatial-reasoning"
    if name == "flat":  # a folder of the three random-split files; the images elsewhere (a flat folder)
        shutil.copytree(os.path.join(FIXTURE, "splits", "random"), tmp_path / "vsr")
        copy_images(tmp_path / "somewhere")
        return str(tmp_path / "vsr"), str(tmp_path / "somewhere")
    shutil.copytree(os.path.join(FIXTURE, "splits"), clone / "data" / "splits")
    if name in ("clone", "data"):  # VSR's README: "Images should be saved under data/images/"
        copy_images(clone / "data" / "images")
    elif name == "trainval2017":  # COCO 2017's train and val merged, as VSR's README also allows
        copy_images(clone / "data" / "trainval2017")
    elif name == "coco_root":  # COCO where it already is: --image_root at the COCO root
        for d in ("train2017", "val2017"):
            shutil.copytree(os.path.join(FIXTURE, d), tmp_path / "coco" / d)
        return str(clone), str(tmp_path / "coco")
    return str(clone / "data") if name == "data" else str(clone), None


@pytest.mark.parametrize("name", ["clone", "data", "trainval2017", "coco_root", "flat"])
def test_every_published_layout_reads_the_same_rows(tmp_path, name):
    root, image_root = layout(tmp_path, name)
    want = rows(data.read_vsr(FIXTURE, "random"))
    got = data.read_vsr(root, "random", image_root)
    assert rows(got) == want
    assert all(
        os.path.isfile(r.image) and r.image.startswith(str(tmp_path)) for part in got.values() for r in part
    )
    if name != "flat":
        assert rows(data.read_vsr(root, "zeroshot", image_root)) == rows(data.read_vsr(FIXTURE, "zeroshot"))


def test_a_missing_image_names_every_folder_looked_in(tmp_path):
    root, _ = layout(tmp_path, "clone")
    os.remove(os.path.join(root, "data", "images", "000000451431.jpg"))  # the first training row's
    with pytest.raises(data.DataError) as e:
        data.read_vsr(root, "random")
    message = str(e.value)
    assert message.startswith(
        os.path.join(root, "data", "splits", "random", "train.jsonl")
        + ":1: image 000000451431.jpg not found in "
    )
    assert (
        all(f"{d}/" in message for d in data.VSR_IMAGE_DIRS)
        and "--image_root" in message
        and "\n" not in message
    )
    with pytest.raises(data.DataError, match=r"--image_root .*nowhere: no such directory"):
        data.read_vsr(root, "random", str(tmp_path / "nowhere"))


def test_an_evaluation_needs_only_the_images_of_the_splits_it_scores(tmp_path):
    root, _ = layout(tmp_path, "clone")
    scored = data.read_vsr(FIXTURE, "random", parts=("dev", "test"))
    needed = {os.path.basename(r.image) for part in scored.values() for r in part}
    for f in os.listdir(os.path.join(root, "data", "images")):
        if f not in needed:
            os.remove(os.path.join(root, "data", "images", f))
    with pytest.raises(data.DataError, match="train.jsonl:1: image .* not found"):  # training needs its own
        data.read_vsr(root, "random")
    ckpt = tiny_ckpt(tmp_path / "m.pt")
    out = tmp_path / "m.json"
    ev.main(["--model", ckpt, "--bench", "vsr", "--data_root", root, "--json", str(out), "--device", "cpu"])
    fixture = tmp_path / "f.json"
    ev.main(
        ["--model", ckpt, "--bench", "vsr", "--data_root", FIXTURE, "--json", str(fixture), "--device", "cpu"]
    )
    got, want = json.loads(out.read_text()), json.loads(fixture.read_text())
    assert got.keys() == want.keys() and all(
        got[k] == pytest.approx(want[k], abs=1e-6) for k in want if k != "model"
    )


@pytest.mark.parametrize(
    "argv, message",
    [
        (
            ["clip_dpo", "--data", "rankings", "--image_root", "x"],
            "--image_root: --data rankings does not read it",
        ),
        (["clip_dpo", "--image_root", "x"], "--image_root: --data shapes does not read it"),
        (
            ["clip_hardneg", "--data", "coco", "--init", "x", "--image_root", "x"],
            "--image_root: --data coco does not read it",
        ),
        (
            ["eval", "--model", "x", "--bench", "coco", "--image_root", "x"],
            "--image_root: --bench coco does not read it",
        ),
        (
            ["eval", "--model", "x", "--bench", "intrinsic", "--image_root", "x"],
            "--image_root: --bench intrinsic --data shapes does not",
        ),
    ],
)
def test_an_image_root_that_would_be_ignored_is_refused(argv, message, capsys):
    module = __import__(argv[0])
    with pytest.raises(SystemExit):
        (module.get_args if hasattr(module, "get_args") else module.main)(argv[1:])
    assert message in capsys.readouterr().err


@pytest.mark.slow
def test_two_processes_train_whole_epochs_on_the_clone_layout(tmp_path):
    """torchrun's 2 gloo processes on VSR as cloned, with --image_root unused: 2 epochs of whole global
    batches, a dev eval at the end of the first, the final test eval"""
    root, _ = layout(tmp_path, "clone")
    r = torchrun(
        [
            "clip_dpo.py",
            "--data",
            "vsr",
            "--data_root",
            root,
            "--init",
            tiny_ckpt(tmp_path / "init.pt"),
            "--epochs",
            "2",
            "--batch_size",
            "1",
            "--workers",
            "0",
            "--log_every",
            "1",
            "--out_dir",
            str(tmp_path / "o"),
        ]
    )
    assert r.returncode == 0, r.stderr
    groups = int(r.stdout.split(" train rows -> ")[1].split(" preference groups")[0])
    per_epoch = groups // 2
    assert (
        f"2 epochs of {groups} items = {2 * per_epoch} steps ({per_epoch} an epoch) of global batch 2 (2 x 1)"
        in r.stdout
    )
    assert (
        f"step {2 * per_epoch}/{2 * per_epoch} |" in r.stdout and f"eval val step {per_epoch} (" in r.stdout
    )
    # the start (test), the end of epoch 1 (val), the end of the run (test)
    assert len(eval_lines(r.stdout)) == 3
