"""serve.py through a real server on a free port: answers equal to predict.py's, bad uploads as 4xx JSON with the
next request still answered, the queue limit, the API key, SIGTERM; and a real headless browser on the page."""

import concurrent.futures
import io
import os
import re
import select
import shutil
import signal
import socket
import subprocess
import sys
import time

import pytest
import requests
from PIL import Image

import train
from conftest import ROOT, copy_subset
from helpers import read_csv, run_predict, tiny_pairs


class Server:
    """`python serve.py ARGS --port 0` until stop(): the port is the one its start-up line names."""

    def __init__(self, model, *args, env=None):
        command = [sys.executable, str(ROOT / "serve.py"), "--model_fn", str(model), "--port", "0"]
        self.proc = subprocess.Popen(
            [*command, *map(str, args)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env={**os.environ, **(env or {})},
        )
        self.started = self.wait_for_line()
        found = re.search(r" on (http://(?:127\.0\.0\.1|\[::1\])):(\d+)", self.started)
        if found:
            self.port = int(found.group(2))
            self.url = f"{found.group(1)}:{self.port}"
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline and self.proc.poll() is None:
                try:
                    if requests.get(self.url + "/health", timeout=1).status_code == 200:
                        return
                except (requests.ConnectionError, requests.Timeout):  # queued until the app (or its workers) start
                    time.sleep(0.2)
        self.stop()
        raise AssertionError(
            f"the server did not start: {self.started} {self.proc.stdout.read()} {self.proc.stderr.read()}"
        )

    def wait_for_line(self, timeout=60):
        """Its start-up line ('serving ... on http://127.0.0.1:PORT ...'), or '' when it ends or times out first."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if select.select([self.proc.stdout], [], [], 0.2)[0]:
                line = self.proc.stdout.readline()
                if line.startswith("serving "):
                    return line
                if not line:  # the end of its output: it stopped
                    return ""
        return ""

    def post(self, files, route="/predict", **kw):
        parts = [("file", (name, data, "application/octet-stream")) for name, data in files]
        return requests.post(self.url + route, files=parts, timeout=60, **kw)

    def stop(self, sig=signal.SIGTERM):
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            self.proc.wait(15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        return self.proc.returncode


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """A single-label checkpoint (frozen resnet18, one epoch, with an out-of-distribution reference) and a
    multi-label one, with their data."""
    root = tmp_path_factory.mktemp("serve")
    data = copy_subset(root / "data", ["bag", "sneaker", "trouser"], 12, 4)
    common = [
        "--model_name",
        "resnet18",
        "--input_size",
        "32",
        "--n_epochs",
        "1",
        "--num_workers",
        "0",
        "--verbose",
        "0",
    ]
    train.main(
        train.parse_args(
            [
                str(a)
                for a in [
                    "--data_dir",
                    data,
                    "--model_fn",
                    root / "single.pth",
                    "--log_dir",
                    root / "run1",
                    "--freeze",
                    *common,
                ]
            ]
        )
    )
    labels = tiny_pairs(root / "pairs")
    train.main(
        train.parse_args(
            [
                str(a)
                for a in [
                    "--labels_csv",
                    labels,
                    "--multi_label",
                    "--model_fn",
                    root / "multi.pth",
                    "--log_dir",
                    root / "run2",
                    "--freeze",
                    *common,
                ]
            ]
        )
    )
    return root, data, labels


@pytest.fixture(scope="module")
def single(models):
    server = Server(models[0] / "single.pth")
    yield server
    server.stop()


def test_answers_equal_predict_py_for_the_same_files(models, single, tmp_path, capsys):
    root, data, _ = models
    files = sorted((data / "test").rglob("*.png"))
    run_predict(
        capsys,
        "--model_fn",
        root / "single.pth",
        "--data_dir",
        data / "test",
        "--output",
        tmp_path / "r.csv",
        "--n_images",
        "0",
    )
    expected = {os.path.basename(r["file_dir"]): r for r in read_csv(tmp_path / "r.csv")}
    response = single.post([(f.name, f.read_bytes()) for f in files])
    assert response.status_code == 200, response.text
    results = response.json()["results"]
    assert [r["file"] for r in results] == [f.name for f in files]
    for r in results:
        row = expected[r["file"]]
        assert r["predict"] == row["predict"] and abs(r["confidence"] - float(row["confidence"])) < 1e-5
        assert all(abs(p - float(row[f"prob_{c}"])) < 1e-5 for c, p in r["probs"].items())
        assert abs(r["ood_score"] - float(row["ood_score"])) < 1e-5
        assert r["in_distribution"] == (row["in_distribution"] == "1")
    info = requests.get(single.url + "/info", timeout=10).json()
    assert info["classes"] == ["bag", "sneaker", "trouser"] and info["input_size"] == 32
    assert info["metrics"]["test_count"] == 12 and isinstance(info["metrics"]["test_count"], int)
    assert isinstance(info["metrics"]["best_epoch"], int) and isinstance(info["metrics"]["valid_loss"], float)
    assert "temperature" in info and info["ood"]["method"] == "knn"


def test_workers_serve_the_same_answers_on_the_port_the_start_up_line_names(models, single):
    root, data, _ = models
    files = sorted((data / "test").rglob("*.png"))[:4]
    server = Server(root / "single.pth", "--workers", "2")
    try:
        assert " with 2 processes on http://127.0.0.1:" in server.started and server.port != single.port
        answers = [s.post([(f.name, f.read_bytes()) for f in files]) for s in (server, single)]
        assert all(a.status_code == 200 for a in answers), answers[0].text
        assert [r["predict"] for r in answers[0].json()["results"]] == [
            r["predict"] for r in answers[1].json()["results"]
        ]
    finally:
        assert server.stop() == 0


def test_a_multi_label_model_answers_its_sets_as_predict_py(models, tmp_path, capsys):
    root, _, labels = models
    images = sorted((root / "pairs" / "images").glob("*.png"))[:6]
    listing = tmp_path / "list.txt"
    listing.write_text("".join(f"{f}\n" for f in images))
    run_predict(
        capsys,
        "--model_fn",
        root / "multi.pth",
        "--file_list",
        listing,
        "--output",
        tmp_path / "m.csv",
        "--n_images",
        "0",
    )
    expected = {os.path.basename(r["file_dir"]): r for r in read_csv(tmp_path / "m.csv")}
    server = Server(root / "multi.pth")
    try:
        results = server.post([(f.name, f.read_bytes()) for f in images]).json()["results"]
    finally:
        server.stop()
    for r in results:
        row = expected[r["file"]]
        assert r["predict"] == row["predict"] and "confidence" not in r
        assert r["labels"] == ([] if row["predict"] == "unknown" else row["predict"].split())
        assert all(abs(p - float(row[f"prob_{c}"])) < 1e-5 for c, p in r["probs"].items())


def bomb():
    """A 40000x40000 PNG of a few hundred KB: 1.6 billion pixels once decoded."""
    buffer = io.BytesIO()
    Image.MAX_IMAGE_PIXELS, before = None, Image.MAX_IMAGE_PIXELS
    try:
        Image.new("1", (40000, 40000)).save(buffer, format="PNG", optimize=True)
    finally:
        Image.MAX_IMAGE_PIXELS = before
    return buffer.getvalue()


def test_bad_uploads_are_4xx_with_a_reason_and_the_next_request_works(models, single, tmp_path):
    _, data, _ = models
    good = sorted((data / "test" / "bag").glob("*.png"))[0].read_bytes()
    gif = io.BytesIO()
    Image.new("RGB", (8, 8)).save(gif, format="ICO")
    cases = [
        ([("notes.txt", b"not an image at all")], 415, "is not an image Pillow can read"),
        ([("half.png", good[: len(good) // 2])], 400, "could not be decoded"),
        ([("empty.png", b"")], 400, "is empty"),
        ([("bomb.png", bomb())], 413, "pixels"),
        ([("icon.ico", gif.getvalue())], 415, "is a ICO file"),
        ([], 400, "no file"),
    ]
    for files, status, words in cases:
        response = single.post(files)
        assert response.status_code == status and words in response.json()["detail"], (files[:1], response.text)
        assert "Traceback" not in response.text
        ok = single.post([("good.png", good)])
        assert ok.status_code == 200 and ok.json()["results"][0]["predict"] in ("bag", "sneaker", "trouser")
    metrics = requests.get(single.url + "/metrics", timeout=10).text
    assert 'serve_requests_total{route="/predict",status="415"} 2' in metrics and "serve_batch_size_bucket" in metrics


def test_upload_size_queue_limit_api_key_and_sigterm(models, tmp_path):
    """A file over --max_upload_mb: 413. A queue of 2 images filled by a slow batch: 503 with Retry-After. With
    --api_key: 401 without it (but /health), 200 with it. SIGTERM during a request: the answer arrives, exit 0."""
    root, data, _ = models
    image = sorted((data / "test" / "bag").glob("*.png"))[0].read_bytes()
    server = Server(
        root / "single.pth",
        "--max_upload_mb",
        "0.0005",
        "--max_queue",
        "2",
        "--max_wait_ms",
        "1500",
        "--api_key",
        "s3cret",
    )
    try:
        assert requests.get(server.url + "/info", timeout=10).status_code == 401
        assert requests.get(server.url + "/health", timeout=10).status_code == 200
        keyed = {"headers": {"X-API-Key": "s3cret"}}
        assert requests.get(server.url + "/info?api_key=s3cret", timeout=10).status_code == 200
        assert server.post([("x.png", image)], headers={"X-API-Key": "wrong"}).status_code == 401
        big = server.post([("big.png", image + b"\0" * 1024)], **keyed)
        assert big.status_code == 413 and big.json()["detail"] == "'big.png' is larger than the upload limit, 524 bytes"
        with concurrent.futures.ThreadPoolExecutor(4) as pool:
            answers = list(pool.map(lambda _: server.post([("x.png", image)], **keyed), range(4)))
        codes = sorted(a.status_code for a in answers)
        assert codes.count(200) >= 2 and 503 in codes, codes
        assert all(a.headers.get("Retry-After") == "1" for a in answers if a.status_code == 503)
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            in_flight = pool.submit(server.post, [("x.png", image)], **keyed)
            time.sleep(0.5)  # the request waits in the batcher (--max_wait_ms 1500) when the signal comes
            start = time.monotonic()
            code = server.stop(signal.SIGTERM)
            assert in_flight.result().status_code == 200
        assert code == 0 and time.monotonic() - start < 10 and "stopped (SIGTERM)" in server.proc.stdout.read()
    finally:
        server.stop(signal.SIGKILL)


def test_serve_binds_localhost_and_refuses_bad_flags_in_one_line(models):
    root = models[0]
    import serve
    from cli import run_cli

    assert serve.parse_args(["--model_fn", "m.pth"]).host == "127.0.0.1"
    for argv, words in (
        (["--model_fn", root / "missing.pth"], "does not exist"),
        (["--model_fn", root / "single.pth", "--max_batch", "0"], "--max_batch must be"),
        (["--model_fn", root / "single.pth", "--port", "70000"], "--port must be in 0..65535"),
    ):
        proc = subprocess.run(
            [sys.executable, str(ROOT / "serve.py"), *map(str, argv)], capture_output=True, text=True, timeout=60
        )
        assert proc.returncode == 2 and proc.stderr.startswith("error: ") and words in proc.stderr, proc.stderr
        assert "Traceback" not in proc.stderr
    assert callable(run_cli)
    with socket.socket() as taken:  # a port in use: one line, before anything is printed as served
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        proc = subprocess.run(
            [sys.executable, str(ROOT / "serve.py"), "--model_fn", str(root / "single.pth"), "--port", str(port)],
            capture_output=True,
            text=True,
            timeout=60,
        )
    assert proc.returncode == 2 and proc.stderr.startswith(f"error: cannot listen on 127.0.0.1 port {port}: ")
    assert "(0: a free one)" in proc.stderr and len(proc.stderr.splitlines()) == 1 and "serving" not in proc.stdout
    assert serve.local_url("0.0.0.0", 80) == "http://127.0.0.1:80" and serve.local_url("::", 80) == "http://[::1]:80"
    import serving

    assert [serving.limit_text(n) for n in (20 << 20, 1024 << 20, 524)] == ["20 MB", "1024 MB", "524 bytes"]
    try:  # IPv6, where this host has it: the start-up line's address in brackets
        with socket.socket(socket.AF_INET6) as probe:
            probe.bind(("::1", 0))
    except OSError:
        return
    server = Server(root / "single.pth", "--host", "::1")
    try:
        assert " on http://[::1]:" in server.started and requests.get(server.url + "/health", timeout=10).ok
    finally:
        assert server.stop() == 0


# ----------------------------------------------------------------------------- the page, in a real browser


def chromium():
    """Debian's Chromium (.ci/run installs it), or None."""
    return shutil.which("chromium") or shutil.which("chromium-browser")


def test_the_page_in_a_headless_browser(models, single, tmp_path):
    """Two images picked with the file input: their class names show. A file named like an HTML tag: its name shows
    as text, and no script of it runs (no dialog)."""
    browser_path = chromium()
    if browser_path is None:
        pytest.skip("no Chromium here (.ci/run installs Debian's chromium); the browser test did not run")
    from playwright.sync_api import sync_playwright

    _, data, _ = models
    picks = [sorted((data / "test" / c).glob("*.png"))[0] for c in ("bag", "trouser")]
    evil = tmp_path / "<img src=x onerror=alert(1)>.png"
    shutil.copy(picks[0], evil)
    dialogs = []
    with sync_playwright() as p:
        browser = p.chromium.launch(
            executable_path=browser_path,
            args=[
                "--no-sandbox",
                "--disable-gpu",
                "--disable-quic",
                "--no-first-run",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
            ],
        )
        try:
            page = browser.new_page()
            page.on("dialog", lambda d: (dialogs.append(d.message), d.dismiss()))
            page.goto(single.url + "/")
            page.wait_for_selector("#info dd")  # the model card
            assert "bag, sneaker, trouser" in page.inner_text("#info")
            page.set_input_files("#files", [str(f) for f in picks])
            page.wait_for_function("document.querySelectorAll('.result').length == 2", timeout=30000)
            answers = page.locator(".answer").all_inner_texts()
            assert len(answers) == 2 and all(a.split(" ")[0] in ("bag", "sneaker", "trouser") for a in answers)
            page.set_input_files("#files", [str(evil)])
            page.wait_for_function("document.querySelectorAll('.result').length == 3", timeout=30000)
            page.wait_for_timeout(300)
            assert page.locator(".name").first.inner_text() == evil.name  # shown as text
            assert page.locator("#results img[src='x']").count() == 0 and dialogs == []
        finally:
            browser.close()
