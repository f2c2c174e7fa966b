"""Sample order and random draws as pure functions of ``(seed, step)``: resuming needs no data-loader or RNG state.

The samples of optimizer step ``k`` are a pure function of ``(seed, k)``, and so are its random draws
(:func:`step_seed`).
"""

from __future__ import annotations

import typing as tp

import numpy as np

from dynadiff.training.errors import TrainingError


def seed_words(seed: int) -> list[int]:
    return [seed & 0xFFFFFFFF, (seed >> 32) & 0xFFFFFFFF]


def step_seed(seed: int, *keys: int) -> int:
    """A 63-bit seed derived from the run's seed and integer keys (step, micro-batch, stream)."""
    state = np.random.SeedSequence([*seed_words(seed), *keys]).generate_state(2, np.uint64)
    return int(state[0] >> np.uint64(1))


def epoch_permutation(n: int, seed: int, epoch: int) -> np.ndarray:
    """The order of the ``n`` training samples in epoch ``epoch``."""
    return np.random.default_rng([*seed_words(seed), epoch, 7]).permutation(n)


class SampleStream:
    """Endless sample order: epoch permutations back to back; ``positions(start, count)`` -> indices.

    Position ``p`` of the stream is sample ``perm(p // n)[p % n]``: any stretch can be
    produced without replaying the ones before it.
    """

    def __init__(self, n: int, seed: int):
        if n < 1:
            raise TrainingError("the training split is empty")
        self.n, self.seed = n, seed
        self._cache: dict[int, np.ndarray] = {}

    def _perm(self, epoch: int) -> np.ndarray:
        if epoch not in self._cache:
            if len(self._cache) >= 2:  # a stretch spans at most two epochs at a time
                self._cache.pop(min(self._cache))
            self._cache[epoch] = epoch_permutation(self.n, self.seed, epoch)
        return self._cache[epoch]

    def positions(self, start: int, count: int) -> list[int]:
        return [int(self._perm(p // self.n)[p % self.n]) for p in range(start, start + count)]


class StepBatches:
    """``batch_sampler`` for a DataLoader: the micro-batches of steps ``start_step, start_step + 1, ...``.

    With ``world_size`` processes, micro-batch ``m`` of step ``k`` is the stretch of ``batch_size * world_size``
    stream positions that one process with that batch size takes, and ``rank`` takes its rows
    ``rank * batch_size .. (rank + 1) * batch_size - 1``.
    """

    def __init__(self, stream: SampleStream, batch_size: int, accumulation: int, start_step: int, stop_step: int,
                 rank: int = 0, world_size: int = 1):
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is not within world_size {world_size}")
        self.stream, self.batch_size, self.accumulation = stream, batch_size, accumulation
        self.start_step, self.stop_step = start_step, stop_step
        self.rank, self.world_size = rank, world_size

    def __len__(self) -> int:
        return max(0, self.stop_step - self.start_step) * self.accumulation

    def __iter__(self) -> tp.Iterator[list[int]]:
        for step in range(self.start_step, self.stop_step):
            for micro in range(self.accumulation):
                start = ((step * self.accumulation + micro) * self.world_size + self.rank) * self.batch_size
                yield self.stream.positions(start, self.batch_size)
