"""Training data: random-access sources and resumable, process-sharded batch streams."""

from deme_jax.data.captions import CaptionFolder, Example, TfdsCaptions, fit_caption_image, make_caption_source
from deme_jax.data.input_pipeline import (
    heldout_images,
    make_source,
    make_stream,
    reference_images,
    training_batches,
)
from deme_jax.data.sources import (
    ArraySource,
    FolderSource,
    TfdsSource,
    fit_image,
    mnist_digits,
    mnist_source,
    mnist_split,
)
from deme_jax.data.stream import BatchStream, to_model_range

__all__ = [
    "ArraySource",
    "BatchStream",
    "CaptionFolder",
    "Example",
    "FolderSource",
    "TfdsCaptions",
    "TfdsSource",
    "fit_caption_image",
    "fit_image",
    "heldout_images",
    "make_caption_source",
    "make_source",
    "make_stream",
    "mnist_digits",
    "mnist_source",
    "mnist_split",
    "reference_images",
    "to_model_range",
    "training_batches",
]
