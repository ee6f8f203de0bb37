"""Why the model decided: Grad-CAM heat maps (Selvaraju et al. 2017) for predict.py --explain, and the
validation images with the highest loss (train.py's top_losses.png and top_losses.csv).

Grad-CAM weighs the feature maps of the backbone's last convolutional block by the gradient of the
predicted class's logit, averaged over each map: relu(sum_c mean(dy/dA_c) * A_c), scaled to [0, 1]. Only
the layers after that block are differentiated: the hook below turns the block's output into a new leaf
of the autograd graph, and with the weights not requiring gradients nothing below it is recorded, so a
batch costs one forward pass plus a backward pass through the head."""

import csv
import zipfile
from contextlib import ExitStack
from pathlib import Path

import numpy as np
import torch
from torch.nn import functional as F

from cli import CLIError
from data_loader import Preprocess, load_rgb
from run_paths import input_names_in
from utils import atomic_open, atomic_path, atomic_savefig, image_grid_figure

OVERLAY_SIDE = 384  # long side of the overlay PNGs, in pixels
ALPHA = 0.45  # weight of the heat map's colours over the image
NO_EVIDENCE = "(no evidence: empty map)"  # the title's last line over an all-zero map


# ----------------------------------------------------------------------------- the layer


def target_layer(model, head, input_size, device):
    """(module, tokens) whose output Grad-CAM weighs: the last module to finish, outside the classifier
    `head`, whose output is a feature map (N, C, h, w) with h * w > 1; for a vision transformer (no such map
    after its patch embedding) the input norm of the last encoder block, whose patch tokens form the map
    (tokens=True; after that block only the class token reaches the classifier). The model's blocks must run
    as modules (model_loader.optimize_for_inference(..., keep_modules=True)), not inlined by torch.fx."""
    if hasattr(model, "encoder") and hasattr(model, "conv_proj"):  # torchvision's VisionTransformer
        return model.encoder.layers[-1].ln_1, True
    order, reached = [], []  # feature maps in the order they finish; set once the classifier starts

    def keep(module, inputs, out):
        if not reached and torch.is_tensor(out) and out.dim() == 4 and out.shape[2] * out.shape[3] > 1:
            order.append(module)

    hooks = [m.register_forward_hook(keep) for name, m in model.named_modules() if name]
    hooks.append(model.get_submodule(head).register_forward_pre_hook(lambda m, i: reached.append(True)))
    try:
        was_training = model.training
        model.eval()
        with torch.no_grad():
            model(torch.zeros(1, 3, input_size, input_size, device=device))
        model.train(was_training)
    finally:
        for h in hooks:
            h.remove()
    if not order:
        raise CLIError(f"--explain: {type(model).__name__} has no convolutional feature map to explain")
    return order[-1], False


class GradCAM:
    """Attach to a model's target layer; `forward(model, images)` runs the model (or a wrapper of it, such as
    ood.ScoredModel) keeping that layer's output as a leaf of the graph, `maps(logits, classes)` turns the
    gradient of each row's class logit into its map. The model's weights must not require gradients."""

    def __init__(self, layer, tokens=False):
        self.tokens = tokens
        self.activation = None
        self.handle = layer.register_forward_hook(self._keep)

    def _keep(self, module, inputs, output):
        if not torch.is_grad_enabled():
            return None
        self.activation = output.detach().requires_grad_()
        return self.activation.clone()  # later in-place ops (densenet's relu_) change the clone, not the leaf

    def forward(self, model, images):
        with torch.enable_grad():
            return model(images)

    def maps(self, logits, classes):
        """(n, h, w) float32 maps in [0, 1] for the first n = len(classes) rows of the last forward (with
        test-time augmentation the batch holds the mirror images after them)."""
        n = len(classes)
        with torch.enable_grad():
            chosen = logits[:n].float().gather(1, classes.to(logits.device)[:, None]).sum()
            (grads,) = torch.autograd.grad(chosen, self.activation)
        a, g = self.activation[:n].float(), grads[:n].float()
        if self.tokens:  # (n, 1 + h*w, C): the class token out, the rest back to its grid
            side = int(round((a.shape[1] - 1) ** 0.5))
            a, g = (t[:, 1:].transpose(1, 2).reshape(n, -1, side, side) for t in (a, g))
        cam = (g.mean((2, 3), keepdim=True) * a).sum(1).relu()
        peak = cam.amax((1, 2), keepdim=True)
        peak = torch.where(peak > 0, peak, torch.ones_like(peak))  # an all-zero map stays zero
        self.activation = None
        return (cam / peak).detach()

    def remove(self):
        self.handle.remove()


