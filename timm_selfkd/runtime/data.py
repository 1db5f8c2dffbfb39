"""Data sets and loaders: timm's `create_dataset`/`create_loader`, Fashion-MNIST from local files, and the
injection of a method's batches (through a `BatchStream`) into timm's loader."""
import atexit
import functools
import gzip
import logging
import multiprocessing
import multiprocessing.util  # its exit hook, registered on import, must run after ours
import os
import signal
import time
from collections import deque
from contextlib import contextmanager
from typing import Callable, Deque, Dict, List, Optional, Sequence, Set

import numpy as np
import torch
from PIL import Image
from timm.data import ImageDataset, create_dataset
from timm.data.readers.img_extensions import get_img_extensions
from timm.data.readers.reader_image_folder import ReaderImageFolder
from timm.data.readers.reader_image_in_tar import ReaderImageInTar
from timm.utils.misc import natural_key
from timm.data.loader import PrefetchLoader
from timm.data.distributed_sampler import RepeatAugSampler
from torch.utils.data import DataLoader, Dataset, DistributedSampler, IterableDataset, Sampler
from torch.utils.data._utils import signal_handling

from timm_selfkd.errors import UsageError, first_line
from timm_selfkd.runtime.batch_stream import BatchStream, KeyedDataset

__all__ = ['FASHION_MNIST_DIR', 'FashionMNIST', 'DatasetView', 'DatasetNotFoundError', 'build_dataset',
           'class_count', 'dataset_labels', 'dataset_class_map', 'symmetric_label_noise', 'with_label_noise',
           'index_sampler', 'read_through', 'UnreadableImages', 'unreadable_images', 'workers_ignore_stop_signals',
           'worker_failure', 'worker_failures_found_by_the_loader']

_logger = logging.getLogger(__name__)

FASHION_MNIST_DIR = '/usr/share/datasets/fashion-mnist'  # Debian package `dataset-fashion-mnist`


class DatasetNotFoundError(FileNotFoundError):
    """The requested data set is not where the user said it is."""


def _read_idx(path: str, header_bytes: int) -> np.ndarray:
    with gzip.open(path, 'rb') as f:
        return np.frombuffer(f.read(), dtype=np.uint8, offset=header_bytes)


class FashionMNIST(Dataset):
    """Fashion-MNIST read from its IDX `.gz` files, with no download.

    Looks in `root` (the layout of Debian's `dataset-fashion-mnist`) and in `root/FashionMNIST/raw`
    (torchvision's layout). Images are PIL images in `img_mode` ('RGB' for 3-channel models, 'L' for 1).
    """

    def __init__(self, root: str, train: bool = True, img_mode: str = 'RGB', transform=None):
        prefix = 'train' if train else 't10k'
        folder = next((d for d in (root, os.path.join(root, 'FashionMNIST', 'raw'))
                       if os.path.isfile(os.path.join(d, f'{prefix}-labels-idx1-ubyte.gz'))), None)
        if folder is None:
            raise DatasetNotFoundError(
                f'Fashion-MNIST files ({prefix}-*-ubyte.gz) not found in {root}; '
                f'install them with `apt-get install dataset-fashion-mnist` or pass --data-dir')
        self.targets = _read_idx(os.path.join(folder, f'{prefix}-labels-idx1-ubyte.gz'), 8).astype(np.int64)
        self.images = _read_idx(os.path.join(folder, f'{prefix}-images-idx3-ubyte.gz'), 16).reshape(-1, 28, 28)
        self.img_mode = img_mode
        self.transform = transform

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, index: int):
        image = Image.fromarray(self.images[index], mode='L')
        if self.img_mode != 'L':
            image = image.convert(self.img_mode)
        if self.transform is not None:
            image = self.transform(image)
        return image, int(self.targets[index])


