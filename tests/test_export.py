"""`python -m timm_selfkd.export`: a run folder of train.py in timm's Hugging Face layout, loaded back by timm with
the checkpoint's logits; the model card; the Hub push up to the upload (offline); bad input."""
import csv
import dataclasses
import json
import os
import shutil
import subprocess
import sys
from types import SimpleNamespace

import huggingface_hub
import pytest
import safetensors.torch
import timm
import torch
import yaml
from timm.data import resolve_data_config

from conftest import NUM_CLASSES
from test_train import REPO, read_summary, train_args
from timm_selfkd import export
from timm_selfkd.registry import get_method
from timm_selfkd.train import main as train

PROG = 'python -m timm_selfkd.export'
FILES = ['README.md', 'config.json', 'model.safetensors']
# a run with training-only exits (kept in the checkpoint's task state) and an EMA; preprocessing of its own
MULTI_EXIT = ('--selfkd', 'multi_exit', '--multi-exit-alpha', '0.3', '--model', 'test_resnet', '--img-size', '32',
              '--model-ema', '--model-ema-decay', '0.5', '--crop-pct', '0.8', '--interpolation', 'bicubic',
              '--mean', '0.4', '0.45', '0.5', '--std', '0.2', '0.25', '0.3')
# a ViT built at another size (its construction arguments must travel) with USKD's training-only weak head, no EMA
USKD_VIT = ('--selfkd', 'uskd', '--model', 'vit_tiny_patch16_224', '--img-size', '32', '--model-kwargs',
            'img_size=32', 'patch_size=8', 'depth=2')
VIT_KWARGS = dict(img_size=32, patch_size=8, depth=2)


@pytest.fixture(scope='module')
def runs(image_folder, tmp_path_factory):
    """The run folders of one epoch of each run above."""
    folders = {}
    for name, flags in (('multi_exit', MULTI_EXIT), ('uskd', USKD_VIT)):
        output = tmp_path_factory.mktemp(name)
        train(train_args(image_folder, output, *flags))
        folders[name] = str(output / 'run')
    return folders


def _export(capsys, *argv):
    export.main([str(a) for a in argv])
    return capsys.readouterr().out


def _checkpoint(run, name='model_best.pth.tar'):
    return torch.load(os.path.join(run, name), map_location='cpu', weights_only=False)


def _logits(model, seed=0):
    images = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        return model.eval()(images)


def _plain(state_dict, name='test_resnet', **kwargs):
    model = timm.create_model(name, num_classes=NUM_CLASSES, **kwargs)
    model.load_state_dict(state_dict)
    return model


def test_export_loads_in_timm_with_the_checkpoints_logits(runs, tmp_path, capsys):
    """The EMA weights by default (the run kept them), without the exits; config.json carries the classes and the
    run's preprocessing, none of timm's published weights' provenance."""
    out = tmp_path / 'hf'
    stdout = _export(capsys, runs['multi_exit'], out)
    assert sorted(os.listdir(out)) == FILES
    assert 'exported the EMA of the trained weights (decay 0.5) of model_best.pth.tar (epoch 0' in stdout
    checkpoint = _checkpoint(runs['multi_exit'])
    assert 'exits' in checkpoint['task_state']  # the training-only parts exist, and are not exported
    exported = safetensors.torch.load_file(out / 'model.safetensors')
    assert sorted(exported) == sorted(timm.create_model('test_resnet', num_classes=NUM_CLASSES).state_dict())
    loaded = timm.create_model(f'local-dir:{out}', pretrained=True)
    assert torch.equal(_logits(loaded), _logits(_plain(checkpoint['state_dict_ema'])))
    assert not torch.equal(_logits(loaded), _logits(_plain(checkpoint['state_dict'])))

    config = json.loads((out / 'config.json').read_text())
    assert (config['architecture'], config['num_classes']) == ('test_resnet', NUM_CLASSES)
    assert not {'tag', 'license', 'hf_hub_id', 'url'} & set(config['pretrained_cfg'])
    assert resolve_data_config({}, model=loaded) == dict(input_size=(3, 32, 32), interpolation='bicubic',
                                                         mean=[0.4, 0.45, 0.5], std=[0.2, 0.25, 0.3], crop_pct=0.8,
                                                         crop_mode='center')


