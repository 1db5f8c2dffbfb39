"""What the training log says besides the losses: throughput and data-loading time between two step lines, and
each epoch's wall time with an estimate of the run's time left.

Host clocks only, so nothing here waits for the device: the step line's read of the loss sums is the one host sync
of a log interval, and the interval's throughput is measured up to it.
"""
import time
from datetime import timedelta
from typing import Iterable, Iterator, List

__all__ = ['StepMeter', 'EpochClock', 'duration']


def duration(seconds: float) -> str:
    """`12.3s` under a minute, `H:MM:SS` from there on."""
    return f'{seconds:.1f}s' if seconds < 60 else str(timedelta(seconds=round(seconds)))


class StepMeter:
    """Images per second and the time spent waiting for the loader, over the steps since the last step line.

    Args:
        world_size: The run's processes. Every process trains as many rows per step (the samplers pad) in lockstep
            (DDP), so the rate of all processes is this one's times `world_size`.
    """

    def __init__(self, world_size: int = 1):
        self.world_size = world_size
        self._restart()

    def _restart(self) -> None:
        self.since = time.perf_counter()
        self.images, self.steps, self.waited = 0, 0, 0.0

    def batches(self, loader: Iterable) -> Iterator:
        """The loader's batches, timing each wait for one (the first includes starting the loader's workers)."""
        self._restart()
        began = time.perf_counter()
        iterator = iter(loader)
        while True:
            try:
                batch = next(iterator)
            except StopIteration:
                return
            self.waited += time.perf_counter() - began
            yield batch
            began = time.perf_counter()

    def count(self, images: int) -> None:
        """One step trained on `images` rows."""
        self.images += images
        self.steps += 1

    def text(self) -> str:
        """`N img/s (M img/s all)  data D s/step` since the last call (or the epoch's start), then start over."""
        seconds = max(time.perf_counter() - self.since, 1e-9)
        rate, wait = self.images / seconds, self.waited / max(self.steps, 1)
        self._restart()
        return f'{rate:.1f} img/s ({rate * self.world_size:.1f} img/s all)  data {wait:.3f}s/step'


class EpochClock:
    """Each epoch's wall time (training, validation, checkpoint) and the run's time left: the mean epoch time of
    this process's epochs times the epochs left, an estimate."""

    def __init__(self, num_epochs: int):
        self.num_epochs = num_epochs
        self.times: List[float] = []
        self.began = time.time()

    def start(self, seconds_done: float = 0.0) -> None:
        """An epoch starts, `seconds_done` of its training already behind it (a run resumed mid-epoch)."""
        self.began = time.time() - seconds_done

    def end(self, epoch: int, train_seconds: float) -> str:
        """The epoch's end line."""
        wall = time.time() - self.began
        self.times.append(wall)
        left = self.num_epochs - epoch - 1
        mean = sum(self.times) / len(self.times)
        return (f'Epoch {epoch} took {duration(wall)} (training {duration(train_seconds)}); estimated time left '
                f'{duration(mean * left)} ({left} more epoch{"" if left == 1 else "s"} at the mean epoch time '
                f'{duration(mean)})')
