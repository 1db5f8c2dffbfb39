"""`--train-crop-mode pad`: timm's train transform with the CIFAR papers' zero-pad + random crop."""
import numpy as np
import pytest
import torch
from PIL import Image
from timm.data import create_transform
from timm.data.transforms import RandomResizedCropAndInterpolation

from timm_selfkd.transforms import with_pad_crop

SIZE, PAD = 8, 2


def gradient_image():
    """Distinct non-zero pixel values, so any crop window can be located."""
    pixels = (np.arange(SIZE * SIZE * 3).reshape(SIZE, SIZE, 3) % 250 + 5).astype(np.uint8)
    return Image.fromarray(pixels)


def windows(image):
    """Every crop a pad-PAD random crop can give, as (dy, dx) -> CHW uint8 array."""
    padded = np.pad(np.asarray(image), ((PAD, PAD), (PAD, PAD), (0, 0)))
    return {(dy, dx): padded[dy:dy + SIZE, dx:dx + SIZE].transpose(2, 0, 1)
            for dy in range(2 * PAD + 1) for dx in range(2 * PAD + 1)}


def test_pad_crop_replaces_only_the_random_resized_crop():
    """Prefetcher transform (uint8 out, no flip, no jitter): each output is one of the padded windows, the
    zero-padded border shows up, and over many draws the offsets cover the whole range."""
    timm_transform = create_transform(SIZE, is_training=True, hflip=0., color_jitter=None, use_prefetcher=True)
    transform = with_pad_crop(timm_transform, (SIZE, SIZE), PAD)
    assert not any(isinstance(t, RandomResizedCropAndInterpolation) for t in transform.transforms)
    assert [type(t) for t in transform.transforms[1:]] == [type(t) for t in timm_transform.transforms[1:]]
    image = gradient_image()
    candidates = windows(image)
    torch.manual_seed(0)
    seen = set()
    for _ in range(300):
        out = np.asarray(transform(image))
        (offset,) = [key for key, window in candidates.items() if np.array_equal(out, window)]
        seen.add(offset)
    assert seen == set(candidates)


def test_pad_crop_keeps_normalisation_and_flip():
    """Without the prefetcher: float output normalised by timm, same size; hflip=1 mirrors every window."""
    transform = with_pad_crop(create_transform(SIZE, is_training=True, hflip=1., color_jitter=None), SIZE, PAD)
    out = transform(gradient_image())
    assert out.dtype == torch.float32 and out.shape == (3, SIZE, SIZE)
    mean, std = torch.tensor([0.485, 0.456, 0.406]), torch.tensor([0.229, 0.224, 0.225])
    pixels = (out * std[:, None, None] + mean[:, None, None]) * 255
    flipped = {k: w[:, :, ::-1] for k, w in windows(gradient_image()).items()}
    assert any(np.allclose(pixels.numpy(), w, atol=0.01) for w in flipped.values())


def test_no_aug_transform_is_kept():
    transform = create_transform(SIZE, is_training=True, no_aug=True)
    assert with_pad_crop(transform, SIZE, PAD) is transform


@pytest.mark.parametrize('size', [6, 12])
def test_other_image_sizes_are_resized_first(size):
    image = Image.fromarray(np.full((size, size, 3), 200, np.uint8))
    transform = with_pad_crop(create_transform(SIZE, is_training=True, use_prefetcher=True), SIZE, PAD)
    assert np.asarray(transform(image)).shape == (3, SIZE, SIZE)