def test_model_card_names_method_paper_hparams_recipe_and_metrics(runs, image_folder, tmp_path, capsys):
    out = tmp_path / 'hf'
    _export(capsys, runs['multi_exit'], out)
    card = (out / 'README.md').read_text()
    assert card.startswith('---\ntags:\n- image-classification\n- timm\n- timm-selfkd\n- selfkd-multi_exit\n')
    spec = get_method('multi_exit')
    assert '- **Self-KD method:** multi_exit' in card and f'- **Paper:** {spec.paper}\n' in card
    for name, value in dataclasses.asdict(spec.hparams_cls(alpha=0.3)).items():  # the rest: the defaults
        assert f'\n  - {name}: {value}\n' in card, name
    assert ('- **Weights:** the EMA of the trained weights (decay 0.5) of model_best.pth.tar (epoch 0, the best '
            'eval top1 of the run)') in card
    (row,) = read_summary(os.path.dirname(runs['multi_exit']))
    metrics = '\n'.join(f'  - {name}: {round(float(row[f"eval_ema_{name}"]), 4)}'
                        for name in ('top1', 'top5', 'loss', 'nll', 'ece', 'aurc'))
    assert f'- **Evaluation of the EMA weights, epoch 0 (summary.csv):**\n{metrics}\n' in card
    assert '  - lr: 0.01\n' in card and '  - model_ema_decay: 0.5\n' in card  # the salient recipe keys
    recipe = card.split('```yaml\n')[1].split('```')[0]
    with open(os.path.join(runs['multi_exit'], 'args.yaml')) as f:
        recorded_recipe = yaml.safe_load(f)
    local_paths = ('data_dir', 'output', 'experiment', 'resume', 'initial_checkpoint', 'class_map', 'log_wandb',
                   'wandb_project', 'wandb_tags', 'wandb_resume_id')
    assert yaml.safe_load(recipe) == {key: value for key, value in recorded_recipe.items()
                                      if value is not None and key not in local_paths}
    assert image_folder not in card and f"timm.create_model('local-dir:{out}', pretrained=True)" in card


def test_vit_with_its_construction_arguments_and_no_ema(runs, tmp_path, capsys):
    """A ViT at another size loads from its config alone; a run without EMA exports its trained weights."""
    out = tmp_path / 'vit'
    stdout = _export(capsys, runs['uskd'], out)
    assert 'exported the trained weights of model_best.pth.tar' in stdout
    checkpoint = _checkpoint(runs['uskd'])
    assert 'weak_head' in checkpoint['task_state']
    loaded = timm.create_model(f'local-dir:{out}', pretrained=True)
    assert torch.equal(_logits(loaded), _logits(_plain(checkpoint['state_dict'], 'vit_tiny_patch16_224',
                                                       **VIT_KWARGS)))
    card = (out / 'README.md').read_text()
    assert f'- **Paper:** {get_method("uskd").paper}\n' in card and '- **Weights:** the trained weights' in card


def test_last_checkpoint_trained_weights_and_final_metrics(runs, tmp_path, capsys):
    """--checkpoint picks the file, --no-ema the trained weights, and the card gives the metrics at the exported
    epoch and at the run's end (the run made two epochs long: model_best at epoch 0 differs from last at 1)."""
    run = tmp_path / 'run'
    shutil.copytree(runs['multi_exit'], run)
    best = _checkpoint(run)
    best['state_dict'] = {k: v * 2 if v.is_floating_point() else v for k, v in best['state_dict'].items()}
    torch.save(best, run / 'model_best.pth.tar')
    last = _checkpoint(run, 'last.pth.tar')
    last['epoch'] = 1
    torch.save(last, run / 'last.pth.tar')
    (first,) = read_summary(tmp_path)
    with open(run / 'summary.csv', 'a', newline='') as f:
        csv.DictWriter(f, fieldnames=list(first)).writerow({**first, 'epoch': '1', 'eval_top1': '77.5'})
    cards = {}
    for name, argv, state_dict in (('last', ['--checkpoint', 'last', '--no-ema'], last['state_dict']),
                                   ('best', ['--no-ema'], best['state_dict'])):
        out = tmp_path / name
        stdout = _export(capsys, run, out, *argv)
        assert torch.equal(_logits(timm.create_model(f'local-dir:{out}', pretrained=True)),
                           _logits(_plain(state_dict)))
        assert 'exported the trained weights of' in stdout
        cards[name] = (out / 'README.md').read_text()
    assert '- **Weights:** the trained weights of last.pth.tar (epoch 1)\n' in cards['last']
    assert '- **Evaluation of the trained weights, epoch 1 (summary.csv):**\n  - top1: 77.5\n' in cards['last']
    assert 'end of the run' not in cards['last']
    assert '- **Weights:** the trained weights of model_best.pth.tar (epoch 0, the best eval top1' in cards['best']
    assert (f'- **Evaluation of the trained weights, epoch 0 (summary.csv):**\n  - top1: {float(first["eval_top1"])}\n'
            in cards['best'])
    assert ('- **Evaluation of the trained weights at the end of the run, epoch 1 (summary.csv):**\n  - top1: 77.5\n'
            in cards['best'])


