"""FADE against its official code (BMVC-FADE + gem-torch): the rules of issue 17, items 3-5.

Each rule is pinned by hand-computed values or by re-computing it from the backbone's own pieces:
which blocks gem-torch's ``depth`` turns into GEM blocks, ``ss_attn_temp`` as the inverse
temperature, the GEM CLS token for ``language_classification_feature: gem``, and OpenCV's 8-bit
resize of the final uint8 map.
"""
from __future__ import annotations

import math
import sys

import cv2
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from zsadx.config import ConfigError, load_config, load_yaml
from zsadx.errors import UserError
from zsadx.eval.evaluator import EvalConfig
from zsadx.models.attention import gem_hook, gem_layers
from zsadx.models.methods.base import build_method
from zsadx.models.methods.fade import resize_uint8


def fade(**over):
    data = {"method": load_yaml("methods/fade-tiny"), "data": {"shards": "-", "dataset": "-"}}
    cfg = load_config(EvalConfig, data=data, overrides=[f"method.{k}={v}" for k, v in over.items()])
    return build_method(cfg.method).eval()


# ---- item 4: gem_depth ----------------------------------------------------------------------

@pytest.mark.parametrize("depth, blocks, expected", [
    (7, 12, list(range(7, 13))),     # FADE's default on ViT-B: the last 6 blocks
    (7, 24, list(range(19, 25))),    # on ViT-L still the last 6 (not 7..24, 18 blocks)
    (2, 12, [12]),
    (13, 12, list(range(1, 13))),    # every block
    (3, 4, [3, 4]),                  # fade-tiny
])
def test_gem_depth_is_the_last_depth_minus_one_blocks(depth, blocks, expected):
    # gem-torch replaces resblocks[-i] for i = 1 .. depth-1, i.e. 1-based blocks blocks-i+1.
    assert sorted(blocks - i + 1 for i in range(1, depth)) == expected
    assert list(gem_layers(depth, blocks)) == expected
    assert sorted(gem_hook(depth, blocks).layers) == expected


@pytest.mark.parametrize("depth", [0, 1, 14])
def test_gem_depth_outside_what_gem_torch_accepts(depth):
    with pytest.raises(ValueError, match="outside 2..13"):
        gem_layers(depth, 12)


def test_fade_gem_depth_keys_are_checked():
    assert sorted(fade(gem_depth=2).gem.layers) == [4]       # the tiny backbone has 4 blocks
    assert sorted(fade(gem_depth=5).gem.layers) == [1, 2, 3, 4]
    with pytest.raises(ConfigError, match="'method.gem_depth' 6 outside 2..5"):
        fade(gem_depth=6)
    with pytest.raises(ConfigError, match="'method.gem_depth': 1"):
        fade(gem_depth=1)
    with pytest.raises(ConfigError, match="'method.ss_attn_temp'.*inverse temperature"):
        fade(ss_attn_temp=-1.0)
    with pytest.raises(ConfigError, match="'method.ss_attn_iter'"):
        fade(ss_attn_iter=-1)


# ---- item 4: ss_attn_temp is the inverse temperature -----------------------------------------

def identity_block(dim: int = 2) -> nn.Module:
    """A one-head block whose q, k, v and out-projection are the identity (q = k = v = x)."""
    blk = nn.Module()
    blk.attn = nn.MultiheadAttention(dim, 1, batch_first=True)
    with torch.no_grad():
        blk.attn.in_proj_weight.copy_(torch.eye(dim).repeat(3, 1))
        blk.attn.in_proj_bias.zero_()
        blk.attn.out_proj.weight.copy_(torch.eye(dim))
        blk.attn.out_proj.bias.zero_()
    return blk


def test_ss_attn_temp_multiplies_the_cosine_logits():
    # Two orthogonal unit tokens: cos = I, so the attention row is softmax(t * [1, 0]).
    x = torch.tensor([[[1.0, 0.0], [0.0, 1.0]]])
    t = 2.0
    with torch.no_grad():
        out = gem_hook(2, 1, iterations=0, inv_temp=t).path(identity_block(), x)
    w = math.exp(t) / (math.exp(t) + 1)      # 0.8808; 1/t would give 0.6225
    assert out[0].flatten().tolist() == pytest.approx([w, 1 - w, 1 - w, w], rel=1e-6)


def test_ss_attn_temp_with_the_official_single_iteration():
    x = torch.tensor([[[1.0, 0.0], [0.0, 1.0]]])
    t = 3.0
    w = math.exp(t) / (math.exp(t) + 1)
    # One clustering step maps the tokens to (w, 1-w) and (1-w, w); their cosine is c.
    c = 2 * w * (1 - w) / (w ** 2 + (1 - w) ** 2)
    w2 = math.exp(t) / (math.exp(t) + math.exp(t * c))   # the final maps are applied to the original v
    with torch.no_grad():
        out = gem_hook(2, 1, iterations=1, inv_temp=t).path(identity_block(), x)
    assert out[0].flatten().tolist() == pytest.approx([w2, 1 - w2, 1 - w2, w2], rel=1e-6)


