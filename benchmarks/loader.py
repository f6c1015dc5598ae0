"""Loader throughput: the full stream against a bare decode loop over the same images, one run.

    .venv/bin/python benchmarks/loader.py [--images 2000] [--seconds 6] [--runs 3]
        [--only 500px 256px 28px]

Data: Fashion-MNIST images (Debian's dataset-fashion-mnist) made into ViT pretraining inputs:
upscaled to 500x375 colour JPEGs (quality 90; ImageNet's typical size, JFT's is similar),
prepared into shards with `tessera prepare`. Two smaller sets show where per-sample work, not
decoding, dominates: 256x256 JPEGs, and the images as they are (28x28 grey PNG).

Measured, each as samples/s, rates side by side (torch and each worker on one thread):
  decode        a bare loop: PIL decode of the same image bytes from memory, one process
  decode lj     the same loop with libjpeg-turbo called directly (pipeline/data/jpeg.py), whole
                images: how much of the stream's lead over PIL is the decoder, not the crop
  stream w=0    the whole stream in this process (read shards, parse tar, decode only the
                random resized crop, resize to 224, flip, batch): the rate of one worker
  stream pil    the same with PIL decoding whole images, then cropping (the path without the
                built decoder, and for formats other than JPEG)
  stream w=1/2  the same with 1 and 2 DataLoader worker processes
  stream s3     the stream (2 workers) reading the same shards from an S3 server on loopback
  ray-data      `data.ingest: ray-data`: Ray Data tasks (2 CPUs of a local Ray) read, decode and
                augment the same shards; one consumer takes the batches, as a trainer would
  stream 256    the 256x256 JPEGs as prepared, and as `prepare --pixels raw` stores their
                decoded pixels (192 KB a sample), both against the bare 256 px decode loop
  stream 28px   the 28x28 PNGs as prepared (PNG), and as `prepare --pixels raw` stores them
                (no decoder), both against the bare PNG decode loop
In-process rates take turns with their baseline (6 rounds of slices in one measurement, so both
see the same machine: its speed drifts by up to 30% within minutes); worker streams run in
blocks (w2 before and after the S3 stream, averaged). Every figure is the median over --runs
whole runs. Targets (issue 22): 28 px stream >= 0.8x decode; 256 px >= 0.95x; S3 vs
disk >= 0.8x; 2 workers vs 1 >= 1.8x.
"""

from __future__ import annotations

import argparse
import dataclasses
import io
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from pipeline.data import jpeg
from pipeline.data.prepare import PrepareOptions, prepare
from pipeline.data.sources import open_source
from pipeline.data.stream import Stream, StreamConfig

FASHION_MNIST = "/usr/share/datasets/fashion-mnist"
torch.set_num_threads(1)  # the bare decode loop is one thread; so is each measured stream


def make_folder(root: Path, n: int, size: tuple[int, int], fmt: str) -> list[bytes]:
    """n Fashion-MNIST images (width, height) as files in class folders; returns their bytes."""
    src = open_source(FASHION_MNIST)
    rng = np.random.default_rng(0)
    encoded = []
    for i in range(n):
        grey = src.arrays["train"][i]
        label = src.splits["train"][i].labels[0]
        if size != grey.shape[::-1]:
            tint = rng.uniform(0.5, 1.0, 3)
            im = Image.fromarray((grey[..., None] * tint).astype(np.uint8)).resize(
                size, Image.BICUBIC
            )
        else:
            im = Image.fromarray(grey)
        buf = io.BytesIO()
        im.save(buf, format=fmt, **({"quality": 90} if fmt == "JPEG" else {}))
        folder = root / f"class{label}"
        folder.mkdir(parents=True, exist_ok=True)
        (folder / f"{i:06d}.{fmt.lower().replace('jpeg', 'jpg')}").write_bytes(buf.getvalue())
        encoded.append(buf.getvalue())
    return encoded


