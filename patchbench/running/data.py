"""Dataset registry: every dataset gives float images in [0, 1] as (C, H, W) and int labels.

Nothing here downloads unless asked (``download=True``): tests and CI run offline.
"""

from __future__ import annotations

import gzip
import math
import pickle
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

DEBIAN_FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")
SPLITS = ("train", "val", "test")
# "val" is the last 1/VALIDATION_PARTS of the training files (5,000 of Fashion-MNIST's 60,000):
# settings such as a vote threshold or an ablation size are chosen on it, never on "test".
VALIDATION_PARTS = 12


class DatasetNotFoundError(FileNotFoundError):
    """The files of a dataset are not where we looked; the message says how to get them."""


class DatasetFormatError(ValueError):
    """Files were found but are not in the expected format."""


@dataclass
class ImageData:
    """A split of a dataset: a torch Dataset plus what defenses need to know about it."""

    name: str
    split: str
    dataset: Dataset
    in_shape: tuple[int, int, int]
    classes: tuple[str, ...]

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def subset(self, n: int | None) -> ImageData:
        """The first ``n`` images (all of them when n is None)."""
        if n is None or n >= len(self):
            return self
        return self.slice(0, n)

    def slice(self, start: int, stop: int, split: str | None = None) -> ImageData:
        """Images ``start`` .. ``stop - 1``, optionally relabelled as another split."""
        if isinstance(self.dataset, TensorImages):
            ds: Dataset = TensorImages(self.dataset.images[start:stop],
                                       self.dataset.labels[start:stop])
        else:
            ds = torch.utils.data.Subset(self.dataset, range(start, stop))
        return ImageData(self.name, split or self.split, ds, self.in_shape, self.classes)

    def without_validation(self) -> ImageData:
        """The training split minus its ``val`` images, for models tuned on ``val``."""
        if self.split != "train":
            raise ValueError(f"only the train split holds validation images, not {self.split!r}")
        return self.slice(0, len(self) - validation_size(len(self)))


def validation_size(n_train: int) -> int:
    return n_train // VALIDATION_PARTS


class TensorImages(Dataset):
    """In-memory images (uint8 or float) indexed by whole batches of indices at once."""

    def __init__(self, images: Tensor, labels: Tensor) -> None:
        if len(images) != len(labels):
            raise DatasetFormatError(f"{len(images)} images but {len(labels)} labels")
        self.images, self.labels = images, labels.long()

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: Tensor | int) -> tuple[Tensor, Tensor]:
        images = self.images[index]
        if images.dtype == torch.uint8:
            images = images.float() / 255.0
        return images, self.labels[index]


def batches(data: ImageData, batch_size: int, shuffle: bool = False, seed: int = 0,
            num_workers: int = 0, pin_memory: bool = False) -> Iterator[tuple[Tensor, Tensor]]:
    """Iterate (images, labels) batches; in-memory data is sliced without a per-item loop.

    ``pin_memory`` (for a GPU) returns page-locked batches, so that ``.to(device,
    non_blocking=True)`` overlaps the copy with the GPU's work; ``num_workers`` decode files
    (ImageFolder data) in parallel processes.
    """
    if isinstance(data.dataset, TensorImages):
        n = len(data)
        order = (torch.randperm(n, generator=torch.Generator().manual_seed(seed)) if shuffle
                 else torch.arange(n))
        for lo in range(0, n, batch_size):
            images, labels = data.dataset[order[lo:lo + batch_size]]
            yield (images.pin_memory(), labels.pin_memory()) if pin_memory else (images, labels)
        return
    loader = DataLoader(data.dataset, batch_size=batch_size, shuffle=shuffle,
                        num_workers=num_workers, pin_memory=pin_memory,
                        generator=torch.Generator().manual_seed(seed))
    yield from loader


Loader = Callable[[str, "Path | None", bool], ImageData]
DATASETS: dict[str, Loader] = {}


def register(name: str) -> Callable[[Loader], Loader]:
    def wrap(fn: Loader) -> Loader:
        DATASETS[name] = fn
        return fn
    return wrap


