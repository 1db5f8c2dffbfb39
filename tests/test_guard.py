"""RunGuard: the first bad step and term, patience for fp16 loss scaling, and one verdict for all ranks."""
import os
import signal

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from timm_selfkd.runtime import run_guard
from timm_selfkd.runtime.run_guard import RunGuard, Verdict

NAN, OK = float('nan'), 1.0


def terms(loss=OK, kd=OK):
    return {'loss': torch.tensor(loss), 'loss_ce': torch.tensor(OK), 'loss_kd': torch.tensor(kd)}


def test_the_first_bad_step_and_term_are_reported():
    guard = RunGuard(torch.device('cpu'), distributed=False)
    for step in range(3):
        guard.observe(step, terms())
    assert guard.poll() == Verdict()
    assert guard.observe(3, terms(kd=float('inf'))).item() == 1
    guard.observe(4, terms(loss=NAN))
    assert guard.poll() == Verdict(0, 3, 'loss_kd')


def test_patience_needs_consecutive_bad_steps():
    """With fp16 loss scaling a skipped step is normal: only `patience` bad steps in a row are divergence,
    reported from the first step of that streak."""
    guard = RunGuard(torch.device('cpu'), distributed=False, patience=3)
    for step, loss in enumerate([NAN, NAN, OK, NAN, NAN]):
        guard.observe(step, terms(loss=loss))
    assert guard.poll().bad_step is None  # streaks of 2
    guard.observe(5, terms(loss=NAN))
    assert guard.poll() == Verdict(0, 3, 'loss')


def test_signals_set_the_stop_request_and_a_second_one_exits(monkeypatch):
    guard = RunGuard(torch.device('cpu'), distributed=False)
    guard.install()
    try:
        os.kill(os.getpid(), signal.SIGTERM)
        assert guard.poll() == Verdict(signal.SIGTERM)
        exits = []
        monkeypatch.setattr(os, '_exit', exits.append)
        os.kill(os.getpid(), signal.SIGINT)
        assert exits == [128 + signal.SIGINT]
    finally:
        guard.uninstall()
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL


def test_the_same_signal_twice_within_the_window_is_one_request(monkeypatch):
    """A scheduler signals every process while torchrun forwards the signal to its ranks: the repeat within
    REPEAT_WINDOW_S is the same stop request; later, it is a second one and exits at once."""
    now = [100.0]
    monkeypatch.setattr(run_guard.time, 'monotonic', lambda: now[0])
    exits = []
    monkeypatch.setattr(os, '_exit', exits.append)
    guard = RunGuard(torch.device('cpu'), distributed=False)
    guard.install()
    try:
        os.kill(os.getpid(), signal.SIGTERM)
        now[0] += run_guard.REPEAT_WINDOW_S / 2
        os.kill(os.getpid(), signal.SIGTERM)
        assert exits == [] and guard.poll() == Verdict(signal.SIGTERM)
        now[0] += run_guard.REPEAT_WINDOW_S
        os.kill(os.getpid(), signal.SIGTERM)
        assert exits == [128 + signal.SIGTERM]
    finally:
        guard.uninstall()


def _agree(rank, port, results):
    os.environ.update(MASTER_ADDR='127.0.0.1', MASTER_PORT=str(port))
    dist.init_process_group('gloo', rank=rank, world_size=2)
    guard = RunGuard(torch.device('cpu'), distributed=True)
    if rank == 1:
        guard.signum = signal.SIGTERM  # only rank 1 was signalled
    guard.observe(7, terms(loss=NAN) if rank == 0 else terms())  # only rank 0 diverged
    results[rank] = guard.poll()
    results[rank + 2] = guard.agree_bad(torch.tensor(rank))  # rank 1's step was bad
    dist.destroy_process_group()


def test_ranks_agree_on_one_verdict():
    with mp.Manager() as manager:
        results = manager.dict()
        mp.spawn(_agree, args=(29517 + os.getpid() % 1000, results), nprocs=2)
        assert results[0] == results[1] == Verdict(signal.SIGTERM, 7, 'loss')
        assert results[2] is results[3] is True
