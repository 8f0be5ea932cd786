"""Dataset loaders on tiny files of the real on-disk formats, written in tmp_path.

Nothing here downloads: every loader is called with ``download=False`` (the default).
"""

from __future__ import annotations

import gzip
import pickle
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

from patchbench.running.data import (
    CIFAR_CLASSES,
    DEBIAN_FASHION_MNIST,
    FASHION_CLASSES,
    SYNTHETIC_CLASSES,
    DatasetFormatError,
    DatasetNotFoundError,
    ImageData,
    TensorImages,
    batches,
    load_dataset,
    read_idx,
)

IDX_UBYTE_1D = 0x00000801  # labels: N
IDX_UBYTE_3D = 0x00000803  # images: N, 28, 28


# --- helpers -----------------------------------------------------------------------------

def idx_bytes(array: np.ndarray) -> bytes:
    """An IDX file of unsigned bytes: magic 0x000008<ndim>, big-endian dims, then the data."""
    header = struct.pack(">I", 0x00000800 | array.ndim)
    header += b"".join(struct.pack(">I", d) for d in array.shape)
    return header + np.ascontiguousarray(array, dtype=np.uint8).tobytes()


def write_idx(path: Path, array: np.ndarray) -> Path:
    data = idx_bytes(array)
    if path.suffix == ".gz":
        data = gzip.compress(data)
    path.write_bytes(data)
    return path


def fashion_arrays(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8)
    images[0, 0, 0], images[0, 0, 1] = 0, 255  # make the extremes of the range appear
    labels = rng.integers(0, 10, size=n, dtype=np.uint8)
    return images, labels


def write_fashion(folder: Path, split: str, n: int, gz: bool, seed: int = 0
                  ) -> tuple[np.ndarray, np.ndarray]:
    """Write one split of Fashion-MNIST as the four-file IDX layout uses it."""
    prefix = "train" if split == "train" else "t10k"
    suffix = ".gz" if gz else ""
    images, labels = fashion_arrays(n, seed)
    folder.mkdir(parents=True, exist_ok=True)
    write_idx(folder / f"{prefix}-images-idx3-ubyte{suffix}", images)
    write_idx(folder / f"{prefix}-labels-idx1-ubyte{suffix}", labels)
    return images, labels


def write_cifar(root: Path, n_per_batch: int = 3, seed: int = 0) -> dict[str, dict]:
    """torchvision's python format: pickled dicts with uint8 ``data`` (n, 3072) and labels."""
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    batches_written = {}
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        entry = {"batch_label": name,
                 "data": rng.integers(0, 256, size=(n_per_batch, 3072), dtype=np.uint8),
                 "labels": [int(x) for x in rng.integers(0, 10, size=n_per_batch)],
                 "filenames": [f"{name}_{i}.png" for i in range(n_per_batch)]}
        with open(folder / name, "wb") as fh:
            pickle.dump(entry, fh, protocol=2)
        batches_written[name] = entry
    return batches_written


# --- fashion-mnist -----------------------------------------------------------------------

@pytest.mark.parametrize("gz", [True, False], ids=["gzipped", "plain"])
def test_read_idx_returns_the_array_written(tmp_path: Path, gz: bool) -> None:
    suffix = ".gz" if gz else ""
    images, labels = fashion_arrays(3, seed=1)
    got_images = read_idx(write_idx(tmp_path / f"images{suffix}", images))
    got_labels = read_idx(write_idx(tmp_path / f"labels{suffix}", labels))
    assert got_images.dtype == np.uint8 and got_images.shape == (3, 28, 28)
    np.testing.assert_array_equal(got_images, images)
    np.testing.assert_array_equal(got_labels, labels)


def test_idx_helper_writes_the_documented_magic_numbers() -> None:
    images, labels = fashion_arrays(2, seed=0)
    assert struct.unpack(">IIII", idx_bytes(images)[:16]) == (IDX_UBYTE_3D, 2, 28, 28)
    assert struct.unpack(">II", idx_bytes(labels)[:8]) == (IDX_UBYTE_1D, 2)


def test_read_idx_result_is_writable(tmp_path: Path) -> None:
    array = read_idx(write_idx(tmp_path / "labels", np.arange(4, dtype=np.uint8)))
    array[0] = 9  # a copy, not a read-only view on the file's bytes
    assert array.tolist() == [9, 1, 2, 3]