def load_dataset(name: str, split: str = "test", data_dir: str | Path | None = None,
                 download: bool = False) -> ImageData:
    """Load a split of a registered dataset; raise a one-line error if it cannot be found."""
    if name not in DATASETS:
        raise KeyError(f"unknown dataset {name!r}; available: {', '.join(DATASETS)}")
    if split not in SPLITS:
        raise KeyError(f"unknown split {split!r}; available: {', '.join(SPLITS)}")
    loader = DATASETS[name]
    if split == "val":
        train = loader("train", Path(data_dir) if data_dir else None, download)
        return train.slice(len(train) - validation_size(len(train)), len(train), "val")
    return loader(split, Path(data_dir) if data_dir else None, download)


class SplitCache:
    """Evaluation splits loaded once per sweep (its cells certify the same split), or once
    per study run (its sweeps share one), and only for that: files changed between two sweeps
    of one process are read again. It pickles empty, so a worker process loads its own copy
    instead of receiving one per cell."""

    def __init__(self) -> None:
        self._splits: dict[tuple[str, str, str | None, bool], ImageData] = {}

    def get(self, name: str, split: str, data_dir: str | Path | None = None,
            download: bool = False) -> ImageData:
        key = (name, split, str(data_dir) if data_dir else None, download)
        if key not in self._splits:
            self._splits[key] = load_dataset(name, split, data_dir, download)
        return self._splits[key]

    def __getstate__(self) -> dict:
        return {}

    def __setstate__(self, state: dict) -> None:
        self._splits = {}


# --- fashion-mnist -----------------------------------------------------------------------

FASHION_CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt",
                   "Sneaker", "Bag", "Ankle boot")


@register("fashion-mnist")
def _fashion_mnist(split: str, data_dir: Path | None, download: bool) -> ImageData:
    prefix = "train" if split == "train" else "t10k"
    roots = [data_dir] if data_dir else [DEBIAN_FASHION_MNIST]
    if data_dir:
        roots.append(data_dir / "FashionMNIST" / "raw")
    for root in roots:
        images_file = _find_idx(root, f"{prefix}-images-idx3-ubyte")
        labels_file = _find_idx(root, f"{prefix}-labels-idx1-ubyte")
        if images_file and labels_file:
            images, labels = read_idx(images_file), read_idx(labels_file)
            if images.ndim != 3 or images.shape[1:] != (28, 28) or labels.ndim != 1:
                raise DatasetFormatError(f"{images_file} and {labels_file} do not hold 28x28 "
                                         f"images and labels (shapes {images.shape}, "
                                         f"{labels.shape})")
            images = torch.from_numpy(images).unsqueeze(1)
            labels = torch.from_numpy(labels.astype(np.int64))
            return ImageData("fashion-mnist", split, TensorImages(images, labels),
                             (1, 28, 28), FASHION_CLASSES)
    if download:
        from torchvision.datasets import FashionMNIST

        root = data_dir or Path.home() / ".cache" / "patchbench" / "data"
        FashionMNIST(str(root), train=split == "train", download=True)
        return _fashion_mnist(split, root, False)
    where = data_dir or DEBIAN_FASHION_MNIST
    raise DatasetNotFoundError(
        f"Fashion-MNIST IDX files not found in {where}: run 'apt-get install "
        "dataset-fashion-mnist', pass --data-dir, or allow --download")


def _find_idx(root: Path, stem: str) -> Path | None:
    for candidate in (root / stem, root / f"{stem}.gz"):
        if candidate.is_file():
            return candidate
    return None


def read_idx(path: Path) -> np.ndarray:
    """Read an IDX file (plain or gzipped) of unsigned bytes into an array."""
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as fh:
            raw = fh.read()
    except (OSError, EOFError) as err:
        raise DatasetFormatError(f"cannot read IDX file {path}: {err}") from None
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] != 0x08:
        raise DatasetFormatError(f"{path} is not an IDX file of unsigned bytes")
    ndim = raw[3]
    if len(raw) < 4 + 4 * ndim:
        raise DatasetFormatError(f"{path} is cut short inside its IDX header")
    dims = [int.from_bytes(raw[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim)]
    body = raw[4 + 4 * ndim:]
    if len(body) != math.prod(dims):
        raise DatasetFormatError(f"{path}: header says {dims}, file holds {len(body)} bytes")
    return np.frombuffer(body, dtype=np.uint8).reshape(dims).copy()


# --- cifar10 -----------------------------------------------------------------------------

CIFAR_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse",
                 "ship", "truck")