def test_push_to_hub_uploads_the_export_with_timms_push(runs, tmp_path, capsys, monkeypatch):
    """timm's push_to_hf_hub up to the upload, offline: the repository it would create and the folder it would
    upload (the weights, config and card of the local export)."""
    calls = {}

    def create_repo(self, repo_id, private=False, exist_ok=False, **kwargs):
        calls['create_repo'] = (repo_id, private, exist_ok)
        return SimpleNamespace(repo_id=repo_id)

    def upload_folder(self, repo_id, folder_path, **kwargs):
        calls['upload'] = (repo_id, sorted(os.listdir(folder_path)), kwargs)
        calls['files'] = {name: open(os.path.join(folder_path, name), 'rb').read() for name in FILES}
        return 'https://huggingface.co/user/tiny/commit/0123'

    monkeypatch.setattr(huggingface_hub.HfApi, 'create_repo', create_repo)
    monkeypatch.setattr(huggingface_hub.HfApi, 'file_exists', lambda self, **kwargs: False)  # no card there yet
    monkeypatch.setattr(huggingface_hub.HfApi, 'upload_folder', upload_folder)
    out = tmp_path / 'hf'
    stdout = _export(capsys, runs['multi_exit'], out, '--push-to-hub', 'user/tiny', '--private')
    assert calls['create_repo'] == ('user/tiny', True, True)
    repo, files, kwargs = calls['upload']
    assert (repo, files) == ('user/tiny', FILES) and kwargs['commit_message'] == 'Add test_resnet trained with ' \
                                                                                 'timm-selfkd'
    for name in ('README.md', 'config.json'):
        assert calls['files'][name] == (out / name).read_bytes(), name
    uploaded = safetensors.torch.load(calls['files']['model.safetensors'])
    exported = safetensors.torch.load_file(out / 'model.safetensors')
    assert all(torch.equal(uploaded[k], exported[k]) for k in exported) and uploaded.keys() == exported.keys()
    card = (out / 'README.md').read_text()
    assert '# Model card for tiny\n' in card and "timm.create_model('hf-hub:user/tiny', pretrained=True)" in card
    assert 'pushed to the Hugging Face Hub: https://huggingface.co/user/tiny/commit/0123' in stdout


def test_failed_push_is_one_line_and_keeps_the_export(runs, tmp_path, capsys, monkeypatch):
    def refuse(self, repo_id, **kwargs):
        raise OSError('Invalid user token.\nmore detail')

    monkeypatch.setattr(huggingface_hub.HfApi, 'create_repo', refuse)
    out = tmp_path / 'hf'
    with pytest.raises(SystemExit) as exc:
        export.main([runs['multi_exit'], str(out), '--push-to-hub', 'user/tiny'])
    assert exc.value.code == 1
    assert capsys.readouterr().err.splitlines() == [
        f"{PROG}: error: pushing to 'user/tiny' failed (Invalid user token.); {out} is complete"]
    assert sorted(os.listdir(out)) == FILES


def _without_ema(run, out):
    checkpoint = _checkpoint(run)
    del checkpoint['state_dict_ema'], checkpoint['task_state_ema']
    torch.save(checkpoint, os.path.join(run, 'model_best.pth.tar'))


def _truncate(run, out):
    with open(os.path.join(run, 'model_best.pth.tar'), 'r+b') as f:
        f.truncate(1000)


def _unknown_method(run, out):
    with open(os.path.join(run, 'args.yaml'), 'a') as f:
        f.write('selfkd: dbl\n')


def _fill(run, out):
    os.makedirs(out)
    with open(os.path.join(out, 'notes.txt'), 'w') as f:
        f.write('mine')


def _remove(*names):
    return lambda run, out: [os.remove(os.path.join(run, name)) for name in names]