@pytest.mark.parametrize("split", ["train", "test"])
@pytest.mark.parametrize("gz", [True, False], ids=["gzipped", "plain"])
def test_fashion_mnist_loads_both_splits(tmp_path: Path, split: str, gz: bool) -> None:
    images, labels = write_fashion(tmp_path, split, n=5, gz=gz)
    data = load_dataset("fashion-mnist", split, data_dir=tmp_path)
    assert (data.name, data.split, len(data)) == ("fashion-mnist", split, 5)
    assert data.in_shape == (1, 28, 28)
    assert data.classes == FASHION_CLASSES and data.num_classes == 10
    x, y = next(batches(data, batch_size=16))
    assert x.shape == (5, 1, 28, 28) and x.dtype == torch.float32
    assert x.min() == 0.0 and x.max() == 1.0
    torch.testing.assert_close(x[:, 0], torch.from_numpy(images).float() / 255)
    assert y.dtype == torch.int64 and y.tolist() == labels.tolist()


def test_fashion_mnist_splits_read_their_own_files(tmp_path: Path) -> None:
    write_fashion(tmp_path, "train", n=4, gz=True, seed=1)
    write_fashion(tmp_path, "test", n=2, gz=False, seed=2)
    assert len(load_dataset("fashion-mnist", "train", data_dir=tmp_path)) == 4
    assert len(load_dataset("fashion-mnist", "test", data_dir=tmp_path)) == 2


def test_fashion_mnist_finds_torchvisions_raw_layout(tmp_path: Path) -> None:
    write_fashion(tmp_path / "FashionMNIST" / "raw", "test", n=3, gz=True)
    assert len(load_dataset("fashion-mnist", "test", data_dir=tmp_path)) == 3


def test_fashion_mnist_missing_folder_says_how_to_get_it(tmp_path: Path) -> None:
    with pytest.raises(DatasetNotFoundError) as err:
        load_dataset("fashion-mnist", "test", data_dir=tmp_path / "nowhere")
    assert "apt-get install dataset-fashion-mnist" in str(err.value)
    assert str(tmp_path / "nowhere") in str(err.value)
    assert isinstance(err.value, FileNotFoundError)


def test_fashion_mnist_with_only_the_other_split_is_not_found(tmp_path: Path) -> None:
    write_fashion(tmp_path, "train", n=2, gz=True)
    with pytest.raises(DatasetNotFoundError, match="apt-get install dataset-fashion-mnist"):
        load_dataset("fashion-mnist", "test", data_dir=tmp_path)


def test_fashion_mnist_with_labels_missing_is_not_found(tmp_path: Path) -> None:
    write_fashion(tmp_path, "test", n=2, gz=True)
    (tmp_path / "t10k-labels-idx1-ubyte.gz").unlink()
    with pytest.raises(DatasetNotFoundError):
        load_dataset("fashion-mnist", "test", data_dir=tmp_path)


def corrupt_idx_files(tmp_path: Path) -> dict[str, Path]:
    images, _ = fashion_arrays(3, seed=0)
    good = idx_bytes(images)
    files = {
        "truncated body": good[:-100],
        "too long body": good + b"\x00" * 7,
        "truncated gzip": gzip.compress(good)[:-20],
        "not gzip": b"this is not a gzip stream at all",
        "wrong magic": b"\x08\x03\x00\x00" + good[4:],
        "int32 data type": b"\x00\x00\x0c\x03" + good[4:],
        "too short for a header": b"\x00\x00",
        "empty": b"",
    }
    paths = {}
    for i, (kind, data) in enumerate(files.items()):
        suffix = ".gz" if "gzip" in kind else ""
        paths[kind] = tmp_path / f"file{i}{suffix}"
        paths[kind].write_bytes(data)
    return paths


CORRUPTIONS = ["truncated body", "too long body", "truncated gzip", "not gzip", "wrong magic",
               "int32 data type", "too short for a header", "empty"]


@pytest.mark.parametrize("kind", CORRUPTIONS)
def test_read_idx_rejects_corrupt_files(tmp_path: Path, kind: str) -> None:
    path = corrupt_idx_files(tmp_path)[kind]
    with pytest.raises(DatasetFormatError, match=str(path.name)):
        read_idx(path)


def test_read_idx_rejects_a_header_truncated_inside_the_dimensions(tmp_path: Path) -> None:
    path = tmp_path / "header-only"
    path.write_bytes(struct.pack(">I", IDX_UBYTE_3D) + struct.pack(">I", 3))
    with pytest.raises(DatasetFormatError):
        read_idx(path)