@register("cifar10")
def _cifar10(split: str, data_dir: Path | None, download: bool) -> ImageData:
    root = data_dir or Path.home() / ".cache" / "patchbench" / "data"
    folder = root / "cifar-10-batches-py"
    if not folder.is_dir() and download:
        from torchvision.datasets import CIFAR10

        CIFAR10(str(root), train=split == "train", download=True)
    if not folder.is_dir():
        raise DatasetNotFoundError(
            f"CIFAR-10 not found: expected {folder} (torchvision's python format); "
            "pass --data-dir pointing at its parent, or allow --download")
    names = [f"data_batch_{i}" for i in range(1, 6)] if split == "train" else ["test_batch"]
    images, labels = [], []
    for name in names:
        try:
            with open(folder / name, "rb") as fh:
                entry = pickle.load(fh, encoding="latin1")
            if not isinstance(entry, dict):
                raise DatasetFormatError(f"{folder / name} is not a CIFAR-10 batch")
            images.append(np.asarray(entry["data"], dtype=np.uint8).reshape(-1, 3, 32, 32))
            labels.extend(entry.get("labels", entry.get("fine_labels", [])))
        except FileNotFoundError:
            raise DatasetNotFoundError(f"CIFAR-10 file {folder / name} is missing") from None
        except (pickle.UnpicklingError, KeyError, ValueError, EOFError, TypeError,
                AttributeError, ImportError) as err:
            raise DatasetFormatError(f"{folder / name} is not a CIFAR-10 batch: {err}") from None
    return ImageData("cifar10", split,
                     TensorImages(torch.from_numpy(np.concatenate(images)),
                                  torch.tensor(labels)),
                     (3, 32, 32), CIFAR_CLASSES)


# --- imagenet ----------------------------------------------------------------------------

@register("imagenet")
def _imagenet(split: str, data_dir: Path | None, download: bool) -> ImageData:
    from torchvision import datasets, transforms

    folder = (data_dir / ("train" if split == "train" else "val")) if data_dir else None
    if folder is None or not folder.is_dir():
        raise DatasetNotFoundError(
            "ImageNet must be given as an ImageFolder tree: pass --data-dir DIR with "
            "DIR/train/<class>/*.JPEG and DIR/val/<class>/*.JPEG (it is never downloaded)")
    transform = transforms.Compose([transforms.Resize(256), transforms.CenterCrop(224),
                                    transforms.ToTensor()])
    try:
        ds = datasets.ImageFolder(str(folder), transform=transform)
    except (FileNotFoundError, RuntimeError) as err:
        raise DatasetFormatError(f"{folder} is not an ImageFolder tree: {err}") from None
    return ImageData("imagenet", split, ds, (3, 224, 224), tuple(ds.classes))


# --- synthetic ---------------------------------------------------------------------------

SYNTHETIC_CLASSES = ("horizontal", "vertical", "diagonal", "anti-diagonal")


@register("synthetic")
def _synthetic(split: str, data_dir: Path | None, download: bool) -> ImageData:
    """Stripe textures whose orientation is the class: local evidence everywhere, so small
    receptive fields learn it in seconds. Generated from a fixed seed, no files."""
    n, seed = (2048, 0) if split == "train" else (512, 1)
    images, labels = make_stripes(n, size=28, seed=seed)
    return ImageData("synthetic", split, TensorImages(images, labels), (1, 28, 28),
                     SYNTHETIC_CLASSES)


def make_stripes(n: int, size: int, seed: int) -> tuple[Tensor, Tensor]:
    gen = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, len(SYNTHETIC_CLASSES), (n,), generator=gen)
    yy, xx = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    directions = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0], [1.0, -1.0]])
    d = directions[labels]  # (n, 2)
    period = 3.0 + 3.0 * torch.rand(n, generator=gen)
    phase = 2 * math.pi * torch.rand(n, generator=gen)
    coord = d[:, 0, None, None] * yy + d[:, 1, None, None] * xx
    angle = 2 * math.pi * coord / period[:, None, None] + phase[:, None, None]
    stripes = 0.5 + 0.5 * torch.sin(angle)
    noise = 0.15 * torch.randn(n, size, size, generator=gen)
    images = (stripes + noise).clamp(0, 1)
    return (images * 255).round().to(torch.uint8).unsqueeze(1), labels
