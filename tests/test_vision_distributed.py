"""A 2-rank ZeRO-3 smoke training of a tiny PAD-DyConv network on CPU (gloo): the loss decreases, a checkpoint is
written, and resuming from it reproduces the uninterrupted run exactly (weights, SGD momentum, cosine schedule, masks,
temperature). Uses deepspeed.initialize directly, with the optimizer and schedule the vision track asks for."""

import os

from pad_moe.testing.ranks import run_ranks

STEPS, SAVE_AT, MICRO, STEPS_PER_EPOCH = 6, 3, 8, 3


def _reference_model():
    import torch
    from torch import nn

    from pad_moe.vision.layers import DynamicConv2d, PadDynamicConv2d
    from pad_moe.vision.models import init_weights, random_masks

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
                          PadDynamicConv2d(8, 8, 3, stride=2, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                          DynamicConv2d(8, 16, 1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 4))
    init_weights(model)
    random_masks(model, 0.5, seed=0)
    return model


def _engine(world):
    import deepspeed
    import torch

    model = _reference_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.2, momentum=0.9, weight_decay=1e-4)
    config = {
        "train_micro_batch_size_per_gpu": MICRO, "gradient_accumulation_steps": 1, "train_batch_size": MICRO * world,
        # every parameter partitioned (no small-parameter persistence), so the layers' forward runs on gathered shards
        "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0},
        "zero_allow_untested_optimizer": True,  # a torch SGD under ZeRO
        "scheduler": {"type": "WarmupCosineLR", "params": {"total_num_steps": STEPS, "warmup_num_steps": 2,
                                                           "warmup_type": "linear", "cos_min_ratio": 0.0}},
        "steps_per_print": 10**9,
    }
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=config)
    return engine


def _run(engine, schedule, images, labels, rank, world, start, stop, save_dir=None):
    import torch
    import torch.nn.functional as F

    losses = []
    for step in range(start, stop):
        schedule.apply(engine, step, STEPS_PER_EPOCH)
        first = ((step * world + rank) * MICRO) % len(images)
        x, y = images[first:first + MICRO], labels[first:first + MICRO]
        loss = F.cross_entropy(engine(x), y)
        engine.backward(loss)
        engine.step()
        mean = loss.detach().clone()
        torch.distributed.all_reduce(mean)
        losses.append(float(mean) / world)
        if save_dir is not None and step + 1 == SAVE_AT:
            engine.save_checkpoint(save_dir, tag=f"step{SAVE_AT}", client_state={"tau": schedule.state_dict()})
    return losses


def _train_and_resume(rank, world, save_dir):
    from pad_moe.pad.protocol import pad_modules
    from pad_moe.vision.data import ImageDataset, synthetic_images
    from pad_moe.vision.temperature import TemperatureSchedule

    raw, labels = synthetic_images(MICRO * world * 2, 4, 1, 8, seed=3)
    dataset = ImageDataset(raw, labels, (0.5,), (0.25,))
    images = __import__("torch").stack([dataset[i][0] for i in range(len(dataset))])

    from pad_moe.accounting import count_live

    engine = _engine(world)
    counted = count_live(engine.module)  # ZeRO-3 has partitioned every parameter: counts must use the full sizes
    full = _run(engine, TemperatureSchedule(30, 1, 1), images, labels, rank, world, 0, STEPS, save_dir)
    masks = [m.mask_weight.clone() for _, m in pad_modules(engine.module)]

    resumed_engine = _engine(world)  # fresh model: different random masks are overwritten by the checkpoint's
    for _, m in pad_modules(resumed_engine.module):
        m.set_masks({"weight": ~m.mask_weight})
    _, client = resumed_engine.load_checkpoint(save_dir, tag=f"step{SAVE_AT}")
    schedule = TemperatureSchedule(30, 1, 1)
    schedule.load_state_dict(client["tau"])
    resumed = _run(resumed_engine, schedule, images, labels, rank, world, schedule.last_step + 1, STEPS)
    same_masks = all((a == m.mask_weight).all().item()
                     for a, (_, m) in zip(masks, pad_modules(resumed_engine.module)))
    return {"full": full, "resumed": resumed, "same_masks": same_masks, "counted": counted, "files": sorted(os.listdir(
        os.path.join(save_dir, f"step{SAVE_AT}")))}


def test_two_rank_zero3_training_decreases_loss_checkpoints_and_resumes_exactly(tmp_path):
    results = run_ranks(_train_and_resume, 2, str(tmp_path), timeout=240)
    full, resumed = results[0]["full"], results[0]["resumed"]
    assert results[0]["full"] == results[1]["full"]  # all-reduced: both ranks agree
    assert sum(full[-2:]) / 2 < sum(full[:2]) / 2, full
    assert any(name.startswith("zero_pp_rank_1") for name in results[0]["files"]), results[0]["files"]
    assert len(resumed) == STEPS - SAVE_AT
    assert resumed == full[SAVE_AT:], (resumed, full)
    assert results[0]["same_masks"] and results[1]["same_masks"]
    from pad_moe.accounting import count_live

    reference = _reference_model()
    assert results[0]["counted"] == results[1]["counted"] == count_live(reference)