@pytest.mark.parametrize('spoil, argv, expected', [
    (None, ['{run}-missing', '{out}'], "RUN_DIR '{run}-missing' is not a folder"),
    (_remove('args.yaml'), ['{run}', '{out}'], "'{run}' is not a run folder of train.py: it has no args.yaml"),
    (_remove('model_best.pth.tar'), ['{run}', '{out}'],
     "'{run}' has no model_best.pth.tar: export last.pth.tar with --checkpoint last"),
    (_remove('model_best.pth.tar', 'last.pth.tar'), ['{run}', '{out}', '--checkpoint', 'last'],
     "'{run}' has no last.pth.tar (train.py writes it when an epoch ends; a recovery checkpoint is not exported"),
    (_truncate, ['{run}', '{out}'], "model_best.pth.tar' is truncated or corrupt"),
    (_without_ema, ['{run}', '{out}', '--ema'], 'holds no EMA weights (the run was trained without --model-ema)'),
    (_unknown_method, ['{run}', '{out}'], "args.yaml': unknown self-KD method 'dbl' (did you mean 'dlb'?)"),
    (_fill, ['{run}', '{out}'], "OUT_DIR '{out}' exists and holds files: choose another folder, or replace it with "
                                "--force"),
    (None, ['{run}', '{run}', '--force'], "OUT_DIR '{run}' is the run folder or holds it"),
    (None, ['{run}', '{tmp}', '--force'], "OUT_DIR '{tmp}' is the run folder or holds it"),
])
def test_bad_input_is_one_line_and_writes_nothing(runs, tmp_path, capsys, spoil, argv, expected):
    """Exit status 2, one line naming the problem; OUT_DIR neither created nor touched, no temporary folder."""
    names = dict(run=str(tmp_path / 'run'), out=str(tmp_path / 'out'), tmp=str(tmp_path))
    shutil.copytree(runs['multi_exit'], names['run'])
    if spoil is not None:
        spoil(names['run'], names['out'])
    before = {folder: sorted(os.listdir(folder)) for folder in (tmp_path, tmp_path / 'run')}
    with pytest.raises(SystemExit) as exc:
        export.main([arg.format(**names) for arg in argv])
    assert exc.value.code == 2
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and err[0].startswith(f'{PROG}: error: ') and expected.format(**names) in err[0], err
    assert {folder: sorted(os.listdir(folder)) for folder in before} == before
    assert not os.path.isdir(names['out']) or os.listdir(names['out']) == ['notes.txt']


def test_a_failed_write_leaves_no_out_dir(runs, tmp_path, capsys, monkeypatch):
    """An error while writing (a full disk) removes the half-written folder; the previous OUT_DIR stays whole."""
    def full_disk(model, save_directory, data_config=None, **kwargs):
        open(os.path.join(save_directory, 'model.safetensors'), 'w').close()
        raise OSError(28, 'No space left on device')

    out = tmp_path / 'hf'
    out.mkdir()
    (out / 'notes.txt').write_text('mine')
    monkeypatch.setattr(export, 'save_for_hf', full_disk)
    with pytest.raises(SystemExit) as exc:
        export.main([runs['multi_exit'], str(out), '--force'])
    assert exc.value.code == 2
    assert capsys.readouterr().err.splitlines() == [
        f"{PROG}: error: cannot write OUT_DIR '{out}': No space left on device"]
    assert sorted(os.listdir(tmp_path)) == ['hf'] and os.listdir(out) == ['notes.txt']


def test_force_replaces_the_whole_out_dir(runs, tmp_path, capsys):
    out = tmp_path / 'hf'
    out.mkdir()
    (out / 'pytorch_model.bin').write_text('an older export')
    _export(capsys, runs['multi_exit'], out, '--force')
    assert sorted(os.listdir(out)) == FILES and sorted(os.listdir(tmp_path)) == ['hf']


@pytest.mark.parametrize('missing, expected', [
    ('safetensors', 'exporting needs safetensors: pip install safetensors'),
    ('timm', f'exporting needs timm 1.0.31 or newer (its save_for_hf writes the run\'s preprocessing), installed: '
             f'{timm.__version__}: pip install -U timm'),
])
def test_missing_packages_are_one_line(runs, tmp_path, capsys, monkeypatch, missing, expected):
    if missing == 'timm':
        monkeypatch.setattr(export, 'save_for_hf', lambda model, save_directory, model_config=None: None)
    else:
        find_spec = export.importlib.util.find_spec
        monkeypatch.setattr(export.importlib.util, 'find_spec', lambda name: None if name == missing else
                            find_spec(name))
    with pytest.raises(SystemExit) as exc:
        export.main([runs['multi_exit'], str(tmp_path / 'hf')])
    assert exc.value.code == 2
    assert capsys.readouterr().err.splitlines() == [f'{PROG}: error: {expected}']
    assert not (tmp_path / 'hf').exists()


def test_command_line_module(tmp_path):
    """`python -m timm_selfkd.export` on a folder that is no run: status 2, one line, no traceback."""
    result = subprocess.run([sys.executable, '-m', 'timm_selfkd.export', str(tmp_path), str(tmp_path / 'hf')],
                            capture_output=True, text=True, cwd=REPO, timeout=120)
    assert result.returncode == 2 and result.stdout == ''
    assert result.stderr.splitlines() == [f"{PROG}: error: '{tmp_path}' is not a run folder of train.py: it has no "
                                          'args.yaml and no summary.csv']
