"""Host input throughput of the streaming folder source: JPEG decode + pre-crop to 224 px.

Run from the repository root:

  python benchmarks/streaming_input.py [--images 512] [--data /tmp/ssljax_streaming_jpegs]
      [--batch 64] [--batches 16] [--out benchmarks/results/streaming_input.json]

Writes `--images` random-texture JPEGs of 320 x 256 (W x H, quality 90; ImageNet's mean image
is about 400 x 350) in ImageNet's train layout under `--data` (outside the repository; reused
if present), builds ``data.source='folder_stream'`` with ``data.image_size = 224`` and the
default whole-image pre-crop, then times:

  1. one example at a time, no grain: ``StreamingSource.train_examples`` on single indices
     (read, decode, crop, bilinear resize), the per-core cost;
  2. ``StreamingLoader`` (grain) for several worker-process / read-thread settings: host
     batches of `--batch` images, `--batches` of them after one warm-up batch, which also
     absorbs the workers' start-up.
  3. the evaluation views (``StreamingSource.get``: shorter side resized, centre crop) in
     batches of `--batch`, decoded by one thread and by each of `--eval-threads`.

Images/s is images delivered over wall time. The JSON records the machine (CPU model, core
count, load average before and after) because the host is shared with other jobs: on a busy
machine the numbers are lower bounds of what the same cores give when idle.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time

import numpy as np


def _cpu_model() -> str:
  try:
    with open("/proc/cpuinfo", encoding="utf-8") as f:
      for line in f:
        if line.startswith("model name"):
          return line.split(":", 1)[1].strip()
  except OSError:
    pass
  return platform.processor() or "unknown"


def write_jpegs(root: str, count: int, classes: int = 4) -> None:
  """`count` 320 x 256 JPEGs in ``root/train/<wnid>/``; smooth noise, so they compress like
  photographs rather than white noise."""
  from PIL import Image

  marker = os.path.join(root, f".complete_{count}")
  if os.path.exists(marker):
    return
  rng = np.random.default_rng(0)
  for i in range(count):
    directory = os.path.join(root, "train", f"n{i % classes:08d}")
    os.makedirs(directory, exist_ok=True)
    coarse = rng.integers(0, 256, (16, 20, 3), dtype=np.uint8)
    image = Image.fromarray(coarse).resize((320, 256), Image.Resampling.BICUBIC)
    noise = rng.normal(0, 12, (256, 320, 3))
    pixels = np.clip(np.asarray(image, np.float64) + noise, 0, 255).astype(np.uint8)
    Image.fromarray(pixels).save(os.path.join(directory, f"img_{i:05d}.JPEG"), quality=90)
  open(marker, "w").close()


def main(argv: list[str] | None = None) -> dict:
  parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
  parser.add_argument("--images", type=int, default=512)
  parser.add_argument("--data", default="/tmp/ssljax_streaming_jpegs")
  parser.add_argument("--batch", type=int, default=64)
  parser.add_argument("--batches", type=int, default=16)
  parser.add_argument("--settings", default="0x1,0x2,0x4,2x1",
                      help="comma-separated WORKERSxTHREADS grain settings")
  parser.add_argument("--eval-threads", default="2",
                      help="comma-separated thread counts for the evaluation views (and 1)")
  parser.add_argument("--out", default="benchmarks/results/streaming_input.json")
  args = parser.parse_args(argv)

  from ssljax import data
  from ssljax.config import default_config

  load_before = os.getloadavg()
  write_jpegs(args.data, args.images)
  c = default_config()
  c.data.update(dict(source="folder_stream", data_dir=args.data, image_size=224, channels=3,
                     num_classes=4))
  source = data.build_source(c.data, "train")

  rows = []
  single = min(64, len(source))
  start = time.perf_counter()
  for i in range(single):
    source.train_examples(np.array([i]), seed=0, epoch=0)
  seconds = time.perf_counter() - start
  rows.append({"setting": "one example at a time (no grain)", "workers": 0, "threads": 1,
               "images": single, "seconds": seconds, "images_per_sec": single / seconds})

  for setting in args.settings.split(","):
    workers, threads = (int(v) for v in setting.split("x"))
    with data.StreamingLoader(source, global_batch=args.batch, seed=0, workers=workers,
                              threads=threads, prefetch=2) as loader:
      next(loader)  # warm-up: worker start-up and the first batch
      start = time.perf_counter()
      for _ in range(args.batches):
        batch = next(loader)
      seconds = time.perf_counter() - start
    assert batch["image"].shape == (args.batch, 224, 224, 3)
    images = args.batch * args.batches
    rows.append({"setting": f"grain StreamingLoader, {workers} workers x {threads} threads",
                 "workers": workers, "threads": threads, "images": images, "seconds": seconds,
                 "images_per_sec": images / seconds})

  # Evaluation views (resize + centre crop) through StreamingSource.get, by 1..N threads.
  for threads in sorted({1, *(int(t) for t in args.eval_threads.split(","))}):
    source.eval_threads = threads
    indices = np.arange(min(len(source), args.batch * args.batches))
    source.get(indices[:args.batch])  # warm-up
    start = time.perf_counter()
    for lo in range(0, len(indices), args.batch):
      source.get(indices[lo:lo + args.batch])
    seconds = time.perf_counter() - start
    rows.append({"setting": f"evaluation views (get), {threads} threads", "workers": 0,
                 "threads": threads, "images": len(indices), "seconds": seconds,
                 "images_per_sec": len(indices) / seconds})

  print(f"{'setting':<52} {'images':>7} {'s':>7} {'images/s':>9}")
  for r in rows:
    print(f"{r['setting']:<52} {r['images']:>7} {r['seconds']:>7.2f} {r['images_per_sec']:>9.1f}")
  result = {
      "what": "folder_stream host input: read + JPEG decode + whole-image pre-crop, bilinear "
              "resize to 224 x 224 x 3 uint8 (320 x 256 JPEGs, quality 90)",
      "command": "python benchmarks/streaming_input.py " + " ".join(
          f"--{k.replace('_', '-')}={v}" for k, v in vars(args).items()),
      "machine": {"cpu": _cpu_model(), "cores": os.cpu_count(), "python": platform.python_version(),
                  "load_average_before": load_before, "load_average_after": os.getloadavg(),
                  "note": ("other jobs shared the cores (1-minute load >= 0.5 before the run): "
                           "the numbers are lower bounds for the same cores idle"
                           if load_before[0] >= 0.5 else
                           "quiet machine (1-minute load < 0.5 before the run)")},
      "date": time.strftime("%Y-%m-%d"),
      "rows": rows,
  }
  os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
  with open(args.out, "w", encoding="utf-8") as f:
    json.dump(result, f, indent=2)
    f.write("\n")
  print(f"wrote {args.out}")
  return result


if __name__ == "__main__":
  main()