# ----------------------------------------------------------------------------- maps back onto the image


def crop_box(width, height, input_size, resize_size):
    """(left, top, side) of the eval transform's center crop, in the original image's pixels: torchvision's
    Resize (short side to resize_size) then CenterCrop(input_size)."""
    scale = resize_size / min(width, height)
    new_w, new_h = (
        (resize_size, int(resize_size * height / width))
        if width <= height
        else (int(resize_size * width / height), resize_size)
    )
    left, top = int(round((new_w - input_size) / 2.0)), int(round((new_h - input_size) / 2.0))
    return left / scale, top / scale, input_size / scale


def full_size_map(cam, width, height, input_size, resize_size):
    """The (h, w) map of the center crop at the image's own height x width: the crop's area gets the map
    (bilinear), the margins the model never saw get 0."""
    left, top, side = crop_box(width, height, input_size, resize_size)
    x0, y0, x1, y1 = round(left), round(top), round(left + side), round(top + side)  # may reach past the image
    full = torch.zeros(height, width)
    if x1 > x0 and y1 > y0:
        inside = F.interpolate(cam[None, None].float(), size=(y1 - y0, x1 - x0), mode="bilinear", align_corners=False)[
            0, 0
        ]
        cx0, cy0, cx1, cy1 = max(0, x0), max(0, y0), min(width, x1), min(height, y1)
        if cx1 > cx0 and cy1 > cy0:
            full[cy0:cy1, cx0:cx1] = inside[cy0 - y0 : cy1 - y0, cx0 - x0 : cx1 - x0]
    return full.clamp(0, 1).numpy().astype(np.float32)


def is_empty(heat):
    """True for an all-zero map: no position of the feature map raised the class's logit (the relu left
    nothing), so its overlay is a flat tint that shows no evidence, not evidence everywhere."""
    return not bool((torch.as_tensor(heat) > 0).any())


def evidence_title(title, heat):
    """The title of an image drawn with its map: NO_EVIDENCE on a line of its own when the map is empty."""
    return f"{title}\n{NO_EVIDENCE}" if is_empty(heat) else title


def colorize(heat):
    """(h, w) in [0, 1] -> (h, w, 3) uint8 in matplotlib's 'jet' colours."""
    from matplotlib import colormaps

    return (colormaps["jet"](heat)[..., :3] * 255).astype(np.uint8)


def blend(image, heat):
    """An RGB PIL image with the heat map (any size, scaled to the image's) over it: (h, w, 3) uint8."""
    base = np.asarray(image, dtype=np.float32)
    heat = torch.as_tensor(heat, dtype=torch.float32)
    small = F.interpolate(heat[None, None], size=base.shape[:2], mode="bilinear", align_corners=False)[0, 0]
    mixed = (1 - ALPHA) * base + ALPHA * colorize(small.clamp(0, 1).numpy()).astype(np.float32)
    return mixed.clip(0, 255).astype(np.uint8)


def overlay(image, heat, title, color="black"):
    """The whole image scaled to OVERLAY_SIDE on its long side, the heat map blended over it, and a title
    strip above; a PIL image."""
    from PIL import Image, ImageDraw, ImageFont

    scale = OVERLAY_SIDE / max(image.size)
    size = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
    blended = blend(image.convert("RGB").resize(size, Image.BILINEAR), heat)
    try:
        font = ImageFont.load_default(size=16)  # Pillow 10.1+ with FreeType
    except (TypeError, ImportError, OSError):
        font = ImageFont.load_default()
    lines = title.count("\n") + 1
    canvas = Image.new("RGB", (size[0], size[1] + 20 * lines + 6), "white")
    canvas.paste(Image.fromarray(blended), (0, 20 * lines + 6))
    ImageDraw.Draw(canvas).multiline_text((4, 3), title, fill=color, font=font, spacing=2)
    return canvas


