"""Image data without torchvision: idx / CIFAR / ImageFolder readers on tiny files written here, transforms, the
vision config and job, and one-line errors for bad input."""

import gzip
import os
import pickle
import random
import struct

import numpy as np
import pytest
import torch

from pad_moe.vision.config import VisionConfig
from pad_moe.vision.data import (
    FASHION_MNIST_DIR,
    DataError,
    ImageDataset,
    load_cifar10,
    load_fashion_mnist,
    load_image_folder,
    normalize,
    random_crop,
    random_horizontal_flip,
    read_cifar_batch,
    read_idx,
    resize_images,
)


def write_idx(path, array: np.ndarray, compress=True):
    code = {np.uint8: 0x08, np.int32: 0x0C}[array.dtype.type]
    header = bytes([0, 0, code, array.ndim]) + b"".join(struct.pack(">I", d) for d in array.shape)
    data = header + array.astype(array.dtype.newbyteorder(">")).tobytes()
    with (gzip.open if compress else open)(path, "wb") as f:
        f.write(data)


@pytest.fixture
def fmnist_dir(tmp_path):
    rng = np.random.default_rng(0)
    for prefix, n in (("train", 12), ("t10k", 5)):
        write_idx(tmp_path / f"{prefix}-images-idx3-ubyte.gz", rng.integers(0, 256, (n, 28, 28), dtype=np.uint8))
        write_idx(tmp_path / f"{prefix}-labels-idx1-ubyte.gz", (np.arange(n) % 10).astype(np.uint8))
    return tmp_path


def test_idx_files_gz_and_raw_read_with_their_declared_shape(tmp_path):
    a = np.arange(24, dtype=np.int32).reshape(2, 3, 4)
    write_idx(tmp_path / "a.idx", a, compress=False)
    write_idx(tmp_path / "a.idx.gz", a)
    assert np.array_equal(read_idx(str(tmp_path / "a.idx")), a)
    assert np.array_equal(read_idx(str(tmp_path / "a.idx.gz")), a)


def test_corrupt_idx_files_raise_one_clear_error(tmp_path):
    (tmp_path / "junk").write_bytes(b"\x89PNG not idx")
    with pytest.raises(DataError, match="is not an idx file"):
        read_idx(str(tmp_path / "junk"))
    write_idx(tmp_path / "short", np.zeros((4, 4), dtype=np.uint8), compress=False)
    with open(tmp_path / "short", "r+b") as f:
        f.truncate(20)
    with pytest.raises(DataError, match="data bytes"):
        read_idx(str(tmp_path / "short"))
    (tmp_path / "bad.gz").write_bytes(b"not gzip at all")
    with pytest.raises(DataError, match="cannot read idx file"):
        read_idx(str(tmp_path / "bad.gz"))


def test_fashion_mnist_loader_reads_the_package_layout(fmnist_dir):
    images, labels = load_fashion_mnist(str(fmnist_dir), "train")
    assert images.shape == (12, 1, 28, 28) and images.dtype == torch.uint8
    assert labels.tolist() == [i % 10 for i in range(12)]
    assert load_fashion_mnist(str(fmnist_dir), "test")[0].shape == (5, 1, 28, 28)
    with pytest.raises(DataError, match="apt-get install -y dataset-fashion-mnist"):
        load_fashion_mnist(str(fmnist_dir / "missing"), "train")


@pytest.mark.skipif(not os.path.isdir(FASHION_MNIST_DIR), reason="Debian package dataset-fashion-mnist not installed")
def test_the_real_fashion_mnist_package():
    train, test = load_fashion_mnist(None, "train"), load_fashion_mnist(None, "test")
    assert train[0].shape == (60000, 1, 28, 28) and test[0].shape == (10000, 1, 28, 28)
    assert sorted(train[1].unique().tolist()) == list(range(10))


def _cifar_batch(path, n, payload=None):
    payload = payload or {b"data": np.random.default_rng(n).integers(0, 256, (n, 3072), dtype=np.uint8),
                          b"labels": [i % 10 for i in range(n)]}
    with open(path, "wb") as f:
        pickle.dump(payload, f)


