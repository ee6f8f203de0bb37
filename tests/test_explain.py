"""Why the model decided (explain.py): Grad-CAM against a hand computation and an independent implementation,
the maps put back on the image, predict.py --explain end to end, and train.py's top losses."""

import shutil

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

import data_loader
import explain
import model_loader
import predict
import prediction_figure
import train
from conftest import copy_subset, run_in_process
from helpers import read_csv, run_predict, scalar_tags

# ----------------------------------------------------------------------------- the math


class TinyNet(nn.Module):
    """conv -> relu -> global average pool -> linear: Grad-CAM of class k is relu(sum_c w[k, c] A_c), scaled."""

    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU())
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(4, 3)

    def forward(self, x):
        return self.fc(self.pool(self.features(x)).flatten(1))


def test_gradcam_is_the_class_weighted_sum_of_the_last_feature_maps():
    torch.manual_seed(0)
    net = TinyNet().eval().requires_grad_(False)
    images = torch.randn(2, 3, 5, 6)
    layer, tokens = explain.target_layer(net, "fc", 5, torch.device("cpu"))
    assert layer is net.features and not tokens
    cam = explain.GradCAM(layer)
    with torch.no_grad():
        logits = cam.forward(net, images)
        classes = torch.tensor([2, 0])  # not necessarily the best class: the map follows the class asked for
        maps = cam.maps(logits, classes)
    feats = net.features(images)
    for i, k in enumerate(classes.tolist()):
        hand = torch.einsum("c,chw->hw", net.fc.weight[k], feats[i]).relu()
        hand = hand / hand.max()
        assert maps[i].shape == (5, 6) and torch.allclose(maps[i], hand, atol=1e-5)
    other = torch.einsum("c,chw->hw", net.fc.weight[1], feats[0]).relu()
    assert not torch.allclose(maps[0], other / other.max(), atol=1e-2)


def test_the_mirror_views_of_tta_do_not_change_the_original_views_map():
    torch.manual_seed(0)
    net = TinyNet().eval().requires_grad_(False)
    images = torch.randn(3, 3, 8, 8)
    cam = explain.GradCAM(explain.target_layer(net, "fc", 8, torch.device("cpu"))[0])
    with torch.no_grad():
        alone = cam.maps(cam.forward(net, images), torch.tensor([0, 1, 2]))
        both = cam.maps(cam.forward(net, torch.cat([images, images.flip(-1)])), torch.tensor([0, 1, 2]))
    assert torch.allclose(alone, both, atol=1e-6)


@pytest.mark.parametrize(
    "name, layer, tokens",
    [
        ("resnet18", "layer4", False),
        ("efficientnet_lite0", "features", False),
        ("densenet121", "features", False),
        ("squeezenet1_0", "classifier.0", False),
        ("vit_b_16", "encoder.layers.encoder_layer_11.ln_1", True),
    ],
)
def test_the_explained_layer_is_the_last_feature_map_before_the_classifier(name, layer, tokens):
    torch.manual_seed(0)
    model, head = model_loader.build_model(name, 3, log=lambda *a: None)
    nn.init.normal_(model.get_submodule(head).weight, std=0.1)  # vit's new head starts at zero: no gradient
    size = 64 if name != "vit_b_16" else 224
    model = model_loader.optimize_for_inference(model, model_loader.is_convolutional(model), keep_modules=True)
    found, is_tokens = explain.target_layer(model.requires_grad_(False), head, size, torch.device("cpu"))
    assert found is model.get_submodule(layer) and is_tokens == tokens
    cam = explain.GradCAM(found, is_tokens)
    with torch.no_grad():
        logits = cam.forward(model, torch.randn(2, 3, size, size))
        maps = cam.maps(logits, logits.argmax(1))
    assert maps.min() >= 0 and torch.allclose(maps.flatten(1).max(1).values, torch.ones(2))