def test_adaptive_inverse_temperature_is_mean_token_norm_over_sqrt_head_dim():
    x = torch.tensor([[[3.0, 0.0], [0.0, 3.0]]])     # norms 3, head dim 2 -> 3 / sqrt(2)
    t = 3 / math.sqrt(2)
    w = math.exp(t) / (math.exp(t) + 1)
    with torch.no_grad():
        out = gem_hook(2, 1, iterations=0).path(identity_block(), x)
    assert out[0].flatten().tolist() == pytest.approx([3 * w, 3 * (1 - w), 3 * (1 - w), 3 * w], rel=1e-6)


def test_fade_passes_ss_attn_temp_as_the_inverse_temperature():
    m = fade(ss_attn_temp=2.0, ss_attn_iter=0)
    x = torch.tensor([[[1.0, 0.0], [0.0, 1.0]]])
    with torch.no_grad():
        out = m.gem.path(identity_block(), x)
    w = math.exp(2.0) / (math.exp(2.0) + 1)
    assert out[0, 0].tolist() == pytest.approx([w, 1 - w], rel=1e-6)


# ---- item 3: the GEM CLS token ---------------------------------------------------------------

def _language_score_by_hand(m, cls_token: torch.Tensor) -> float:
    """Official ``average`` text model on one width-D CLS token: ln_post, proj, L2-normalise, then
    softmax(100 * e . [mean normal, mean abnormal])[abnormal] (means not re-normalised)."""
    v = m.backbone.visual
    e = F.normalize(v.ln_post(cls_token) @ v.proj, dim=-1)
    normal, abnormal = m.text_cls["part"]
    logits = 100 * torch.stack([e @ normal.mean(0), e @ abnormal.mean(0)])
    return float(logits.softmax(-1)[1])


@pytest.mark.parametrize("feature", ["gem", "clip"])
def test_language_classification_scores_the_cls_token_of_its_stream(feature):
    m = fade(language_classification_feature=feature, classification_mode="language",
             segmentation_mode="language", shots=0)
    m.prepare(["part"])
    torch.manual_seed(1)
    img = torch.randn(1, 3, 128, 128)
    score = float(m.predict({"image": img, "cls": ["part"]}).scores[0])
    bb, size = m.backbone, m.cfg.classification_img_size
    small = F.interpolate(img, size=(size, size), mode="bicubic", align_corners=False, antialias=True)
    with torch.no_grad():
        out = bb.encode_image(small, layers=[bb.num_layers], hooks=[m.gem], tap_stream="gem")
        token = out.layers[bb.num_layers][0, 0] if feature == "gem" else out.final[0, 0]
        expected = _language_score_by_hand(m, token)
    assert score == pytest.approx(expected, rel=1e-5, abs=1e-7)


def test_features_carry_both_cls_tokens():
    m = fade()
    torch.manual_seed(1)
    f = m.features(torch.randn(1, 3, 64, 64), [64])[64]
    assert f["gem_cls"].shape == f["clip_cls"].shape == (1, 64)
    assert f["gem"].shape == f["clip"].shape == (1, 16, 64)
    assert torch.allclose(f["gem_cls"].norm(dim=-1), torch.ones(1)) and not torch.allclose(f["gem_cls"], f["clip_cls"])


# ---- item 5: the final uint8 map -------------------------------------------------------------

def test_final_map_is_opencv_resize_of_the_uint8_map():
    torch.manual_seed(2)
    batch = {"image": torch.randn(2, 3, 128, 128), "cls": ["part", "part"]}
    m = fade(shots=0, use_query_img_in_vision_memory_bank="true", vision_segmentation_multiplier=1.0,
             quantize_uint8="false", eval_size=8)               # 8 x 8: the map before the final resize
    m.prepare(["part"])
    raw = m.predict(batch).maps.numpy()
    m.cfg.quantize_uint8, m.cfg.eval_size = True, 64
    got = m.predict(batch).maps.numpy()
    # Official: (clip(map, 0, 1) * 255).astype(uint8), then cv2.resize(seg, (448, 448)) (INTER_LINEAR).
    official = np.stack([cv2.resize((np.clip(r, 0, 1) * 255).astype(np.uint8), (64, 64)) for r in raw])
    assert np.array_equal(np.rint(got * 255).astype(np.uint8), official)
    assert np.allclose(got * 255, np.rint(got * 255), atol=1e-4)   # whole levels, returned / 255


def test_opencv_resize_differs_from_float_resize_and_rounding():
    """Why OpenCV itself: its fixed-point bilinear is not a rounded float bilinear."""
    maps = torch.from_numpy(np.random.default_rng(0).integers(0, 256, (1, 56, 56), dtype=np.uint8))
    ours = resize_uint8(maps, 448)
    assert ours.dtype == torch.uint8 and np.array_equal(ours[0].numpy(), cv2.resize(maps[0].numpy(), (448, 448)))
    floated = F.interpolate(maps[:, None].float(), size=(448, 448), mode="bilinear", align_corners=False)
    diff = (ours.int() - floated[:, 0].round().int()).abs()
    assert int(diff.max()) <= 1 and float((diff > 0).float().mean()) > 0.02   # ~12% here (x86 SIMD)


def test_missing_opencv_is_a_one_line_user_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "cv2", None)      # import cv2 -> ImportError
    with pytest.raises(UserError, match="pip install opencv-python-headless"):
        resize_uint8(torch.zeros(1, 2, 2, dtype=torch.uint8), 4)
