"""Models written by export.py, read back: the metadata an exported file carries (the class names, the eval
preprocessing, the calibration, the out-of-distribution threshold, the task's entries) as the checkpoint keys
predict.py reads, and onnxruntime running an ONNX export behind the call a PyTorch model takes."""

import json
from pathlib import Path

import torch
import torchvision

import tasks
from cli import CLIError

EXPORT_FORMAT_VERSION = 1
# What a consumer of an exported model reads (ONNX metadata_props; torch.export extra files), all strings:
# JSON lists for class_names, mean and std; numbers as text; args is the training flags as JSON.
EXPORT_KEYS = (
    "format_version",
    "model_name",
    "class_names",
    "input_size",
    "resize_size",
    "mean",
    "std",
    "temperature",
    "torch_version",
    "torchvision_version",
    "args",
)
EXPORTED_SUFFIXES = (".onnx",)  # what predict.py runs with onnxruntime instead of loading a checkpoint


def export_metadata(ckpt):
    """The checkpoint's class names and eval preprocessing (resize the short side to resize_size with
    bilinear antialiasing, center crop input_size, normalize), as the strings an exported model carries."""
    temperature = ckpt.get("temperature")
    return {
        "format_version": str(EXPORT_FORMAT_VERSION),
        "model_name": str(ckpt["model_name"]),
        "class_names": json.dumps(list(ckpt["class_names"])),
        "input_size": str(int(ckpt["input_size"])),
        "resize_size": str(int(ckpt["resize_size"])),
        "mean": json.dumps([float(m) for m in ckpt["mean"]]),
        "std": json.dumps([float(s) for s in ckpt["std"]]),
        "temperature": repr(float(1.0 if temperature is None else temperature)),  # logits / T before softmax
        "torch_version": str(torch.__version__),  # of the export
        "torchvision_version": str(torchvision.__version__),
        "args": json.dumps(ckpt.get("args", {})),  # data_dir, dataset_name: predict.py's default inputs
        "metrics": json.dumps(ckpt.get("metrics", {})),  # validation, calibration and test figures (optional)
        **ood_metadata(ckpt.get("ood")),
        **tasks.for_checkpoint(ckpt).export_metadata(ckpt),
    }


def ood_metadata(reference):
    """With an out-of-distribution reference (ood.py), the graph's second output ood_score is read with
    ood_method and ood_threshold (in_distribution = ood_score <= threshold; empty: none was fitted)."""
    if not reference:
        return {}
    threshold = reference.get("threshold")
    return {
        "ood_method": str(reference["method"]),
        "ood_threshold": "" if threshold is None else repr(float(threshold)),
    }


def checkpoint_from_metadata(meta, path):
    """Exported metadata (strings) -> the checkpoint keys predict.py reads; a CLIError when any is missing."""
    missing = [k for k in EXPORT_KEYS if k not in meta]
    if missing:
        raise CLIError(f"{str(path)!r} was not written by export.py: its metadata lacks {', '.join(missing)}")
    try:
        if int(meta["format_version"]) > EXPORT_FORMAT_VERSION:
            raise CLIError(
                f"{str(path)!r} has export format {meta['format_version']}; this version reads up to "
                f"{EXPORT_FORMAT_VERSION}"
            )
        return {
            "format_version": int(meta["format_version"]),
            "model_name": meta["model_name"],
            "class_names": json.loads(meta["class_names"]),
            "input_size": int(meta["input_size"]),
            "resize_size": int(meta["resize_size"]),
            "mean": json.loads(meta["mean"]),
            "std": json.loads(meta["std"]),
            "temperature": float(meta["temperature"]),
            "args": json.loads(meta["args"]),
            "metrics": json.loads(meta.get("metrics") or "{}"),
            **({"int8": json.loads(meta["int8"])} if meta.get("int8") else {}),  # export.py --int8's gate figures
            "torch_version": meta["torch_version"],
            "torchvision_version": meta["torchvision_version"],
            **(
                {
                    "ood": {
                        "method": meta["ood_method"],
                        "threshold": float(meta["ood_threshold"]) if meta.get("ood_threshold") else None,
                    }
                }
                if "ood_method" in meta
                else {}
            ),
            **tasks.for_metadata(meta).entries_from_metadata(meta),
        }
    except (ValueError, TypeError) as e:
        raise CLIError(f"{str(path)!r} has unreadable export metadata ({e})") from None


def is_exported(path):
    return Path(path).suffix.lower() in EXPORTED_SUFFIXES


def onnx_session(model, providers=("CPUExecutionProvider",)):
    """An onnxruntime session of `model` (a path, or the bytes of a model) with as many threads as PyTorch's CPU
    ops."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = torch.get_num_threads()
    return ort.InferenceSession(model, options, providers=list(providers))


class OnnxModel:
    """An exported ONNX model behind the call predict.py makes: float32 image batch (N, 3, H, W) -> logits,
    or (logits, ood_score) when the graph has that second output, as torch tensors on the CPU. onnxruntime
    runs it on the CPU, or on CUDA's provider after .to(cuda)."""

    def __init__(self, path, device=torch.device("cpu")):
        import onnxruntime as ort

        self.path, self.device = Path(path), torch.device(device)
        providers = ["CPUExecutionProvider"]
        if self.device.type == "cuda":
            if "CUDAExecutionProvider" in ort.get_available_providers():
                providers.insert(0, ("CUDAExecutionProvider", {"device_id": self.device.index or 0}))
            else:
                print(
                    "onnxruntime: this installation has no CUDA provider (onnxruntime-gpu has it); running on the CPU"
                )
        try:
            self.session = onnx_session(str(self.path), providers)
        except Exception as e:  # onnxruntime's Fail / InvalidProtobuf / NoSuchFile ...
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise CLIError(f"{str(path)!r} is not an ONNX model onnxruntime can load ({first[:160]})") from None

    def metadata(self):
        return self.session.get_modelmeta().custom_metadata_map

    def to(self, device):
        device = torch.device(device)
        return (
            self
            if device.type == self.device.type and device.index == self.device.index
            else OnnxModel(self.path, device)
        )

    def __call__(self, images):
        batch = images.detach().to("cpu", torch.float32).contiguous().numpy()
        outputs = [torch.from_numpy(o) for o in self.session.run(None, {"input": batch})]
        return outputs[0] if len(outputs) == 1 else tuple(outputs)


def load_exported(path):
    """An ONNX file of export.py -> (checkpoint-like metadata, OnnxModel on the CPU)."""
    if not Path(path).is_file():
        raise CLIError(f"exported model {str(path)!r} does not exist")
    model = OnnxModel(path)
    names = ([i.name for i in model.session.get_inputs()], [o.name for o in model.session.get_outputs()])
    if names not in ((["input"], ["logits"]), (["input"], ["logits", "ood_score"])):
        raise CLIError(
            f"{str(path)!r} was not written by export.py: its inputs and outputs are {names}, "
            "not ['input'] and ['logits'] (and 'ood_score')"
        )
    ckpt = checkpoint_from_metadata(model.metadata(), path)
    if ("ood" in ckpt) != (len(names[1]) == 2):
        raise CLIError(f"{str(path)!r}: its ood_score output and its ood_method metadata do not come together")
    return ckpt, model
