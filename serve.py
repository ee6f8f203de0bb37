"""Try a trained model in a browser and call it from code: a local page and a REST API for any model predict.py
runs (a .pth checkpoint of train.py, or an .onnx export), loaded once through the same code as predict.py, so an
image gets the answer predict.py writes for it (calibrated probabilities, the threshold's 'unknown', the
out-of-distribution score). Requests that arrive within --max_wait_ms of each other run as one forward.

  GET /           the page: drop or pick images, see the top classes, the 'unknown' and 'unlike the training
                  images' badges, Grad-CAM on request, and the model card
  POST /predict   multipart, field `file` (repeatable) -> {"results": [{"file", "predict", "confidence", "probs",
                  "ood_score", "in_distribution"}, ...]}; POST /explain: the same with a Grad-CAM "heatmap" (.pth)
  GET /health     200 once the model is loaded (never asks for the API key)
  GET /info       the model card as JSON
  GET /metrics    Prometheus' text format: requests, images, batch sizes, latency, queue depth

Safe by default: it binds 127.0.0.1 (--host 0.0.0.0 to serve the network); with --api_key (or SERVE_API_KEY) every
route but /health answers 401 without the key (header X-API-Key, Authorization: Bearer, or ?api_key= for the
page); an upload is typed by its content, limited in bytes and pixels, and its name is only ever shown as text.
"""

import cli  # before torch: Ctrl-C while the imports below load is one quiet line, not a traceback

if __name__ == "__main__":
    cli.exit_quietly_on_stop_signals()
    cli.check_installation()

import asyncio
import json
import os
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

import int8
from cli import ArgumentParser, CLIError, StopFlag, flag_adder, run_cli
from predictor import Predictor, Reading
from run_paths import RunPaths
from serving import Batcher, Busy, Limits, Metrics, UploadError, decode_upload, heatmap_png, result_json

PAGE = Path(__file__).resolve().parent / "static" / "index.html"
API_KEY_ENV = "SERVE_API_KEY"  # the key, when --api_key is not given (a flag shows in the process list)
SETTINGS_ENV = "SERVE_SETTINGS"  # --workers: each worker process rebuilds the app from these
MAX_FILES = 64  # files per request

EXAMPLES = """examples:
  python serve.py --model_fn model.pth                       # http://127.0.0.1:8000: the page and the API
  python serve.py --model_fn model.onnx --host 0.0.0.0 --port 9000 --api_key "$KEY"
  curl -F file=@photo.jpg http://127.0.0.1:8000/predict"""


def build_parser():
    p = ArgumentParser(description=__doc__, epilog=EXAMPLES)
    add = flag_adder(p)
    add(
        "--model_fn",
        "--model_path",
        default="model.pth",
        help="a checkpoint of train.py (.pth) or an export of export.py (.onnx)",
    )
    add(
        "--host",
        default="127.0.0.1",
        help="the address to listen on: 127.0.0.1 = this machine only; 0.0.0.0 = every network interface",
    )
    add("--port", type=int, default=8000, help="0: a free port, named in the start-up line")
    add("--api_key", default=None, help=f"every route but /health needs this key (default: ${API_KEY_ENV}, else none)")
    add("--max_batch", type=int, default=16, help="images per forward at most")
    add("--max_wait_ms", type=float, default=5.0, help="how long the first image of a batch waits for others")
    add("--max_queue", type=int, default=64, help="images waiting at most; past that, 503 with Retry-After")
    add("--workers", type=int, default=1, help="server processes, each with its own model")
    add("--decode_threads", type=int, default=None, help="threads decoding uploads (default: the CPUs, up to 4)")
    add("--max_upload_mb", type=float, default=20, help="largest file accepted (413 above it)")
    add(
        "--max_megapixels",
        type=float,
        default=50,
        help="largest image accepted, width x height (a decompression bomb of a few KB can claim 40000x40000)",
    )
    add("--gpu_id", type=int, default=None, help="CUDA device; -1 = CPU (default: GPU 0, else MPS, else CPU)")
    add("--amp", action="store_true", help="bf16/fp16 autocast")
    add(
        "--threshold",
        type=float,
        default=None,
        help="as predict.py: rows below this calibrated confidence are --unknown_label",
    )
    add("--unknown_label", default="unknown", help="the prediction of a rejected row")
    add("--tta", action="store_true", help="as predict.py: average each image's probabilities with its mirror image's")
    add(
        "--reject_ood", action="store_true", help="as predict.py: images unlike the training images are --unknown_label"
    )
    return p


