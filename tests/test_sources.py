"""The paper recipes' data: CIFAR binaries, downsampled ImageNet .npz, ImageNet's folder layout,
each read into shards whose pixels and labels are the source's; validation carved by class."""

import io
import json
from collections import Counter

import numpy as np
import pytest
from PIL import Image

from pipeline.data.prepare import PrepareOptions, prepare
from pipeline.data.shards import load_manifest
from pipeline.data.sources import SourceError, open_source
from pipeline.data.stream import Stream, StreamConfig

LOCAL = PrepareOptions(samples_per_shard=40, executor="local", progress=False)


def images(n, side, seed):
    return np.random.default_rng(seed).integers(0, 256, (n, side, side, 3), dtype=np.uint8)


def planar(x):
    """(N, side, side, 3) -> CIFAR's rows: R plane, G plane, B plane."""
    return x.transpose(0, 3, 1, 2).reshape(len(x), -1)


def streamed(url, split, side):
    """{key: (pixels (side, side, 3), label)} of a whole split, as the stream delivers it."""
    cfg = StreamConfig(url, split, batch_size=64, train=False, image_size=side)
    return {
        k: (x.permute(1, 2, 0).numpy(), int(y))
        for b in Stream(cfg).iter_epoch()
        for k, x, y in zip(b["key"], b["image"], b["label"], strict=True)
    }


def test_cifar10_binary_batches_give_their_pixels_labels_and_class_names(tmp_path):
    folder = tmp_path / "cifar-10-batches-bin"
    folder.mkdir()
    x = {
        name: images(30, 32, i)
        for i, name in enumerate(["data_batch_1", "data_batch_2", "test_batch"])
    }
    y = {name: np.arange(30, dtype=np.uint8) % 10 for name in x}
    for name in x:
        (folder / f"{name}.bin").write_bytes(
            np.concatenate([y[name][:, None], planar(x[name])], 1).tobytes()
        )
    names = [
        "airplane",
        "automobile",
        "bird",
        "cat",
        "deer",
        "dog",
        "frog",
        "horse",
        "ship",
        "truck",
    ]
    (folder / "batches.meta.txt").write_text("\n".join(names) + "\n\n")

    m = prepare(open_source(str(folder)), str(tmp_path / "ds"), LOCAL)
    assert m.classes == names and m.image_size == [32, 32] and m.channels == 3
    assert {k: v.samples for k, v in m.splits.items()} == {"train": 60, "test": 30}
    got = streamed(str(tmp_path / "ds"), "test", 32)
    for i in range(30):
        pixels, label = got[f"{i:08d}"]
        np.testing.assert_array_equal(pixels, x["test_batch"][i])
        assert label == y["test_batch"][i]
    train = streamed(str(tmp_path / "ds"), "train", 32)
    np.testing.assert_array_equal(train[f"{35:08d}"][0], x["data_batch_2"][5])  # batches in order


def test_cifar100_takes_the_fine_labels_and_a_truncated_file_is_named(tmp_path):
    folder = tmp_path / "cifar-100-binary"
    folder.mkdir()
    for name, n in (("train", 50), ("test", 20)):
        coarse = np.arange(n, dtype=np.uint8) % 20
        fine = (np.arange(n, dtype=np.uint8) * 7) % 100
        rows = np.concatenate([coarse[:, None], fine[:, None], planar(images(n, 32, n))], 1)
        (folder / f"{name}.bin").write_bytes(rows.tobytes())
    (folder / "fine_label_names.txt").write_text("\n".join(f"fine{i}" for i in range(100)))
    src = open_source(str(folder))
    assert len(src.classes) == 100 and src.classes[7] == "fine7"
    assert [r.labels[0] for r in src.splits["test"][:3]] == [0, 7, 14]

    (folder / "test.bin").write_bytes((folder / "test.bin").read_bytes()[:-100])
    with pytest.raises(SourceError, match=r"test\.bin: .* not a whole number of 3074-byte records"):
        open_source(str(folder))
    with pytest.raises(SourceError, match="pickled Python version is not read"):
        open_source(str(tmp_path), "cifar")


def test_downsampled_imagenet_npz_is_read_without_pickle_stored_or_compressed(tmp_path):
    folder = tmp_path / "Imagenet32"
    folder.mkdir()
    x1, x2, xv = images(25, 32, 1), images(15, 32, 2), images(10, 32, 3)
    labels = {n: np.arange(len(a)) % 5 + 1 for n, a in (("1", x1), ("2", x2), ("v", xv))}  # 1-based
    np.savez(
        folder / "train_data_batch_1.npz", data=planar(x1), labels=labels["1"], mean=np.zeros(3)
    )
    np.savez(folder / "train_data_batch_2.npz", data=planar(x2), labels=labels["2"])
    np.savez_compressed(folder / "val_data.npz", data=planar(xv), labels=labels["v"])

    m = prepare(open_source(str(folder)), str(tmp_path / "ds"), LOCAL)
    assert m.source["kind"] == "npz" and m.image_size == [32, 32] and len(m.classes) == 5
    test = streamed(str(tmp_path / "ds"), "test", 32)
    for i in range(10):
        pixels, label = test[f"val_data_{i:07d}"]
        np.testing.assert_array_equal(pixels, xv[i])
        assert label == labels["v"][i] - 1
    train = streamed(str(tmp_path / "ds"), "train", 32)
    np.testing.assert_array_equal(train["train_data_batch_2_0000014"][0], x2[14])

    np.savez(folder / "val_data.npz", data=np.array([{"a": 1}], dtype=object), labels=np.ones(1))
    from pipeline.data.sources import _npz_arrays

    _npz_arrays.cache_clear()
    with pytest.raises(SourceError, match=r"val_data\.npz: not a readable \.npz without pickle"):
        open_source(str(folder))