def test_the_map_goes_back_onto_the_image_where_the_center_crop_took_it():
    """A bright dot in a 90 x 50 image, through the eval transform (short side to 40, center crop 32): a map
    that is hot where the dot landed in the crop comes back hot at the dot, 0 outside the crop."""
    image = np.zeros((50, 90, 3), np.uint8)
    image[20:24, 52:56] = 255
    tf = data_loader.display_transform(32, 40)
    seen = np.asarray(tf(Image.fromarray(image)).convert("L"), np.float32)
    cam = torch.from_numpy(seen / seen.max())
    full = explain.full_size_map(cam, 90, 50, 32, 40)
    assert full.shape == (50, 90) and full.dtype == np.float32 and full.min() >= 0 and full.max() <= 1
    y, x = np.unravel_index(full.argmax(), full.shape)
    assert 19 <= y <= 24 and 51 <= x <= 56
    left, _, side = explain.crop_box(90, 50, 32, 40)
    assert full[:, : int(left) - 1].max() == 0 and full[:, int(left + side) + 1 :].max() == 0


def test_maps_fit_every_image_size_even_where_the_crop_box_rounds_unevenly():
    """500 x 375 (Oxford Pets, VOC) at 224/256 puts the crop's edges at .5 pixels."""
    cam = torch.rand(7, 7)
    for width, height in [(500, 375), (375, 500), (333, 501), (1000, 999), (224, 224), (100, 1300)]:
        for input_size, resize_size in [(224, 256), (224, 224), (64, 73), (224, 200)]:
            full = explain.full_size_map(cam, width, height, input_size, resize_size)
            assert full.shape == (height, width) and 0.5 < full.max() <= 1


def test_an_overlay_never_replaces_an_input_image(tmp_path):
    (tmp_path / "cat.png").write_bytes(b"")
    exp = explain.Explanations(tmp_path, [tmp_path / "cat.png", tmp_path / "sub" / "dog.png"])
    assert exp.png_name(tmp_path / "cat.png").name == "cat_2.png"
    assert exp.png_name(tmp_path / "sub" / "dog.png").name == "dog.png"
    assert exp.png_name(tmp_path / "other" / "dog.jpg").name == "dog_2.png"


def test_an_empty_map_is_titled_no_evidence_and_counted(tmp_path):
    assert explain.is_empty(np.zeros((5, 7), np.float32)) and not explain.is_empty(np.eye(5, dtype=np.float32))
    assert explain.evidence_title("bag (0.91)", torch.zeros(3, 3)) == "bag (0.91)\n(no evidence: empty map)"
    assert explain.evidence_title("bag (0.91)", torch.eye(3)) == "bag (0.91)"
    image = Image.new("RGB", (40, 30), "white")
    with explain.Explanations(tmp_path) as exp:
        some = exp.add("a.png", image, np.eye(30, 40, dtype=np.float32), "bag (0.91)", "black")
        none = exp.add("b.png", image, np.zeros((30, 40), np.float32), "bag (0.91)", "black")
    assert (exp.count, exp.empty) == (2, 1)
    with Image.open(some) as a, Image.open(none) as b:
        assert b.height == a.height + 20  # one more title line over the flat tint
        title_strip = np.asarray(b.convert("RGB"))[20:46]  # the second line: the note, drawn in black
        assert (title_strip.sum(-1) < 200).sum() > 100


# ----------------------------------------------------------------------------- end to end


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A frozen ImageNet backbone (EfficientNet-Lite0) with a head on 3 classes, and its run folder."""
    root = tmp_path_factory.mktemp("explain")
    data = copy_subset(root / "data", ["bag", "sneaker", "trouser"], 30, 6)
    train.main(
        train.parse_args(
            [
                str(a)
                for a in (
                    "--data_dir",
                    data,
                    "--model_name",
                    "efficientnet_lite0",
                    "--use_pretrained",
                    "--input_size",
                    "64",
                    "--n_epochs",
                    "3",
                    "--freeze",
                    "--num_workers",
                    "0",
                    "--model_fn",
                    root / "m.pth",
                    "--log_dir",
                    root / "run",
                    "--verbose",
                    "0",
                )
            ]
        )
    )
    return root, data


def independent_gradcam(ckpt_path, files, classes):
    """Grad-CAM written out with a plain backward pass through the unoptimized checkpoint model, on the
    last block of efficientnet's features; (n, h, w) maps of the given classes."""
    ckpt = model_loader.load_checkpoint(ckpt_path)
    model, _ = model_loader.model_from_checkpoint(ckpt, ckpt_path)
    model.eval()
    tf = data_loader.build_transforms(ckpt["input_size"], ckpt["resize_size"], ckpt["mean"], ckpt["std"], train=False)
    x = torch.stack([tf(data_loader.load_rgb(f)) for f in files])
    kept = []
    model.features.register_forward_hook(lambda m, i, out: kept.append(out) or out.retain_grad())
    logits = model(x)
    logits[torch.arange(len(files)), torch.tensor(classes)].sum().backward()
    a, g = kept[0], kept[0].grad
    cam = (g.mean((2, 3), keepdim=True) * a).sum(1).relu().detach()
    peak = cam.amax((1, 2), keepdim=True)
    return cam / torch.where(peak > 0, peak, 1.0)  # a map that is 0 everywhere stays 0


