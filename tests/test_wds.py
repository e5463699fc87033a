"""wds.py, --data wds: img2dataset's webdataset shards (written here under tmp_path in its exact
layout: <key>.jpg, <key>.json, <key>.txt a sample, keys = 5-digit shard id + row, rows in download
order with failed downloads missing), split across ranks and DataLoader workers, resumed from the
step count, damaged shards and bad samples counted and skipped; the scripts' CLI on such shards."""

import io
import json
import os
import random
import sys
import tarfile

import numpy as np
import pytest
import torch
from helpers import ROOT, TINY, gloo_processes, killed_and_resumed, load_weights, run, run_here, tiny_ckpt
from PIL import Image

import clip_scratch
import data
import shapes
import training
import wds

sys.path.insert(0, os.path.join(ROOT, "bench", "tools"))
import export_shapes  # noqa: E402

SHARDS, ROWS = 6, 5  # every shard: 5 of the rows 0..6 (two failed downloads each)


def jpeg(i, size=16):
    buf = io.BytesIO()
    Image.fromarray(np.full((size, size, 3), (i * 37) % 256, np.uint8)).save(buf, "jpeg")
    return buf.getvalue()


def img2dataset_tar(path, shard_id, rows, files=None):
    """a shard as img2dataset writes it through webdataset's TarWriter: per sample the files sorted
    by extension (jpg, json, txt), mode 0o444, user/group bigdata; rows in the order the downloads
    finished. files: key -> {ext: bytes} replacing a sample's files. -> the keys written"""
    keys = []
    with tarfile.open(path, "w|") as tar:
        for row in rows:
            key = f"{shard_id:05d}{row:04d}"
            caption = f"caption {key}"
            meta = {"url": f"http://x/{key}.jpg", "caption": caption, "re_caption": f"synthetic {key}"}
            meta |= {"key": key, "status": "success", "error_message": None, "width": 16, "height": 16}
            sample = {"jpg": jpeg(row), "json": json.dumps(meta, indent=4).encode(), "txt": caption.encode()}
            for ext, value in sorted((files or {}).get(key, sample).items()):
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size, info.mode, info.uname, info.gname, info.mtime = (
                    len(value),
                    0o444,
                    "bigdata",
                    "bigdata",
                    1,
                )
                tar.addfile(info, io.BytesIO(value))
            keys.append(key)
    return keys


@pytest.fixture
def shards(tmp_path):
    """SHARDS shards of ROWS samples -> (their folder, every key)"""
    folder, keys = tmp_path / "shards", []
    folder.mkdir()
    for s in range(SHARDS):
        rows = random.Random(s).sample(range(ROWS + 2), ROWS)  # download order, two rows failed
        keys += img2dataset_tar(folder / f"{s:05d}.tar", s, rows)
    return folder, keys


def keyed(key, files, rng):  # a Shards sample that is its key (a str would be a reason to skip it)
    return (key,)


def as_is(samples):  # a collate that keeps the samples' keys
    return [key for (key,) in samples], {}


def steps_seen(folder, rank, world, workers, start, stop, batch_size=5, seed=0, sample=keyed, collate=as_is):
    """the batches [start, stop) one rank reads -> [(samples, counts)] per step"""
    paths = wds.shard_paths(str(folder / "{00000..00005}.tar"))
    shards = wds.Shards(paths, sample, rank, world, seed)
    return list(shards.loader(collate, batch_size, start, stop, workers))