def parse_args(argv=None):
    return build_parser().parse_args(argv)


@dataclass(frozen=True)
class Settings:
    """How the app serves (built from the flags; nothing below the script reads them)."""

    api_key: str = None
    max_batch: int = 16
    max_wait: float = 0.005  # seconds
    max_queue: int = 64
    decode_threads: int = 2
    limits: Limits = Limits()
    model_fn: str = ""  # for the model card and Grad-CAM's second model


def settings_from(args):
    for name in ("max_batch", "max_queue", "workers"):
        if getattr(args, name) <= 0:
            raise CLIError(f"--{name} must be a positive number; got {getattr(args, name)}")
    if not 0 <= args.port <= 65535:
        raise CLIError(f"--port must be in 0..65535 (0: a free port, printed at start-up); got {args.port}")
    if args.max_wait_ms < 0 or args.max_upload_mb <= 0 or args.max_megapixels <= 0:
        raise CLIError("--max_wait_ms must be 0 or more; --max_upload_mb and --max_megapixels positive")
    threads = args.decode_threads or min(4, os.cpu_count() or 1)
    return Settings(
        args.api_key or os.environ.get(API_KEY_ENV) or None,
        args.max_batch,
        args.max_wait_ms / 1000,
        args.max_queue,
        threads,
        Limits(int(args.max_upload_mb * 2**20), int(args.max_megapixels * 1e6)),
        str(args.model_fn),
    )


def load_predictor(args, explain_maps=False):
    """The model, loaded and made ready as predict.py does (predictor.Predictor)."""
    reading = Reading(args.threshold, args.unknown_label, args.tta, args.reject_ood)
    RunPaths().reads(args.model_fn, "the model --model_fn").check()  # one line for a missing file
    predictor = Predictor.load(args.model_fn, reading, args.gpu_id, args.amp, explain_maps=explain_maps, log=print)
    warning = int8.warning_for(predictor.ckpt, predictor.compute.device.type)
    if warning:
        print(warning, file=sys.stderr)
    return predictor


def model_card(predictor, settings):
    """GET /info: what the model is, how its outputs are read, and the figures its checkpoint stores."""
    ckpt, reading = predictor.ckpt, predictor.reading
    reference = predictor.reference
    card = {
        "model": Path(settings.model_fn).name,
        "model_name": ckpt["model_name"],
        "classes": list(predictor.class_names),
        "multi_label": predictor.task.multi_label,
        "input_size": int(ckpt["input_size"]),
        "resize_size": int(ckpt["resize_size"]),
        "threshold": reading.threshold,
        "unknown_label": reading.unknown_label,
        "tta": reading.tta,
        "reject_ood": reading.reject_ood,
        "ood": None if reference is None else {"method": reference["method"], "threshold": predictor.ood_threshold},
        "metrics": {  # counts and epochs as whole numbers: "test_count": 120, not 120.0
            k: int(v) if (k.endswith("_count") or k.endswith("_epoch")) and float(v).is_integer() else float(v)
            for k, v in (ckpt.get("metrics") or {}).items()
            if isinstance(v, (int, float)) and not isinstance(v, bool)
        },
        "max_upload_mb": settings.limits.max_upload_bytes / 2**20,
        "max_batch": settings.max_batch,
        "grad_cam": not str(settings.model_fn).lower().endswith(".onnx"),
        "int8": ckpt.get("int8"),  # an export.py --int8 build: its gate's figures against fp32 (None otherwise)
        "int8_warning": int8.warning_for(ckpt, predictor.compute.device.type),  # "" unless its weights saturate here
    }
    calibration = predictor.calibration
    card.update(calibration.checkpoint_entries())  # temperature, or temperatures and thresholds per class
    return card


def add_error_answers(app):
    """Every refusal and failure as a JSON reason with its status: a bad upload (4xx), a full queue (503 with
    Retry-After), an invalid request (422), a bug (500, the reason logged here, never a traceback to the client)."""
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse

    @app.exception_handler(UploadError)
    async def bad_upload(request, e):
        return JSONResponse({"detail": e.reason}, status_code=e.status)

    @app.exception_handler(Busy)
    async def busy(request, e):
        return JSONResponse({"detail": f"busy: {e}; try again shortly"}, 503, headers={"Retry-After": "1"})

    @app.exception_handler(RequestValidationError)
    async def invalid(request, e):
        first = e.errors()[0] if e.errors() else {}
        where = ".".join(str(p) for p in first.get("loc", ()))
        return JSONResponse({"detail": f"{where}: {first.get('msg', 'invalid request')}"}, status_code=422)

    @app.exception_handler(Exception)
    async def failed(request, e):
        print(f"error: {cli.describe_error(e, 300)}", file=sys.stderr)
        return JSONResponse({"detail": "internal error"}, status_code=500)


