"""The cost command's rows from the measurements: ratios to plain training, projections for E epochs of N images,
one markdown table and one JSON record."""
import dataclasses
import datetime
import os
import platform
from pathlib import Path
from typing import Any, Dict, List, Optional

import numpy as np
import timm
import torch

import timm_selfkd
from timm_selfkd.cost.measure import Result, Setting

__all__ = ['cost_rows', 'markdown', 'environment', 'cpu_name', 'TWICE']

TWICE = 1.5  # reads per image and epoch from which a method says it reads each image twice or more


def cost_rows(results: List[Result], setting: Setting, epochs: int) -> List[Dict[str, Any]]:
    """One record per row (the first is plain training, the reference), with the fields of the JSON.

    Time ratio: median over rounds of the row's step time / the reference's in the same round. Wall time: steps
    of E epochs of the method's batches over N images x its median step (the step only: no data loading, no
    validation). Equal epochs: against plain training's E epochs; equal images: against plain training reading
    as many images (E x the method's reads per image epochs).
    """
    base = results[0]
    if base.failure is not None:
        raise ValueError(f'plain training cannot run here: {base.failure}')
    base_step = float(np.median(base.times))
    base_wall = epochs * base.steps_per_epoch * base_step
    base_reads = base.steps_per_epoch * setting.batch_size / setting.num_samples
    rows = []
    for result in results:
        row = {'method': result.run.label, 'selfkd': result.run.method, 'hparams': _plain(result.run.hparams),
               'status': _status(result.failure), 'reason': result.failure}
        rows.append(row)
        if result.failure is not None:
            continue
        q1, step, q3 = np.percentile(result.times, [25, 50, 75])
        r1, ratio, r3 = np.percentile(result.times / base.times, [25, 50, 75])
        reads = result.steps_per_epoch * setting.batch_size / setting.num_samples
        wall = epochs * result.steps_per_epoch * step
        plain_same_images = base_wall * reads / base_reads
        row.update(
            step_ms=step * 1e3, step_ms_iqr=[q1 * 1e3, q3 * 1e3], time_ratio=ratio, time_ratio_iqr=[r1, r3],
            timed_steps=len(result.times), images_per_s=setting.batch_size / step,
            new_images_per_s=setting.num_samples / result.steps_per_epoch / step,
            peak_memory_bytes=result.peak_bytes,
            memory_ratio=result.peak_bytes / base.peak_bytes if base.peak_bytes else None,
            state_bytes=result.state_bytes, per_sample_state_bytes=result.per_sample_bytes,
            per_sample_state_total_bytes=round(result.per_sample_bytes * setting.num_samples),
            per_sample_state_variants={label: round(per_image * setting.num_samples)
                                       for label, per_image in result.variant_per_sample_bytes.items()},
            steps_per_epoch=result.steps_per_epoch, new_images_per_step=setting.num_samples / result.steps_per_epoch,
            reads_per_image=reads, wall_s=wall, wall_ratio_equal_epochs=wall / base_wall,
            plain_wall_s_equal_images=plain_same_images, wall_ratio_equal_images=wall / plain_same_images)
    return rows


def _status(failure: Optional[str]) -> str:
    """'ok', or the kind of failure its reason starts with (`measure.failure_reason`)."""
    if failure is None:
        return 'ok'
    return next(kind for kind in ('out of memory', 'refused', 'failed') if failure.startswith(kind))


def _plain(value: Any) -> Any:
    """Hyper-parameters as JSON values (a stack's per-part dataclasses as dicts)."""
    if dataclasses.is_dataclass(value):
        return dataclasses.asdict(value)
    if isinstance(value, dict):
        return {key: _plain(item) for key, item in value.items()}
    return value


def _size(nbytes: Optional[float]) -> str:
    if nbytes is None:
        return ''
    for unit, scale in (('GiB', 2 ** 30), ('MiB', 2 ** 20), ('KiB', 2 ** 10)):
        if abs(nbytes) >= scale:
            return f'{nbytes / scale:.1f} {unit}'
    return f'{nbytes:.0f} B'


def _duration(seconds: float) -> str:
    for unit, scale in (('d', 86400), ('h', 3600), ('min', 60)):
        if seconds >= scale:
            return f'{seconds / scale:.1f} {unit}'
    return f'{seconds:.0f} s'


