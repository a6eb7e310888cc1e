"""tools/bench_dropless.py runs end to end (tiny sizes) and reports what the issue asks: loads per skew, the dropped
fraction of capacity dispatch, every variant's share of the matmul peak and the targets. Not a timing test."""

import json
import os
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_quick_run_reports_loads_drops_and_targets(tmp_path):
    out = tmp_path / "b.json"
    proc = subprocess.run([sys.executable, "tools/bench_dropless.py", "--quick", "--skews", "1", "2", "--json",
                           str(out)], cwd=REPO, capture_output=True, text=True,
                          env={**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1"}, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads(out.read_text())
    low, high = result["skews"]
    assert low["max_over_mean"] < 1.5 and abs(high["max_over_mean"] - 2.0) < 0.1  # 4 experts: 2 is the maximum
    rows = high["rows"]
    assert rows["ds-capacity-1.0"]["dropped"] > 0 and rows["dropless-moe"]["dropped"] == 0
    assert {"glu-dropless-pad-neuron-0.5", "ds-dropless-pad-element-0.5"} <= set(rows)
    assert all(r["pct_peak"] > 0 for r in rows.values())
    assert any("1.5x the throughput" in t["target"] for t in result["targets"])