def test_cifar10_batches_load_and_corrupt_ones_fail_clearly(tmp_path):
    for i in range(1, 3):
        _cifar_batch(tmp_path / f"data_batch_{i}", 4)
    _cifar_batch(tmp_path / "test_batch", 3)
    images, labels = load_cifar10(str(tmp_path), "train")
    assert images.shape == (8, 3, 32, 32) and labels.shape == (8,)
    assert load_cifar10(str(tmp_path), "test")[0].shape == (3, 3, 32, 32)
    for seed in range(50):  # arbitrary bytes: every way they fail to unpickle is one clear DataError
        (tmp_path / "garbage").write_bytes(random.Random(seed).randbytes(64))
        with pytest.raises(DataError, match="not a (readable )?CIFAR-10 batch"):
            read_cifar_batch(str(tmp_path / "garbage"))
    (tmp_path / "garbage").write_bytes(b"\x80\x04X\xff\xff\xff\xff\xff\xff\xff\x7f")  # a 4 GiB string in 12 bytes
    with pytest.raises(DataError, match="not a readable CIFAR-10 batch"):
        read_cifar_batch(str(tmp_path / "garbage"))
    _cifar_batch(tmp_path / "wrong_shape", 0, {b"data": np.zeros((2, 10), np.uint8), b"labels": [0, 1]})
    with pytest.raises(DataError, match="is corrupt"):
        read_cifar_batch(str(tmp_path / "wrong_shape"))
    with open(tmp_path / "evil", "wb") as f:
        pickle.dump({b"data": os.getcwd}, f)  # a pickle that would import a function
    with pytest.raises(DataError, match="refusing to load"):
        read_cifar_batch(str(tmp_path / "evil"))
    with pytest.raises(DataError, match="does not exist"):
        load_cifar10(str(tmp_path / "nope"), "train")


def test_image_folder_loads_classes_and_rejects_a_folder_without_classes(tmp_path):
    from PIL import Image

    for split in ("train", "val"):
        for cls, color in (("cat", 30), ("dog", 200)):
            os.makedirs(tmp_path / split / cls)
            for i in range(2):
                Image.new("RGB", (20, 12), (color, i * 50, 0)).save(tmp_path / split / cls / f"{i}.png")
    images, labels, classes = load_image_folder(str(tmp_path), "train", channels=3, size=16)
    assert images.shape == (4, 3, 16, 16) and labels.tolist() == [0, 0, 1, 1] and classes == ["cat", "dog"]
    assert load_image_folder(str(tmp_path), "val", channels=1, size=8)[0].shape == (4, 1, 8, 8)
    os.makedirs(tmp_path / "empty" / "train")
    with pytest.raises(DataError, match="has no class sub-folders"):
        load_image_folder(str(tmp_path / "empty"), "train", 3, 16)


def test_transforms_crop_flip_normalise_resize():
    image = torch.arange(2 * 5 * 5, dtype=torch.float32).reshape(2, 5, 5)
    torch.manual_seed(0)
    crops = [random_crop(image, 2) for _ in range(20)]
    assert all(c.shape == image.shape for c in crops)
    padded = torch.nn.functional.pad(image, (2, 2, 2, 2))
    windows = [padded[:, i:i + 5, j:j + 5] for i in range(5) for j in range(5)]
    assert all(any(torch.equal(c, w) for w in windows) for c in crops)
    assert any(not torch.equal(c, image) for c in crops)
    assert torch.equal(random_crop(image, 0), image)
    flips = {random_horizontal_flip(image).equal(image.flip(-1)) for _ in range(30)}
    assert flips == {True, False}
    out = normalize(torch.ones(3, 2, 2), (0.5, 0.25, 0.0), (0.5, 0.25, 2.0))
    assert out[:, 0, 0].tolist() == [1.0, 3.0, 0.5]
    with pytest.raises(ValueError, match="2 means"):
        normalize(torch.ones(3, 2, 2), (0.1, 0.2), (1.0,))
    resized = resize_images(torch.full((3, 1, 28, 28), 100, dtype=torch.uint8), 32)
    assert resized.shape == (3, 1, 32, 32) and resized.dtype == torch.uint8 and (resized == 100).all()
    ds = ImageDataset(torch.zeros(4, 1, 8, 8, dtype=torch.uint8), torch.arange(4), (0.5,), (0.25,), augment=True)
    x, y = ds[1]
    assert x.shape == (1, 8, 8) and y == 1