class DatasetView(Dataset):
    """A data set seen through an optional subset of its indices, an optional PIL image-mode conversion and
    optional replacement labels.

    The view owns the transform (timm's `create_loader` sets `transform` on the data set it gets) and applies
    it after the conversion, so torchvision's grayscale sets (`torch/mnist`, ...) feed 3-channel models.

    Args:
        targets: The label of each item of the view (e.g. noisy labels); None keeps the data set's own.
    """

    def __init__(self, dataset: Dataset, indices: Optional[Sequence[int]] = None, img_mode: Optional[str] = None,
                 targets: Optional[Sequence[int]] = None):
        self.dataset = dataset
        self.indices = np.arange(len(dataset)) if indices is None else np.asarray(indices, dtype=np.int64)
        self.img_mode = img_mode
        self.targets = None if targets is None else np.asarray(targets, dtype=np.int64)
        if self.targets is not None and len(self.targets) != len(self.indices):
            raise ValueError(f'{len(self.targets)} labels for a view of {len(self.indices)} items')
        self.transform = getattr(dataset, 'transform', None)
        dataset.transform = None

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, index: int):
        image, target = self.dataset[int(self.indices[index])]
        if self.img_mode is not None and isinstance(image, Image.Image) and image.mode != self.img_mode:
            image = image.convert(self.img_mode)
        if self.transform is not None:
            image = self.transform(image)
        return image, target if self.targets is None else int(self.targets[index])


def build_dataset(name: str, root: Optional[str], split: str, is_training: bool, in_chans: int,
                  download: bool = False, subset: int = 0, seed: int = 0, input_img_mode: Optional[str] = None,
                  train_classes: Optional[Dict[str, int]] = None, **timm_kwargs) -> Dataset:
    """`fashion_mnist` from local files, anything else through timm's `create_dataset`.

    Args:
        subset: If > 0, keep this many images, drawn at random with `seed` (the same on every rank).
        input_img_mode: PIL mode of the images (default: 'L' for 1 channel, else 'RGB').
        train_classes: The training split's class map (`dataset_class_map`) for another split of an image folder
            or tar data set: that split is labelled by it (a class folder it lacks is logged, one training lacks
            is a `UsageError`), unless `class_map` names a map for both.
        **timm_kwargs: More `create_dataset` arguments (class_map, input_key, num_samples, ...).
    """
    img_mode = input_img_mode or ('L' if in_chans == 1 else 'RGB')
    convert_mode = None  # timm's own readers and ours produce img_mode already; torchvision's sets do not
    if name == 'fashion_mnist':
        dataset = FashionMNIST(root or FASHION_MNIST_DIR, train=is_training, img_mode=img_mode)
    else:
        if not name and (not root or not os.path.exists(root)):
            raise DatasetNotFoundError(f'image folder {root!r} does not exist (set --data-dir)')
        def create(**kwargs):
            try:
                return create_dataset(name, root=root, split=split, is_training=is_training, download=download,
                                      input_img_mode=img_mode, seed=seed, **{**timm_kwargs, **kwargs})
            except (RuntimeError, AssertionError, FileNotFoundError, OSError) as e:
                reason = first_line(e)
                raise DatasetNotFoundError(f'data set {name or "folder"!r} ({split}) could not be loaded from '
                                           f'{root!r}: {reason}') from e

        dataset = create()
        if is_training:
            _warn_empty_class_folders(dataset, split)
        if train_classes is not None and not timm_kwargs.get('class_map') and \
                _class_map_check(dataset, split, train_classes):
            dataset = create(class_map=train_classes)  # labels by the training split's folder names
        if name.lower().startswith('torch/'):
            convert_mode = img_mode
    if isinstance(dataset, IterableDataset):
        if subset:
            raise UsageError(f'--train-subset/--val-subset need a map-style data set, and {name!r} is streamed')
        return dataset
    indices = None
    if subset and subset < len(dataset):
        indices = np.sort(np.random.default_rng(seed).choice(len(dataset), subset, replace=False))
    if indices is not None or convert_mode is not None:
        dataset = DatasetView(dataset, indices, convert_mode)
    return dataset


def dataset_labels(dataset: Dataset) -> Optional[np.ndarray]:
    """Class index of every item without reading any image, or None if the data set does not expose them."""
    if isinstance(dataset, DatasetView):
        if dataset.targets is not None:
            return dataset.targets
        labels = dataset_labels(dataset.dataset)
        return None if labels is None else labels[dataset.indices]
    if hasattr(dataset, 'targets'):
        return np.asarray(dataset.targets, dtype=np.int64)
    reader = getattr(dataset, 'reader', None)
    if isinstance(reader, ReaderImageInTar):  # a tar data set: its samples are (member, tar, child tar)
        return np.asarray(reader.targets, dtype=np.int64)
    samples = getattr(reader, 'samples', None)
    if samples is not None:
        return np.asarray([target for _, target in samples], dtype=np.int64)
    return None


