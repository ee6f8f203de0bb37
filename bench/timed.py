"""The benchmarks' one way to run a whole process (its wall time and stdout, or exit with its output), and to
compare two result.csv files."""

import csv
import subprocess
import sys
import time


def run(cmd, **kw):
    """Wall time of a whole process; fails loudly if it fails."""
    start = time.perf_counter()
    proc = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, **kw)
    seconds = time.perf_counter() - start
    if proc.returncode != 0:
        sys.exit(f"failed: {' '.join(map(str, cmd))}\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}")
    return seconds, proc.stdout


def read_rows(path):
    with open(path, encoding="utf-8-sig") as f:
        return list(csv.DictReader(f))


def agreement(a_path, b_path):
    a, b = read_rows(a_path), read_rows(b_path)
    assert [r["file_dir"] for r in a] == [r["file_dir"] for r in b]
    keys = [k for k in a[0] if k.startswith("prob_")] or ["confidence"]
    same = sum(x["predict"] == y["predict"] for x, y in zip(a, b))
    diff = max(abs(float(x[k]) - float(y[k])) for x, y in zip(a, b) for k in keys if x[k] and y[k])
    return same, len(a), diff
