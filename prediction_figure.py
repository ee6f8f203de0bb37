"""predict.py's figures: the sample predictions (--plot), titled with the prediction and its confidence (red when
wrong, orange when no class is decided, purple when unlike the training images), and --explain's overlay of each
image's heat map."""

import data_loader
import explain
from utils import save_image_grid

TITLE_WIDTH = 32  # characters per line of a title in the figure (a 2.4-inch cell at 9 pt); longer lines wrap


def describe_row(label, pred, probs, unlike, class_names, unknown_label, task):
    """(title, colour) of a prediction in the figure and the --explain overlays: the task's title (the prediction
    and its confidence, the truth when the label says otherwise); red when wrong; orange for rows deciding no
    class ('unknown', with the best class named); 'unlike training' and purple for out-of-distribution rows."""
    title, wrong = task.title(label, pred, probs, class_names, unknown_label)
    color = "purple" if unlike else "darkorange" if wrong is None else "red" if wrong else "black"
    return title + ("\nunlike training" if unlike else ""), color


def wrap_title(title, width=TITLE_WIDTH):
    """Each line of a title broken after its commas so that no line is longer than width characters (a single
    longer item keeps a line of its own)."""
    lines = []
    for line in title.split("\n"):
        current = ""
        for item in line.split(", "):
            if current and len(current) + len(item) + 3 > width:  # ", " and the comma that may end the line
                lines.append(current + ",")
                current = item
            else:
                current = f"{current}, {item}" if current else item
        lines.append(current)
    return "\n".join(lines)


def figure_title(label, pred, probs, unlike, class_names, unknown_label, task, heat=None):
    """(title, colour) of an image in the --plot figure: describe_row's, wrapped to the cell's width; with its
    --explain map `heat`, a last line when the map is empty (explain.evidence_title)."""
    title, color = describe_row(label, pred, probs, unlike, class_names, unknown_label, task)
    return wrap_title(title if heat is None else explain.evidence_title(title, heat)), color


def explain_row(explained, sample, cam, pred, probs, unlike, class_names, ckpt, args, task):
    """The image's heat map at its own size into heatmaps.npz and its overlay PNG; returns the PNG's path (the
    heatmap column)."""
    file, label = sample
    try:
        image = data_loader.load_rgb(file)  # read again: its own size, and the overlay's pixels
    except Exception:  # changed or gone since the loader read it: the row stays, without a map
        return ""
    heat = explain.full_size_map(cam, image.width, image.height, ckpt["input_size"], ckpt["resize_size"])
    title, color = describe_row(label, pred, probs, unlike, class_names, args.unknown_label, task)
    return str(explained.add(file, image, heat, title.replace("\n", "; "), color))


def plot_predictions(samples, class_names, ckpt, path, show, unknown_label, task):
    """The images as the model saw them (resize + center crop), in real colours (with --explain, the heat map
    over them), titled as figure_title says."""
    show_tf = data_loader.Preprocess.of(ckpt).display()
    images, titles, colors = [], [], []
    for (file, label), pred, probs, unlike, heat in samples:
        image = show_tf(data_loader.load_rgb(file))
        images.append(image if heat is None else explain.blend(image, heat))  # the crop's map: --explain
        title, color = figure_title(label, pred, probs, unlike, class_names, unknown_label, task, heat)
        titles.append(title)
        colors.append(color)
    if not save_image_grid(images, titles, colors, path, show=show):
        print(f"--show: no window can open here (no display), so the figure was only saved: {path}")
