"""The batch-info side channel (STUB of the lead's base API): each batch's indices are the images that arrive."""
import numpy as np
import pytest
import torch
from timm.data import create_loader

from timm_selfkd.data import build_dataset, dataset_labels, record_batch_info, set_loader_epoch


class _Task:
    device = torch.device('cpu')

    def bind_batch_info_source(self, source):
        self.batch_info = source


@pytest.mark.parametrize('workers, prefetcher', [(0, False), (2, True)])
def test_indices_match_the_labels_that_arrive(image_folder, workers, prefetcher):
    dataset = build_dataset('', image_folder, 'train', is_training=True, in_chans=3)
    labels = dataset_labels(dataset)
    loader = create_loader(dataset, input_size=(3, 32, 32), batch_size=5, is_training=True, num_workers=workers,
                           use_prefetcher=prefetcher, device=torch.device('cpu'))
    task = _Task()
    loader = record_batch_info(loader, task)
    seen = []
    for epoch in range(2):
        set_loader_epoch(loader, epoch)
        for step, (_, target) in enumerate(loader):
            info = task.batch_info()
            assert (info.epoch, info.step) == (epoch, step)
            assert np.array_equal(labels[info.indices.numpy()], target.numpy())
            seen.append(info.indices)
    assert len(torch.cat(seen)) == 2 * (len(dataset) // 5 * 5)
    assert not torch.equal(seen[0], seen[len(seen) // 2])  # the order is reshuffled each epoch
