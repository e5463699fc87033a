"""
--data wds: webdataset tar shards as img2dataset writes them (img2dataset --output_format webdataset),
streamed, split across ranks and DataLoader workers, resumable from the step count.

    <folder>/00000.tar, 00001.tar, ...       (+ 00000.parquet, 00000_stats.json: not read)
    in each tar, per sample: <key>.jpg (or .png, .webp: --encode_format), <key>.json, <key>.txt
      key   the shard id and the row, zero-padded ("000000012": shard 0, row 12)
      json  the input row's columns (url, caption, and any --save_additional_columns, e.g. a CLIPS
            synthetic caption "re_caption" or hard negatives "negatives": [...]) + key, status, width,
            height, original_width, original_height, error_message, ...
      txt   the caption (UTF-8)
    webdataset's TarWriter writes a sample's files one after the other, sorted by extension; a failed
    download has no files at all.

--data_root is a shard pattern: brace ranges and lists as webdataset and open_clip expand them
(`shards/{00000..00099}.tar`, `{a,b}`), several patterns joined by `::` or `,`, or a folder (its
*.tar files). An epoch is --train_num_samples samples, as open_clip's --train-num-samples defines it.

How the shards are read (Shards): with R ranks and W DataLoader workers each (W = 1 without
workers) there are R x W readers; reader (rank r, j) owns the steps s with s % W == j and, on each
of its passes p, the shards at positions i of a (seed, p) shuffle of all shards with
i % (R x W) == r x W + j: in one pass the readers read disjoint shards that together are all of
them. A reader's k-th batch is the next B entries of its stream (an entry: a sample, or one damaged
shard), so the step count says where every reader is: a resumed run counts (headers only, no decode)
the entries its readers had drawn and continues at that sample, exactly. Resume with the same world
size and --workers (the split depends on both). Fewer shards than readers is an error (open_clip
refuses it too): give more shards or fewer --workers.

A plain tarfile reader, not the webdataset package (nothing to install): read_shard is one function,
and it reads the same shards as fast as webdataset's own pipeline (bench/timing/bench_wds.py; the
measurement: bench/LOG.md, 2026-12-06). The tests check the layout against webdataset's own writer
and reader when it is installed.
"""

import io
import json
import os
import random
import re
import tarfile
from functools import partial

import torch

import data

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")


# -----------------------------------------------------------------------------
# shard patterns


def expand(pattern):
    """a shard pattern -> [path]: brace ranges {00000..00099} (zero-padded as written) and lists {a,b}
    (nested too), several patterns joined by '::' or by ',' outside braces, '~' expanded; a path
    listed twice is kept once"""
    parts, depth, start = [], 0, 0
    pattern = pattern.replace("::", "\0")
    for i, ch in enumerate(pattern):
        depth += {"{": 1, "}": -1}.get(ch, 0)
        if ch == "\0" or (ch == "," and depth == 0):
            parts.append(pattern[start:i])
            start = i + 1
    parts.append(pattern[start:])
    return list(dict.fromkeys(os.path.expanduser(p) for part in parts if part for p in _braces(part)))


def _braces(s):
    # the innermost expandable {...} first: a range a..b or a comma list
    for m in re.finditer(r"\{([^{}]*)\}", s):
        body, r = m.group(1), re.fullmatch(r"(-?\d+)\.\.(-?\d+)", m.group(1))
        if r:
            a, b = int(r.group(1)), int(r.group(2))
            padded = any(len(x) > 1 and x.lstrip("-").startswith("0") for x in r.groups())
            width = max(len(x) for x in r.groups()) if padded else 0
            items = [f"{i:0{width}d}" for i in range(a, b + (1 if b >= a else -1), 1 if b >= a else -1)]
        elif "," in body:
            items = body.split(",")
        else:
            continue  # a literal brace
        return [x for item in items for x in _braces(s[: m.start()] + item + s[m.end() :])]
    return [s]


def shard_paths(pattern, flag="--data_root"):
    """the shards of a pattern (or of a folder: its *.tar files, sorted), every one checked to exist
    -> [path]; DataError naming the flag and the first missing file"""
    if os.path.isdir(os.path.expanduser(pattern)):
        folder = os.path.expanduser(pattern)
        paths = sorted(os.path.join(folder, f) for f in os.listdir(folder) if f.endswith(".tar"))
        if not paths:
            raise data.DataError(f"{flag} {pattern}: a folder without .tar shards")
        return paths
    paths = expand(pattern)
    missing = [p for p in paths if not os.path.isfile(p)]
    if not paths or len(missing) == len(paths):
        raise data.DataError(
            f"{flag} {pattern}: no shard matches (looked for {paths[0] if paths else pattern}"
            f"{f' and {len(paths) - 1} more' if len(paths) > 1 else ''}); give existing .tar files, "
            "e.g. 'shards/{00000..00099}.tar'"
        )
    if missing:
        raise data.DataError(
            f"{flag} {pattern}: {len(missing)} of {len(paths)} shards do not exist: {', '.join(missing[:3])}"
        )
    return paths


