"""
Write the shapes world to disk in the exact layouts of two real datasets, at their real size, so the
real-data path (readers, image cache, JPEG decoding, --epochs, torchrun) runs end to end without a
download:
- Flickr8k, Karpathy's layout: dataset_flickr8k.json (images[].filename, split, sentences[].raw) +
  Images/*.jpg; 8,091 images, 5 true captions each, 1,000 val and 1,000 test images.
- VSR, its release layout: splits/random/{train,dev,test}.jsonl rows {image, image_link, caption,
  label, relation, ...} + COCO-2017-style JPEGs in train2017/ (train rows) and val2017/ (dev, test);
  one scene gives a true statement and its false converse ("The red circle is left of the blue
  square." / "... right of ..."), ~10k rows split 70/10/20 by image as VSR's random split.
- --wds: Flickr8k's train images also as webdataset shards in img2dataset's layout (wds.py), in
  OUT/flickr8k_wds/: 00000.tar (+ 00000_stats.json), ... --shard_size samples each; a sample is
  <key>.jpg, <key>.json (img2dataset's fields + "re_caption": the other four captions joined, the
  CLIPS synthetic caption, and "negatives": the scene's exact hard negatives) and <key>.txt (the
  first caption).

    python bench/tools/export_shapes.py --out data/shapes_export               # both, 224 px (~3 min on 2 cores)
    python clip_scratch.py --data flickr8k --data_root data/shapes_export/flickr8k --image_size 64 --cache_images
    torchrun --standalone --nproc_per_node 2 clip_dpo.py --data vsr --data_root data/shapes_export/vsr \\
        --init out/clip_scratch/ckpt.pt --device cpu
    python eval.py --model out/clip_dpo/ckpt.pt --bench vsr --data_root data/shapes_export/vsr
    python bench/tools/export_shapes.py --out data/shapes_export --vsr 0 --wds
    python clip_scratch.py --data wds --data_root 'data/shapes_export/flickr8k_wds/{00000..00006}.tar' \
        --train_num_samples 6091 --eval_data flickr8k --eval_root data/shapes_export/flickr8k --image_size 64

Scenes come from their own random stream ("export"), not the training or test streams.
"""

import argparse
import json
import math
import os
import random
import sys

from PIL import Image

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
import shapes  # noqa: E402
import wds  # noqa: E402

WDS_NEGATIVES = ("relation", "attribute_swap")  # the json's "negatives": these exact ones of each scene


def save_jpeg(scene, path, size):
    tmp = f"{path}.tmp.jpg"
    Image.fromarray(shapes.render(scene, size)).save(tmp, quality=95)
    os.replace(tmp, path)


def five_captions(scene, rng):
    """Flickr8k has five captions an image: the caption, the true statement, and three terse partial
    captions (each true of the scene)"""
    return [
        scene.caption(),
        shapes.statements(scene)[0][0],
        *(shapes.partial_caption(scene, rng) for _ in range(3)),
    ]


def export_flickr8k(out, n, size, seed):
    os.makedirs(os.path.join(out, "Images"), exist_ok=True)
    images = []
    for i in range(n):
        rng = shapes.scene_rng("export-flickr8k", seed, i)
        scene, name = shapes.sample_scene(rng), f"{i:010d}_shapes.jpg"
        save_jpeg(scene, os.path.join(out, "Images", name), size)
        split = "test" if i < 1000 * n // 8091 else "val" if i < 2000 * n // 8091 else "train"
        images.append(
            {
                "filename": name,
                "imgid": i,
                "split": split,
                "sentences": [
                    {"raw": c, "imgid": i, "sentid": 5 * i + k}
                    for k, c in enumerate(five_captions(scene, rng))
                ],
            }
        )
    with open(os.path.join(out, "dataset_flickr8k.json"), "w") as f:
        json.dump({"images": images, "dataset": "flickr8k"}, f)
    return len(images)


