"""The bottleneck vectors of one split, read from the cache: in memory when they fit, streamed
when they do not, so memory stays flat however many images there are."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

from retrain.bottlenecks.cache import BottleneckCache
from retrain.data.sampling import draw, random_picks
from retrain.errors import RetrainError

# Splits up to this size (about 50,000 vectors of 1,280) are loaded whole, which is fastest;
# larger ones are streamed from the cache, so memory stays flat beyond it.
IN_MEMORY_LIMIT_BYTES = 256 << 20


@dataclass
class Split:
    """Feature vectors [n, dim] and labels (in the head's form, see retrain.heads.head) of one
    split, in memory."""

    x: np.ndarray
    y: np.ndarray

    def __len__(self) -> int:
        return len(self.y)

    @property
    def feature_dim(self) -> int:
        return self.x.shape[1]


@dataclass
class FeatureSplit:
    """The cached vectors of one split, by location (cache.LOCATION_DTYPE), with their labels."""

    cache: BottleneckCache
    locations: np.ndarray
    y: np.ndarray

    def __len__(self) -> int:
        return len(self.y)

    @property
    def feature_dim(self) -> int:
        return self.cache.feature_dim

    @property
    def nbytes(self) -> int:
        return len(self) * self.feature_dim * 4

    def fits_in_memory(self, limit: int | None = None) -> bool:
        return self.nbytes <= (IN_MEMORY_LIMIT_BYTES if limit is None else limit)

    def read(self, indices: np.ndarray) -> np.ndarray:
        """Vectors [len(indices), dim] of the given rows of this split."""
        x, ok = self.cache.read(self.locations[indices])
        if not ok.all():
            raise RetrainError(
                "bottleneck cache: an entry changed on disk during the run (checksum failed); "
                "run again to recompute it"
            )
        return x

    def load(self) -> Split:
        """The whole split in memory."""
        return Split(self.read(np.arange(len(self))), self.y)

    def subset(self, count: int, seed: int) -> FeatureSplit:
        """At most `count` rows, drawn at random without replacement."""
        if count >= len(self):
            return self
        picks = random_picks(len(self), count, seed)
        return FeatureSplit(self.cache, self.locations[picks], self.y[picks])

    def chunks(self, rows: int = 8192) -> Iterator[Split]:
        """The split in consecutive in-memory pieces."""
        for start in range(0, len(self), rows):
            indices = np.arange(start, min(start + rows, len(self)))
            yield Split(self.read(indices), self.y[indices])

    def random_batches(
        self, batch_size: int, seed: int, cdf: np.ndarray | None = None
    ) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """An endless stream of batches drawn at random with replacement, uniformly or by the
        cumulative probabilities `cdf` (see retrain.data.sampling)."""
        rng = np.random.default_rng(seed)
        while True:
            picks = np.sort(draw(rng, len(self), batch_size, cdf))
            yield self.read(picks), self.y[picks]