def jpeg(value):
    buf = io.BytesIO()
    Image.fromarray(np.full((20, 24, 3), value, np.uint8)).save(buf, format="JPEG", quality=95)
    return buf.getvalue()


def imagenet_train(root):
    wnids = ["n01440764", "n01443537", "n01484850"]
    for c, wnid in enumerate(wnids):
        (root / "train" / wnid).mkdir(parents=True)
        for i in range(4):
            (root / "train" / wnid / f"{wnid}_{i}.JPEG").write_bytes(jpeg(60 * c + i))
    (root / "val").mkdir()
    return wnids


@pytest.mark.parametrize("layout", ["class folders", "kaggle csv", "devkit"])
def test_imagenet_layouts_label_the_validation_images_and_make_it_the_test_split(tmp_path, layout):
    root = tmp_path / "ILSVRC" / "Data" / "CLS-LOC"
    wnids = imagenet_train(root)
    truth = {f"ILSVRC2012_val_{i:08d}": wnids[(i * 2) % 3] for i in range(1, 7)}
    for stem, wnid in truth.items():
        folder = root / "val" / wnid if layout == "class folders" else root / "val"
        folder.mkdir(parents=True, exist_ok=True)
        (folder / f"{stem}.JPEG").write_bytes(jpeg(200))
    if layout == "kaggle csv":  # at the top of the Kaggle copy, three folders up
        lines = ["ImageId,PredictionString"] + [
            f"{s},{w} 1 2 3 4 {w} 5 6 7 8" for s, w in truth.items()
        ]
        (tmp_path / "LOC_val_solution.csv").write_text("\n".join(lines) + "\n")
    elif layout == "devkit":  # ILSVRC ids are not the sorted wnid order
        from scipy.io import savemat

        ids = {"n01484850": 1, "n01440764": 2, "n01443537": 3}
        synsets = np.zeros(3, dtype=[("ILSVRC2012_ID", object), ("WNID", object)])
        for k, (w, i) in enumerate(ids.items()):
            synsets[k] = (i, w)
        data = root / "ILSVRC2012_devkit_t12" / "data"
        data.mkdir(parents=True)
        savemat(data / "meta.mat", {"synsets": synsets})
        (data / "ILSVRC2012_validation_ground_truth.txt").write_text(
            "\n".join(str(ids[w]) for w in truth.values()) + "\n"
        )
    src = open_source(str(root))
    assert src.kind == "imagenet" and src.classes == wnids
    assert {r.key: src.classes[r.labels[0]] for r in src.splits["test"]} == truth
    assert len(src.splits["train"]) == 12 and set(src.splits) == {"train", "test"}


def test_a_flat_imagenet_val_without_ground_truth_says_what_it_needs(tmp_path):
    imagenet_train(tmp_path)
    (tmp_path / "val" / "ILSVRC2012_val_00000001.JPEG").write_bytes(jpeg(1))
    with pytest.raises(
        SourceError, match=r"LOC_val_solution\.csv .* ILSVRC2012_validation_ground_truth"
    ):
        open_source(str(tmp_path), "imagenet")


def test_validation_is_carved_by_class_and_recorded(tmp_path):
    m = prepare(open_source("digits"), str(tmp_path / "ds"), PrepareOptions(
        samples_per_shard=400, val_fraction=0.1, executor="local", progress=False))  # fmt: skip
    src = open_source("digits")
    total = Counter(r.labels[0] for r in src.splits["train"])
    val = Counter(int(y) for y in _labels(str(tmp_path / "ds"), "val"))
    assert all(abs(val[c] - 0.1 * total[c]) <= 1 for c in total), (val, total)
    record = json.loads((tmp_path / "ds" / "dataset.json").read_text())["source"]["val"]
    assert record == {"carved_from": "train", "fraction": 0.1, "seed": 0, "stratified": "by class",
                      "samples": m.splits["val"].samples}  # fmt: skip
    assert load_manifest(str(tmp_path / "ds")).splits["val"].samples == sum(val.values())


def _labels(url, split):
    cfg = StreamConfig(url, split, batch_size=100, train=False)
    return [y for b in Stream(cfg).iter_epoch() for y in b["label"]]