def create_app(predictor, settings, explainer=None):
    """The web app (FastAPI) around a loaded Predictor. explainer: a callable giving a Predictor made with
    explain_maps, for Grad-CAM (None: loaded from settings.model_fn on the first /explain)."""
    from fastapi import FastAPI, Request, UploadFile
    from fastapi.responses import HTMLResponse, JSONResponse, PlainTextResponse

    metrics = Metrics()
    state = {}
    explain_lock = threading.Lock()

    @asynccontextmanager
    async def lifespan(app):
        state["batcher"] = Batcher(predictor, settings.max_batch, settings.max_wait, settings.max_queue, metrics)
        state["pool"] = ThreadPoolExecutor(settings.decode_threads, thread_name_prefix="decode")
        yield
        state["batcher"].stop()  # the images already queued are answered first
        state["pool"].shutdown(wait=True)

    app = FastAPI(title="image classifier", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)

    @app.middleware("http")
    async def guard(request: Request, call_next):
        start, route = time.perf_counter(), request.url.path
        if settings.api_key and route != "/health" and not authorized(request, settings.api_key):
            response = JSONResponse({"detail": "a valid API key is needed (header X-API-Key)"}, status_code=401)
        elif int(request.headers.get("content-length") or 0) > settings.limits.max_upload_bytes * MAX_FILES + 2**20:
            response = JSONResponse({"detail": "the request is larger than the upload limit allows"}, 413)
        else:
            response = await call_next(request)
        metrics.request(route if route in ROUTES else "other", response.status_code, time.perf_counter() - start)
        return response

    add_error_answers(app)

    @app.get("/", response_class=HTMLResponse)
    async def page():
        return HTMLResponse(PAGE.read_text(encoding="utf-8"))

    @app.get("/health")
    async def health():
        return {"status": "ok"}

    @app.get("/info")
    async def info():
        return model_card(predictor, settings)

    @app.get("/metrics", response_class=PlainTextResponse)
    async def prometheus():
        return PlainTextResponse(metrics.text(state["batcher"].depth()), media_type="text/plain; version=0.0.4")

    async def read_images(files):
        if not files:
            raise UploadError(400, "no file: send one or more images in the multipart field 'file'")
        if len(files) > MAX_FILES:
            raise UploadError(413, f"{len(files)} files in one request; at most {MAX_FILES}")
        loop, names, images = asyncio.get_running_loop(), [], []
        for upload in files:
            name = upload.filename or "upload"
            data = await upload.read(settings.limits.max_upload_bytes + 1)
            names.append(name)
            images.append(
                loop.run_in_executor(state["pool"], decode_upload, data, name, predictor.preprocess, settings.limits)
            )
        return names, await asyncio.gather(*images)

    @app.post("/predict")
    async def predict(file: list[UploadFile] = None):
        names, images = await read_images(file)
        answers = await asyncio.gather(*(asyncio.wrap_future(f) for f in state["batcher"].submit(images)))
        return {"results": [result_json(predictor, n, *a) for n, a in zip(names, answers)]}

    @app.post("/explain")
    async def explain(file: list[UploadFile] = None):
        names, images = await read_images(file)
        model = await asyncio.get_running_loop().run_in_executor(None, explaining, explain_lock)
        results = []
        for name, image in zip(names, images):
            answer = await asyncio.wrap_future(state["batcher"].submit([image])[0])
            heat = await asyncio.get_running_loop().run_in_executor(None, heatmap, model, image, explain_lock)
            results.append({**result_json(predictor, name, *answer), "heatmap": heat})
        return {"results": results}

    def explaining(lock):
        with lock:
            if "explainer" not in state:
                if not model_card(predictor, settings)["grad_cam"]:
                    raise UploadError(400, "Grad-CAM needs the .pth checkpoint: an ONNX model gives no gradients")
                state["explainer"] = (
                    explainer()
                    if explainer
                    else Predictor.load(settings.model_fn, predictor.reading, explain_maps=True, log=lambda *a: None)
                )
            return state["explainer"]

    def heatmap(model, image, lock):
        with lock:  # one Grad-CAM at a time: its hooks hold the last forward's activations
            return heatmap_png(model, image)

    return app


