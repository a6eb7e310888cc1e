"""A build killed while DeepSpeed JIT-built its CPU comm op left its lock behind and every later run waited on it
forever, silently (found when an evidence grid hung for 9 minutes at 0 % CPU)."""

import os

from pad_moe.distributed import STALE_LOCK_S, clear_stale_build_locks


def _ext(root, name, with_library=True, age=0.0, now=1e9):
    folder = root / "py311_cpu" / name
    folder.mkdir(parents=True)
    if with_library:
        (folder / f"{name}.so").write_bytes(b"\0")
    lock = folder / "lock"
    lock.write_text("")
    os.utime(lock, (now - age, now - age))
    return lock


def test_only_old_locks_of_built_extensions_are_removed(tmp_path, capsys):
    now = 1e9
    stale = _ext(tmp_path, "deepspeed_shm_comm", age=STALE_LOCK_S + 60, now=now)
    building = _ext(tmp_path, "fresh_build", age=30, now=now)  # a build in progress holds it
    unbuilt = _ext(tmp_path, "never_built", with_library=False, age=STALE_LOCK_S + 60, now=now)
    assert clear_stale_build_locks(str(tmp_path), now=now) == [str(stale)]
    assert not stale.exists() and building.exists() and unbuilt.exists()
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "stale build lock" in err[0]
    assert clear_stale_build_locks(str(tmp_path / "missing"), now=now) == []


def test_the_environment_s_ninja_comes_first(tmp_path, monkeypatch):
    """Runs with and without the venv on PATH used two ninja versions, which rebuilt DeepSpeed's op every time."""
    from pad_moe.distributed import prefer_environment_ninja

    bin_dir = tmp_path / "venv" / "bin"
    bin_dir.mkdir(parents=True)
    python = str(bin_dir / "python")
    monkeypatch.setenv("PATH", os.pathsep.join(["/usr/bin", str(bin_dir), "/bin"]))
    assert not prefer_environment_ninja(python)  # no ninja in the environment: PATH untouched
    (bin_dir / "ninja").write_text("")
    assert prefer_environment_ninja(python)
    assert os.environ["PATH"].split(os.pathsep) == [str(bin_dir), "/usr/bin", "/bin"]
    assert not prefer_environment_ninja(python)  # already first