def open_shards(pattern, n_samples, sample, rank, world, workers, seed):
    """the scripts' make_data for --data wds -> (Shards, n_samples: the items of an epoch); one line
    (DataError) for no --train_num_samples, no shard, or fewer shards than readers"""
    if not n_samples or n_samples < 1:
        raise data.DataError(
            "--data wds needs --train_num_samples N: the samples an epoch, as open_clip's "
            "--train-num-samples (img2dataset's *_stats.json: the sum of their 'successes')"
        )
    paths, readers = shard_paths(pattern), world * max(1, workers)
    if len(paths) < readers:
        raise data.DataError(
            f"--data_root {pattern}: {len(paths)} shards for {readers} readers (world size {world} x "
            f"{max(1, workers)} --workers); every reader needs a shard of its own: fewer --workers, or "
            "more shards"
        )
    return Shards(paths, sample, rank, world, seed), n_samples


# -----------------------------------------------------------------------------
# one shard


def read_shard(path, read=True):
    """One tar shard -> its entries, in order: (key, {extension: bytes}) per sample (the files whose
    names share the part before the first dot of the basename, as webdataset groups them; bytes None
    with read=False, which only walks the headers), then, if the tar is damaged (a bad header, a
    member or the end-of-archive marker cut short, an I/O error), one (None, the error) in place of
    the sample it was reading and of everything after it. Both modes find the same entries, so a
    count with read=False says where a run that read them stopped."""
    key, files = None, {}
    try:
        with open(path, "rb") as f, tarfile.open(fileobj=f, mode="r:") as tar:
            for member in tar:
                if not member.isfile():
                    continue
                name = os.path.basename(member.name)
                k, _, ext = name.partition(".")
                k = os.path.join(os.path.dirname(member.name), k)
                if k != key and files:
                    yield key, files
                    files = {}
                key, files[ext.lower()] = k, tar.extractfile(member).read() if read else None
            # tarfile stops silently at a header that is cut short or garbled (or past the end of a
            # file cut in a member's data): a whole tar has its end-of-archive marker, a zero block,
            # where the next header would be
            f.seek(tar.offset)
            if f.read(tarfile.BLOCKSIZE) != bytes(tarfile.BLOCKSIZE):
                raise tarfile.ReadError(f"no tar header or end-of-archive marker at byte {tar.offset}")
    except (tarfile.TarError, OSError, EOFError) as e:
        yield None, f"{path}: damaged ({e})"
        return
    if files:
        yield key, files


def write_shard(path, samples, mtime=0):
    """samples [(key, {extension: bytes or str})] -> a tar at path, exactly as webdataset's TarWriter
    writes it for img2dataset (each sample's files sorted by extension, mode 0o444, user and group
    "bigdata"); written to a temp file, then renamed"""
    tmp = f"{path}.tmp{os.getpid()}"
    with tarfile.open(tmp, "w|") as tar:
        for key, files in samples:
            for ext in sorted(files):
                value = files[ext].encode() if isinstance(files[ext], str) else files[ext]
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size, info.mtime, info.mode, info.uname, info.gname = (
                    len(value),
                    mtime,
                    0o444,
                    "bigdata",
                    "bigdata",
                )
                tar.addfile(info, io.BytesIO(value))
    os.replace(tmp, path)


# -----------------------------------------------------------------------------
# samples: what each script draws from an entry (a str = the reason it is skipped, counted by it)


def _image_and_caption(files, image_size, preprocess=None):
    """-> (image float [3, S, S] or None if it does not decode (counted as an unreadable image),
    caption, the json's fields ({} if there is none)), or the reason the sample is skipped"""
    ext = next((e for e in IMAGE_EXTS if e in files), None)
    if ext is None:
        return "samples without an image"
    caption = files.get("txt", b"").decode("utf-8", "replace").strip()
    if not caption:
        return "samples without a caption (.txt)"
    try:
        meta = json.loads(files["json"]) if "json" in files else {}
    except ValueError:
        return "samples with a malformed .json"
    pixels = data.load_image(io.BytesIO(files[ext]), image_size, preprocess)
    return None if pixels is None else data.to_tensor(pixels, preprocess), caption, meta


