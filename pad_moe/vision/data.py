"""Image data without torchvision: Fashion-MNIST idx files, CIFAR-10 python batches, ImageFolder directories, and a
synthetic set; pad_moe's own transforms (random crop with padding, horizontal flip, normalise).

Images are held as uint8 tensors (N, C, H, W) and resized once at load time to the model's input size; transforms run
per example in the training process and draw from torch's global RNG (the trainer checkpoints it per rank, so a resumed
run draws the same crops and flips).
"""

from __future__ import annotations

import gzip
import importlib
import os
import pickle
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F

FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"
"""Where the Debian package ``dataset-fashion-mnist`` installs the idx files (``apt-get install -y
dataset-fashion-mnist``)."""

DATASETS = ("fashion_mnist", "cifar10", "imagefolder", "synthetic")
NORMALISATION = {  # (mean, std) per channel
    "fashion_mnist": ((0.2860,), (0.3530,)),
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    "imagefolder": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
    "synthetic": ((0.5,), (0.25,)),
}
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".ppm", ".pgm", ".tif", ".tiff")


class DataError(ValueError):
    """Missing or malformed data files: reported as one line (exit status 2)."""


# -- idx (MNIST / Fashion-MNIST) --------------------------------------------------------------------------------------
_IDX_DTYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


def read_idx(path: str) -> np.ndarray:
    """An idx file (optionally gzip-compressed) as a numpy array of its declared type and shape."""
    opener = gzip.open if path.endswith(".gz") else open
    try:
        with opener(path, "rb") as f:
            raw = f.read()
    except (OSError, EOFError) as err:
        raise DataError(f"cannot read idx file {path}: {err}") from None
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_DTYPES or raw[3] == 0:
        raise DataError(f"{path} is not an idx file (magic bytes {raw[:4].hex() or 'missing'})")
    ndim = raw[3]
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise DataError(f"{path} is truncated inside its idx header")
    shape = tuple(int.from_bytes(raw[4 + 4 * i:8 + 4 * i], "big") for i in range(ndim))
    dtype = np.dtype(_IDX_DTYPES[raw[2]])
    expected = int(np.prod(shape)) * dtype.itemsize
    if len(raw) - header != expected:
        raise DataError(f"{path} holds {len(raw) - header} data bytes, but its header {shape} needs {expected}")
    return np.frombuffer(raw, dtype=dtype, offset=header).reshape(shape)


