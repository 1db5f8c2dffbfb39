"""benchmarks/gpu_evidence.py --quick: every phase of the GPU evidence run on a tiny model on the CPU (so that the
script cannot rot before a GPU runs it), and the README table it writes from the run's files."""
import importlib.util
import json
import os

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_spec = importlib.util.spec_from_file_location('gpu_evidence', os.path.join(REPO, 'benchmarks', 'gpu_evidence.py'))
gpu_evidence = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(gpu_evidence)

pytestmark = pytest.mark.xdist_group('cost')


def test_the_quick_run_writes_every_phase_and_the_readme_table(tmp_path):
    readme = tmp_path / 'README.md'
    readme.write_text(f'intro\n{gpu_evidence.BEGIN}\nno GPU figure exists yet\n{gpu_evidence.END}\nrest\n')
    gpu_evidence.main(['--quick', '--results-dir', str(tmp_path / 'run'), '--readme', str(readme)])
    manifest = json.loads((tmp_path / 'run' / 'evidence.json').read_text())
    assert [phase['name'] for phase in manifest['phases']] == ['tests', 'cost test_resnet bf16', 'bake']
    statuses = {phase['name']: phase['status'] for phase in manifest['phases']}
    assert statuses['cost test_resnet bf16'] == statuses['bake'] == 'ok'
    assert 'skipped' in statuses['tests'] or 'passed' in statuses['tests']  # all skipped without CUDA
    cost = json.loads((tmp_path / 'run' / 'cost_test_resnet_bf16.json').read_text())
    assert [row['method'] for row in cost['rows']] == ['none', 'dlb', 'bake'] and cost['setting']['amp']
    bake = json.loads((tmp_path / 'run' / 'bake_swin_t.json').read_text())
    assert bake['setting']['opt'] == 'adamw' and bake['setting']['cutmix'] == 1.0  # the recipe's
    text = readme.read_text()
    assert text.startswith(f'intro\n{gpu_evidence.BEGIN}\nGPU evidence: cpu (--quick)') and text.endswith(
        f'{gpu_evidence.END}\nrest\n')
    assert '| method | test_resnet bf16 |' in text and '| dlb | ' in text
    assert 'BAKE vs plain training, `test_resnet` with configs/bake_imagenet_swin_t.yaml' in text
    assert 'the BAKE paper reports +1.5% time' in text and 'no GPU figure' not in text


def test_a_phase_without_time_left_is_skipped_and_said(tmp_path):
    manifest = gpu_evidence.run(quick=True, budget=0, folder=tmp_path)
    assert all(phase['status'].startswith('skipped: ') for phase in manifest['phases'])
    assert 'Skipped or cut short to keep the 0 s budget: tests (skipped' in gpu_evidence.render(tmp_path)


def test_the_full_run_plans_every_model_and_precision_within_nine_minutes():
    phases = gpu_evidence.plan(quick=False)
    costs = [phase for phase in phases if phase.name.startswith('cost ')]
    assert len(costs) == 8 and all('all' in phase.argv and '--amp' in phase.argv for phase in costs)
    assert {phase.argv[phase.argv.index('--model') + 1] for phase in costs} == set(gpu_evidence.MODELS)
    assert sum(phase.seconds for phase in phases) <= 9 * 60
