"""What serve.py runs behind its routes, apart from the web framework: uploads checked and decoded as predict.py
decodes a file (type by content, size and pixel limits, one-line reasons), a batcher that runs the requests that
arrive within a few milliseconds of each other as one forward of the Predictor (predictor.py), the rows as JSON
with result.csv's field names, and the counters /metrics shows in Prometheus' text format."""

import base64
import io
import threading
import time
from collections import deque
from concurrent.futures import Future
from dataclasses import dataclass

import torch
from PIL import Image

import data_loader
import explain
from cli import describe_error


def cli_text(e):
    return describe_error(e, 120)


ACCEPTED_FORMATS = {"JPEG", "PNG", "BMP", "GIF", "TIFF", "WEBP", "MPO"}  # what Pillow found in the bytes, not the name


class UploadError(Exception):
    """A bad upload: the HTTP status to answer and a one-line reason."""

    def __init__(self, status, reason):
        super().__init__(reason)
        self.status, self.reason = status, reason


class Busy(Exception):
    """The queue is full: answer 503 with Retry-After."""


@dataclass(frozen=True)
class Limits:
    """What an upload may be (serve.py's flags)."""

    max_upload_bytes: int = 20 << 20  # per file
    max_pixels: int = 50_000_000  # width x height, checked before decoding (a decompression bomb is a few KB)


def limit_text(n_bytes):
    """'20 MB', '1024 MB', '524 bytes': a byte limit as --max_upload_mb gives it, without a rounding to 0."""
    return f"{n_bytes / 2**20:.6g} MB" if n_bytes >= 2**20 else f"{n_bytes} bytes"


def decode_upload(data, name, preprocess, limits):
    """The upload's bytes -> the model's input tensor, decoded as predict.py decodes a file (data_loader.load_rgb,
    the same reduced-scale JPEG decoding and eval transform). UploadError for anything else."""
    if not data:
        raise UploadError(400, f"{name!r} is empty")
    if len(data) > limits.max_upload_bytes:
        # the body is read up to one byte past the limit: its real size is not known here
        raise UploadError(413, f"{name!r} is larger than the upload limit, {limit_text(limits.max_upload_bytes)}")
    try:
        with Image.open(io.BytesIO(data)) as img:  # reads the header only: no pixel is decoded yet
            kind, (width, height) = img.format, img.size
    except Image.DecompressionBombError as e:  # over twice Pillow's own pixel limit
        raise UploadError(413, f"{name!r} claims too many pixels to decode ({cli_text(e)})") from None
    except Exception:  # noqa: BLE001 - Pillow's many ways of not knowing a file
        raise UploadError(415, f"{name!r} is not an image Pillow can read") from None
    if kind not in ACCEPTED_FORMATS:
        raise UploadError(415, f"{name!r} is a {kind} file, not one of {', '.join(sorted(ACCEPTED_FORMATS))}")
    if width * height > limits.max_pixels:
        raise UploadError(413, f"{name!r} is {width}x{height} pixels, over the {limits.max_pixels / 1e6:g} MP limit")
    try:
        image = data_loader.load_rgb(io.BytesIO(data), preprocess.draft_side())
        return preprocess.transform()(image)
    except Exception as e:  # noqa: BLE001 - a truncated or corrupt file fails while decoding
        raise UploadError(400, f"{name!r} could not be decoded ({describe_error(e, 120)})") from None


def result_json(predictor, name, probs, decision, score):
    """One image's answer: result.csv's fields (predict, confidence for one label per image; ood_score,
    in_distribution) with every class's probability under "probs", and "labels" (the classes decided) for a
    multi-label model."""
    columns = predictor.columns(labelled=False)
    cells = dict(zip(columns, predictor.row((name, -1), probs, decision, score)))
    out = {"file": name, "predict": cells["predict"]}
    if "confidence" in cells:  # the top class's calibrated probability, unrounded
        out["confidence"] = float(probs.max())
    if predictor.task.multi_label:  # the decision: a multi-hot tuple (UNKNOWN when rejected)
        chosen = decision if isinstance(decision, tuple) else ()
        out["labels"] = [c for c, on in zip(predictor.class_names, chosen) if on]
    out["probs"] = {c: float(p) for c, p in zip(predictor.class_names, probs.tolist())}
    if score is not None:
        value, unlike = score
        out["ood_score"] = value
        out["in_distribution"] = None if unlike is None else not unlike
    return out


def heatmap_png(explainer, image):
    """Grad-CAM of the best class over the image as the model saw it (the crop, in real colours), as a data: URL
    of a PNG; `explainer`: a Predictor made with explain_maps (its model's blocks kept as modules)."""
    with torch.no_grad():  # Grad-CAM takes gradients from the hooked layer up: not inference_mode
        out = explainer.outputs(image[None], maps=True)
    overlay = explain.blend(_to_pil(image, explainer.preprocess), out.maps[0].numpy())
    buffer = io.BytesIO()
    Image.fromarray(overlay).save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def _to_pil(tensor, preprocess):
    """The normalized input tensor back to an RGB image (undoing the normalization)."""
    mean = torch.tensor(preprocess.mean)[:, None, None]
    std = torch.tensor(preprocess.std)[:, None, None]
    array = ((tensor * std + mean).clamp(0, 1) * 255).round().byte().permute(1, 2, 0).numpy()
    return Image.fromarray(array)