def test_predict_explain_writes_a_map_per_image_at_its_size_and_an_overlay(trained, tmp_path, capsys):
    root, data = trained
    inputs = tmp_path / "in"
    shutil.copytree(data / "test", inputs)
    twin = inputs / "other" / sorted((inputs / "bag").iterdir())[0].name  # the same stem in another folder
    twin.parent.mkdir()
    Image.open(sorted((inputs / "sneaker").iterdir())[0]).resize((70, 40)).save(twin)  # not square, not 28 px
    (inputs / "bag" / "broken.png").write_bytes(b"not an image")
    out = tmp_path / "r.csv"
    printed = run_predict(
        capsys,
        "--model_fn",
        root / "m.pth",
        "--data_dir",
        inputs,
        "--output",
        out,
        "--plot",
        tmp_path / "p.png",
        "--explain",
        tmp_path / "cams",
    )
    rows = read_csv(out)
    good = [r for r in rows if not r["error"]]
    assert len(good) == 19 and f"{len(good)} overlays" in printed
    maps = np.load(tmp_path / "cams" / "heatmaps.npz")
    assert sorted(maps.files) == sorted(r["file_dir"] for r in good)
    for r in good:
        heat = maps[r["file_dir"]]
        with Image.open(r["file_dir"]) as img:
            assert heat.shape == (img.height, img.width) and heat.dtype == np.float32
        assert heat.min() >= 0 and heat.max() <= 1
    assert [r["heatmap"] for r in rows if r["error"]] == [""]
    pngs = [r["heatmap"] for r in good]
    assert len(set(pngs)) == len(pngs) and all(p.startswith(str(tmp_path / "cams")) for p in pngs)
    with Image.open(pngs[0]) as overlay:
        assert overlay.width == explain.OVERLAY_SIDE and len(set(overlay.getdata())) > 50
    # the maps are Grad-CAM of the predicted class, as a plain backward pass computes it
    ckpt = model_loader.load_checkpoint(root / "m.pth")
    square = [r for r in good if r["file_dir"] != str(twin)]
    classes = [ckpt["class_names"].index(r["predict"]) for r in square]
    hand = independent_gradcam(root / "m.pth", [r["file_dir"] for r in square], classes)
    for r, cam in zip(square, hand):
        expected = explain.full_size_map(cam, 28, 28, ckpt["input_size"], ckpt["resize_size"])
        assert np.abs(maps[r["file_dir"]] - expected).max() < 0.02, r["file_dir"]


def test_explain_with_tta_maps_the_original_view(trained, tmp_path, capsys):
    root, data = trained
    for name, extra in (("plain", []), ("tta", ["--tta"])):
        run_predict(
            capsys,
            "--model_fn",
            root / "m.pth",
            "--data_dir",
            data / "test",
            "--output",
            tmp_path / f"{name}.csv",
            "--n_images",
            "0",
            "--explain",
            tmp_path / name,
            *extra,
        )
    plain, tta = np.load(tmp_path / "plain" / "heatmaps.npz"), np.load(tmp_path / "tta" / "heatmaps.npz")
    same_class = [
        a["file_dir"]
        for a, b in zip(read_csv(tmp_path / "plain.csv"), read_csv(tmp_path / "tta.csv"))
        if a["predict"] == b["predict"]
    ]
    assert len(same_class) >= 12
    for f in same_class:
        assert np.abs(plain[f] - tta[f]).max() < 1e-4


