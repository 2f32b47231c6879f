"""One-time conversion of a third-party PyTorch pickle into safetensors.

deme_jax never unpickles a file itself; this goes through PyTorch's
``weights_only`` loader, which refuses anything but tensors and plain containers.
"""

from __future__ import annotations

from pathlib import Path


def convert_pickle_to_safetensors(src: str | Path, dst: str | Path) -> Path:
    """Reads a state dict from ``src`` (``.bin``/``.pt``/``.pth``) and writes it to ``dst`` as safetensors."""
    import torch  # optional dependency, only needed for this conversion
    from safetensors.torch import save_file

    src, dst = Path(src), Path(dst)
    if not src.is_file():
        raise FileNotFoundError(f"{src} does not exist.")
    try:
        state = torch.load(src, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises UnpicklingError, RuntimeError, ... depending on the damage
        raise ValueError(f"{src} cannot be read by PyTorch's safe weights_only loader ({type(err).__name__}: "
                         f"{str(err).splitlines()[0]}). It holds more than tensors or is damaged; obtain a "
                         "safetensors export of the checkpoint instead.") from err
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"{src} does not hold a flat state dict of tensors (found {type(state).__name__}); "
                         "save `model.state_dict()` and convert that.")
    dst.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in state.items()}, dst, metadata={"format": "pt"})
    return dst
