"""The trainer scores IMP with the task loss (the paper's), or with task + aux when partition.score_loss says so."""

import pytest
import torch

from pad_moe import distributed as D
from pad_moe.config import load_config
from pad_moe.train import loop
from pad_moe.train.job import build_job


@pytest.mark.parametrize("score_loss", ["task", "task+aux"])
def test_run_partition_scores_the_configured_loss(monkeypatch, score_loss):
    cfg = load_config("configs/debug.yaml", ["moe.ep_size=1", "moe.aux_loss_coef=5.0", f"partition.score_loss={score_loss}"])
    job = build_job(cfg, ep_rank=0)
    batches = loop.MicroBatches(job.train_set, job.collate, cfg.train.micro_batch_size, 0, 1, cfg.data.seed)
    seen = {}

    def fake_partition(model, part_batches, loss_fn, pcfg):
        seen["loss"] = float(loss_fn(model, part_batches[0]))
        seen["n"] = len(part_batches)
        return {"method": pcfg.method}

    monkeypatch.setattr("pad_moe.partition.partition_from_config", fake_partition)
    monkeypatch.setattr(D, "attach_expert_groups", lambda model: None)
    monkeypatch.setattr(D, "detach_expert_groups", lambda model: None)
    job.model.eval()  # deterministic routing, so both evaluations route alike
    loop.run_partition(job, cfg, batches)
    with torch.no_grad():
        total, task, aux = loop._loss(job, job.model, batches.batch(0), cfg.moe.aux_loss_coef)
    assert float(aux) > 0 and seen["n"] == cfg.partition.num_batches
    want = float(task) if score_loss == "task" else float(total)
    assert seen["loss"] == pytest.approx(want, rel=1e-6)