def dataset_class_map(dataset: Dataset) -> Optional[Dict[str, int]]:
    """The class name -> label map of a timm image folder or tar data set (through any `DatasetView`), or None
    for data sets whose labels do not come from folder names (they are the same in every split)."""
    while isinstance(dataset, DatasetView):
        dataset = dataset.dataset
    reader = getattr(dataset, 'reader', None)
    if isinstance(reader, ReaderImageFolder):
        return dict(reader.class_to_idx)
    if isinstance(reader, ReaderImageInTar):
        return dict(reader.class_name_to_idx)
    return None


def _names(names: List[str], most: int = 10) -> str:
    shown = ', '.join(names[:most])
    return shown + (f' and {len(names) - most} more' if len(names) > most else '')


def _class_map_check(dataset: Dataset, split: str, train_classes: Dict[str, int]) -> bool:
    """Compare a split's own class folders with the training split's: a folder training lacks is an error
    naming it; a missing one is logged. Returns whether the split must be read again with the training map."""
    own = dataset_class_map(dataset)
    if own is None or own == train_classes:
        return False
    root = getattr(dataset.reader, 'root', split)
    extra = sorted(set(own) - set(train_classes), key=natural_key)
    if extra:
        raise UsageError(f'the {split!r} split ({root}) has {len(extra)} class folder(s) the training split lacks: '
                         f'{_names(extra)}; the model has no label for them (remove them, or pass the same '
                         f'--class-map to both splits)')
    missing = sorted(set(train_classes) - set(own), key=natural_key)
    if missing:
        _logger.warning(f'the {split!r} split ({root}) lacks {len(missing)} of the {len(train_classes)} training '
                        f'classes: {_names(missing)}; evaluating its {len(own)} classes with their training labels')
    return True


def _warn_empty_class_folders(dataset: Dataset, split: str) -> None:
    """Name, in one warning line, the class folders of an image-folder split that hold no image (at any depth).

    timm's reader leaves such a folder out of its class map, numbering the folders with images; a `--class-map`
    that lists it keeps its label (and counts it: `class_count`)."""
    reader = getattr(dataset, 'reader', None)
    if not isinstance(reader, ReaderImageFolder) or not os.path.isdir(reader.root):
        return
    labelled = {target for _, target in reader.samples}
    folders = sorted((entry for entry in os.scandir(reader.root) if entry.is_dir()), key=lambda e: natural_key(e.name))
    empty = [entry.name for entry in folders
             if reader.class_to_idx.get(entry.name) not in labelled and not _holds_images(entry.path)]
    if not empty:
        return
    mapped = [name for name in empty if name in reader.class_to_idx]
    fate = (f'{_names(mapped)} keep{"s" if len(mapped) == 1 else ""} a label from the class map' if mapped else
            f'timm leaves them out of the class map: the {len(reader.class_to_idx)} folders with images are the '
            'classes (--num-classes gives the model more outputs, a --class-map listing them keeps their labels)')
    _logger.warning(f'the {split!r} split ({reader.root}) has {len(empty)} class folder(s) without images: '
                    f'{_names(empty)}; {fate}')


def _holds_images(folder: str) -> bool:
    extensions = get_img_extensions(as_set=True)
    return any(os.path.splitext(name)[1].lower() in extensions
               for _, _, files in os.walk(folder, followlinks=True) for name in files)


def class_count(dataset: Dataset) -> Optional[int]:
    """Number of classes of the whole data set (a subset may miss some): its class map's (a `--class-map` may list
    classes without images), else one more than its largest label; None if labels are not exposed."""
    while isinstance(dataset, DatasetView):
        dataset = dataset.dataset
    classes = dataset_class_map(dataset)
    if classes:
        return max(classes.values()) + 1
    labels = dataset_labels(dataset)
    return None if labels is None or not labels.size else int(labels.max()) + 1


_NOISE_STREAM = 0x6e6f697365  # keeps the noise draw apart from the subset draw of the same seed