def test_brace_patterns_lists_and_folders(shards, tmp_path):
    folder, _ = shards
    names = lambda ps: [os.path.basename(p) for p in ps]
    assert names(wds.expand("s/{00000..00003}.tar")) == [f"{i:05d}.tar" for i in range(4)]
    assert wds.expand("{8..11}") == ["8", "9", "10", "11"]
    assert wds.expand("{a,b{1..2}}/x.tar") == ["a/x.tar", "b1/x.tar", "b2/x.tar"]
    assert wds.expand("a.tar::b/{0..1}.tar,c.tar") == ["a.tar", "b/0.tar", "b/1.tar", "c.tar"]
    assert wds.expand("a/{x}.tar") == ["a/{x}.tar"]  # a literal brace
    assert names(wds.shard_paths(str(folder / "{00000..00005}.tar"))) == [f"{i:05d}.tar" for i in range(6)]
    assert names(wds.shard_paths(f"{folder}/00001.tar::{folder}/{{00003,00004}}.tar")) == [
        "00001.tar",
        "00003.tar",
        "00004.tar",
    ]
    assert wds.shard_paths(str(folder)) == wds.shard_paths(str(folder / "{00000..00005}.tar"))
    with pytest.raises(
        data.DataError, match=r"--data_root .*: no shard matches \(looked for .*/00010.tar and 1 more"
    ):
        wds.shard_paths(str(folder / "{00010..00011}.tar"))
    with pytest.raises(data.DataError, match=r"1 of 7 shards do not exist: .*00006.tar"):
        wds.shard_paths(str(folder / "{00000..00006}.tar"))


def test_a_shard_reads_back_sample_for_sample(shards):
    folder, keys = shards
    got = list(wds.read_shard(str(folder / "00002.tar")))
    assert [k for k, _ in got] == [k for k in keys if k.startswith("00002")]
    key, files = got[0]
    assert sorted(files) == ["jpg", "json", "txt"] and files["txt"] == f"caption {key}".encode()
    assert json.loads(files["json"])["re_caption"] == f"synthetic {key}"
    image, caption, synthetic, _ = wds.clip_sample(key, files, random.Random(0), 16, "re_caption", True)
    assert image.shape == (3, 16, 16) and (caption, synthetic) == (f"caption {key}", f"synthetic {key}")
    assert [k for k, f in wds.read_shard(str(folder / "00002.tar"), read=False)] == [k for k, _ in got]
    # CLIPS needs the json's synthetic caption: a sample without it is a named skip; plain CLIP does not read it
    no_json = {k: v for k, v in files.items() if k != "json"}
    assert wds.clip_sample(key, no_json, random.Random(0), 16, "re_caption", True) == (
        "samples without a 're_caption' in their json (--recap_key)"
    )
    assert wds.clip_sample(key, no_json, random.Random(0), 16, "re_caption", False)[2] == f"caption {key}"


def test_a_tar_cut_or_garbled_anywhere_ends_in_one_damage_entry(shards, tmp_path):
    """cut inside a header, between two members, inside a member's data or before the end-of-archive
    marker, or with a garbled header: the complete samples before the damage, then one (None, error);
    the header walk (read=False) finds the same entries"""
    folder, keys = shards
    raw = (folder / "00003.tar").read_bytes()
    with tarfile.open(folder / "00003.tar") as tar:
        members = tar.getmembers()
    whole = [k for k in keys if k.startswith("00003")]
    m = members[7]  # the third sample's json
    garbled = bytearray(raw)
    garbled[m.offset + 150] ^= 0xFF  # its header's checksum field
    damaged = {
        "in a header": raw[: m.offset + 100],
        "between members": raw[: m.offset],
        "in the data": raw[: m.offset_data + 10],
        "before the end marker": raw[: members[-1].offset_data + 512],
        "a garbled header": bytes(garbled),
    }
    for what, content in damaged.items():
        (tmp_path / "bad.tar").write_bytes(content)
        got = [k for k, _ in wds.read_shard(str(tmp_path / "bad.tar"))]
        assert got[-1] is None and got[:-1] == whole[: len(got) - 1], what
        assert len(got) - 1 == (ROWS - 1 if what == "before the end marker" else 2), what
        assert [k for k, _ in wds.read_shard(str(tmp_path / "bad.tar"), read=False)] == got, what


