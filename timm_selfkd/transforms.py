"""Training transforms timm does not have: the CIFAR papers' pad-and-random-crop.

timm's `create_loader` builds its train transform (flips, colour jitter, auto-augment, normalisation or the
prefetcher's uint8 output, random erasing) around a random-resized crop. `with_pad_crop` swaps only that crop
for the crop of the CIFAR papers (DLB sec. 4.1, LsrKD sec. 4.1, CS-KD): zero-pad N pixels on each side and cut
a random image-sized window (after a resize to the model's size, a no-op for 32x32 CIFAR at 32), so every
other part of timm's pipeline stays as configured.
"""
from typing import Sequence, Union

from timm.data.transforms import RandomResizedCropAndInterpolation, str_to_interp_mode
from torchvision import transforms

__all__ = ['TRAIN_CROP_MODES', 'pad_crop', 'with_pad_crop']

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