ROUTES = {"/", "/health", "/info", "/metrics", "/predict", "/explain"}


def authorized(request, key):
    """The key in X-API-Key, Authorization: Bearer, or the api_key query parameter (the page's address)."""
    import hmac

    given = (
        request.headers.get("x-api-key")
        or request.headers.get("authorization", "").removeprefix("Bearer ")
        or request.query_params.get("api_key")
        or ""
    )
    return hmac.compare_digest(given.encode(), key.encode())


def app_factory():
    """--workers N: each worker process builds its app from the flags the first process put in SERVE_SETTINGS."""
    args = parse_args(json.loads(os.environ[SETTINGS_ENV]))
    return create_app(load_predictor(args), settings_from(args))


def listening_socket(host, port):
    """The socket the server listens on, bound before the start-up line is printed, so that the line names the
    port it got (--port 0: a free one the system picks) and a port in use is one line, not a log record."""
    import socket

    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    if os.name != "nt":  # a restart may reuse the port at once; on Windows this option would let a second
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # server take a port that is in use
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        raise CLIError(
            f"cannot listen on {host} port {port}: {e.strerror or e}; choose another --port (0: a free one)"
        ) from None
    sock.listen(2048)  # connections wait from now on, while the model and the workers start
    sock.set_inheritable(True)  # --workers: the worker processes accept on it
    return sock


def local_url(host, port):
    """The address to open for a server on `host`: every interface is reached at the loopback one, and an IPv6
    address goes in brackets (http://[::1]:8000)."""
    host = {"0.0.0.0": "127.0.0.1", "::": "::1", "": "127.0.0.1"}.get(host, host)
    return f"http://{f'[{host}]' if ':' in host else host}:{port}"


def main(args):
    settings = settings_from(args)
    key = " (API key required)" if settings.api_key else ""
    predictor = load_predictor(args)  # fails here, in one line, before the port is taken or any worker starts
    sock = listening_socket(args.host, args.port)
    where = local_url(args.host, sock.getsockname()[1])
    try:
        if args.workers > 1:
            os.environ[SETTINGS_ENV] = json.dumps(sys.argv[1:])
            print(
                f"serving {args.model_fn} ({predictor.ckpt['model_name']}) with {args.workers} processes on "
                f"{where}{key}; Ctrl-C to stop",
                flush=True,
            )
            del predictor
            serve_until_stopped(None, sock, args.workers)
            return
        app = create_app(predictor, settings)
        print(
            f"serving {args.model_fn} ({predictor.ckpt['model_name']}, {len(predictor.class_names)} classes) on "
            f"{where}{key}; Ctrl-C to stop",
            flush=True,
        )
        serve_until_stopped(app, sock)
    finally:
        sock.close()


def serve_until_stopped(app, sock, workers=None):
    """uvicorn on the bound socket until Ctrl-C or SIGTERM: it stops taking requests, answers those in flight,
    and returns; exit 0. (uvicorn re-raises the signal it caught once it is done: a StopFlag takes it instead of
    the quiet exit handler, which would end the process with 130 or 143 after a clean stop.)"""
    import inspect

    import uvicorn
    from uvicorn.supervisors import Multiprocess

    stop = StopFlag().install()
    try:
        options = dict(log_level="warning", timeout_graceful_shutdown=10)
        if workers:
            config = uvicorn.Config("serve:app_factory", factory=True, workers=workers, **options)
            older = "target" in inspect.signature(Multiprocess).parameters  # older uvicorn: the worker target too
            Multiprocess(config, sockets=[sock], **({"target": uvicorn.Server(config).run} if older else {})).run()
        else:
            server = uvicorn.Server(uvicorn.Config(app, **options))
            server.run(sockets=[sock])
            if not server.started and not stop.requested:  # uvicorn logged why (the app's start-up failed)
                raise CLIError("the server did not start (uvicorn's message above says why)")
    finally:
        stop.restore()
    print("stopped" + (f" ({signal_name(stop.signum)})" if stop.signum else ""), flush=True)


def signal_name(signum):
    import signal

    return signal.Signals(signum).name


if __name__ == "__main__":
    run_cli(lambda: main(parse_args()))