def test_explain_refuses_a_file_and_an_onnx_model_in_one_line(trained, tmp_path, capsys):
    root, data = trained
    a_file = tmp_path / "taken"
    a_file.write_text("x")
    err = run_in_process(
        predict,
        [
            "--model_fn",
            root / "m.pth",
            "--data_dir",
            data / "test",
            "--output",
            tmp_path / "r.csv",
            "--explain",
            a_file,
        ],
        capsys,
    )
    assert "is a file" in err and not (tmp_path / "r.csv").exists()
    (tmp_path / "m.onnx").write_bytes(b"")
    err = run_in_process(predict, ["--model_fn", tmp_path / "m.onnx", "--explain", tmp_path / "cams"], capsys)
    assert "needs the checkpoint" in err and not (tmp_path / "cams").exists()


def test_explain_refuses_a_folder_among_the_input_images(trained, tmp_path, capsys):
    """Overlays beside the images would be predicted as images by the next run: --explain into the folder read
    (or any folder under it), or into a folder holding input images, is one error line before any work."""
    root, data = trained
    images = tmp_path / "images"
    shutil.copytree(data / "test" / "bag", images / "bag")
    photo = sorted((images / "bag").iterdir())[0]
    labels = tmp_path / "labels.csv"
    labels.write_text(f"file,label\n{photo},bag\n")
    before = sorted(tmp_path.rglob("*"))
    out = ["--model_fn", root / "m.pth", "--output", tmp_path / "r.csv", "--plot", tmp_path / "p.png"]
    for argv, message in (
        (["--data_dir", images, "--explain", images], f"is inside {str(images)!r}, where the images are read"),
        (["--data_dir", images, "--explain", images / "bag" / "cams"], "where the images are read from"),
        (["--data_dir", photo, "--explain", images / "bag"], "holds input images"),  # one image: its folder
        (["--labels_csv", labels, "--explain", photo.parent], "holds input images"),
        (["--explain", data / "test" / "cams"], "where the images are read from"),
    ):  # the training test/
        err = run_in_process(predict, out + argv, capsys)
        assert err.startswith(f"error: --explain {str(argv[-1])!r}") and message in err, err
    assert sorted(tmp_path.rglob("*")) == before and not (data / "test" / "cams").exists()  # nothing made
    run_predict(capsys, *out, "--data_dir", images, "--explain", tmp_path / "cams")  # beside it is fine
    assert len(list((tmp_path / "cams").glob("*.png"))) == 6


def test_ctrl_c_during_explain_exits_130_and_says_what_was_kept(trained, tmp_path, capsys, monkeypatch):
    """A real SIGINT in the first batch: status 130 as train.py's, no result.csv or heatmaps.npz written, an
    earlier result.csv kept as it was (said only when there was one), and no loader worker left running (they
    ignore SIGTERM: one left behind would hold up the interpreter's exit forever)."""
    import multiprocessing

    from cli import end_child_processes, run_cli
    from helpers import interrupt_when_called

    root, data = trained
    interrupt_when_called(monkeypatch, predict, "explain_row")
    out = tmp_path / "r.csv"
    argv = [
        "--model_fn",
        root / "m.pth",
        "--data_dir",
        data / "test",
        "--output",
        out,
        "--plot",
        tmp_path / "p.png",
        "--explain",
        tmp_path / "cams",
        "--batch_size",
        "4",
        "--num_workers",
        "1",
        "--verbose",
        "0",
    ]
    for earlier in (None, "earlier results\n"):
        if earlier:
            out.write_text(earlier)
        with pytest.raises(SystemExit) as e:
            run_cli(lambda: predict.main(predict.parse_args([str(a) for a in argv])))
        err = capsys.readouterr().err
        assert e.value.code == 130, err
        assert err == f"interrupted after 4 images; {out} was not {'changed' if earlier else 'written'}\n"
        assert (out.read_text() if earlier else out.exists()) == (earlier or False)
        assert not (tmp_path / "cams" / "heatmaps.npz").exists() and not (tmp_path / "p.png").exists()
        left = multiprocessing.active_children()
        end_child_processes(restore=True)  # ended here, so that a failure does not hang the test run too
        assert left == []