def test_webdataset_reads_our_shards_and_writes_what_we_read(tmp_path, shards):
    """the layout is webdataset's own: its TarWriter's tar is write_shard's byte for byte, and its
    reader finds the samples read_shard finds (needs the webdataset package)"""
    webdataset = pytest.importorskip("webdataset")
    folder, _ = shards
    samples = [(k, f) for k, f in wds.read_shard(str(folder / "00001.tar"))]
    with open(tmp_path / "theirs.tar", "wb") as f, webdataset.TarWriter(f, mtime=0) as writer:
        for key, files in samples:
            writer.write({"__key__": key, **files})
    wds.write_shard(str(tmp_path / "ours.tar"), samples, mtime=0)
    assert (tmp_path / "ours.tar").read_bytes() == (tmp_path / "theirs.tar").read_bytes()
    theirs = webdataset.WebDataset(str(folder / "00001.tar"), shardshuffle=False, empty_check=False)
    assert [(s["__key__"], s["txt"], s["jpg"]) for s in theirs] == [
        (k, f["txt"], f["jpg"]) for k, f in samples
    ]


@pytest.mark.parametrize("workers", [0, 2])
def test_ranks_and_workers_read_disjoint_samples_that_cover_the_shards(shards, workers):
    """2 ranks x 1 or 2 workers on 4 shards of 5 samples, 5 a step: the first 2 steps read every
    sample once (each rank a different one at each step), the next 2 every sample once more, in
    another order (the shards reshuffled for the readers' second pass)"""
    folder, keys = shards
    keys = [k for k in keys if k[:5] <= "00003"]
    pattern = str(folder / "{00000..00003}.tar")
    seen = {}
    for rank in (0, 1):
        loader = wds.Shards(wds.shard_paths(pattern), keyed, rank, 2, 0).loader(as_is, 5, 0, 4, workers)
        seen[rank] = [samples for samples, counts in loader]
        assert [len(samples) for samples in seen[rank]] == [5] * 4
    passes = [[k for rank in (0, 1) for step in seen[rank][a:b] for k in step] for a, b in ((0, 2), (2, 4))]
    assert sorted(passes[0]) == sorted(passes[1]) == sorted(keys)
    assert passes[0] != passes[1]


def captions_of(samples):  # a collate that keeps the captions ("caption <key>")
    return [caption for _, caption, _, _ in samples], {}


def _read_as_rank(rank, folder, out):
    args = clip_scratch.get_args(
        ["--data", "wds", "--data_root", f"{folder}/{{00000..00003}}.tar", "--train_num_samples", "20"]
        + ["--workers", "2", "--batch_size", "5", "--image_size", "16", "--max_steps", "2"]
    )
    dataset, n, evalset = clip_scratch.make_data(args, rank, 2)
    assert (n, evalset) == (20, None)
    loader = training.batches(dataset, n, captions_of, args, rank, 2, 0, torch.device("cpu"))
    with open(f"{out}/{rank}.json", "w") as f:
        json.dump([captions for captions, _ in loader], f)


@pytest.mark.slow
def test_two_processes_read_disjoint_samples_that_cover_the_shards(shards, tmp_path):
    """the real path: 2 gloo processes, each make_data and training.batches with 2 DataLoader
    workers, on 4 shards of 5: an epoch of 20 samples (2 steps of 2 x 5) reads each sample once"""
    folder, keys = shards
    gloo_processes(tmp_path, _read_as_rank, str(folder), str(tmp_path))
    steps = {r: json.loads((tmp_path / f"{r}.json").read_text()) for r in (0, 1)}
    assert [len(step) for r in (0, 1) for step in steps[r]] == [5] * 4
    seen = [c for r in (0, 1) for step in steps[r] for c in step]
    assert sorted(seen) == sorted(f"caption {k}" for k in keys if k[:5] <= "00003")


