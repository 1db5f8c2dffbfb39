"""Offline wandb runs read back from their .wandb files (wandb has no reader of its own for them), for the tests
of train.py's `--log-wandb` and of a user's own script's under the upstream adapter."""
import glob
import json
import os
import struct
import zlib

import pytest

_BLOCK = 32 * 1024  # a .wandb file is a LevelDB-style log: 32 KiB blocks of (crc32, length, kind) chunks
_FULL, _LAST = 1, 4


def _records(path):
    """The protobuf records of an offline run's .wandb file."""
    from wandb.proto.wandb_internal_pb2 import Record
    with open(path, 'rb') as f:
        data = f.read()
    assert data[:4] == b':W&B', path
    pos, parts = 7, b''
    while pos + 7 <= len(data):
        if _BLOCK - pos % _BLOCK < 7:  # a block's tail too short for a chunk header is padding
            pos += _BLOCK - pos % _BLOCK
            continue
        crc, length, kind = struct.unpack('<IHB', data[pos:pos + 7])
        chunk = data[pos + 7:pos + 7 + length]
        assert zlib.crc32(bytes([kind]) + chunk) == crc, f'{path}: corrupt chunk at byte {pos}'
        pos += 7 + length
        parts += chunk
        if kind in (_FULL, _LAST):
            record = Record()
            record.ParseFromString(parts)
            parts = b''
            yield record


def wandb_runs(wandb_dir):
    """Every offline run under `wandb_dir`, oldest first: its id, project, name, tags, config and history rows
    (wandb's own `_step`, `_runtime`, ... left out)."""
    import wandb
    wandb.teardown()  # `finish()` may return before wandb's service has written the file; its shutdown waits
    runs = []
    for path in sorted(glob.glob(os.path.join(str(wandb_dir), 'wandb', 'offline-run-*', 'run-*.wandb'))):
        run = dict(history=[], exit_code=None)
        for record in _records(path):
            kind = record.WhichOneof('record_type')
            if kind == 'run':
                run.update(id=record.run.run_id, project=record.run.project, name=record.run.display_name,
                           tags=list(record.run.tags),
                           config={item.key: json.loads(item.value_json) for item in record.run.config.update})
            elif kind == 'history':
                row = {item.key or '/'.join(item.nested_key): json.loads(item.value_json)
                       for item in record.history.item}
                run['history'].append({k: v for k, v in row.items() if not k.startswith('_')})
            elif kind == 'exit':
                run['exit_code'] = record.exit.exit_code
        runs.append(run)
    return runs


@pytest.fixture
def offline_wandb(tmp_path, monkeypatch):
    """wandb writes its runs under tmp_path/wandb-files and nowhere else (its settings are read again: wandb
    keeps them from its first run in a process until `teardown`)."""
    wandb = pytest.importorskip('wandb', reason='the wandb extra is not installed (pip install -e ".[test]")')
    folder = tmp_path / 'wandb-files'
    folder.mkdir()
    monkeypatch.setenv('WANDB_MODE', 'offline')
    monkeypatch.setenv('WANDB_DIR', str(folder))
    monkeypatch.setenv('WANDB_SILENT', 'true')
    wandb.teardown()
    yield folder
    wandb.finish()  # a run a failed test left open
    wandb.teardown()
