"""`LogitsAndFeatures`: BAKE's one-pass (logits, pooled features) across timm model families."""
import pytest
import timm
import torch
from timm.optim import create_optimizer_v2

from timm_selfkd.methods.base import LogitsAndFeatures

FAMILIES = {
    'resnet18': {},
    'efficientnet_b0': {},
    'mobilenetv3_small_050': {},
    'convnext_atto': {},
    'vit_tiny_patch16_224': {'img_size': 32, 'patch_size': 8},
    'deit_tiny_distilled_patch16_224': {'img_size': 32, 'patch_size': 8},  # two heads: no single classifier
    'resnetv2_18': {},  # 1x1 conv classifiers see (B, C, 1, 1)
    'dla34': {},
}


@pytest.mark.parametrize('name', sorted(FAMILIES))
def test_logits_are_the_model_output_and_features_its_pre_logits(name):
    torch.manual_seed(0)
    model = timm.create_model(name, num_classes=5, **FAMILIES[name]).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        logits, features = LogitsAndFeatures(model)(x)
        torch.testing.assert_close(logits, model(x))
        torch.testing.assert_close(features, model.forward_head(model.forward_features(x), pre_logits=True))


def test_head_runs_once_per_step():
    """A head with BatchNorm (MobileNetV4's norm_head) updates its statistics once, as in plain training."""
    model = timm.create_model('mobilenetv4_conv_small', num_classes=5).train()
    LogitsAndFeatures(model)(torch.randn(4, 3, 32, 32))
    assert int(model.norm_head.num_batches_tracked) == 1


def test_dropout_mask_shared_by_logits_and_features():
    """With head dropout the logits are the classifier applied to exactly the returned features."""
    model = timm.create_model('resnet18', num_classes=5, drop_rate=0.5).train()
    logits, features = LogitsAndFeatures(model)(torch.randn(4, 3, 32, 32))
    torch.testing.assert_close(logits, model.get_classifier()(features))


def test_layer_decay_groups_follow_the_wrapped_model():
    model = timm.create_model('vit_tiny_patch16_224', num_classes=5, img_size=32, patch_size=8)
    bare = create_optimizer_v2(model, 'sgd', lr=0.1, layer_decay=0.65)
    wrapped = create_optimizer_v2(LogitsAndFeatures(model), 'sgd', lr=0.1, layer_decay=0.65)
    assert [g['lr_scale'] for g in wrapped.param_groups] == [g['lr_scale'] for g in bare.param_groups]
    assert len(bare.param_groups) > 2
