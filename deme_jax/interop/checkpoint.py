"""Any model as an orbax checkpoint: the parameter tree beside its diffusers/transformers config.

The config is the model's ``config.json`` dict (``channel_projection: true`` for DeMe models), so a
checkpoint converts to a diffusers or transformers directory and back without loss.
"""

from __future__ import annotations

from pathlib import Path

import orbax.checkpoint as ocp

from deme_jax.interop.diffusers import FORMAT_OF_MODULE, model_format
from deme_jax.models import param_shapes


def is_orbax_model(path: str | Path) -> bool:
    return (Path(path) / "model_config").is_dir() and (Path(path) / "params").is_dir()


def save_orbax_model(model, params: dict, path: str | Path) -> Path:
    """Writes ``params`` and ``model_config`` items under ``path`` (which must not exist yet)."""
    path = Path(path).absolute()
    if path.exists():
        raise FileExistsError(f"{path} already exists; orbax never overwrites a checkpoint. Choose a new path.")
    config = FORMAT_OF_MODULE[type(model)].model_to_config(model)
    with ocp.Checkpointer(ocp.CompositeCheckpointHandler()) as checkpointer:
        checkpointer.save(path, args=ocp.args.Composite(
            params=ocp.args.StandardSave(params), model_config=ocp.args.JsonSave(config)))
    return path


def load_orbax_model(path: str | Path):
    """Reads a checkpoint written by :func:`save_orbax_model` as ``(model, params)``."""
    path = Path(path).absolute()
    if not is_orbax_model(path):
        raise FileNotFoundError(f"No deme_jax model checkpoint at {path}: expected the orbax items "
                                f"{path / 'params'} and {path / 'model_config'} (write one with `deme convert`).")
    with ocp.Checkpointer(ocp.CompositeCheckpointHandler()) as checkpointer:
        config = checkpointer.restore(path, args=ocp.args.Composite(model_config=ocp.args.JsonRestore())).model_config
        model = model_format(config, path / "model_config").model_from_config(config)
        abstract = param_shapes(model)
        try:
            restored = checkpointer.restore(path, args=ocp.args.Composite(params=ocp.args.StandardRestore(abstract)))
        except (ValueError, KeyError) as err:
            raise ValueError(f"The parameters in {path / 'params'} do not match the model its model_config "
                             f"describes ({err}); the checkpoint is damaged or was edited.") from err
    return model, restored.params