def decoding(blobs: list[bytes], mode: str) -> Iterator[int]:
    """The bare loop: PIL decodes each image from memory; yields 1 per image."""
    while True:
        for blob in blobs:
            with Image.open(io.BytesIO(blob)) as im:
                np.asarray(im.convert(mode))
            yield 1


def decoding_libjpeg(blobs: list[bytes]) -> Iterator[int]:
    sizes = [jpeg.info(blob)[:2] for blob in blobs]
    while True:
        for blob, (w, h) in zip(blobs, sizes, strict=True):
            jpeg.decode_crop(blob, (0, 0, w, h), 3, size=(w, h))
            yield 1


def streaming(cfg: StreamConfig, fast_jpeg: bool = True) -> Iterator[int]:
    """The stream; yields each batch's size."""
    stream = Stream(cfg)
    stream.transform = dataclasses.replace(stream.transform, fast_jpeg=fast_jpeg)
    for batch in stream:
        yield len(batch["key"])


def rates(meters: dict[str, Iterator[int]], seconds: float, slices: int = 6) -> dict[str, float]:
    """Samples/s of each meter, measured in turns: `slices` rounds in which each meter runs for
    seconds / slices, so a baseline and what is compared with it see the same machine (its
    speed drifts by up to 30% within minutes). Each meter's first item (start-up) is not timed.
    Only for meters that do no work between their turns (no worker processes)."""
    for meter in meters.values():
        next(meter)
    n, spent = dict.fromkeys(meters, 0), dict.fromkeys(meters, 0.0)
    for _ in range(slices):
        for name, meter in meters.items():
            start = time.perf_counter()
            while time.perf_counter() - start < seconds / slices:
                n[name] += next(meter)
            spent[name] += time.perf_counter() - start
    return {name: n[name] / spent[name] for name in meters}


def rate_stream(cfg: StreamConfig, seconds: float) -> float:
    """A stream with worker processes, measured in one block (workers decode ahead between
    turns, so they cannot take turns with another meter)."""
    return rates({"stream": streaming(cfg)}, seconds, slices=1)["stream"]


def rate_ray_data(cfg: StreamConfig, seconds: float, cpus: int) -> float:
    import ray

    from pipeline.data.ray_ingest import decode_shard
    from pipeline.data.shards import load_manifest
    from pipeline.orchestrate.ray_tasks import start_local_ray

    start_local_ray(num_cpus=cpus, log_to_driver=False)
    try:
        manifest = load_manifest(cfg.url, cfg.endpoint_url)
        items = [{"shard": i} for i in range(len(manifest.split(cfg.split).shards))]
        ds = ray.data.from_items(items, override_num_blocks=len(items)).flat_map(
            decode_shard(cfg, manifest), num_cpus=1
        )
        n, start = 0, None
        while start is None or time.perf_counter() - start < seconds:  # epochs, until time is up
            for batch in ds.iter_batches(batch_size=cfg.batch_size, batch_format="numpy"):
                if start is None:  # start-up (tasks, first decodes) is not throughput
                    start = time.perf_counter()
                    continue
                n += len(batch["key"])
                if time.perf_counter() - start >= seconds:
                    break
        return n / (time.perf_counter() - start)
    finally:
        ray.shutdown()


