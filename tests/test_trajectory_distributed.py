"""MrKD and PS-KD under DDP (2 processes, gloo, one spawn for all checks): the copies are equal on every rank,
and every PS-KD row written or read is the prediction of the right sample, with one table per node shared by
its ranks or one per rank (two one-process "nodes")."""
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn as nn
from torch.utils.data import DistributedSampler

import timm_selfkd
from timm_selfkd.methods.base import RunInfo
from timm_selfkd.registry import build_hparams

WORLD = 2
NUM_SAMPLES, NUM_CLASSES, FEATURES, PER_RANK_BATCH, EPOCHS = 12, 12, 5, 2, 3
STEPS = NUM_SAMPLES // WORLD // PER_RANK_BATCH


def _mrkd(rank):
    torch.manual_seed(rank)  # different initial weights per rank: DDP broadcasts rank 0's when it wraps
    model = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 3))
    task = timm_selfkd.create_task('mrkd', model, copies=2, interval='2')
    task.prepare_distributed(device_ids=None)
    optimizer = torch.optim.SGD(task.trainable_module.parameters(), lr=0.1)
    generator = torch.Generator().manual_seed(100 + rank)  # each rank its own data
    for _ in range(5):
        out = task(torch.randn(6, 4, generator=generator), torch.randint(3, (6,), generator=generator))
        optimizer.zero_grad()
        out['loss'].backward()
        optimizer.step()
    return {'copies': task.ring.state_dict(), 'running_mean': model[1].running_mean.clone(),
            'num_steps': task.num_steps}


def _pskd(rank, local_world_size):
    """Train a linear model on fixed features; record every prediction, every read, and the final table."""
    features = torch.randn(NUM_SAMPLES, FEATURES, generator=torch.Generator().manual_seed(0))
    labels = torch.arange(NUM_SAMPLES) % NUM_CLASSES
    torch.manual_seed(0)
    spec = timm_selfkd.get_method('pskd')  # built by hand: the test binds the run's node layout itself
    task = spec.task_cls(nn.Linear(FEATURES, NUM_CLASSES), build_hparams(spec, {}))
    task.bind_run(RunInfo(num_epochs=EPOCHS, steps_per_epoch=STEPS, num_samples=NUM_SAMPLES,
                          num_classes=NUM_CLASSES, batch_size=PER_RANK_BATCH, world_size=WORLD, rank=rank,
                          local_rank=rank % local_world_size, local_world_size=local_world_size))
    return train_recording(task, task.memory, features, labels, rank, lr=0.5)


def train_recording(task, memory, inputs, labels, rank, lr):
    """Train `task` (a PS-KD memory user, bound to this run) under DDP for EPOCHS on `inputs`; return the final
    table, every read of the memory and every rank's predictions (also used by tests/test_multi_exit_pskd.py)."""
    task.prepare_distributed(device_ids=None)
    optimizer = torch.optim.SGD(task.trainable_module.parameters(), lr=lr)
    sampler = DistributedSampler(range(NUM_SAMPLES), num_replicas=WORLD, rank=rank, shuffle=True, seed=0)
    predictions, reads = [], []
    for epoch in range(EPOCHS):
        sampler.set_epoch(epoch)
        order = list(sampler)
        for step in range(STEPS):
            indices = torch.tensor(order[step * PER_RANK_BATCH:(step + 1) * PER_RANK_BATCH])
            memory.flush()
            reads.append((epoch, indices, *memory.lookup(indices)))
            task.set_epoch(epoch)
            out = task(inputs[indices], labels[indices], indices=indices)  # a hand-written loop's batch information
            predictions.append((epoch, indices, out['output'].detach().softmax(-1)))
            optimizer.zero_grad()
            out['loss'].backward()
            optimizer.step()
    task.sync_task_state()
    everyone = [None] * WORLD
    dist.all_gather_object(everyone, predictions)
    return {'table': memory.values.clone(), 'reads': reads, 'predictions': everyone}


def _worker(rank, init_file, out_dir):
    dist.init_process_group('gloo', init_method=f'file://{init_file}', rank=rank, world_size=WORLD)
    result = {'mrkd': _mrkd(rank), 'pskd_node': _pskd(rank, WORLD), 'pskd_two_nodes': _pskd(rank, 1)}
    torch.save(result, f'{out_dir}/{rank}.pt')
    dist.destroy_process_group()


def _run(tmp_path_factory):
    folder = tmp_path_factory.mktemp('ddp')
    mp.spawn(_worker, args=(str(folder / 'init'), str(folder)), nprocs=WORLD)
    return [torch.load(folder / f'{rank}.pt', weights_only=False) for rank in range(WORLD)]


_RESULTS = {}


def _results(tmp_path_factory):
    if not _RESULTS:
        _RESULTS['ranks'] = _run(tmp_path_factory)
    return _RESULTS['ranks']


def test_mrkd_copies_are_equal_on_every_rank(tmp_path_factory):
    ranks = [r['mrkd'] for r in _results(tmp_path_factory)]
    assert ranks[0]['num_steps'] == ranks[1]['num_steps'] == 5
    # the ranks' BatchNorm statistics differ (each saw its own batches), the copies do not
    assert not torch.allclose(ranks[0]['running_mean'], ranks[1]['running_mean'])
    for name, tensor in ranks[0]['copies'].items():
        assert torch.equal(tensor, ranks[1]['copies'][name]), name
    assert not torch.equal(ranks[0]['copies']['0.weight'][0], ranks[0]['copies']['0.weight'][1])  # refreshed


def _last_predictions(predictions, before_epoch=None):
    """Each sample's prediction at the last step it was trained on (before `before_epoch`, if given)."""
    last = {}
    for rank_predictions in predictions:
        for epoch, indices, probs in rank_predictions:
            if before_epoch is None or epoch < before_epoch:
                for index, row in zip(indices.tolist(), probs):
                    last.setdefault(index, {})[epoch] = row
    return {i: rows[max(rows)] for i, rows in last.items()}


def _check_pskd(ranks, key):
    results = [r[key] for r in ranks]
    final = _last_predictions(results[0]['predictions'])
    assert sorted(final) == list(range(NUM_SAMPLES))
    expected = torch.stack([final[i] for i in range(NUM_SAMPLES)]).half()
    for result in results:  # every node's table holds every sample's last prediction, in its own row
        assert torch.allclose(result['table'].float(), expected.float(), atol=1e-3)
    for result in results:  # every read is the sample's prediction of the previous epoch
        for epoch, indices, probs, written in result['reads']:
            assert written.tolist() == [epoch > 0] * len(indices)
            if epoch:
                previous = _last_predictions(results[0]['predictions'], before_epoch=epoch)
                assert torch.allclose(probs, torch.stack([previous[i] for i in indices.tolist()]), atol=1e-3)
    assert not torch.allclose(expected[0].float(), expected[1].float(), atol=1e-2)  # rows tell samples apart


def test_pskd_rows_under_ddp_one_table_per_node(tmp_path_factory):
    _check_pskd(_results(tmp_path_factory), 'pskd_node')


def test_pskd_rows_under_ddp_one_table_per_one_process_node(tmp_path_factory):
    _check_pskd(_results(tmp_path_factory), 'pskd_two_nodes')
