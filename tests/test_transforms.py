"""`--train-crop-mode pad`: timm's train transform with the CIFAR papers' zero-pad + random crop."""
import numpy as np
import pytest
import torch
from PIL import Image
from timm.data import create_transform
from timm.data.transforms import RandomResizedCropAndInterpolation

from timm_selfkd.runtime.transforms import with_pad_crop

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


# ---------------------------------------------------------------------------------------------------------------------
# Cutout
# ---------------------------------------------------------------------------------------------------------------------

MEAN = (0.5, 0.25, 1.0)


def hole_of(before, after):
    """The (rows, cols) bounding box of the changed pixels, and whether it is one filled rectangle."""
    changed = (before != after).any(dim=0)
    rows, cols = changed.any(dim=1).nonzero().flatten(), changed.any(dim=0).nonzero().flatten()
    box = (int(rows.min()), int(rows.max()) + 1, int(cols.min()), int(cols.max()) + 1)
    return box, bool(changed[box[0]:box[1], box[2]:box[3]].all())


@pytest.mark.parametrize('dtype', [torch.uint8, torch.float32])
def test_cutout_one_square_of_the_mean_colour_clipped_at_borders(dtype):
    """uint8 (prefetcher) images get mean x 255, normalised ones 0; the hole is 6x6 inside the image and
    clipped at each of the four borders when its centre is near one."""
    from timm_selfkd.runtime.transforms import CutOut
    cutout = CutOut(6, MEAN)
    image = torch.full((3, 16, 16), 7, dtype=dtype)
    torch.manual_seed(0)
    sizes, borders = set(), set()
    for _ in range(400):
        out = cutout(image)
        (top, bottom, left, right), filled = hole_of(image, out)
        assert filled and image.eq(7).all(), 'the input was changed or the hole is not a rectangle'
        expected = torch.tensor([128, 64, 255]) if dtype == torch.uint8 else torch.zeros(3)
        assert out[:, top, left].tolist() == expected.to(dtype).tolist()
        assert (bottom - top == 6 or top == 0 or bottom == 16) and (right - left == 6 or left == 0 or right == 16)
        sizes.add((bottom - top, right - left))
        borders |= {name for name, hit in (('top', top == 0), ('bottom', bottom == 16), ('left', left == 0),
                                           ('right', right == 16)) if hit}
    assert (6, 6) in sizes and any(h < 6 for h, _ in sizes), 'never inside, or never clipped'
    assert borders == {'top', 'bottom', 'left', 'right'}


def test_with_cutout_appends_to_timm_transform():
    from timm_selfkd.runtime.transforms import CutOut, with_cutout
    timm_transform = create_transform(SIZE, is_training=True, use_prefetcher=True)
    transform = with_cutout(timm_transform, 4, MEAN)
    assert isinstance(transform.transforms[-1], CutOut) and transform.transforms[:-1] == timm_transform.transforms
    assert np.asarray(transform(gradient_image())).shape == (3, SIZE, SIZE)