@pytest.mark.parametrize("workers", [0, 2])
def test_a_resumed_stream_continues_where_the_step_count_says(shards, workers):
    """steps [3, 11) of a run that starts at step 3 are those of a run from step 0, sample for sample
    (a reader's pass ends at step 2 or 4: the resume crosses shards and passes)"""
    folder, _ = shards
    for rank in (0, 1):
        full = steps_seen(folder, rank, 2, workers, 0, 11, batch_size=3)
        resumed = steps_seen(folder, rank, 2, workers, 3, 11, batch_size=3)
        assert resumed == full[3:]
        assert steps_seen(folder, rank, 2, workers, 0, 11, batch_size=3, seed=1) != full  # the seed shuffles


def test_damaged_shards_and_bad_samples_are_counted_skips(shards):
    """a tar cut short is one 'damaged shards' skip (the samples before the cut are read), a sample
    without a caption and one whose image does not decode are counted by name, nothing crashes"""
    folder, keys = shards
    cut = folder / "00004.tar"
    raw = cut.read_bytes()
    cut.write_bytes(raw[: len(raw) // 2])
    before_cut = [k for k, _ in wds.read_shard(str(cut))]
    assert before_cut[-1] is None and 0 < len(before_cut) - 1 < ROWS
    k0, k1 = [k for k in keys if k.startswith("00001")][:2]
    files = {k: dict(f) for k, f in wds.read_shard(str(folder / "00001.tar")) if k in (k0, k1)}
    del files[k0]["txt"]
    files[k1]["jpg"] = b"not a jpeg"
    img2dataset_tar(folder / "00001.tar", 1, [int(k[5:]) for k in keys if k.startswith("00001")], files)
    args = clip_scratch.get_args(["--data", "wds", "--context_length", "32"])
    sample = lambda key, files, rng: wds.clip_sample(key, files, rng, 16, "re_caption", False)
    collate = lambda samples: clip_scratch.make_batch(samples, args)
    # one reader, one sample a step: its first pass is the 5 whole shards' samples + the cut one's entries
    entries = (SHARDS - 1) * ROWS + len(before_cut)
    total, n_images = {}, 0
    for batch, counts in steps_seen(folder, 0, 1, 0, 0, entries, 1, sample=sample, collate=collate):
        n_images += 0 if batch is None else len(batch[0])
        for k, v in counts.items():
            total[k] = total.get(k, 0) + v
    assert {k: v for k, v in total.items() if v} == {
        "unreadable images": 1,
        "samples without a caption (.txt)": 1,
        "damaged shards": 1,
    }
    assert n_images == entries - 3


def test_the_steps_follow_train_num_samples(shards, tmp_path):
    """an epoch is --train_num_samples: 2 epochs of 40 at a global batch of 8 are 10 steps, whatever
    the shards hold (30 samples: the readers start their next pass); one eval a epoch"""
    folder, _ = shards
    r = run(
        [
            "clip_scratch.py",
            "--data",
            "wds",
            "--data_root",
            str(folder / "{00000..00005}.tar"),
            "--train_num_samples",
            "40",
            "--epochs",
            "2",
            "--workers",
            "2",
            *TINY,
            "--context_length",
            "32",
            "--out_dir",
            str(tmp_path / "out"),
        ]
    )
    assert r.returncode == 0, r.stderr
    assert "2 epochs of 40 items = 10 steps (5 an epoch)" in r.stdout
    assert load_weights(tmp_path / "out")["step"] == 10
    assert "--data wds has no eval split here" in r.stdout


def test_bad_input_is_one_line_naming_the_flag(shards, tmp_path):
    folder, _ = shards
    common = ["clip_scratch.py", "--data", "wds", *TINY, "--out_dir", str(tmp_path / "out")]
    for extra, message in (
        (
            ["--data_root", str(folder / "{00010..00019}.tar"), "--train_num_samples", "10"],
            "no shard matches",
        ),
        (["--data_root", str(folder / "{00000..00005}.tar")], "--data wds needs --train_num_samples N"),
        (
            [
                "--data_root",
                str(folder / "{00000..00002}.tar"),
                "--train_num_samples",
                "10",
                "--workers",
                "4",
            ],
            "3 shards for 4 readers (world size 1 x 4 --workers)",
        ),
    ):
        r = run_here([*common, *extra])
        assert r.returncode != 0
        lines = r.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], r.stderr


@pytest.mark.slow
def test_clip_scratch_resumes_a_wds_run_exactly(shards, tmp_path):
    """killed after its step-2 checkpoint and resumed, a run on shards ends with the weights of the run
    that was never stopped: the resumed readers continue at the samples the step count says"""
    folder, _ = shards
    args = ["clip_scratch.py", "--data", "wds", "--data_root", str(folder), "--train_num_samples", "30"]
    args += ["--max_steps", "8", "--ckpt_every", "2", "--workers", "2", *TINY, "--context_length", "32"]
    _, a, b = killed_and_resumed(tmp_path, args)
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k


@pytest.mark.slow
def test_the_scripts_train_on_exported_shards(tmp_path):
    """export_shapes.py --wds: img2dataset's layout; clip_scratch.py trains on it and evaluates on the
    Flickr8k export, clip_hardneg.py reads each sample's exact negatives from its json"""
    out = tmp_path / "export"
    export_shapes.main(["--out", str(out), "--flickr8k", "120", "--vsr", "0", "--image_size", "32", "--wds"])
    shard_dir = out / "flickr8k_wds"
    assert sorted(os.listdir(shard_dir)) == ["00000.tar", "00000_stats.json"]
    export_shapes.export_flickr8k_wds(str(out / "flickr8k"), str(shard_dir), 40, 0)
    train = data.read_flickr8k(str(out / "flickr8k"))["train"]
    by_name = {os.path.basename(p): caps for p, caps in train}
    keys = []
    for s in range(3):
        for key, files in wds.read_shard(str(shard_dir / f"{s:05d}.tar")):
            meta, keys = json.loads(files["json"]), keys + [key]
            assert key == meta["key"] and len(key) == 7 and key[:5] == f"{s:05d}"  # 40 a shard: 2 row digits
            name = meta["url"].rsplit("/", 1)[1]
            assert files["txt"].decode() == by_name[name][0] == meta["caption"]
            scene = shapes.sample_scene(shapes.scene_rng("export-flickr8k", 0, int(name[:10])))
            assert meta["negatives"] == [shapes.NEGATIVES[k](scene) for k in export_shapes.WDS_NEGATIVES]
    assert len(keys) == len(train) == 91
    r = run(
        [
            "clip_scratch.py",
            "--data",
            "wds",
            "--data_root",
            str(shard_dir / "{00000..00002}.tar"),
            "--train_num_samples",
            "91",
            "--epochs",
            "1",
            "--eval_data",
            "flickr8k",
            "--eval_root",
            str(out / "flickr8k"),
            "--workers",
            "1",
            *TINY,
            "--out_dir",
            str(tmp_path / "scratch"),
        ]
    )
    assert r.returncode == 0, r.stderr
    assert "1 epochs of 91 items = 11 steps" in r.stdout and "eval test step 11" in r.stdout
    init = tiny_ckpt(tmp_path / "init.pt")
    r = run(
        [
            "clip_hardneg.py",
            "--data",
            "wds",
            "--data_root",
            str(shard_dir),
            "--train_num_samples",
            "91",
            "--init",
            init,
            "--max_steps",
            "3",
            "--workers",
            "0",
            "--batch_size",
            "8",
            "--eval_every",
            "0",
            "--log_every",
            "1",
            "--out_dir",
            str(tmp_path / "hardneg"),
        ]
    )
    assert r.returncode == 0, r.stderr
    assert "invalid negatives" not in r.stdout  # every sample's negative came from its json
    assert load_weights(tmp_path / "hardneg")["step"] == 3