def symmetric_label_noise(labels: np.ndarray, rate: float, num_classes: int, seed: int) -> np.ndarray:
    """Symmetric label noise: `round(rate * N)` items, drawn at random, get a label drawn uniformly from the
    `num_classes - 1` classes other than their own.

    `rate` is the fraction of wrong labels (conventions that draw from all `K` classes, the true one included,
    give `rate * (K - 1) / K` wrong labels). Deterministic per seed; every process computes the same labels.

    Args:
        labels: Clean class index of every item.
        rate: Fraction of labels to corrupt, in [0, 1).
        num_classes: K; labels lie in [0, K).
        seed: Seed of the draw.
    """
    if not 0 <= rate < 1:
        raise ValueError(f'label noise rate must be in [0, 1), got {rate}')
    labels = np.asarray(labels, dtype=np.int64)
    if num_classes < 2 or not labels.size:
        return labels.copy()
    rng = np.random.default_rng([seed, _NOISE_STREAM])
    flipped = rng.choice(labels.size, int(round(rate * labels.size)), replace=False)
    noisy = labels.copy()
    # an offset in [1, K) from the true class reaches each other class with the same probability
    noisy[flipped] = (labels[flipped] + rng.integers(1, num_classes, flipped.size)) % num_classes
    return noisy


def with_label_noise(dataset: Dataset, rate: float, seed: int) -> Dataset:
    """`dataset` with symmetric noise (`symmetric_label_noise`) on its labels, as a `DatasetView`.

    The noisy labels are the data set's labels from then on: the loader yields them and `dataset_labels` returns
    them, so samplers that group images by class (BAKE, CS-KD) see the same labels as the loss, as they would on
    a data set whose annotations are wrong (grouping by the clean labels would use knowledge no real run has).

    Raises:
        ValueError: the data set does not expose its labels.
    """
    labels = dataset_labels(dataset)
    if labels is None:
        raise ValueError('--train-label-noise needs a data set that exposes its labels (image folder, '
                         'Fashion-MNIST, torchvision sets)')
    return DatasetView(dataset, targets=symmetric_label_noise(labels, rate, class_count(dataset) or 0, seed))


def index_sampler(dataset: Dataset, seed: int, rank: int, world_size: int,
                  aug_repeats: float = 0) -> Sampler[int]:
    """A shuffling index sampler that is rank-aware and replayable per epoch (seed, epoch); with `aug_repeats`,
    timm's repeated-augmentation sampler (epochs of the usual length made of images drawn `aug_repeats` times,
    each copy on another rank)."""
    if aug_repeats:
        return RepeatAugSampler(dataset, num_replicas=world_size, rank=rank, num_repeats=aug_repeats)
    return DistributedSampler(dataset, num_replicas=world_size, rank=rank, shuffle=True, seed=seed)


class _IgnoreStopSignals:
    """A DataLoader `worker_init_fn` that makes the worker ignore SIGTERM and SIGINT, then runs `init_fn` (timm's).

    Schedulers (Slurm on preemption, scancel and the time limit), `timeout`, container runtimes and Ctrl-C signal
    the whole process group. The main process stops the run cleanly (a recovery checkpoint at the next step);
    a worker must not die of the same signal first, which the main process would report as a crashed worker. The
    main process ends its workers itself when it exits (`_end_workers`); a worker that dies of anything else is
    still an error.
    A class, not a closure, so that it pickles for the spawn and forkserver start methods."""

    def __init__(self, init_fn: Optional[Callable[[int], None]]):
        self.init_fn = init_fn

    def __call__(self, worker_id: int) -> None:
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, signal.SIG_IGN)
        if self.init_fn is not None:
            self.init_fn(worker_id)


def _end_workers() -> None:
    """Kill the daemonic children still alive at exit (in a run: the DataLoader workers of an iterator that an
    escaping exception kept alive). multiprocessing's own exit hook would SIGTERM them and wait, forever for
    workers that ignore SIGTERM; torch's SIGCHLD check is switched off first, as these deaths are no failure."""
    workers = [child for child in multiprocessing.active_children() if child.daemon]
    if workers:
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    for worker in workers:
        worker.kill()
    for worker in workers:
        worker.join()


@functools.cache
def _end_workers_at_exit() -> None:
    atexit.register(_end_workers)  # after multiprocessing's hook, so it runs before it


def _ignoring_stop_signals(init_fn):
    _end_workers_at_exit()
    return init_fn if isinstance(init_fn, _IgnoreStopSignals) else _IgnoreStopSignals(init_fn)


def workers_ignore_stop_signals(loader):
    """Make the DataLoader workers of `loader` (a `DataLoader` or timm's `PrefetchLoader`) ignore SIGTERM and
    SIGINT, leaving stop signals to the main process (see `_IgnoreStopSignals`). Returns `loader`."""
    inner = loader.loader if isinstance(loader, PrefetchLoader) else loader
    inner.worker_init_fn = _ignoring_stop_signals(inner.worker_init_fn)
    return loader


