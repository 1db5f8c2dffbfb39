"""Training transforms timm does not have: the CIFAR papers' pad-and-random-crop, and Cutout.

timm's `create_loader` builds its train transform (flips, colour jitter, auto-augment, normalisation or the
prefetcher's uint8 output, random erasing) around a random-resized crop. `with_pad_crop` swaps only that crop
for the crop of the CIFAR papers (DLB sec. 4.1, LsrKD sec. 4.1, CS-KD): zero-pad N pixels on each side and cut
a random image-sized window (after a resize to the model's size, a no-op for 32x32 CIFAR at 32), so every
other part of timm's pipeline stays as configured. `with_cutout` appends DeVries & Taylor's Cutout (DLB sec.
4.3: one 16x16 hole) to the end of it. Both draw from torch's generator, which the training stream seeds per
sample.
"""
from typing import Sequence, Union

import torch
from timm.data.transforms import RandomResizedCropAndInterpolation, str_to_interp_mode
from torchvision import transforms

__all__ = ['TRAIN_CROP_MODES', 'pad_crop', 'with_pad_crop', 'CutOut', 'with_cutout']

TRAIN_CROP_MODES = ('rrc', 'rkrc', 'rkrr', 'pad')  # timm's three, and ours


def pad_crop(img_size: Union[int, Sequence[int]], padding: int, interpolation: str = 'bilinear') -> transforms.Compose:
    """Resize to `img_size` (a copy when the image has that size already), zero-pad `padding` pixels on each
    side, then take a random `img_size` window (torchvision's `RandomCrop(size, padding)`)."""
    size = (img_size, img_size) if isinstance(img_size, int) else tuple(img_size)
    mode = str_to_interp_mode('bilinear' if interpolation == 'random' else interpolation)
    return transforms.Compose([transforms.Resize(size, interpolation=mode),
                               transforms.RandomCrop(size, padding=padding, fill=0, padding_mode='constant')])


def with_pad_crop(transform, img_size: Union[int, Sequence[int]], padding: int, interpolation: str = 'bilinear'):
    """timm's train transform with its random-resized crop replaced by `pad_crop`.

    A transform without a random-resized crop (e.g. `--no-aug`) is returned unchanged.

    Args:
        transform: The `Compose` that timm's `create_transform(is_training=True)` built.
        img_size: Output (height, width) or side.
        padding: Zero padding on each side, in pixels (4 in the CIFAR papers).
        interpolation: Resize interpolation; timm's 'random' becomes bilinear.
    """
    steps = getattr(transform, 'transforms', None)
    if not steps or not any(isinstance(step, RandomResizedCropAndInterpolation) for step in steps):
        return transform
    return transforms.Compose([pad_crop(img_size, padding, interpolation)
                               if isinstance(step, RandomResizedCropAndInterpolation) else step for step in steps])


class CutOut:
    """Cutout (DeVries & Taylor, 2017): one `size` x `size` square, centred on a uniformly drawn pixel and clipped
    at the image border, set to the mean colour.

    Works on the CHW tensors at the end of timm's transform: normalised floats (the mean colour is 0) or, with
    timm's prefetcher, uint8 images that are normalised later (the mean colour is `mean` x 255).

    Args:
        size: Side of the square in pixels.
        mean: Per-channel mean in [0, 1] (timm's data config), the fill of uint8 images.
    """

    def __init__(self, size: int, mean: Sequence[float]):
        self.size = size
        self.mean = tuple(mean)

    def __call__(self, image: torch.Tensor) -> torch.Tensor:
        height, width = image.shape[-2:]
        centre_y, centre_x = int(torch.randint(height, ())), int(torch.randint(width, ()))
        half = self.size // 2
        top, bottom = max(centre_y - half, 0), min(centre_y - half + self.size, height)
        left, right = max(centre_x - half, 0), min(centre_x - half + self.size, width)
        image = image.clone()
        if image.dtype == torch.uint8:
            fill = torch.tensor([round(m * 255) for m in self.mean], dtype=torch.uint8)
        else:
            fill = torch.zeros(image.shape[0], dtype=image.dtype)
        image[:, top:bottom, left:right] = fill[:, None, None]
        return image

    def __repr__(self) -> str:
        return f'{type(self).__name__}(size={self.size})'


def with_cutout(transform, size: int, mean: Sequence[float]):
    """timm's train transform followed by `CutOut(size, mean)`."""
    steps = getattr(transform, 'transforms', [transform])
    return transforms.Compose(list(steps) + [CutOut(size, mean)])
