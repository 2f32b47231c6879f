"""Shuffled global batches, split over processes, that resume exactly.

The batch for global step k is a pure function of (seed, k, process_index,
process_count): the iterator state is only the next step number, so resuming
after preemption is exact and instant, and the global batch (the concatenation
over processes) does not depend on how many processes there are.
"""

from __future__ import annotations

import collections
import functools
from concurrent.futures import Future, ThreadPoolExecutor

import numpy as np

# Second entropy word of the numpy seeds, so the epoch permutations, the
# flips and the per-row draws of other streams (text2image.latent_cache: latent
# noise, caption dropout) draw from unrelated streams.
_PERMUTATION, _FLIP, ROW_DRAWS = 0, 1, 2


def to_model_range(images: np.ndarray) -> np.ndarray:
    """uint8 images to the float32 [-1, 1] the diffusion model sees."""
    return images.astype(np.float32) / 127.5 - 1


class BatchStream:
    """This process's slice of an endless stream of shuffled global batches.

    Global order: epoch e is a permutation of the source indices drawn from
    (seed, e); global batch k is positions [k*B, (k+1)*B) of the concatenated
    epochs, and process p takes its rows [p*B/P, (p+1)*B/P). Horizontal flips are
    drawn per (seed, step, global row). Iterating prefetches `prefetch` batches
    on as many threads (PIL and array_record release the GIL while decoding).
    """

    def __init__(
        self,
        source,
        global_batch_size: int,
        *,
        seed: int | tuple[int, ...],
        process_index: int = 0,
        process_count: int = 1,
        random_flip: bool = False,
        start_step: int = 0,
        prefetch: int = 4,
    ):
        if len(source) == 0:
            raise ValueError("the data source is empty")
        if global_batch_size < 1 or global_batch_size % process_count:
            raise ValueError(
                f"global batch size {global_batch_size} must be a positive multiple of the "
                f"process count {process_count}"
            )
        if not 0 <= process_index < process_count:
            raise ValueError(f"process_index={process_index} is not in [0, {process_count})")
        self.source = source
        self.global_batch_size = global_batch_size
        self.local_batch_size = global_batch_size // process_count
        self.seed = (seed,) if isinstance(seed, int) else tuple(seed)  # numpy SeedSequence entropy
        self.process_index = process_index
        self.process_count = process_count
        self.random_flip = random_flip
        self.prefetch = prefetch
        self._step = start_step
        self._pending: collections.deque[Future] = collections.deque()
        self._pool: ThreadPoolExecutor | None = None
        self._permutation = functools.lru_cache(maxsize=2)(self._draw_permutation)

    def _draw_permutation(self, epoch: int) -> np.ndarray:
        return np.random.default_rng([*self.seed, _PERMUTATION, epoch]).permutation(len(self.source))

    def global_indices(self, step: int) -> np.ndarray:
        """Source indices of the whole global batch `step`, in row order."""
        positions = step * self.global_batch_size + np.arange(self.global_batch_size)
        epochs, offsets = np.divmod(positions, len(self.source))
        indices = np.empty(self.global_batch_size, np.int64)
        for epoch in np.unique(epochs):
            rows = epochs == epoch
            indices[rows] = self._permutation(int(epoch))[offsets[rows]]
        return indices

    def global_flips(self, step: int) -> np.ndarray:
        """Which rows of global batch `step` are flipped horizontally (all False without random_flip)."""
        if not self.random_flip:
            return np.zeros(self.global_batch_size, bool)
        return np.random.default_rng([*self.seed, _FLIP, step]).random(self.global_batch_size) < 0.5

    def batch(self, step: int) -> np.ndarray:
        """This process's rows of global batch `step`: float32 NHWC in [-1, 1]."""
        rows = slice(self.process_index * self.local_batch_size, (self.process_index + 1) * self.local_batch_size)
        images = np.stack([self.source[i] for i in self.global_indices(step)[rows]])
        flips = self.global_flips(step)[rows]
        images[flips] = images[flips, :, ::-1]
        return to_model_range(images)

    def __iter__(self):
        return self

    def __next__(self) -> np.ndarray:
        if self._pool is None:
            self._pool = ThreadPoolExecutor(self.prefetch, thread_name_prefix="deme-data")
        while len(self._pending) < self.prefetch:
            self._pending.append(self._pool.submit(self.batch, self._step + len(self._pending)))
        images = self._pending.popleft().result()
        self._step += 1
        return images

    def state(self) -> dict:
        """JSON-able iterator state: the step of the batch `next()` returns next."""
        return {"step": self._step}

    def restore(self, state: dict) -> None:
        """Continues from a `state()`: the next batch is global batch `state['step']`."""
        self._drop_pending()
        self._step = int(state["step"])

    def close(self) -> None:
        """Stops the prefetch threads."""
        self._drop_pending()
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None

    def _drop_pending(self) -> None:
        for future in self._pending:
            future.cancel()
        self._pending.clear()
