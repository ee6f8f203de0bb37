"""serve.py under load (a script, not a test): prints each figure with the CPU it ran on.

  python bench/serve_bench.py                     # a few minutes on 2 cores (the 10,000-request part most of it)
  python bench/serve_bench.py --soak 2000         # a shorter soak

Measures, on one model (default: the README's quick start, EfficientNet-Lite0 --freeze on the shipped sample,
224 px; --model_fn another) and the shipped sample's test images:
  1. 16 concurrent clients posting one image each, over and over: images/s against predict.py's steady rate on
     the same images (two list lengths, so its start-up cancels), in the same run; target >= 0.8;
  2. one client, one image at a time: the median latency against one batch-1 forward of the same model in this
     process (as serve.py runs it); target <= forward + 30 ms;
  3. --soak requests (10,000) from 8 clients, one in ten a bad upload (random bytes, a truncated PNG): no 5xx, and
     the server's resident memory after the last request within 10% of that after the first 1,000.
The clients run on the same machine as the server: on 2 cores they take some of its CPU.
"""

import concurrent.futures
import os
import random
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

import requests  # noqa: E402
import torch  # noqa: E402
from scale_bench import cpu_line  # noqa: E402

import data_loader as dl  # noqa: E402
from cli import ArgumentParser  # noqa: E402
from predictor import Predictor  # noqa: E402
from timed import run  # noqa: E402

SAMPLE = ROOT / "data" / "fashion_sample"


def parse_args(argv=None):
    p = ArgumentParser(description=__doc__)
    p.add_argument("--model_fn", default=None, help="the model served (default: the quick start's, trained here)")
    p.add_argument("--clients", type=int, default=16)
    p.add_argument("--requests", type=int, default=640, help="requests of the concurrent part")
    p.add_argument("--soak", type=int, default=10000, help="requests of the soak part (0: skip it)")
    p.add_argument("--work", default=None, help="folder for the model and lists (default: a new temporary one)")
    return p.parse_args(argv)


def rss_mb(pid):
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(model_fn):
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, ROOT / "serve.py", "--model_fn", model_fn, "--port", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    url = f"http://127.0.0.1:{port}"
    for _ in range(300):
        try:
            if requests.get(url + "/health", timeout=1).status_code == 200:
                return proc, url
        except requests.ConnectionError:
            time.sleep(0.2)
    proc.kill()
    sys.exit(f"serve.py did not start: {proc.stderr.read().decode()[-500:]}")


def post(session, url, name, data):
    return session.post(url + "/predict", files=[("file", (name, data, "image/png"))], timeout=120)


def predict_steady_rate(model_fn, files, work):
    """predict.py's images/s on `files` listed 2x and 8x, from the difference (start-up cancels)."""
    seconds = {}
    for times in (2, 8):
        listing = work / f"list_{times}.txt"
        listing.write_text("".join(f"{f}\n" for _ in range(times) for f in files))
        seconds[times], _ = run(
            [
                sys.executable,
                ROOT / "predict.py",
                "--model_fn",
                model_fn,
                "--file_list",
                listing,
                "--output",
                work / f"r{times}.csv",
                "--n_images",
                "0",
                "--verbose",
                "0",
            ]
        )
    return 6 * len(files) / (seconds[8] - seconds[2])


def batch1_forward_ms(model_fn, image):
    predictor = Predictor.load(model_fn, gpu_id=-1, log=lambda *a: None)
    x = predictor.preprocess.transform()(dl.load_rgb(image))[None]
    times = []
    with torch.inference_mode():
        for _ in range(25):
            start = time.perf_counter()
            predictor.outputs(x)
            times.append(time.perf_counter() - start)
    return 1000 * statistics.median(times[5:])


def concurrent_part(url, blobs, clients, n):
    def client(k):
        with requests.Session() as s:
            picks = [blobs[(k + i * clients) % len(blobs)] for i in range(n // clients)]
            return [post(s, url, name, data).status_code for name, data in picks]

    start = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(clients) as pool:
        codes = [c for part in pool.map(client, range(clients)) for c in part]
    return len(codes) / (time.perf_counter() - start), codes


def soak_part(url, pid, blobs, n):
    rng = random.Random(0)
    whole = blobs[0][1]
    bad = [("noise.png", bytes(rng.randrange(256) for _ in range(2000))), ("half.png", whole[: len(whole) // 2])]
    counts, marks = {}, {}

    def client(k):
        with requests.Session() as s:
            for i in range(k, n, 8):
                name, data = bad[(i // 10) % 2] if i % 10 == 0 else blobs[i % len(blobs)]
                code = post(s, url, name, data).status_code
                counts[code] = counts.get(code, 0) + 1
                if i in (999, n - 1):
                    marks[i] = rss_mb(pid)

    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        list(pool.map(client, range(8)))
    return counts, marks.get(999, float("nan")), rss_mb(pid)


def main(args):
    work = Path(args.work or tempfile.mkdtemp(prefix="serve_bench_"))
    work.mkdir(parents=True, exist_ok=True)
    model_fn = Path(args.model_fn) if args.model_fn else work / "model.pth"
    if not model_fn.exists():
        run(
            [
                sys.executable,
                ROOT / "train.py",
                "--model_name",
                "efficientnet_lite0",
                "--use_pretrained",
                "--freeze",
                "--model_fn",
                model_fn,
                "--log_dir",
                work / "run",
                "--verbose",
                "0",
            ]
        )
    files = sorted(str(p) for p in (SAMPLE / "test").rglob("*.png"))
    blobs = [(Path(f).name, Path(f).read_bytes()) for f in files]
    print(f"machine: {cpu_line()}; {model_fn.name}; {len(files)} test images of the shipped sample (28 px PNGs)")
    steady = predict_steady_rate(model_fn, files, work)
    forward = batch1_forward_ms(model_fn, files[0])
    proc, url = start_server(model_fn)
    try:
        with requests.Session() as s:
            for name, data in blobs[:8]:
                post(s, url, name, data)  # warm-up
            latencies = []
            for name, data in blobs[:60]:
                start = time.perf_counter()
                post(s, url, name, data)
                latencies.append(1000 * (time.perf_counter() - start))
        rate, codes = concurrent_part(url, blobs, args.clients, args.requests)
        print(
            f"1. {args.clients} concurrent clients, one image a request, {len(codes)} requests: {rate:.1f} img/s; "
            f"predict.py's steady rate on the same images {steady:.1f} img/s -> {rate / steady:.2f} (target >= 0.8); "
            f"statuses {sorted(set(codes))}"
        )
        median = statistics.median(latencies)
        print(
            f"2. one client: median latency {median:.1f} ms; a batch-1 forward in process {forward:.1f} ms; "
            f"overhead {median - forward:.1f} ms (target <= 30)"
        )
        if args.soak:
            start = time.perf_counter()
            counts, first, last = soak_part(url, proc.pid, blobs, args.soak)
            errors = sum(n for code, n in counts.items() if code >= 500)
            print(
                f"3. {args.soak} requests, 1 in 10 a bad upload, 8 clients, {time.perf_counter() - start:.0f}s: "
                f"statuses {dict(sorted(counts.items()))}, 5xx {errors}; server RSS {first:.0f} MB after 1,000, "
                f"{last:.0f} MB after {args.soak} ({last / first - 1:+.1%}; target within 10%)"
            )
    finally:
        proc.terminate()
        proc.wait(30)
    print(f"(work files in {work}; {os.cpu_count()} CPUs)")


if __name__ == "__main__":
    main(parse_args())