def worker_failure(error: BaseException, wait_s: float = 5.0) -> Optional[str]:
    """One line on the DataLoader worker whose death caused `error`, or None if `error` has another cause.

    torch reports a dead worker as a RuntimeError. A batch in transfer from a worker being killed can fail first,
    with a broken connection (the worker's file-descriptor sharer is gone) before the worker can be reaped, so
    that torch finds every worker alive; then this waits up to `wait_s` for the dead child to show."""
    if isinstance(error, RuntimeError) and str(error).startswith('DataLoader worker'):
        return str(error).strip().splitlines()[0].strip()
    if not isinstance(error, (ConnectionError, EOFError)):
        return None
    deadline = time.monotonic() + wait_s
    while time.monotonic() < deadline:
        try:  # WNOWAIT: leave the child to be reaped by its multiprocessing.Process
            dead = os.waitid(os.P_ALL, 0, os.WEXITED | os.WNOHANG | os.WNOWAIT)
        except ChildProcessError:
            return None
        if dead is not None:
            how = (f'is killed by signal: {signal.strsignal(dead.si_status)}' if dead.si_code != os.CLD_EXITED
                   else f'exited with status {dead.si_status}')
            return f'DataLoader worker (pid {dead.si_pid}) {how} ({type(error).__name__} receiving its batch)'
        time.sleep(0.05)
    return None


@contextmanager
def worker_failures_found_by_the_loader():
    """Within this context a dead DataLoader worker is found by the loader itself, at its next batch (its liveness
    check every 5 s, as torch does for loaders iterated outside the main thread), not by torch's SIGCHLD handler,
    which raises the error in whatever line the main process is running: inside a log call (`logging` prints it
    with a traceback and goes on) or mid-transfer of a batch (the surviving worker then prints a broken
    connection). Main thread only, as any signal handler."""
    installed, handler = signal_handling._SIGCHLD_handler_set, signal.getsignal(signal.SIGCHLD)
    signal_handling._SIGCHLD_handler_set = True  # torch installs its handler only while this is False
    signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    try:
        yield
    finally:
        signal.signal(signal.SIGCHLD, handler)
        signal_handling._SIGCHLD_handler_set = installed


def _image_dataset(dataset: Dataset) -> Optional[ImageDataset]:
    """The timm `ImageDataset` under `dataset`'s views, if any."""
    while isinstance(dataset, DatasetView):
        dataset = dataset.dataset
    return dataset if isinstance(dataset, ImageDataset) else None


class UnreadableImages:
    """The training images that cannot be read, found by whichever process reads them and counted per batch.

    timm's `ImageDataset` replaces an image it cannot read by the next one and warns at every read. A loader from
    `read_through` replaces it the same way (`_Substituting`: batches keep their shape, every method its layout) and
    flags it in a table shared with the workers; the main process takes each batch's indices as the sampler hands
    them out. `rows()`, once per training step, gives the rows of the step's batch whose image could not be read,
    and names each such image once, in one warning line. Batches nobody counts (a loop of one's own) are named
    when older than the loader can have in flight, or at the next pass.

    Args:
        dataset: The training set, indexed as the sampler's indices.
        in_flight: The most batches the loader takes from the sampler before the loop trains the first of them.
    """

    def __init__(self, dataset: Dataset, in_flight: int):
        self.dataset = dataset
        self.flags = torch.zeros(len(dataset), dtype=torch.uint8).share_memory_()
        self._batches: Deque[np.ndarray] = deque()
        self._in_flight = in_flight
        self._named: Set[int] = set()

    def dispatched(self, indices: np.ndarray) -> None:
        """The loader took a batch of these indices from the sampler."""
        if len(self._batches) >= self._in_flight:
            self._name(self._batches.popleft())  # read long ago, and nobody counts them
        self._batches.append(indices)

    def restart(self) -> None:
        """A new pass of the sampler: the batches of the last one were all read."""
        while self._batches:
            self._name(self._batches.popleft())

    def rows(self) -> int:
        """Rows of the oldest batch not yet counted (the step's) whose image could not be read."""
        return self._name(self._batches.popleft())

    def _name(self, indices: np.ndarray) -> int:
        bad = indices[self.flags.numpy()[indices].astype(bool)]
        for index in sorted(set(bad.tolist()) - self._named):
            self._named.add(index)
            path = self._filename(index)
            why = _read_error(path)
            _logger.warning(f'cannot read training image {path}{f" ({why})" if why else ""}: each read of it is '
                            'replaced by the next image, and not counted in train_images')
        return int(bad.size)

    def _filename(self, index: int) -> str:
        dataset = self.dataset
        while isinstance(dataset, DatasetView):
            dataset, index = dataset.dataset, int(dataset.indices[index])
        return dataset.filename(index, absolute=True)