@pytest.mark.parametrize("gz", [True, False], ids=["gzipped", "plain"])
def test_fashion_mnist_truncated_images_file_is_a_format_error(tmp_path: Path, gz: bool) -> None:
    write_fashion(tmp_path, "test", n=3, gz=gz)
    path = tmp_path / ("t10k-images-idx3-ubyte" + (".gz" if gz else ""))
    raw = gzip.decompress(path.read_bytes()) if gz else path.read_bytes()
    raw = raw[: len(raw) // 2]
    path.write_bytes(gzip.compress(raw) if gz else raw)
    with pytest.raises(DatasetFormatError, match="header says"):
        load_dataset("fashion-mnist", "test", data_dir=tmp_path)


def test_fashion_mnist_image_and_label_counts_must_agree(tmp_path: Path) -> None:
    images, labels = fashion_arrays(4, seed=0)
    write_idx(tmp_path / "t10k-images-idx3-ubyte", images)
    write_idx(tmp_path / "t10k-labels-idx1-ubyte", labels[:3])
    with pytest.raises(DatasetFormatError, match="4 images but 3 labels"):
        load_dataset("fashion-mnist", "test", data_dir=tmp_path)


def test_fashion_mnist_images_of_the_wrong_size_are_a_format_error(tmp_path: Path) -> None:
    write_idx(tmp_path / "t10k-images-idx3-ubyte", np.zeros((2, 14, 14), np.uint8))
    write_idx(tmp_path / "t10k-labels-idx1-ubyte", np.zeros(2, np.uint8))
    with pytest.raises(DatasetFormatError):
        load_dataset("fashion-mnist", "test", data_dir=tmp_path)


@pytest.mark.skipif(not DEBIAN_FASHION_MNIST.is_dir(),
                    reason="dataset-fashion-mnist (Debian package) is not installed")
def test_debian_fashion_mnist_is_the_default() -> None:
    data = load_dataset("fashion-mnist", "test")
    assert len(data) == 10_000
    assert data.in_shape == (1, 28, 28) and data.num_classes == 10
    x, y = data.dataset[torch.arange(3)]
    assert x.shape == (3, 1, 28, 28) and 0.0 <= x.min() <= x.max() <= 1.0
    labels = data.dataset.labels
    assert sorted(labels.unique().tolist()) == list(range(10))
    assert torch.bincount(labels).tolist() == [1000] * 10


# --- cifar10 -----------------------------------------------------------------------------

@pytest.mark.parametrize("split", ["train", "test"])
def test_cifar10_loads_torchvisions_python_format(tmp_path: Path, split: str) -> None:
    written = write_cifar(tmp_path, n_per_batch=3)
    names = [f"data_batch_{i}" for i in range(1, 6)] if split == "train" else ["test_batch"]
    raw = np.concatenate([written[n]["data"] for n in names])
    labels = sum((written[n]["labels"] for n in names), [])

    data = load_dataset("cifar10", split, data_dir=tmp_path)
    assert (data.name, data.split, len(data)) == ("cifar10", split, len(raw))
    assert data.in_shape == (3, 32, 32) and data.classes == CIFAR_CLASSES
    x, y = next(batches(data, batch_size=64))
    assert x.shape == (len(raw), 3, 32, 32) and x.dtype == torch.float32
    assert 0.0 <= x.min() <= x.max() <= 1.0
    assert y.tolist() == labels
    for i, c, row, col in [(0, 0, 0, 0), (1, 1, 5, 7), (2, 2, 31, 31), (len(raw) - 1, 2, 17, 3)]:
        assert x[i, c, row, col].item() == pytest.approx(raw[i, c * 1024 + row * 32 + col] / 255)
    torch.testing.assert_close(x.reshape(len(raw), -1), torch.from_numpy(raw).float() / 255)


def test_cifar10_missing_folder_is_not_found(tmp_path: Path) -> None:
    with pytest.raises(DatasetNotFoundError, match="cifar-10-batches-py"):
        load_dataset("cifar10", "test", data_dir=tmp_path)


def test_cifar10_missing_batch_is_not_found(tmp_path: Path) -> None:
    write_cifar(tmp_path)
    (tmp_path / "cifar-10-batches-py" / "data_batch_3").unlink()
    with pytest.raises(DatasetNotFoundError, match="data_batch_3 is missing"):
        load_dataset("cifar10", "train", data_dir=tmp_path)
    assert len(load_dataset("cifar10", "test", data_dir=tmp_path)) == 3


def corrupt_cifar(path: Path, kind: str) -> None:
    good = path.read_bytes()
    if kind == "truncated":
        path.write_bytes(good[: len(good) // 2])
    elif kind == "garbage":
        path.write_bytes(b"\x00 definitely not a pickle")
    elif kind == "empty":
        path.write_bytes(b"")
    elif kind == "no data key":
        path.write_bytes(pickle.dumps({"labels": [0, 1]}))
    elif kind == "wrong row length":
        path.write_bytes(pickle.dumps({"data": np.zeros((2, 1000), np.uint8), "labels": [0, 1]}))
    elif kind == "no labels":
        path.write_bytes(pickle.dumps({"data": np.zeros((2, 3072), np.uint8)}))
    elif kind == "not a dict":
        path.write_bytes(pickle.dumps([1, 2, 3]))


@pytest.mark.parametrize("kind", [
    "truncated", "garbage", "empty", "no data key", "wrong row length", "no labels",
    "not a dict",
])
def test_cifar10_corrupt_batch_is_a_format_error(tmp_path: Path, kind: str) -> None:
    write_cifar(tmp_path)
    corrupt_cifar(tmp_path / "cifar-10-batches-py" / "test_batch", kind)
    with pytest.raises(DatasetFormatError):
        load_dataset("cifar10", "test", data_dir=tmp_path)


# --- imagenet ----------------------------------------------------------------------------

def write_image_folder(root: Path, classes: dict[str, tuple[int, int, int]], per_class: int = 2,
                       ) -> None:
    from PIL import Image

    for name, color in classes.items():
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            Image.new("RGB", (12 + 4 * i, 10), color).save(root / name / f"{i}.png")


def test_imagenet_loads_an_image_folder_tree(tmp_path: Path) -> None:
    write_image_folder(tmp_path / "val", {"n01": (255, 0, 0), "n02": (0, 0, 255)})
    data = load_dataset("imagenet", "test", data_dir=tmp_path)
    assert (data.name, data.split, len(data)) == ("imagenet", "test", 4)
    assert data.in_shape == (3, 224, 224) and data.classes == ("n01", "n02")
    x, y = next(batches(data, batch_size=8))
    assert x.shape == (4, 3, 224, 224) and 0.0 <= x.min() <= x.max() <= 1.0
    assert y.tolist() == [0, 0, 1, 1]
    torch.testing.assert_close(x[0, :, 100, 100], torch.tensor([1.0, 0.0, 0.0]))
    torch.testing.assert_close(x[3, :, 100, 100], torch.tensor([0.0, 0.0, 1.0]))


def test_imagenet_train_split_reads_the_train_folder(tmp_path: Path) -> None:
    write_image_folder(tmp_path / "train", {"a": (0, 0, 0), "b": (9, 9, 9), "c": (1, 2, 3)},
                       per_class=1)
    assert load_dataset("imagenet", "train", data_dir=tmp_path).classes == ("a", "b", "c")
    with pytest.raises(DatasetNotFoundError):
        load_dataset("imagenet", "test", data_dir=tmp_path)


def test_imagenet_subset_and_batches_use_the_data_loader(tmp_path: Path) -> None:
    write_image_folder(tmp_path / "val", {"n01": (255, 0, 0), "n02": (0, 0, 255)})
    data = load_dataset("imagenet", "test", data_dir=tmp_path)
    small = data.subset(3)
    assert len(small) == 3 and small.in_shape == data.in_shape and small.classes == data.classes
    labels = [y.tolist() for _, y in batches(small, batch_size=2)]
    assert labels == [[0, 0], [1]]
    shuffled = torch.cat([y for _, y in batches(data, batch_size=3, shuffle=True)])
    assert sorted(shuffled.tolist()) == [0, 0, 1, 1]


def test_imagenet_without_data_dir_is_not_found() -> None:
    with pytest.raises(DatasetNotFoundError, match="--data-dir"):
        load_dataset("imagenet", "test")


def test_imagenet_missing_split_folder_is_not_found(tmp_path: Path) -> None:
    with pytest.raises(DatasetNotFoundError, match="ImageFolder"):
        load_dataset("imagenet", "test", data_dir=tmp_path)


def test_imagenet_folder_without_images_is_a_format_error(tmp_path: Path) -> None:
    (tmp_path / "val" / "n01").mkdir(parents=True)
    (tmp_path / "val" / "n01" / "readme.txt").write_text("no images here")
    with pytest.raises(DatasetFormatError, match="not an ImageFolder tree"):
        load_dataset("imagenet", "test", data_dir=tmp_path)


# --- synthetic ---------------------------------------------------------------------------

def test_synthetic_is_deterministic_with_four_classes() -> None:
    a, b = load_dataset("synthetic", "test"), load_dataset("synthetic", "test")
    assert a.in_shape == (1, 28, 28) and a.classes == SYNTHETIC_CLASSES and a.num_classes == 4
    assert torch.equal(a.dataset.images, b.dataset.images)
    assert torch.equal(a.dataset.labels, b.dataset.labels)
    assert a.dataset.images.shape[1:] == (1, 28, 28)
    assert sorted(a.dataset.labels.unique().tolist()) == [0, 1, 2, 3]


def test_synthetic_splits_differ() -> None:
    train, test = load_dataset("synthetic", "train"), load_dataset("synthetic", "test")
    assert len(train) > len(test) > 0
    assert not torch.equal(train.dataset.images[: len(test)], test.dataset.images)


def test_subset_takes_the_first_images() -> None:
    data = load_dataset("synthetic", "test")
    small = data.subset(10)
    assert isinstance(small, ImageData) and len(small) == 10
    assert (small.name, small.split, small.in_shape, small.classes) == (
        data.name, data.split, data.in_shape, data.classes)
    x_small, y_small = small.dataset[torch.arange(10)]
    x_all, y_all = data.dataset[torch.arange(10)]
    assert torch.equal(x_small, x_all) and torch.equal(y_small, y_all)
    assert data.subset(None) is data and data.subset(len(data) + 5) is data


def test_val_is_the_tail_of_train_and_held_out_training_never_sees_it() -> None:
    train, val = load_dataset("synthetic", "train"), load_dataset("synthetic", "val")
    kept = train.without_validation()
    assert val.split == "val" and len(val) == len(train) // 12
    assert len(kept) + len(val) == len(train)
    images = train.dataset.images
    assert torch.equal(val.dataset.images, images[len(kept):])
    assert torch.equal(kept.dataset.images, images[:len(kept)])
    with pytest.raises(ValueError, match="only the train split"):
        val.without_validation()


def image_ids(images: torch.Tensor) -> list[int]:
    """A fingerprint per image, to compare multisets of images regardless of order."""
    weights = torch.arange(1, images[0].numel() + 1, dtype=torch.float64)
    return sorted(int(v) for v in (images.flatten(1).double() * 255).round() @ weights)


@pytest.mark.parametrize("shuffle", [False, True], ids=["in-order", "shuffled"])
def test_batches_yield_every_image_exactly_once(shuffle: bool) -> None:
    data = load_dataset("synthetic", "test").subset(50)
    got = list(batches(data, batch_size=16, shuffle=shuffle, seed=3))
    assert [len(y) for _, y in got] == [16, 16, 16, 2]
    x = torch.cat([b[0] for b in got])
    y = torch.cat([b[1] for b in got])
    x_all, y_all = data.dataset[torch.arange(50)]
    assert x.shape == (50, 1, 28, 28)
    assert image_ids(x) == image_ids(x_all)
    assert sorted(y.tolist()) == sorted(y_all.tolist())
    if shuffle:
        assert not torch.equal(y, y_all)
    else:
        assert torch.equal(x, x_all) and torch.equal(y, y_all)


def test_batches_shuffle_follows_the_seed() -> None:
    images = torch.arange(20, dtype=torch.uint8).reshape(20, 1, 1, 1)
    data = ImageData("toy", "test", TensorImages(images, torch.arange(20)), (1, 1, 1), ("a",))

    def order(seed: int) -> list[int]:
        return torch.cat([y for _, y in batches(data, 7, shuffle=True, seed=seed)]).tolist()

    assert order(0) == order(0) and sorted(order(0)) == list(range(20))
    assert order(0) != order(1)


# --- registry ----------------------------------------------------------------------------

def test_unknown_dataset_names_the_available_ones() -> None:
    with pytest.raises(KeyError) as err:
        load_dataset("mnist", "test")
    message = err.value.args[0]
    assert "unknown dataset 'mnist'" in message
    for name in ("fashion-mnist", "cifar10", "imagenet", "synthetic"):
        assert name in message


def test_unknown_split_names_the_available_ones() -> None:
    with pytest.raises(KeyError) as err:
        load_dataset("synthetic", "validation")
    assert err.value.args[0] == "unknown split 'validation'; available: train, val, test"