def markdown(rows: List[Dict[str, Any]], setting: Setting, epochs: int, device_name: str) -> str:
    """The table and what its columns mean."""
    amp = f', AMP {setting.amp_dtype}' if setting.amp else ''
    extras = ''.join(f', {flag}' for flag, on in (('channels last', setting.channels_last),
                                                  ('gradient checkpointing', setting.grad_checkpointing),
                                                  (f'torch.compile {setting.torchcompile}', setting.torchcompile))
                     if on)
    kwargs = ''.join(f' {k}={v}' for k, v in setting.model_kwargs.items())
    timed = rows[0]['timed_steps']
    size = 'x'.join(map(str, setting.input_size))
    lines = [
        f'Model `{setting.model}`{kwargs}, {setting.num_classes} classes, input {size}, '
        f'{setting.batch_size} images per step for every method, {device_name}{amp}{extras}, optimizer {setting.opt}; '
        f'{timed} timed steps per method, interleaved round-robin. Projection: {epochs} epochs of '
        f'{setting.num_samples} images.',
        '',
        '| method | step (ms) | time ratio (IQR) | images/s | peak memory | memory ratio | kept state '
        '| reads/image | wall, E epochs | vs plain, equal epochs | vs plain, equal images |',
        '|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|',
    ]
    for row in rows:
        if row['reason'] is not None:
            lines.append(f'| {row["method"]} | {row["reason"]} |' + ' |' * 9)
            continue
        r1, r3 = row['time_ratio_iqr']
        memory = f'{row["memory_ratio"]:.2f}x' if row['memory_ratio'] is not None else ''
        lines.append(
            f'| {row["method"]} | {row["step_ms"]:.1f} | {row["time_ratio"]:.2f}x ({r1:.2f}-{r3:.2f}) '
            f'| {row["images_per_s"]:.0f} | {_size(row["peak_memory_bytes"])} | {memory} '
            f'| {_size(row["state_bytes"]) if row["state_bytes"] else "0"} | {row["reads_per_image"]:.2f} '
            f'| {_duration(row["wall_s"])} | {row["wall_ratio_equal_epochs"]:.2f}x '
            f'| {row["wall_ratio_equal_images"]:.2f}x |')
    twice = [row['method'] for row in rows if row['reason'] is None and row['reads_per_image'] >= TWICE]
    per_sample = [f'{row["method"]} {_size(row["per_sample_state_total_bytes"])}'
                  + ''.join(f' ({label}: {_size(total)})' for label, total in row['per_sample_state_variants'].items())
                  for row in rows if row['reason'] is None and row['per_sample_state_bytes']]
    peak = 'the CUDA allocator\'s peak' if setting.device.startswith('cuda') else 'live tensors'
    lines += [
        '',
        'Time ratio: median over rounds of the step time / plain training\'s in the same round (quartiles in '
        'brackets). images/s: images read per second (rows of the batch). Peak memory: one steady-state step '
        f'({peak}: model, gradients, optimizer and task state, activations), without per-sample tables. Kept '
        'state: what the method '
        'keeps between steps beyond the model and its optimizer (its checkpoint\'s task state: training-only parts, '
        'weight copies, per-sample tables for N images). Wall: steps of E epochs of the method\'s batches x its '
        'median step (no data loading, no validation); equal images: against plain training reading as many '
        'images.',
    ]
    if twice:
        lines.append(f'- Read each image twice or more per epoch (an epoch takes that many more steps; compare at '
                     f'equal images): {", ".join(twice)}.')
    if per_sample:
        lines.append(f'- Per-sample tables (host memory, one per node, not in the peak): {", ".join(per_sample)}.')
    return '\n'.join(lines) + '\n'


def cpu_name() -> str:
    """The CPU's model name (from /proc/cpuinfo on Linux) and logical core count."""
    name = platform.processor() or platform.machine()
    cpuinfo = Path('/proc/cpuinfo')
    if cpuinfo.exists():
        name = next((line.split(':', 1)[1].strip() for line in cpuinfo.read_text().splitlines()
                     if line.startswith('model name')), name)
    return f'{name}, {os.cpu_count()} logical cores'


def environment(device: str, command: str) -> Dict[str, str]:
    """Command line, versions, hardware and date of a measurement."""
    return {'command': command,
            'torch': torch.__version__, 'timm': timm.__version__, 'timm_selfkd': timm_selfkd.__version__,
            'python': platform.python_version(), 'cpu': cpu_name(), 'platform': platform.platform(),
            'device': torch.cuda.get_device_name(device) if device.startswith('cuda') else 'cpu',
            'torch_threads': str(torch.get_num_threads()),
            'date': f'{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M UTC}'}