class Explanations:
    """Where predict.py --explain writes: one overlay PNG per image (unique names when stems repeat) and
    heatmaps.npz, written entry by entry into a temporary file that replaces heatmaps.npz when the block
    ends without an error (an interrupted run leaves the old one)."""

    def __init__(self, folder, inputs=()):
        self.folder = Path(folder)
        self.names = set()
        self.count = 0
        self.empty = 0  # of them all-zero maps (is_empty), titled NO_EVIDENCE
        # names of input images inside the folder: an overlay never replaces one
        self.taken = input_names_in(self.folder, inputs)

    def __enter__(self):
        self._stack = ExitStack()
        tmp = self._stack.enter_context(atomic_path(self.folder / "heatmaps.npz"))
        self._zip = self._stack.enter_context(zipfile.ZipFile(tmp, "w", allowZip64=True))
        return self

    def __exit__(self, *exc):
        return self._stack.__exit__(*exc)

    def png_name(self, file):
        stem, n = Path(file).stem, 1
        name = f"{stem}.png"
        while name in self.names or name in self.taken:
            n += 1
            name = f"{stem}_{n}.png"
        self.names.add(name)
        return self.folder / name

    def add(self, file, image, heat, title, color):
        """Writes the overlay (titled NO_EVIDENCE too when the map is empty) and the map (key: `file`); returns
        the overlay's path."""
        with self._zip.open(f"{file}.npy", "w", force_zip64=True) as f:
            np.lib.format.write_array(f, heat, allow_pickle=False)
        path = self.png_name(file)
        with atomic_open(path, "wb") as f:
            overlay(image, heat, evidence_title(title, heat), color).save(f, format="PNG", compress_level=1)
        self.count += 1
        self.empty += is_empty(heat)
        return path


# ----------------------------------------------------------------------------- top losses


def top_losses(logits, labels, task, calibration=None):
    """(order, loss, prob_given): rows by decreasing loss -log p(given label), with p calibrated (calibration
    None: T = 1): softmax(logits / temperature) for one label; for several, p(given set), the product over
    classes of the calibrated sigmoid of the present ones and 1 - it of the absent ones."""
    loss = (calibration or task.uncalibrated(logits.shape[1])).row_loss(logits, labels)
    return torch.argsort(loss, descending=True, stable=True), loss, loss.neg().exp()


def predicted_names(logits, labels, calibration, class_names, task):
    """Per row: (given, predicted) as text; multi-label: the sets above the calibration's thresholds, space-joined
    ('(none)' for no class), as label_issues.csv writes them."""
    return task.names_of_rows(labels, task.chosen(logits, calibration), class_names)


def write_top_losses(files, logits, labels, calibration, class_names, meta, run_dir, task, writer=None, step=0, n=16):
    """top_losses.csv (every validation image, highest loss first), top_losses.png (the n highest, titled
    'given → predicted', then 'p(given) 0.12': the calibrated probability of the given label) and the same grid
    in TensorBoard through `writer` (a SummaryWriter; the
    run's own, so the run keeps one event file); returns the CSV's path."""
    order, loss, prob_given = top_losses(logits, labels, task, calibration)
    names = predicted_names(logits, labels, calibration, class_names, task)
    run_dir = Path(run_dir)
    with atomic_open(run_dir / "top_losses.csv", "w", newline="") as f:
        table = csv.writer(f)
        table.writerow(["file", "given", "predicted", "loss", "prob_given"])
        for i in order.tolist():
            table.writerow([files[i], *names[i], f"{float(loss[i]):.6f}", f"{float(prob_given[i]):.6f}"])
    show = Preprocess.of(meta).display()
    images, titles, colors = [], [], []
    for i in order[:n].tolist():
        try:
            images.append(show(load_rgb(files[i])))
        except Exception:  # read once already; gone since
            continue
        arrow = "\n→ " if len(names[i][0]) + len(names[i][1]) > 24 else " → "  # long label sets: two lines
        titles.append(f"{names[i][0]}{arrow}{names[i][1]}\np(given) {float(prob_given[i]):.2f}")
        colors.append("red" if names[i][0] != names[i][1] else "black")
    if images:
        import matplotlib.pyplot as plt

        fig = image_grid_figure(images, titles, colors, ncols=4, fontsize=11)
        atomic_savefig(fig, run_dir / "top_losses.png", dpi=100)
        if writer is not None:
            writer.add_figure("Validation/Top losses", fig, step, close=False)
            writer.flush()
        plt.close(fig)
    return run_dir / "top_losses.csv"
