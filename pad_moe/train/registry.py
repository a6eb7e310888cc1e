"""Training jobs by ``model.arch``: each track registers its builder in its own module, the trainer names none.

    @register_job("toy")
    def build_toy_job(cfg: RunConfig, ep_rank: int) -> Job: ...

``build_job(cfg, ep_rank)`` looks up ``cfg.model.arch``. The modules that register the built-in jobs are listed once,
in ``pad_moe.plugins.JOB_MODULES``, and imported on the first look-up (so importing the trainer loads no track).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Callable

if TYPE_CHECKING:
    from pad_moe.config import RunConfig
    from pad_moe.train.job import Job

JobBuilder = Callable[["RunConfig", int], "Job"]
"""(run config, expert-parallel rank) -> Job: the model built on CPU in fp32, its data, loss and metrics."""

_JOBS: dict[str, JobBuilder] = {}
_loaded = False


def register_job(arch: str) -> Callable[[JobBuilder], JobBuilder]:
    """Decorator: ``builder`` makes the Job of runs with ``model.arch=arch``. A second builder for one arch is refused."""
    if not isinstance(arch, str) or not arch:
        raise ValueError(f"register_job needs a non-empty model.arch name, got {arch!r}")

    def decorate(builder: JobBuilder) -> JobBuilder:
        known = _JOBS.get(arch)
        if known is not None and _qualname(known) != _qualname(builder):
            raise ValueError(f"model.arch={arch!r} already has a training job ({_qualname(known)}); "
                             f"{_qualname(builder)} cannot register it again")
        _JOBS[arch] = builder
        return builder

    return decorate


def _qualname(fn) -> str:
    return f"{getattr(fn, '__module__', '?')}.{getattr(fn, '__qualname__', repr(fn))}"


def _load_plugins() -> None:
    global _loaded
    if _loaded:
        return
    from pad_moe.plugins import JOB_MODULES

    for name in JOB_MODULES:
        importlib.import_module(name)
    _loaded = True


def registered_jobs() -> list[str]:
    """The model.arch values that have a training job (the built-in plugin modules are imported first)."""
    _load_plugins()
    return sorted(_JOBS)


def job_builder(arch: str) -> JobBuilder:
    """The registered builder of ``arch``; one line naming the registered archs otherwise."""
    _load_plugins()
    if arch not in _JOBS:
        raise ValueError(f"model.arch={arch!r} has no training job; registered: {', '.join(sorted(_JOBS))}")
    return _JOBS[arch]


def build_job(cfg: RunConfig, ep_rank: int) -> Job:
    """The Job for ``cfg.model.arch`` (the model built on CPU in fp32, expert weights seeded by global expert id)."""
    return job_builder(cfg.model.arch)(cfg, ep_rank)
