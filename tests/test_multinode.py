"""Two 'nodes' on one host: two ``launch/multi_node_no_ssh.sh`` launchers (one rank each, joined over loopback) train
the same run as one 2-rank launcher, to the same losses; the launch scripts reject bad hostfiles with one line."""

import json
import os
import subprocess
import sys

import pytest

from pad_moe.testing.ranks import free_port

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BIN = os.path.dirname(sys.executable)
ENV = {**os.environ, "PATH": f"{BIN}:{os.environ.get('PATH', '')}", "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu",
       "DEEPSPEED_TIMEOUT": "2", "PYTHONUNBUFFERED": "1"}
RUN = ["configs/debug.yaml", "train.steps=6", "train.log_every=3", "partition.iterations=2", "partition.num_batches=2",
       "data.train_size=512", "data.eval_size=64"]


def _check(proc, what):
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, f"{what} exited {proc.returncode}\n{out[-2000:]}\n{err[-3000:]}"


@pytest.mark.slow  # ~95 s: three launchers, 12 processes importing DeepSpeed; run with -m slow
def test_two_single_rank_nodes_match_one_two_rank_launcher(tmp_path):
    out = tmp_path / "runs"
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("# two nodes of one rank each, both on this host\nnode0 slots=1\nnode1 slots=1\n")
    env = {**ENV, "MASTER_PORT": str(free_port())}
    # all three launchers at once (the reference does not depend on the others): the wall time is CPU-bound imports
    procs = {"2-rank launcher": subprocess.Popen(
        [os.path.join(BIN, "deepspeed"), "--num_gpus", "2", "--master_port", str(free_port()), "--module",
         "pad_moe.cli", "train", *RUN, f"output_dir={out}", "name=single"], cwd=ROOT, env=ENV,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)}
    for k in (0, 1):
        procs[f"node {k}"] = subprocess.Popen(
            ["bash", "launch/multi_node_no_ssh.sh", str(hostfile), str(k), "127.0.0.1", *RUN, f"output_dir={out}",
             "name=two_nodes"], cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        for what, proc in procs.items():
            _check(proc, what)
    finally:
        for proc in procs.values():
            if proc.poll() is None:
                proc.kill()
    with open(out / "single" / "summary.json") as f:
        one = json.load(f)
    with open(out / "two_nodes" / "summary.json") as f:
        two = json.load(f)
    assert one["world_size"] == two["world_size"] == 2 and len(one["losses"]) == 6
    assert two["losses"] == pytest.approx(one["losses"], rel=1e-6, abs=1e-7)
    assert two["partition"]["dynamic_per_round"] == one["partition"]["dynamic_per_round"]


@pytest.mark.parametrize("script,lines,extra,match", [
    ("multi_node_no_ssh.sh", "node0 slots=1\nnode1 gpus=1\n", ["0", "127.0.0.1"], 'line 2 "node1 gpus=1"'),
    ("multi_node_no_ssh.sh", "node0 slots=1\nnode0 slots=1\n", ["0", "127.0.0.1"], "host node0 twice"),
    ("multi_node_no_ssh.sh", "node0 slots=1\n", ["1", "127.0.0.1"], "NODE_RANK=1 is not in"),
    ("multi_node_hostfile.sh", "node0 slots=eight\n", [], 'line 1 "node0 slots=eight"'),
    ("multi_node_hostfile.sh", "# nothing\n", [], "has no"),
])
def test_malformed_hostfile_exits_2_with_one_line(tmp_path, script, lines, extra, match):
    hostfile = tmp_path / "hostfile"
    hostfile.write_text(lines)
    proc = subprocess.run(["bash", f"launch/{script}", str(hostfile), *extra, "configs/debug.yaml"], cwd=ROOT,
                          env=ENV, capture_output=True, text=True, timeout=60)
    err = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(err) == 1 and match in err[0] and err[0].startswith(script), proc.stderr
