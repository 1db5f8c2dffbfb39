"""Data sets and loaders: timm's `create_dataset`/`create_loader`, Fashion-MNIST from local files, and the
injection of a method's batches (through a `BatchStream`) into timm's loader."""
import gzip
import os
from typing import Any, Optional, Sequence, Tuple

import numpy as np
from PIL import Image
from timm.data import create_dataset
from timm.data.loader import PrefetchLoader
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Sampler

from .stream import BatchStream, KeyedDataset

__all__ = ['FASHION_MNIST_DIR', 'FashionMNIST', 'DatasetView', 'DatasetNotFoundError', 'build_dataset',
           'class_count', 'dataset_labels', 'index_sampler', 'install_batch_stream']

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
    """A data set seen through an optional subset of its indices and an optional PIL image-mode conversion.

    The view owns the transform (timm's `create_loader` sets `transform` on the data set it gets) and applies
    it after the conversion, so torchvision's grayscale sets (`torch/mnist`, ...) feed 3-channel models.
    """

    def __init__(self, dataset: Dataset, indices: Optional[Sequence[int]] = None, img_mode: Optional[str] = None):
        self.dataset = dataset
        self.indices = np.arange(len(dataset)) if indices is None else np.asarray(indices, dtype=np.int64)
        self.img_mode = img_mode
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
        return image, target


def build_dataset(name: str, root: Optional[str], split: str, is_training: bool, in_chans: int,
                  download: bool = False, subset: int = 0, seed: int = 0) -> Dataset:
    """`fashion_mnist` from local files, anything else through timm's `create_dataset`.

    Args:
        subset: If > 0, keep this many images, drawn at random with `seed` (the same on every rank).
    """
    img_mode = 'L' if in_chans == 1 else 'RGB'
    convert_mode = None  # timm's own readers and ours produce img_mode already; torchvision's sets do not
    if name == 'fashion_mnist':
        dataset = FashionMNIST(root or FASHION_MNIST_DIR, train=is_training, img_mode=img_mode)
    else:
        if not name and (not root or not os.path.exists(root)):
            raise DatasetNotFoundError(f'image folder {root!r} does not exist (set --data-dir)')
        try:
            dataset = create_dataset(name, root=root, split=split, is_training=is_training, download=download,
                                     input_img_mode=img_mode, seed=seed)
        except (RuntimeError, AssertionError, FileNotFoundError, OSError) as e:
            raise DatasetNotFoundError(f'data set {name or "folder"!r} ({split}) could not be loaded from '
                                       f'{root!r}: {str(e).splitlines()[0] if str(e) else type(e).__name__}') from e
        if name.lower().startswith('torch/'):
            convert_mode = img_mode
    indices = None
    if subset and subset < len(dataset):
        indices = np.sort(np.random.default_rng(seed).choice(len(dataset), subset, replace=False))
    if indices is not None or convert_mode is not None:
        dataset = DatasetView(dataset, indices, convert_mode)
    return dataset


def dataset_labels(dataset: Dataset) -> Optional[np.ndarray]:
    """Class index of every item without reading any image, or None if the data set does not expose them."""
    if isinstance(dataset, DatasetView):
        labels = dataset_labels(dataset.dataset)
        return None if labels is None else labels[dataset.indices]
    if hasattr(dataset, 'targets'):
        return np.asarray(dataset.targets, dtype=np.int64)
    samples = getattr(getattr(dataset, 'reader', None), 'samples', None)
    if samples is not None:
        return np.asarray([target for _, target in samples], dtype=np.int64)
    return None


def class_count(dataset: Dataset) -> Optional[int]:
    """Number of classes of the whole data set (a subset may miss some), or None if labels are not exposed."""
    labels = dataset_labels(dataset.dataset if isinstance(dataset, DatasetView) else dataset)
    return None if labels is None or not labels.size else int(labels.max()) + 1


def index_sampler(dataset: Dataset, seed: int, rank: int, world_size: int) -> Sampler[int]:
    """A shuffling index sampler that is rank-aware and replayable per epoch (seed, epoch)."""
    return DistributedSampler(dataset, num_replicas=world_size, rank=rank, shuffle=True, seed=seed)


def install_batch_stream(loader, task, hparams, dataset: Dataset, *, batch_size: int, seed: int, rank: int,
                         world_size: int) -> Tuple[Any, BatchStream]:
    """Make a timm training loader read the batches of `task`'s method through a `BatchStream`.

    The method's batch sampler (or plain shuffled batches) is wrapped in a stream that seeds every sample and
    can resume mid-epoch, and the `DataLoader` inside the timm loader is rebuilt around it and a `KeyedDataset`;
    transforms, collate (fast collate, mixup), workers and the prefetcher stay timm's. The task is bound to the
    method's sampler and, if it reads batch information, to the stream. Used by our loop and by the adapter.

    Returns:
        The loader to use (the same PrefetchLoader, or the rebuilt DataLoader) and the stream, whose
        `set_epoch`/`start_at` choose the batches of the next pass.
    """
    indices = index_sampler(dataset, seed, rank, world_size)
    method_sampler = task.batch_sampler(hparams, index_sampler=indices, labels=dataset_labels(dataset),
                                        batch_size=batch_size, seed=seed, rank=rank, world_size=world_size)
    if method_sampler is None:
        stream = BatchStream.shuffled(indices, batch_size, seed, rank)
    else:
        stream = BatchStream(method_sampler, seed, rank)
        task.bind_batch_sampler(method_sampler)
    if task.needs_batch_info:
        stream.record = True
        task.bind_batch_info_source(stream.pop)
    inner = loader.loader if isinstance(loader, PrefetchLoader) else loader
    kwargs = dict(
        batch_sampler=stream,
        num_workers=inner.num_workers,
        collate_fn=inner.collate_fn,
        pin_memory=inner.pin_memory,
        worker_init_fn=inner.worker_init_fn,
        persistent_workers=inner.persistent_workers,
    )
    if inner.num_workers > 0:
        kwargs['prefetch_factor'] = inner.prefetch_factor
    rebuilt = DataLoader(KeyedDataset(inner.dataset), **kwargs)
    if isinstance(loader, PrefetchLoader):
        loader.loader = rebuilt
        return loader, stream
    return rebuilt, stream
