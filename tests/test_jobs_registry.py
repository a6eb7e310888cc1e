"""Training jobs register themselves by model.arch; the trainer (pad_moe.train) imports no track."""

import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch

from pad_moe.config import load_config
from pad_moe.train.job import Job, build_job
from pad_moe.train.registry import register_job, registered_jobs


def test_the_built_in_jobs_are_registered():
    assert registered_jobs() == ["causal_lm", "hf", "switch", "toy", "vision"]


def test_an_unknown_arch_is_refused_in_one_line_naming_the_registered_ones():
    cfg = SimpleNamespace(model=SimpleNamespace(arch="rnn"))  # past the config's own check
    with pytest.raises(ValueError,
                       match=r"model.arch='rnn' has no training job; registered: causal_lm, hf, switch, toy, vision") as err:
        build_job(cfg, 0)
    assert "\n" not in str(err.value)


def test_a_second_builder_for_a_registered_arch_is_refused():
    with pytest.raises(ValueError, match="model.arch='toy' already has a training job"):
        register_job("toy")(lambda cfg, ep_rank: None)
    assert registered_jobs() == ["causal_lm", "hf", "switch", "toy", "vision"]


def test_build_job_builds_the_toy_job_through_the_registry():
    job = build_job(load_config("configs/debug.yaml", ["moe.ep_size=1", "data.train_size=8", "data.eval_size=4"]), 0)
    assert isinstance(job, Job) and len(job.train_set) == 8
    batch = job.collate([job.train_set[i] for i in range(4)])
    logits, aux = job.forward(job.model, batch)
    assert logits.shape == (4, 2) and torch.isfinite(aux)


def _imported_after(statement: str) -> list[str]:
    code = f"import sys; {statement}; print(' '.join(sorted(m for m in sys.modules if m.startswith('pad_moe'))))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    return out.stdout.split()


def test_importing_the_trainer_imports_no_track():
    job_modules = _imported_after("import pad_moe.train.job")
    assert not [m for m in job_modules if m.startswith(("pad_moe.vision", "pad_moe.switch", "pad_moe.toy",
                                                         "pad_moe.models"))], job_modules
    from pad_moe.plugins import JOB_MODULES

    loop_modules = _imported_after("import pad_moe.train.loop")  # the config brings VisionConfig, not the job
    assert not set(JOB_MODULES) & set(loop_modules), loop_modules


def test_freeze_embeddings_fixes_the_word_embeddings_only_and_only_for_hf():
    overrides = ["moe.mode=static", "moe.ep_size=1", "data.max_train=4", "data.max_eval=4"]
    job = build_job(load_config("configs/minilm_vader.yaml", overrides), 0)
    frozen = [n for n, p in job.model.named_parameters() if not p.requires_grad]
    assert any(n.endswith("word_embeddings.weight") for n in frozen)
    assert not [n for n in frozen if "word_embeddings" not in n and "pooler" not in n]
    job = build_job(load_config("configs/minilm_vader.yaml", [*overrides, "model.freeze_embeddings=false"]), 0)
    assert all(p.requires_grad for n, p in job.model.named_parameters() if "pooler" not in n)
    with pytest.raises(ValueError, match="model.freeze_embeddings=true is for model.arch=hf"):
        load_config("configs/debug.yaml", ["model.freeze_embeddings=true"])
