"""Reads the scalars a run wrote to TensorBoard (clu writes them as tensor summaries)."""

from pathlib import Path

import numpy as np
import tensorflow as tf
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator


def read_scalars(workdir: str | Path) -> dict[str, dict[int, float]]:
    """``{tag: {step: value}}`` of every scalar in ``workdir``'s event files."""
    events = EventAccumulator(str(workdir), size_guidance={"tensors": 0})
    events.Reload()
    scalars = [tag for tag in events.Tags()["tensors"] if events.SummaryMetadata(tag).plugin_data.plugin_name ==
               "scalars"]
    return {tag: {e.step: float(np.asarray(tf.make_ndarray(e.tensor_proto))) for e in events.Tensors(tag)}
            for tag in scalars}
