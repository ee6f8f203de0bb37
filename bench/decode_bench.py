"""Large-JPEG decoding for predict.py (a script, not a test): Pillow's draft mode, which predict.py uses, against
libjpeg-turbo's scaled decode with its fast options through simplejpeg (and PyTurboJPEG where the system's
libturbojpeg is installed), on the same 12-megapixel photos, one core. Prints each decoder's milliseconds per
image (the decode to the reduced scale alone, and with predict.py's eval transform), its decoding speed against
Pillow's draft mode, and
the top-1 agreement of EfficientNet-Lite0's ImageNet classifier with a full Pillow decode.

  pip install simplejpeg PyTurboJPEG scikit-image       # the decoders and the photos (not needed by the tool)
  python bench/decode_bench.py                          # 48 photos: about two minutes on 2 cores
  python bench/decode_bench.py --n_photos 200

The rule (#33): a decoder is adopted only if it decodes >= 1.3x faster than Pillow's draft mode with the agreement
unchanged; else the figures are recorded and Pillow is kept.
"""

import io
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402
from scale_bench import checkpoint, cpu_line, eval_model, grainy, photos, views  # noqa: E402

import data_loader as dl  # noqa: E402
import efficientnet_lite  # noqa: E402
import model_loader as ml  # noqa: E402
from cli import ArgumentParser  # noqa: E402


def parse_args(argv=None):
    p = ArgumentParser(description=__doc__)
    p.add_argument("--n_photos", type=int, default=48, help="12 MP JPEGs (4000x3000, quality 90)")
    p.add_argument("--work", default=None, help="folder for the photos (default: a new temporary one)")
    p.add_argument("--repeats", type=int, default=2, help="timed passes per decoder, in turns; the best counts")
    return p.parse_args(argv)


def make_photos(folder, n):
    folder.mkdir(parents=True, exist_ok=True)
    files = sorted(folder.glob("*.jpg"))
    if len(files) != n:
        rng = np.random.default_rng(0)
        for i, view in enumerate(views(photos(), n)):
            grainy(view, (4000, 3000), rng).save(folder / f"{i:03d}.jpg", quality=90)
        files = sorted(folder.glob("*.jpg"))
    return files


def decoders(side):
    """{name: bytes -> RGB PIL image decoded to a short side of at least `side` (full: the whole image)}."""

    def pillow(data, draft=True):
        img = Image.open(io.BytesIO(data))
        img.format = "JPEG"
        if draft:
            dl.draft_jpeg(img, side)
        img.load()
        return img.convert("RGB")

    found = {"Pillow, full decode": lambda data: pillow(data, draft=False), "Pillow, draft mode (today)": pillow}
    try:
        import simplejpeg

        def simple(data, fast=True):
            w, h = simplejpeg.decode_jpeg_header(data)[:2][::-1]  # (height, width, ...) -> (width, height)
            scale = side / min(w, h)
            array = simplejpeg.decode_jpeg(
                data,
                "RGB",
                fastdct=fast,
                fastupsample=fast,
                min_height=int(np.ceil(h * scale)),
                min_width=int(np.ceil(w * scale)),
            )
            return Image.fromarray(array)

        found["simplejpeg, scaled, fast DCT and upsampling"] = simple
        found["simplejpeg, scaled, accurate"] = lambda data: simple(data, fast=False)
    except ImportError:
        print("simplejpeg is not installed (pip install simplejpeg): not measured")
    try:
        from turbojpeg import TJFLAG_FASTDCT, TJFLAG_FASTUPSAMPLE, TJPF_RGB, TurboJPEG

        turbo = TurboJPEG()

        def pyturbo(data):
            w, h = turbo.decode_header(data)[:2]
            factor = max(
                (f for f in turbo.scaling_factors if min(w, h) * f[0] / f[1] >= side), key=lambda f: -f[0] / f[1]
            )
            array = turbo.decode(
                data, pixel_format=TJPF_RGB, scaling_factor=factor, flags=TJFLAG_FASTDCT | TJFLAG_FASTUPSAMPLE
            )
            return Image.fromarray(array)

        found["PyTurboJPEG, scaled, fast DCT and upsampling"] = pyturbo
    except (ImportError, RuntimeError, OSError) as e:
        print(f"PyTurboJPEG: not measured ({type(e).__name__}: {str(e)[:80]}; it needs the system's libturbojpeg)")
    return found


def main(args):
    work = Path(args.work or tempfile.mkdtemp(prefix="decode_bench_"))
    files = make_photos(work / "12mp", args.n_photos)
    blobs = [f.read_bytes() for f in files]
    state = efficientnet_lite.translate_state_dict(ml.load_pretrained_state(efficientnet_lite.NAME))
    ckpt_path = checkpoint(work / "lite0.pth", efficientnet_lite.NAME, [f"c{i}" for i in range(1000)], 224, state)
    _, model, pre = eval_model(ckpt_path)
    model = ml.optimize_for_inference(model, channels_last=True)
    tf, side = pre.transform(), pre.draft_side()
    found = decoders(side)
    torch.set_num_threads(1)
    print(
        f"machine: {cpu_line()}; {len(files)} JPEGs 4000x3000 q90 "
        f"({np.mean([len(b) for b in blobs]) / 1e6:.1f} MB each); decoded to a short side >= {side} px, then "
        f"predict.py's eval transform ({pre.resize_size} px, crop {pre.input_size}); one thread"
    )
    ms, decode_ms = dict.fromkeys(found, float("inf")), dict.fromkeys(found, float("inf"))
    tensors = {}
    for _ in range(args.repeats):  # in turns: a burst of load on this shared machine does not decide
        for name, decode in found.items():
            start = time.perf_counter()
            images = [decode(b) for b in blobs]
            decoded = time.perf_counter()
            tensors[name] = torch.stack([tf(img) for img in images])
            decode_ms[name] = min(decode_ms[name], (decoded - start) * 1000 / len(blobs))
            ms[name] = min(ms[name], (time.perf_counter() - start) * 1000 / len(blobs))
    with torch.inference_mode():
        top1 = {name: model(x.contiguous(memory_format=torch.channels_last)).argmax(1) for name, x in tensors.items()}
    full, today = top1["Pillow, full decode"], decode_ms["Pillow, draft mode (today)"]
    print(f"{'decoder':46s} {'decode ms':>9s} {'vs draft':>9s} {'+ transform':>12s} {'top-1 = full decode':>20s}")
    for name in found:
        same = int((top1[name] == full).sum())
        print(
            f"{name:46s} {decode_ms[name]:9.1f} {today / decode_ms[name]:8.2f}x {ms[name]:9.1f} ms "
            f"{same:>10d}/{len(files)}"
        )
    print(f"(photos in {work}; {os.cpu_count()} CPUs)")


if __name__ == "__main__":
    main(parse_args())