# ----------------------------------------------------------------------------- the batcher


class Batcher:
    """Images from concurrent requests run as one forward: the first image waits at most max_wait seconds for
    others, up to max_batch; a thread of its own runs the model (torch's own threads do the work). At most
    max_queue images wait; past that, submit raises Busy."""

    def __init__(self, predictor, max_batch=16, max_wait=0.005, max_queue=64, metrics=None):
        self.predictor, self.max_batch, self.max_wait, self.max_queue = predictor, max_batch, max_wait, max_queue
        self.metrics = metrics
        self.pending = deque()  # (tensor, future)
        self.lock = threading.Condition()
        self.running = True
        self.thread = threading.Thread(target=self.loop, name="batcher", daemon=True)
        self.thread.start()

    def submit(self, images):
        """Futures of the images' Outputs rows (probs, decision, score), in order; Busy when the queue is full."""
        with self.lock:
            if not self.running:
                raise Busy("the server is stopping")
            if len(self.pending) + len(images) > self.max_queue:
                raise Busy(f"{len(self.pending)} images are waiting (--max_queue {self.max_queue})")
            futures = [Future() for _ in images]
            self.pending.extend(zip(images, futures))
            self.lock.notify()
        return futures

    def depth(self):
        return len(self.pending)

    def loop(self):
        while True:
            with self.lock:
                while self.running and not self.pending:
                    self.lock.wait()
                if not self.pending:  # stopped and drained
                    return
                deadline = time.monotonic() + self.max_wait
                while self.running and len(self.pending) < self.max_batch and time.monotonic() < deadline:
                    self.lock.wait(max(0.0, deadline - time.monotonic()))
                batch = [self.pending.popleft() for _ in range(min(self.max_batch, len(self.pending)))]
            self.run(batch)

    def run(self, batch):
        images, futures = zip(*batch)
        try:
            with torch.inference_mode():
                out = self.predictor.outputs(torch.stack(images))
        except Exception as e:  # noqa: BLE001 - the requests get the error; the batcher goes on
            for f in futures:
                f.set_exception(e)
            return
        if self.metrics is not None:
            self.metrics.batch(len(images))
        for i, f in enumerate(futures):
            f.set_result((out.probs[i], out.decisions[i], out.score(i)))

    def stop(self, timeout=10.0):
        """Finish the images already queued, then end the thread."""
        with self.lock:
            self.running = False
            self.lock.notify_all()
        self.thread.join(timeout)


# ----------------------------------------------------------------------------- metrics

LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)  # seconds
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128)


class Metrics:
    """Counters for /metrics in Prometheus' text format: requests by route and status, images predicted, batch
    sizes and request latency as histograms, the queue's depth."""

    def __init__(self):
        self.lock = threading.Lock()
        self.requests = {}  # (route, status) -> count
        self.images = 0
        self.latency = [0] * (len(LATENCY_BUCKETS) + 1)
        self.latency_sum = 0.0
        self.batches = [0] * (len(BATCH_BUCKETS) + 1)
        self.batch_sum = 0

    def request(self, route, status, seconds):
        with self.lock:
            self.requests[route, status] = self.requests.get((route, status), 0) + 1
            self.latency[_bucket(seconds, LATENCY_BUCKETS)] += 1
            self.latency_sum += seconds

    def batch(self, size):
        with self.lock:
            self.images += size
            self.batches[_bucket(size, BATCH_BUCKETS)] += 1
            self.batch_sum += size

    def text(self, queue_depth):
        with self.lock:
            lines = [
                "# HELP serve_requests_total HTTP requests by route and status.",
                "# TYPE serve_requests_total counter",
            ]
            lines += [
                f'serve_requests_total{{route="{route}",status="{status}"}} {n}'
                for (route, status), n in sorted(self.requests.items())
            ]
            lines += [
                "# HELP serve_images_total Images predicted.",
                "# TYPE serve_images_total counter",
                f"serve_images_total {self.images}",
            ]
            lines += _histogram(
                "serve_request_seconds", "Request latency in seconds.", LATENCY_BUCKETS, self.latency, self.latency_sum
            )
            lines += _histogram(
                "serve_batch_size", "Images per model forward.", BATCH_BUCKETS, self.batches, self.batch_sum
            )
            lines += [
                "# HELP serve_queue_depth Images waiting for the model.",
                "# TYPE serve_queue_depth gauge",
                f"serve_queue_depth {queue_depth}",
            ]
        return "\n".join(lines) + "\n"


def _bucket(value, bounds):
    return next((i for i, b in enumerate(bounds) if value <= b), len(bounds))


def _histogram(name, help_text, bounds, counts, total):
    lines = [f"# HELP {name} {help_text}", f"# TYPE {name} histogram"]
    running = 0
    for bound, n in zip(bounds, counts):
        running += n
        lines.append(f'{name}_bucket{{le="{bound:g}"}} {running}')
    running += counts[-1]
    lines += [f'{name}_bucket{{le="+Inf"}} {running}', f"{name}_sum {total:g}", f"{name}_count {running}"]
    return lines