def start_s3() -> tuple[subprocess.Popen, str]:
    import socket
    import urllib.request

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    moto = Path(sys.executable).parent / "moto_server"
    proc = subprocess.Popen(
        [str(moto), "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    url = f"http://127.0.0.1:{port}"
    for _ in range(300):
        try:
            urllib.request.urlopen(url, timeout=1)
            break
        except urllib.error.HTTPError:
            break
        except OSError:
            time.sleep(0.1)
    os.environ.update(
        AWS_ACCESS_KEY_ID="bench", AWS_SECRET_ACCESS_KEY="bench", AWS_DEFAULT_REGION="us-east-1"
    )
    return proc, url


ROWS = [  # (figure name of the rate, label, name of its baseline's rate)
    ("decode", "decode JPEG 500x375, PIL (bare loop)", "decode"),
    ("decode_lj", "decode JPEG 500x375, libjpeg-turbo direct (bare loop)", "decode"),
    ("w0", "stream, in process (1 worker's rate)", "decode"),
    ("w0_pil", "stream, in process, PIL decodes whole images", "decode"),
    ("w1", "stream, 1 worker process", "decode"),
    ("w2", "stream, 2 worker processes", "decode"),
    ("s3", "stream, 2 workers, S3 on loopback", "decode"),
    ("ray_data", "ray-data, 2 decode CPUs, 1 consumer", "decode"),
    ("decode_256", "decode JPEG 256x256, PIL (bare loop)", "decode_256"),
    ("w0_256", "stream 256x256, in process", "decode_256"),
    ("raw_w0_256", "stream 256x256 raw pixels (--pixels raw), in process", "decode_256"),
    ("decode_png", "decode PNG 28x28 (bare loop)", "decode_png"),
    ("png_w0", "stream 28px PNGs, in process", "decode_png"),
    ("raw_w0", "stream 28px raw pixels (--pixels raw), in process", "decode_png"),
]
FIGURES = {  # name in the JSON line: (numerator, denominator) rates
    "stream_vs_decode_ratio": ("w0", "decode"),
    "stream_vs_libjpeg_whole_decode_ratio": ("w0", "decode_lj"),
    "pil_stream_vs_decode_ratio": ("w0_pil", "decode"),
    "two_vs_one_worker_ratio": ("w2", "w1"),
    "s3_vs_local_ratio": ("s3", "w2"),
    "ray_data_vs_stream_2_workers_ratio": ("ray_data", "w2"),
    "jpeg256_stream_vs_decode_ratio": ("w0_256", "decode_256"),
    "jpeg256_raw_stream_vs_decode_ratio": ("raw_w0_256", "decode_256"),
    "small_png_stream_vs_decode_ratio": ("png_w0", "decode_png"),
    "small_raw_stream_vs_png_decode_ratio": ("raw_w0", "decode_png"),
}


GROUPS = ("500px", "256px", "28px")  # --only: the images measured (the first is all of S3, workers)


def figures_of(rates: dict) -> dict[str, tuple[str, str]]:
    """The FIGURES whose two rates were measured."""
    return {k: (a, b) for k, (a, b) in FIGURES.items() if a in rates and b in rates}


def measure(
    root: Path, blobs: dict[str, list[bytes]], endpoint: str, seconds: float, groups: list[str]
) -> dict:
    """One run of the measurements of `groups` (samples/s): each baseline takes turns with what
    is compared with it; streams with worker processes run in blocks."""
    vit = dict(batch_size=64, image_size=224, channels=3, crop_scale=(0.08, 1.0))
    small = dict(batch_size=256, image_size=28, channels=1)
    jpegs = str(root / "ds-jpeg")
    r: dict[str, float] = {}
    if "500px" in groups:
        r |= rates(
            {
                "decode": decoding(blobs["jpeg"], "RGB"),
                "decode_lj": decoding_libjpeg(blobs["jpeg"]),
                "w0": streaming(StreamConfig(jpegs, workers=0, **vit)),
                "w0_pil": streaming(StreamConfig(jpegs, workers=0, **vit), fast_jpeg=False),
            },
            4 * seconds,
        )
        for name, workers in (("w1", 1), ("w2", 2)):
            r[name] = rate_stream(StreamConfig(jpegs, workers=workers, **vit), seconds)
        s3 = StreamConfig("s3://bench/ds", workers=2, endpoint_url=endpoint, **vit)
        r["s3"] = rate_stream(s3, seconds)
        r["w2"] = (r["w2"] + rate_stream(StreamConfig(jpegs, workers=2, **vit), seconds)) / 2
        r["ray_data"] = rate_ray_data(StreamConfig(jpegs, workers=0, **vit), seconds, cpus=2)
    if "256px" in groups:
        r |= rates(
            {
                "decode_256": decoding(blobs["jpeg256"], "RGB"),
                "w0_256": streaming(StreamConfig(str(root / "ds-jpeg256"), workers=0, **vit)),
                "raw_w0_256": streaming(StreamConfig(str(root / "ds-raw256"), workers=0, **vit)),
            },
            3 * seconds,
        )
    if "28px" in groups:
        r |= rates(
            {
                "decode_png": decoding(blobs["png"], "L"),
                "png_w0": streaming(StreamConfig(str(root / "ds-png"), workers=0, **small)),
                "raw_w0": streaming(StreamConfig(str(root / "ds-raw"), workers=0, **small)),
            },
            3 * seconds,
        )
    return r


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--images", type=int, default=2000)
    parser.add_argument("--seconds", type=float, default=6.0, help="per measurement")
    parser.add_argument("--runs", type=int, default=3, help="whole runs; medians are reported")
    parser.add_argument("--only", nargs="+", choices=GROUPS, default=list(GROUPS))
    args = parser.parse_args()
    if not jpeg.available():
        sys.exit("the JPEG crop decoder is not built: run `tessera build-ops` (see its message)")
    opts = PrepareOptions(samples_per_shard=250, executor="local", progress=False)
    runs = []
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        sets = {"500px": ("jpeg", (500, 375), "JPEG"), "256px": ("jpeg256", (256, 256), "JPEG"),
                "28px": ("png", (28, 28), "PNG")}  # fmt: skip
        raw = dataclasses.replace(opts, pixels="raw")
        blobs = {}
        for group in args.only:  # the images of the groups asked for, and their shards
            name, size, fmt = sets[group]
            blobs[name] = make_folder(root / name, args.images, size, fmt)
            prepare(open_source(str(root / name)), str(root / f"ds-{name}"), opts)
            if group != "500px":  # the same images as raw pixels
                out = "ds-raw" if group == "28px" else "ds-raw256"
                prepare(open_source(str(root / name)), str(root / out), raw)
        proc, endpoint = start_s3()
        try:
            import fsspec

            if "500px" in args.only:
                fsspec.filesystem("s3", client_kwargs={"endpoint_url": endpoint}).mkdir("bench")
                prepare(
                    open_source(str(root / "jpeg")),
                    "s3://bench/ds",
                    dataclasses.replace(opts, endpoint_url=endpoint),
                )
            for i in range(args.runs):  # whole runs, so every figure's runs interleave
                r = measure(root, blobs, endpoint, args.seconds, args.only)
                runs.append(r)
                ratios = {k: round(r[a] / r[b], 3) for k, (a, b) in figures_of(r).items()}
                print(f"run {i + 1}: {json.dumps(ratios)}", flush=True)
        finally:
            proc.terminate()

    rate = {k: float(np.median([r[k] for r in runs])) for k in runs[0]}
    ratio = {
        k: float(np.median([r[a] / r[b] for r in runs])) for k, (a, b) in figures_of(rate).items()
    }
    print(f"\nmedians of {len(runs)} runs (ratios: the median of each run's ratio)")
    print(
        f"{'loader (samples/s; ViT: crop, resize 224, flip, batch)':<56} {'rate':>9} {'vs base':>9}"
    )
    for key, label, base in [row for row in ROWS if row[0] in rate]:
        median_ratio = float(np.median([r[key] / r[base] for r in runs]))
        print(f"{label:<56} {rate[key]:>9.0f} {median_ratio:>8.2f}x")
    if "500px" in args.only:
        print(
            f"2 workers vs 1 worker: {ratio['two_vs_one_worker_ratio']:.2f}x   (cores: {os.cpu_count()})"
        )
        print(f"S3 on loopback vs disk, 2 workers: {ratio['s3_vs_local_ratio']:.2f}x")
    figures = {k: round(v, 3) for k, v in ratio.items()}
    figures |= {f"{k}_samples_per_s": round(v, 1) for k, v in rate.items()}
    figures["runs"] = len(runs)
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
