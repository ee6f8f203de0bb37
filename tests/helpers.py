"""What several test files share: reading and writing small CSVs, running predict.py in process, TensorBoard's
scalars of a run, a repository script as a module, a real SIGINT at a chosen call, the README's commands, the
two-object multi-label sample. Fixtures live in conftest.py."""

import csv
import os
import re
import signal
from pathlib import Path
from types import SimpleNamespace

import predict

ROOT = Path(__file__).resolve().parent.parent


def read_csv(path):
    with open(path, encoding="utf-8-sig") as f:
        return list(csv.DictReader(f))


def write_csv(path, rows, header=("file", "label")):
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        writer.writerows(rows)
    return path


def run_predict(capsys, *argv):
    """`python predict.py ARGV` in this process (one worker process, quiet); returns what it printed."""
    predict.main(predict.parse_args([str(a) for a in argv] + ["--num_workers", "0", "--verbose", "0"]))
    return capsys.readouterr().out


def scalar_tags(run_dir):
    """The run folder's TensorBoard events, loaded."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run_dir))
    acc.Reload()
    return acc


def load_script(relative):
    """A script of this repository as a module (data/prepare.py, bench/bench.py are not packages)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(Path(relative).stem + "_script", ROOT / relative)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def interrupt_when_called(monkeypatch, module, name):
    """module.name sends a real SIGINT to this process each time it is called, then does its work."""
    real = getattr(module, name)

    def interrupted(*a, **k):
        os.kill(os.getpid(), signal.SIGINT)
        return real(*a, **k)

    monkeypatch.setattr(module, name, interrupted)


def readme_pages():
    """README.md, then each docs/ page (and bench/README.md) it links to, in the order of their first link."""
    text = (ROOT / "README.md").read_text()
    pages = dict.fromkeys(re.findall(r"\]\(((?:docs/[\w-]+|bench/README)\.md)\)", text))
    return [text] + [(ROOT / page).read_text() for page in pages]


def readme_commands():
    """Every command line of the ```bash blocks of the README and the pages it links, in order."""
    text = "\n".join(readme_pages())
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", text, re.S):
        for line in block.replace("\\\n", " ").splitlines():
            if line.strip() and not line.strip().startswith("#"):
                commands.append(line.strip())
    return commands


def readme_deploy_snippet():
    text = (ROOT / "docs" / "export.md").read_text()
    found = re.search(r"<!-- deploy\.py: tests/test_export\.py runs this block -->\n```python\n(.*?)```", text, re.S)
    assert found, "docs/export.md's deployment snippet (marker + python block) is missing"
    return found.group(1)


def tiny_pairs(out):
    """48 train, 24 valid, 16 test two-object images, and one blank image per split (an empty label cell)."""
    from PIL import Image

    prepare = load_script("data/prepare.py")
    prepare.pairs(
        SimpleNamespace(
            source=str(ROOT / "data" / "fashion_sample"),
            out=str(out),
            train=48,
            valid=24,
            test=16,
            valid_share=0.3,
            size=48,
            seed=0,
            overwrite=False,
        )
    )
    with open(out / "labels.csv", "a", newline="") as f:
        for i, split in enumerate(("train", "valid", "test")):
            blank = Image.new("L", (48, 48))
            blank.putpixel((i, 0), 9)  # three different files: the audit reports identical ones as leaks
            blank.save(out / "images" / f"blank_{split}.png")
            csv.writer(f).writerow([f"images/blank_{split}.png", "", split])
    return out / "labels.csv"


def readme_outputs():
    """{command: the lines the README shows as its output}: each ```text block after a
    '<!-- output of: COMMAND -->' marker."""
    text = (ROOT / "README.md").read_text()
    return {
        cmd.strip(): block.splitlines()
        for cmd, block in re.findall(r"<!-- output of: (.*?) -->\n```text\n(.*?)```", text, re.S)
    }


def line_shape(line):
    """A regex for lines like `line` from another run: its numbers (counts, losses, rates, seconds, the run
    folder's time stamp) may differ, its words may not."""
    pattern = re.escape(line)
    return re.sub(r"\d+(?:\\\.\d+)?(?:e[-+]\d+)?", r"[-+\\d.e]+", pattern)


def assert_shows(shown, output):
    """Every line the README shows (but '...') is a line of the real run's output, numbers aside."""
    lines = output.splitlines()
    for line in shown:
        if line.strip() == "...":
            continue
        shape = re.compile(line_shape(line))
        assert any(shape.fullmatch(real) for real in lines), f"the README shows a line no run prints:\n{line}"


def earlier_onnx(path):
    """A small, valid ONNX model at path (one Relu): an earlier build that a refused run must leave as it was.
    Returns its bytes."""
    import onnx
    from onnx import TensorProto, helper

    value = [helper.make_tensor_value_info(n, TensorProto.FLOAT, [1]) for n in "xy"]
    graph = helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "an earlier build", value[:1], value[1:])
    onnx.save(helper.make_model(graph), str(path))
    return Path(path).read_bytes()