def test_train_writes_the_validation_images_by_loss_with_the_calibrated_probability(trained):
    root, _ = trained
    run = root / "run"
    rows = read_csv(run / "top_losses.csv")
    valid = read_csv(run / "valid_files.csv")
    assert sorted(r["file"] for r in rows) == sorted(r["path"] for r in valid)
    losses = [float(r["loss"]) for r in rows]
    assert losses == sorted(losses, reverse=True)
    ckpt = model_loader.load_checkpoint(root / "m.pth")
    model, _ = model_loader.model_from_checkpoint(ckpt, root / "m.pth")
    tf = data_loader.build_transforms(ckpt["input_size"], ckpt["resize_size"], ckpt["mean"], ckpt["std"], train=False)
    with torch.no_grad():
        logits = model.eval()(torch.stack([tf(data_loader.load_rgb(r["file"])) for r in rows]))
    probs = (logits / ckpt["temperature"]).softmax(1)
    names = ckpt["class_names"]
    for r, p in zip(rows, probs):
        given = names.index(r["given"])
        assert r["predicted"] == names[int(p.argmax())]
        assert float(r["prob_given"]) == pytest.approx(float(p[given]), abs=2e-3)
        assert float(r["loss"]) == pytest.approx(-float(p[given].log()), abs=5e-3)
    assert (run / "top_losses.png").stat().st_size > 10_000
    assert "Validation/Top losses" in scalar_tags(run).Tags()["images"]


def test_predict_counts_and_titles_the_empty_maps(tiny_data, tmp_path, capsys, monkeypatch):
    """A resnet18 with its classifier's weights zeroed: every logit is a constant, so every map is empty."""
    import utils

    train.main(
        train.parse_args(
            [
                str(a)
                for a in (
                    "--data_dir",
                    tiny_data,
                    "--model_name",
                    "resnet18",
                    "--input_size",
                    "32",
                    "--n_epochs",
                    "1",
                    "--num_workers",
                    "0",
                    "--model_fn",
                    tmp_path / "m.pth",
                    "--log_dir",
                    tmp_path / "run",
                    "--verbose",
                    "0",
                )
            ]
        )
    )
    ckpt = torch.load(tmp_path / "m.pth", weights_only=True)
    ckpt["state_dict"]["fc.weight"].zero_()
    torch.save(ckpt, tmp_path / "flat.pth")
    drawn = []
    monkeypatch.setattr(
        prediction_figure,
        "save_image_grid",
        lambda images, titles, colors, path, show: (
            drawn.append(titles) or utils.save_image_grid(images, titles, colors, path, show)
        ),
    )
    for name in ("m", "flat"):
        capsys.readouterr()
        printed = run_predict(
            capsys,
            "--model_fn",
            tmp_path / f"{name}.pth",
            "--data_dir",
            tiny_data / "test",
            "--output",
            tmp_path / f"{name}.csv",
            "--plot",
            tmp_path / f"{name}.png",
            "--explain",
            tmp_path / name,
        )
        maps = np.load(tmp_path / name / "heatmaps.npz")
        empty = sum(not maps[k].any() for k in maps.files)
        assert len(maps.files) == 18 and (empty == 18 if name == "flat" else empty < 18)
        assert (
            f"18 overlays ({empty} with an empty map: no evidence for the class) -> " in printed
            if empty
            else "18 overlays -> " in printed
        ), printed
        noted = sum(t.endswith("\n(no evidence: empty map)") for t in drawn[-1])  # the --plot figure's titles
        assert len(drawn[-1]) == 6 and (noted == 6 if name == "flat" else noted <= empty), drawn[-1]


def test_top_losses_figure_titles_say_the_number_is_the_probability_of_the_given_label(
    tiny_data, tmp_path, monkeypatch
):
    import tasks

    drawn = []
    real = explain.image_grid_figure
    monkeypatch.setattr(
        explain,
        "image_grid_figure",
        lambda images, titles, *a, **k: drawn.append(titles) or real(images, titles, *a, **k),
    )
    files = [str(f) for f in sorted((tiny_data / "test" / "bag").glob("*.png"))[:2]]
    logits = torch.tensor([[2.0, 0.0, 0.0], [0.0, 3.0, 0.0]])
    meta = {"input_size": 28, "resize_size": 28}
    explain.write_top_losses(
        files, logits, torch.tensor([0, 0]), None, ["bag", "sneaker", "trouser"], meta, tmp_path, tasks.SingleLabel()
    )
    p_bag = float(torch.softmax(logits[1], 0)[0])
    assert drawn[0][0] == f"bag → sneaker\np(given) {p_bag:.2f}"  # the highest loss first