def clip_sample(key, files, rng, image_size, recap_key, need_recap):
    """clip_scratch.py's sample: (image, caption, synthetic caption, rng) as data.ImageTextDataset's;
    the synthetic caption is the json's recap_key field (CLIPS: a sample without one is skipped; plain
    CLIP does not read it); None if the image does not decode"""
    got = _image_and_caption(files, image_size)
    if isinstance(got, str):
        return got
    image, caption, meta = got
    synthetic = meta.get(recap_key)
    if not (isinstance(synthetic, str) and synthetic.strip()):
        if need_recap:
            return f"samples without a '{recap_key}' in their json (--recap_key)"
        synthetic = caption
    return None if image is None else (image, caption, synthetic.strip(), rng)


def hardneg_sample(key, files, rng, image_size, preprocess, neg_key):
    """clip_hardneg.py's sample: [(image, caption, [one negative])] as its HardNegatives rows: one
    negative drawn from the json's neg_key list ([] or no field: the negative is invalid, masked and
    counted by make_batch); None if the image does not decode"""
    got = _image_and_caption(files, image_size, preprocess)
    if isinstance(got, str):
        return got
    image, caption, meta = got
    negs = [n for n in meta.get(neg_key) or [] if isinstance(n, str) and n.strip()]
    return None if image is None else [(image, caption, [rng.choice(negs) if negs else None])]


# -----------------------------------------------------------------------------
# the stream


class Shards(torch.utils.data.IterableDataset):
    """This rank's share of the shards (module docstring), as batches: each item is (the B samples of
    one step, None for an image that does not decode, {reason: count} of the entries skipped).
    sample(key, files, rng) -> the sample, None, or the reason to skip it (clip_sample,
    hardneg_sample); rng is the entry's own random.Random of (seed, pass, shard, key), so a resumed
    run draws the same. loader() is the DataLoader of a run's steps (training.batches calls it)."""

    def __init__(self, paths, sample, rank, world, seed):
        self.paths, self.sample, self.rank, self.world, self.seed = paths, sample, rank, world, seed
        self.plan = None

    def entries(self, reader, readers, skip=0):
        """reader's endless stream of (key, files, rng) or (None, the damage, None), its first `skip`
        entries passed over (counted on the headers, no image read)"""
        for p in range(2**62):
            order = list(range(len(self.paths)))
            random.Random(f"{self.seed},{p}").shuffle(order)
            n = 0
            for i in order[reader::readers]:
                path, name = self.paths[i], os.path.basename(self.paths[i])
                if skip:
                    count = sum(1 for _ in read_shard(path, read=False))
                    if count <= skip:
                        skip, n = skip - count, n + count
                        continue
                for key, files in read_shard(path):
                    n += key is not None
                    if skip:
                        skip -= 1
                        continue
                    yield key, files, key and random.Random(f"{self.seed},{p},{name},{key}")
            if n == 0:
                mine = [self.paths[i] for i in order[reader::readers]]
                raise data.DataError(f"no readable sample in the shards {', '.join(mine[:3])}")

    def __iter__(self):
        batch_size, start, stop = self.plan
        info = torch.utils.data.get_worker_info()
        W, w = (info.num_workers, info.id) if info else (1, 0)
        # the DataLoader takes the steps start, start+1, ... from workers 0, 1, ... in turn: worker w
        # yields the steps of reader j, those s with s % W == j, and step s is that reader's batch s // W
        steps = range(start + w, stop, W)
        if not steps:
            return
        j = (start + w) % W
        stream = self.entries(self.rank * W + j, self.world * W, skip=steps[0] // W * batch_size)
        for _ in steps:
            samples, counts = [], {}
            for key, files, rng in (next(stream) for _ in range(batch_size)):
                got = self.sample(key, files, rng) if key is not None else "damaged shards"
                if key is None:
                    print(files)  # which shard, and what is wrong with it
                if isinstance(got, str):
                    counts[got] = counts.get(got, 0) + 1
                else:
                    samples.append(got)
            yield samples, counts

    def loader(self, collate, batch_size, start, stop, workers, pin_memory=False):
        """the DataLoader of the steps [start, stop): (collate(samples)'s batch, its counts and the
        stream's skips) per step"""
        self.plan = (batch_size, start, stop)
        return torch.utils.data.DataLoader(
            self,
            batch_size=None,
            collate_fn=partial(_collate, collate=collate),
            num_workers=workers,
            pin_memory=pin_memory,
        )


def _collate(item, collate):
    samples, counts = item
    batch, made = collate(samples)
    return batch, {k: counts.get(k, 0) + made.get(k, 0) for k in {**made, **counts}}