def export_flickr8k_wds(flickr8k, out, shard_size, seed):
    """the train images of the flickr8k export at `flickr8k` as img2dataset's webdataset shards in out
    -> (shards, samples). Keys and names as img2dataset's: shard id (5 digits) then row
    (ceil(log10(shard_size)) digits); a {shard}_stats.json beside each tar (its parquet is left out)"""
    with open(os.path.join(flickr8k, "dataset_flickr8k.json")) as f:
        images = [im for im in json.load(f)["images"] if im["split"] == "train"]
    os.makedirs(out, exist_ok=True)
    digits = math.ceil(math.log10(shard_size)) if shard_size > 1 else 1
    shards = [images[i : i + shard_size] for i in range(0, len(images), shard_size)]
    for shard_id, shard in enumerate(shards):
        samples = []
        for row, im in enumerate(shard):
            with open(os.path.join(flickr8k, "Images", im["filename"]), "rb") as f:
                jpg = f.read()
            key, captions = f"{shard_id:05d}{row:0{digits}d}", [s["raw"] for s in im["sentences"]]
            scene = shapes.sample_scene(shapes.scene_rng("export-flickr8k", seed, im["imgid"]))
            with Image.open(os.path.join(flickr8k, "Images", im["filename"])) as pil:
                width, height = pil.size
            meta = {
                "url": f"http://example.com/{im['filename']}",
                "caption": captions[0],
                "re_caption": ". ".join(c.rstrip(" .") for c in captions[1:]) + ".",
                "negatives": [shapes.NEGATIVES[k](scene) for k in WDS_NEGATIVES],
                "key": key,
                "status": "success",
                "error_message": None,
                "width": width,
                "height": height,
                "original_width": width,
                "original_height": height,
            }
            samples.append((key, {"jpg": jpg, "txt": captions[0], "json": json.dumps(meta, indent=4)}))
        wds.write_shard(os.path.join(out, f"{shard_id:05d}.tar"), samples)
        with open(os.path.join(out, f"{shard_id:05d}_stats.json"), "w") as f:
            stats = {"count": len(samples), "successes": len(samples), "failed_to_download": 0}
            json.dump(stats | {"failed_to_resize": 0, "status_dict": {"success": len(samples)}}, f, indent=4)
    return len(shards), len(images)


def export_vsr(out, n_rows, size, seed):
    os.makedirs(os.path.join(out, "splits", "random"), exist_ok=True)
    splits = {"train": [], "dev": [], "test": []}
    for i in range(n_rows // 2):
        scene = shapes.sample_scene(shapes.scene_rng("export-vsr", seed, i))
        split = ("train", "train", "train", "train", "train", "train", "train", "dev", "test", "test")[i % 10]
        folder, name = "train2017" if split == "train" else "val2017", f"{i:012d}.jpg"
        os.makedirs(os.path.join(out, folder), exist_ok=True)
        save_jpeg(scene, os.path.join(out, folder, name), size)
        for (caption, label), relation in zip(
            shapes.statements(scene), (scene.relation(), shapes.CONVERSE[scene.relation()])
        ):
            splits[split].append(
                {
                    "image": name,
                    "image_link": f"http://images.cocodataset.org/{folder}/{name}",
                    "caption": caption,
                    "label": int(label),
                    "relation": relation,
                    "annotator_id": 0,
                    "vote_true_validator_id": "[1, 2]" if label else "[]",
                    "vote_false_validator_id": "[]" if label else "[1, 2]",
                }
            )
    for split, rows in splits.items():
        random.Random(f"{seed}-{split}").shuffle(rows)  # VSR's files are not grouped by image
        with open(os.path.join(out, "splits", "random", f"{split}.jsonl"), "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in rows)
    return {k: len(v) for k, v in splits.items()}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, help="writes OUT/flickr8k and OUT/vsr")
    p.add_argument("--flickr8k", type=int, default=8091, help="images (Flickr8k has 8,091)")
    p.add_argument("--vsr", type=int, default=10972, help="rows, two a scene (VSR's random split has 10,972)")
    p.add_argument("--image_size", type=int, default=224, help="side of the square JPEGs")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--wds", action="store_true", help="also write Flickr8k's train images as webdataset shards"
    )
    p.add_argument(
        "--shard_size", type=int, default=10000, help="--wds: samples a shard (img2dataset's default)"
    )
    args = p.parse_args(argv)
    if args.wds and not args.flickr8k:
        p.error("--wds writes the Flickr8k export as shards: give --flickr8k > 0")
    if args.flickr8k:
        n = export_flickr8k(os.path.join(args.out, "flickr8k"), args.flickr8k, args.image_size, args.seed)
        print(f"wrote {args.out}/flickr8k: {n} images, {5 * n} captions (Karpathy's layout)")
    if args.wds:
        out = os.path.join(args.out, "flickr8k_wds")
        shards, n = export_flickr8k_wds(os.path.join(args.out, "flickr8k"), out, args.shard_size, args.seed)
        print(
            f"wrote {out}: its {n} train images in {shards} shards, {out}/{{00000..{shards - 1:05d}}}.tar "
            "(img2dataset's webdataset layout)"
        )
    if args.vsr:
        counts = export_vsr(os.path.join(args.out, "vsr"), args.vsr, args.image_size, args.seed)
        print(
            f"wrote {args.out}/vsr: "
            + ", ".join(f"{k} {v} rows" for k, v in counts.items())
            + " (VSR's random split layout)"
        )


if __name__ == "__main__":
    main()