@pytest.mark.parametrize("fields,match", [
    ({"model": "vgg16"}, "vision.model='vgg16' is unknown"),
    ({"conv": "moe"}, "vision.conv='moe' is unknown"),
    ({"dataset": "mnist"}, "vision.dataset='mnist' is unknown"),
    ({"in_chans": 3}, "vision.in_chans=3 but fashion_mnist images have 1 channel"),
    ({"dataset": "cifar10", "in_chans": 1}, "vision.in_chans=1 but cifar10 images have 3 channels"),
    ({"init_kappa": 0.0}, r"vision.init_kappa=0.0 must be in \(0, 1\]"),
    ({"conv": "dyconv", "init_kappa": 0.5}, "needs vision.conv=pad"),
    ({"temperature_start": 0}, "temperature_start=0"),
    ({"label_smoothing": 1.0}, "label_smoothing=1.0"),
    ({"image_size": 4}, "image_size=4 must be >= 8"),
])
def test_vision_config_rejects_bad_values_by_name(fields, match):
    with pytest.raises(ValueError, match=match):
        VisionConfig(**fields)


def test_vision_job_on_fashion_mnist_files_and_synthetic_data(fmnist_dir):
    from pad_moe.vision.job import build_vision_job, on_step

    cfg = VisionConfig(model="resnet_debug", conv="pad", dataset="fashion_mnist", dataset_path=str(fmnist_dir),
                       image_size=16, train_limit=10, label_smoothing=0.1, temperature_epochs=1)
    job = build_vision_job(cfg, seed=0)
    assert len(job.train_set) == 10 and len(job.eval_sets["test"]) == 5
    batch = job.collate([job.train_set[i] for i in range(4)])
    assert batch["images"].shape == (4, 1, 16, 16)
    logits, aux = job.forward(job.model, batch)
    assert logits.shape == (4, 10) and float(aux) == 0.0
    loss = job.task_loss(logits, batch["labels"])
    plain = torch.nn.functional.cross_entropy(logits, batch["labels"])
    assert loss.item() != pytest.approx(plain.item())  # label smoothing is applied
    assert job.extras["on_step"](job.model, 5, 10) == pytest.approx(30 - 29 * 0.5)
    assert job.extras["scalars"](job.model) == {"vision/temperature": pytest.approx(15.5)}
    assert job.extras["optimizer"]["weight_decay"] == 1e-4
    assert on_step(job.model, 10**6, 10) == 1.0
    synthetic = build_vision_job(VisionConfig(model="mobilenetv2_050", conv="dyconv", dataset="synthetic",
                                              in_chans=3, image_size=16, train_limit=32, eval_limit=8), seed=1)
    assert synthetic.extras["optimizer"]["weight_decay"] == 4e-5
    assert len(synthetic.train_set) == 32 and synthetic.train_set[0][0].shape == (3, 16, 16)


def test_image_folder_job_data_is_read_lazily_and_label_mismatch_fails(tmp_path):
    from PIL import Image

    from pad_moe.vision.job import load_splits

    for split in ("train", "val"):
        for cls in ("a", "b", "c"):
            os.makedirs(tmp_path / split / cls)
            Image.new("RGB", (8, 8)).save(tmp_path / split / cls / "x.png")
    cfg = VisionConfig(dataset="imagefolder", dataset_path=str(tmp_path), in_chans=3, image_size=8, num_classes=2)
    with pytest.raises(DataError, match="vision.num_classes=2 but imagefolder has label 2"):
        load_splits(cfg, 0)
    train, val = load_splits(VisionConfig(dataset="imagefolder", dataset_path=str(tmp_path), in_chans=1,
                                          image_size=8, num_classes=3), 0)
    assert len(train) == len(val) == 3 and train[2][0].shape == (1, 8, 8) and int(train[2][1]) == 2
