"""The CLIP feature target: local weights load exactly, frames get the teacher's own mean/std and are resized to the
student's token grid, features are standardised per channel across each clip's tokens."""
from __future__ import annotations

import pytest
import timm
import torch
import torch.nn.functional as F

from trackmae_stream.targets import ClipTeacher

# A small timm ViT stands in for CLIP ViT-B/16 (same loading and forward path, 5.7 M instead of 86 M parameters).
STAND_IN = "vit_tiny_patch16_224.augreg_in21k"


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    torch.manual_seed(0)
    model = timm.create_model(STAND_IN, pretrained=False, num_classes=0)
    path = tmp_path_factory.mktemp("teacher") / "teacher.pth"
    torch.save(model.state_dict(), path)
    return path, model.eval()


def test_teacher_loads_local_file_and_matches_a_float64_recomputation(weights):
    path, reference = weights
    side = 3
    teacher = ClipTeacher(STAND_IN, str(path), tokens_side=side)
    assert teacher.input_side == side * 16 and teacher.dim == 192
    cfg = reference.pretrained_cfg
    torch.testing.assert_close(teacher.mean.flatten(), torch.tensor(cfg["mean"]))
    gen = torch.Generator().manual_seed(1)
    frames = torch.randint(0, 256, (2, 3, 37, 29, 3), dtype=torch.uint8, generator=gen)  # odd frame size
    got = teacher(frames)
    assert got.shape == (2, 3 * side * side, 192)

    x = frames.flatten(0, 1).permute(0, 3, 1, 2).double() / 255
    x = F.interpolate(x, size=(48, 48), mode="bicubic", align_corners=False, antialias=True)
    x = (x - torch.tensor(cfg["mean"], dtype=torch.float64).view(1, 3, 1, 1)) / torch.tensor(
        cfg["std"], dtype=torch.float64).view(1, 3, 1, 1)
    ref_model = timm.create_model(STAND_IN, pretrained=False, num_classes=0, dynamic_img_size=True)
    ref_model.load_state_dict(reference.state_dict())
    with torch.no_grad():
        feats = ref_model.double().eval().forward_features(x)[:, ref_model.num_prefix_tokens:]
    feats = feats.reshape(2, 3 * side * side, 192)
    ref = (feats - feats.mean(1, keepdim=True)) / torch.sqrt(feats.var(1, unbiased=False, keepdim=True) + 1e-6)
    torch.testing.assert_close(got.double(), ref, atol=2e-3, rtol=2e-3)
    # standardised per channel across the clip's tokens
    torch.testing.assert_close(got.mean(1), torch.zeros(2, 192), atol=1e-4, rtol=0)
    torch.testing.assert_close(got.var(1, unbiased=False), torch.ones(2, 192), atol=1e-3, rtol=0)


def test_teacher_without_weights_says_where_it_looked(tmp_path):
    with pytest.raises(RuntimeError, match="cannot load the CLIP teacher"):
        ClipTeacher(STAND_IN, str(tmp_path / "missing.pth"), tokens_side=2)


def test_default_clip_model_normalises_with_clip_statistics():
    cfg = timm.models.get_pretrained_cfg("vit_base_patch16_clip_quickgelu_224.openai")
    assert tuple(cfg.mean) == pytest.approx((0.48145466, 0.4578275, 0.40821073))  # CLIP's, not ImageNet's