def load_fashion_mnist(root: str | None, split: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(images uint8 (N, 1, 28, 28), labels int64 (N,)) of split train | test."""
    root = root or FASHION_MNIST_DIR
    prefix = "train" if split == "train" else "t10k"
    paths = []
    for kind in ("images-idx3-ubyte", "labels-idx1-ubyte"):
        candidates = [os.path.join(root, f"{prefix}-{kind}{ext}") for ext in (".gz", "")]
        found = [p for p in candidates if os.path.isfile(p)]
        if not found:
            raise DataError(f"Fashion-MNIST file {prefix}-{kind}[.gz] not found under {root}; install the Debian "
                            "package (apt-get install -y dataset-fashion-mnist) or set vision.dataset_path")
        paths.append(found[0])
    images, labels = read_idx(paths[0]), read_idx(paths[1])
    if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
        raise DataError(f"{paths[0]} {images.shape} and {paths[1]} {labels.shape} are not N images and N labels")
    return torch.from_numpy(images.copy()).unsqueeze(1), torch.from_numpy(labels.astype(np.int64))


# -- CIFAR-10 python batches ------------------------------------------------------------------------------------------
class _ArrayUnpickler(pickle.Unpickler):
    """Unpickles numpy arrays and plain containers only (CIFAR batches are pickles; refuse anything executable)."""

    ALLOWED = {("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
               ("numpy", "ndarray"), ("numpy", "dtype"), ("numpy.core.multiarray", "scalar"),
               ("numpy._core.multiarray", "scalar"), ("_codecs", "encode")}

    def find_class(self, module, name):
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name}")
        if module.startswith("numpy.core"):
            module = "numpy._core" + module[len("numpy.core"):] if hasattr(np, "_core") else module
        return getattr(importlib.import_module(module), name)


def read_cifar_batch(path: str) -> tuple[np.ndarray, np.ndarray]:
    """(images uint8 (N, 3, 32, 32), labels int64 (N,)) from one CIFAR-10 python batch file."""
    try:
        with open(path, "rb") as f:
            batch = _ArrayUnpickler(f, encoding="bytes").load()
    except Exception as err:  # noqa: BLE001 - arbitrary bytes fail in arbitrary ways (Overflow-, Memory-, KeyError...)
        raise DataError(f"{path} is not a readable CIFAR-10 batch: {type(err).__name__}: {err}") from None
    if not isinstance(batch, dict):
        raise DataError(f"{path} is not a CIFAR-10 batch (holds {type(batch).__name__}, expected a dict)")
    data = batch.get(b"data", batch.get("data"))
    labels = batch.get(b"labels", batch.get("labels"))
    if data is None or labels is None:
        raise DataError(f"{path} is not a CIFAR-10 batch (no 'data' / 'labels' entries)")
    data = np.asarray(data)
    if data.ndim != 2 or data.shape[1] != 3072 or data.dtype != np.uint8 or len(labels) != len(data):
        raise DataError(f"{path} is corrupt: data {data.shape} {data.dtype} with {len(labels)} labels, expected "
                        "(N, 3072) uint8 and N labels")
    return data.reshape(-1, 3, 32, 32), np.asarray(labels, dtype=np.int64)


def load_cifar10(root: str | None, split: str) -> tuple[torch.Tensor, torch.Tensor]:
    """A directory of CIFAR-10 python batches (data_batch_1..5, test_batch), e.g. cifar-10-batches-py/."""
    if not root or not os.path.isdir(root):
        raise DataError(f"CIFAR-10 directory {root!r} does not exist; set vision.dataset_path to the folder holding "
                        "data_batch_1..5 and test_batch")
    names = [f"data_batch_{i}" for i in range(1, 6)] if split == "train" else ["test_batch"]
    present = [n for n in names if os.path.isfile(os.path.join(root, n))]
    if not present:
        raise DataError(f"no CIFAR-10 batch ({', '.join(names)}) under {root}")
    parts = [read_cifar_batch(os.path.join(root, n)) for n in present]
    return (torch.from_numpy(np.concatenate([p[0] for p in parts])),
            torch.from_numpy(np.concatenate([p[1] for p in parts])))


# -- ImageFolder ------------------------------------------------------------------------------------------------------
def scan_image_folder(root: str | None, split: str) -> tuple[list[str], list[int], list[str]]:
    """root/{train,val}/CLASS/*.png|jpg...: (image paths, labels, class names); ``test`` stands in for a missing ``val``.

    Classes are the sorted sub-folder names.
    """
    if not root or not os.path.isdir(root):
        raise DataError(f"image folder {root!r} does not exist; set vision.dataset_path")
    names = ["train"] if split == "train" else ["val", "test"]
    folder = next((os.path.join(root, n) for n in names if os.path.isdir(os.path.join(root, n))), None)
    if folder is None:
        raise DataError(f"image folder {root} has no {' or '.join(names)}/ sub-folder")
    classes = sorted(d for d in os.listdir(folder) if os.path.isdir(os.path.join(folder, d)))
    if not classes:
        raise DataError(f"image folder {folder} has no class sub-folders (expected {folder}/CLASS/IMAGE)")
    paths, labels = [], []
    for label, cls in enumerate(classes):
        for file in sorted(os.listdir(os.path.join(folder, cls))):
            if file.lower().endswith(IMAGE_EXTENSIONS):
                paths.append(os.path.join(folder, cls, file))
                labels.append(label)
    if not paths:
        raise DataError(f"image folder {folder} holds no images ({', '.join(IMAGE_EXTENSIONS)})")
    return paths, labels, classes


def read_image(path: str, channels: int, size: int) -> torch.Tensor:
    """One image file as uint8 (channels, size, size), resized (Pillow)."""
    try:
        from PIL import Image
    except ImportError:
        raise DataError("vision.dataset=imagefolder needs Pillow (pip install pillow)") from None
    try:
        with Image.open(path) as img:
            img = img.convert("L" if channels == 1 else "RGB").resize((size, size), Image.BILINEAR)
            array = np.asarray(img, dtype=np.uint8)
    except OSError as err:
        raise DataError(f"cannot read image {path}: {err}") from None
    return torch.from_numpy(array[None].copy() if channels == 1 else array.transpose(2, 0, 1).copy())


def load_image_folder(root: str | None, split: str, channels: int, size: int) -> tuple[torch.Tensor, torch.Tensor,
                                                                                        list[str]]:
    """A whole (small) image folder in memory: (images uint8 (N, channels, size, size), labels (N,), classes)."""
    paths, labels, classes = scan_image_folder(root, split)
    return (torch.stack([read_image(p, channels, size) for p in paths]), torch.tensor(labels, dtype=torch.int64),
            classes)


# -- synthetic --------------------------------------------------------------------------------------------------------
def synthetic_images(n: int, num_classes: int, channels: int, size: int, seed: int) -> tuple[torch.Tensor,
                                                                                            torch.Tensor]:
    """Noisy images whose class decides which quadrant-and-channel pattern is bright: learnable in a few steps."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, num_classes, (n,), generator=g)
    images = torch.rand(n, channels, size, size, generator=g) * 0.5
    half = max(1, size // 2)
    for c in range(num_classes):
        rows, cols = divmod(c % 4, 2)
        chan = (c // 4) % channels
        sel = labels == c
        images[sel, chan, rows * half:(rows + 1) * half, cols * half:(cols + 1) * half] += 0.5
    return (images.clamp(0, 1) * 255).to(torch.uint8), labels


# -- transforms -------------------------------------------------------------------------------------------------------
def resize_images(images: torch.Tensor, size: int) -> torch.Tensor:
    """uint8 (N, C, H, W) -> uint8 (N, C, size, size), bilinear (done once at load time)."""
    if images.shape[-1] == size and images.shape[-2] == size:
        return images
    out = []
    for chunk in images.split(4096):
        resized = F.interpolate(chunk.float(), size=(size, size), mode="bilinear", align_corners=False,
                                antialias=size < chunk.shape[-1])
        out.append(resized.round().clamp(0, 255).to(torch.uint8))
    return torch.cat(out)


def random_crop(image_CHW: torch.Tensor, padding: int) -> torch.Tensor:
    """Zero-pad by ``padding`` on every side, then crop the original size at a random offset."""
    if padding <= 0:
        return image_CHW
    C, H, W = image_CHW.shape
    padded = F.pad(image_CHW, (padding, padding, padding, padding))
    top, left = (int(v) for v in torch.randint(0, 2 * padding + 1, (2,)))
    return padded[:, top:top + H, left:left + W]


def random_horizontal_flip(image_CHW: torch.Tensor, p: float = 0.5) -> torch.Tensor:
    return image_CHW.flip(-1) if float(torch.rand(())) < p else image_CHW


def normalize(image_CHW: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """(x − mean) / std per channel (a single value applies to every channel)."""
    C = image_CHW.shape[0]
    m = torch.as_tensor(mean, dtype=image_CHW.dtype).reshape(-1)
    s = torch.as_tensor(std, dtype=image_CHW.dtype).reshape(-1)
    if m.numel() not in (1, C) or s.numel() not in (1, C):
        raise ValueError(f"normalisation has {m.numel()} means / {s.numel()} stds for {C} channels")
    return (image_CHW - m[:, None, None]) / s[:, None, None]


class ImageDataset(torch.utils.data.Dataset):
    """uint8 images + labels -> (float image (C, H, W) normalised, label) with optional train-time augmentation."""

    def __init__(self, images: torch.Tensor | None, labels: torch.Tensor, mean, std, *, augment: bool = False,
                 crop_padding: int = 4, hflip: bool = True):
        if images is not None and (images.dim() != 4 or images.dtype != torch.uint8 or len(images) != len(labels)):
            raise ValueError(f"ImageDataset needs uint8 (N, C, H, W) images and N labels, got {tuple(images.shape)} "
                             f"{images.dtype} and {len(labels)} labels")
        self.images, self.labels = images, labels
        self.mean = torch.as_tensor(mean, dtype=torch.float32)
        self.std = torch.as_tensor(std, dtype=torch.float32)
        self.augment, self.crop_padding, self.hflip = augment, crop_padding, hflip

    def raw(self, index: int) -> torch.Tensor:
        """Example ``index`` as stored: uint8 (C, H, W)."""
        return self.images[index]

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int):
        x = self.raw(index).float().div_(255)  # (C, H, W) in [0, 1]
        if self.augment:
            x = random_crop(x, self.crop_padding)
            if self.hflip:
                x = random_horizontal_flip(x)
        return normalize(x, self.mean, self.std), self.labels[index]


class ImageFolderDataset(ImageDataset):
    """An image folder read lazily: each example is decoded and resized when it is drawn (large sets, ImageNet)."""

    def __init__(self, paths: list[str], labels: list[int], channels: int, size: int, mean, std, **kwargs):
        super().__init__(None, torch.tensor(labels, dtype=torch.int64), mean, std, **kwargs)
        self.paths, self.channels, self.size = paths, channels, size

    def raw(self, index: int) -> torch.Tensor:
        return read_image(self.paths[index], self.channels, self.size)


def collate_images(items: list) -> dict[str, torch.Tensor]:
    images, labels = zip(*items)
    return {"images": torch.stack(images), "labels": torch.stack(labels)}
