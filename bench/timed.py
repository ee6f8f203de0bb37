"""The benchmarks' one way to run a whole process: its wall time and stdout, or exit with its output."""
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
