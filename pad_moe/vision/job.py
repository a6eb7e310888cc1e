"""The training job of a vision run (``model.arch=vision``), registered for pad_moe's trainer (``pad_moe.train.job.Job``).

Batches are ``{"images": (B, C, H, W) float, "labels": (B,) int64}``. ``job.extras`` carries what the trainer wires:

    on_step(model, step, steps_per_epoch)   set τ for optimizer step ``step`` (call before each step's forwards)
    temperature                             the TemperatureSchedule (state_dict for checkpoints)
    scalars(model) -> {tag: value}          τ for TensorBoard (λ and dynamic ratio come from pad_scalars)
    optimizer                               the paper's SGD settings (momentum 0.9, weight decay 1e-4 / 4e-5)
    label_smoothing                         used by ``job.task_loss``
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from pad_moe.train.job import Batch, Job
from pad_moe.train.registry import register_job
from pad_moe.vision.config import VisionConfig
from pad_moe.vision.data import (
    NORMALISATION,
    DataError,
    ImageDataset,
    ImageFolderDataset,
    collate_images,
    load_cifar10,
    load_fashion_mnist,
    resize_images,
    scan_image_folder,
    synthetic_images,
)
from pad_moe.vision.layers import KernelAttention
from pad_moe.vision.models import create_model
from pad_moe.vision.temperature import TemperatureSchedule


@dataclass
class VisionJob(Job):
    label_smoothing: float = 0.0

    def task_loss(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(logits.float(), labels, label_smoothing=self.label_smoothing)


def vision_forward(model: nn.Module, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
    """(logits (B, classes), zero auxiliary loss): vision models have no load-balancing loss."""
    logits = model(batch["images"])
    return logits, logits.new_zeros((), dtype=torch.float32)


def accuracy(preds: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:
    return {"accuracy": float((preds == labels).float().mean())}


def temperature_scalars(model: nn.Module) -> dict[str, float]:
    """{'vision/temperature': τ} of the first attention (all share one τ), or {} for models without attention."""
    for module in model.modules():
        if isinstance(module, KernelAttention):
            return {"vision/temperature": module.temperature}
    return {}


def load_splits(cfg: VisionConfig, seed: int) -> tuple[ImageDataset, ImageDataset]:
    """(train, test) datasets of ``cfg``, resized to cfg.image_size, channels and labels checked against the config.

    Image folders are read lazily (decoded per example); the other sets are held in memory as uint8.
    """
    mean, std = NORMALISATION[cfg.dataset]
    augment = dict(augment=cfg.augment, crop_padding=cfg.crop_padding, hflip=cfg.hflip)
    if cfg.dataset == "imagefolder":
        if cfg.in_chans == 1:
            mean, std = (0.5,), (0.25,)
        sets = []
        for split, limit, extra in (("train", cfg.train_limit, augment), ("val", cfg.eval_limit, {})):
            paths, labels, _ = scan_image_folder(cfg.dataset_path, split)
            paths, labels = (paths[:limit], labels[:limit]) if limit else (paths, labels)
            _check_labels(cfg, torch.tensor(labels))
            sets.append(ImageFolderDataset(paths, labels, cfg.in_chans, cfg.image_size, mean, std, **extra))
        return sets[0], sets[1]
    if cfg.dataset == "synthetic":
        n_train, n_eval = cfg.train_limit or 1024, cfg.eval_limit or 256
        train = synthetic_images(n_train, cfg.num_classes, cfg.in_chans, cfg.image_size, seed)
        test = synthetic_images(n_eval, cfg.num_classes, cfg.in_chans, cfg.image_size, seed + 1)
    elif cfg.dataset == "fashion_mnist":
        train, test = (load_fashion_mnist(cfg.dataset_path, s) for s in ("train", "test"))
    else:
        train, test = (load_cifar10(cfg.dataset_path, s) for s in ("train", "test"))
    sets = []
    for (images, labels), limit in ((train, cfg.train_limit), (test, cfg.eval_limit)):
        if limit and cfg.dataset != "synthetic":
            images, labels = images[:limit], labels[:limit]
        if images.shape[1] != cfg.in_chans:
            raise DataError(f"vision.in_chans={cfg.in_chans} but {cfg.dataset} images have {images.shape[1]} "
                            f"channels; set vision.in_chans={images.shape[1]}")
        _check_labels(cfg, labels)
        sets.append((resize_images(images, cfg.image_size), labels))
    (train_x, train_y), (test_x, test_y) = sets
    return ImageDataset(train_x, train_y, mean, std, **augment), ImageDataset(test_x, test_y, mean, std)


def _check_labels(cfg: VisionConfig, labels: torch.Tensor) -> None:
    if len(labels) and int(labels.max()) >= cfg.num_classes:
        raise DataError(f"vision.num_classes={cfg.num_classes} but {cfg.dataset} has label {int(labels.max())}; "
                        f"set vision.num_classes={int(labels.max()) + 1}")


def build_vision_job(cfg: VisionConfig, seed: int) -> VisionJob:
    """The model (built on CPU in fp32, seeded by ``seed``), data, loss and per-step hooks of a vision run."""
    torch.manual_seed(seed)
    model = create_model(cfg.model, cfg.conv, seed=seed, **cfg.model_kwargs())
    train_set, test_set = load_splits(cfg, seed)
    schedule = TemperatureSchedule(cfg.temperature_start, cfg.temperature_end, cfg.temperature_epochs)
    extras = {"on_step": schedule.apply, "temperature": schedule, "scalars": temperature_scalars,
              "optimizer": {"type": "SGD", "momentum": 0.9, "weight_decay": cfg.weight_decay, "nesterov": False},
              "label_smoothing": cfg.label_smoothing}
    return VisionJob(model=model, train_set=train_set, eval_sets={"test": test_set}, collate=collate_images,
                     forward=vision_forward, num_labels=cfg.num_classes, metrics=accuracy, main_metric="accuracy",
                     extras=extras, label_smoothing=cfg.label_smoothing)


@register_job("vision")
def build_vision_run_job(cfg, ep_rank: int) -> VisionJob:
    """The trainer's entry point: the ``vision`` section of RunConfig ``cfg``, seeded by train.seed (no experts)."""
    return build_vision_job(cfg.vision, cfg.train.seed)


def on_step(model: nn.Module, step: int, steps_per_epoch: int, schedule: TemperatureSchedule | None = None) -> float:
    """Set τ of every attention in ``model`` for optimizer step ``step`` (default schedule 30 -> 1 over 10 epochs)."""
    return (schedule or TemperatureSchedule()).apply(model, step, steps_per_epoch)