def _read_error(path: str) -> str:
    """Why the image file `path` cannot be decoded ('' when it can, or is no file here, e.g. a tar member)."""
    if not os.path.isfile(path):
        return ''
    try:
        with Image.open(path) as image:
            image.load()
    except Exception as e:  # PIL raises many kinds for a damaged file
        return first_line(e)
    return ''


class _Substituting(Dataset):
    """A data set over a timm `ImageDataset` that replaces an image it cannot read by the next index, as timm does,
    flagging it in `flags` (shared with the main process) instead of timm's warning at every read."""

    def __init__(self, dataset: Dataset, flags: torch.Tensor):
        self.dataset = dataset
        self.flags = flags
        image_dataset = _image_dataset(dataset)
        self.retries = max(image_dataset._max_retries, 1)  # timm's: consecutive failures before it gives up
        image_dataset._max_retries = 1  # its first failure raises, to be handled here

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int):
        timm_log = logging.getLogger(ImageDataset.__module__)
        quiet = timm_log.disabled
        for _ in range(self.retries):
            timm_log.disabled = True  # its warning at every failed read; `UnreadableImages` names the image once
            try:
                return self.dataset[index]
            except RuntimeError as e:  # timm's "Failed to load 1 consecutive samples"
                if not str(e).startswith('Failed to load'):
                    raise
            finally:
                timm_log.disabled = quiet
            self.flags[index] = 1
            index = (index + 1) % len(self.dataset)
        raise RuntimeError(f'failed to read {self.retries} consecutive training images')


class _CountedBatches(Sampler[List]):
    """A batch stream whose batches' indices go to `unreadable` as the loader takes them."""

    def __init__(self, stream: BatchStream, unreadable: UnreadableImages):
        self.stream = stream
        self.unreadable = unreadable

    def __iter__(self):
        self.unreadable.restart()
        for keys in self.stream:
            self.unreadable.dispatched(np.fromiter((key.index for key in keys), dtype=np.int64, count=len(keys)))
            yield keys

    def __len__(self) -> int:
        return len(self.stream)


def unreadable_images(loader) -> Optional[UnreadableImages]:
    """The `UnreadableImages` of a loader from `read_through` (None unless it reads a timm image set)."""
    inner = loader.loader if isinstance(loader, PrefetchLoader) else loader
    return getattr(inner.batch_sampler, 'unreadable', None)


def read_through(loader, stream: BatchStream):
    """The timm training `loader` rebuilt to read its batches from `stream` (each item a `SampleKey`, read by a
    `KeyedDataset`); transforms, collate (fast collate, mixup), workers and the prefetcher stay timm's, and the
    workers ignore SIGTERM and SIGINT (`workers_ignore_stop_signals`). Over a timm image set, an image that cannot
    be read is replaced as timm does and counted (`unreadable_images`).

    Returns:
        The same `PrefetchLoader` with its inner `DataLoader` replaced, or the rebuilt `DataLoader`.
    """
    inner = loader.loader if isinstance(loader, PrefetchLoader) else loader
    kwargs = dict(
        batch_sampler=stream,
        num_workers=inner.num_workers,
        collate_fn=inner.collate_fn,
        pin_memory=inner.pin_memory,
        worker_init_fn=_ignoring_stop_signals(inner.worker_init_fn),  # stop signals are the main process's
        persistent_workers=inner.persistent_workers,
    )
    if inner.num_workers > 0:
        kwargs['prefetch_factor'] = inner.prefetch_factor
    dataset = inner.dataset
    if _image_dataset(dataset) is not None:
        # taken ahead of the loop: the workers' prefetch, one batch more in the prefetcher, one being trained
        unreadable = UnreadableImages(dataset, in_flight=max(inner.num_workers, 1) * (inner.prefetch_factor or 1) + 4)
        dataset, kwargs['batch_sampler'] = _Substituting(dataset, unreadable.flags), _CountedBatches(stream, unreadable)
    rebuilt = DataLoader(KeyedDataset(dataset), **kwargs)
    if isinstance(loader, PrefetchLoader):
        loader.loader = rebuilt
        return loader
    return rebuilt
