"""Backbone fidelity to the official code (issue 17, items 1-2): positional-embedding resize rules
and exact weights from OpenAI-format files."""
from __future__ import annotations

import math
import typing
from pathlib import Path

import pytest
import torch

from zsadx.config import ConfigError, from_dict, load_yaml
from zsadx.models.backbone import (POS_EMBED_RULES, BackboneConfig, ClipBackbone, patch_size_of,
                                   resize_patch_grid)
from tests.conftest import REPO, TINY

# ----------------------------------------------------------------------------------------------
# The three resize rules, re-expressed by hand as 1-D weight matrices (float64) applied separably
# ----------------------------------------------------------------------------------------------


def _keys_cubic(x: float, a: float) -> float:
    """Keys' cubic convolution kernel with parameter a (support 2)."""
    x = abs(x)
    if x < 1:
        return ((a + 2) * x - (a + 3)) * x * x + 1
    if x < 2:
        return (((x - 5) * x + 8) * x - 4) * a
    return 0.0


def _weights_bilinear(n_in: int, n_out: int) -> torch.Tensor:
    """align_corners=False: source x = (i + 0.5) * in/out - 0.5, clamped at 0; edge index repeated."""
    w = torch.zeros(n_out, n_in, dtype=torch.float64)
    for i in range(n_out):
        src = max((i + 0.5) * n_in / n_out - 0.5, 0.0)
        x0 = math.floor(src)
        t = src - x0
        w[i, x0] += 1 - t
        w[i, min(x0 + 1, n_in - 1)] += t
    return w


def _weights_bicubic(n_in: int, n_out: int) -> torch.Tensor:
    """Plain bicubic: a = -0.75, four taps around the unclamped source x, indices clamped to the edge."""
    w = torch.zeros(n_out, n_in, dtype=torch.float64)
    for i in range(n_out):
        src = (i + 0.5) * n_in / n_out - 0.5
        x0 = math.floor(src)
        for k in range(-1, 3):
            w[i, min(max(x0 + k, 0), n_in - 1)] += _keys_cubic(k - (src - x0), -0.75)
    return w


def _weights_bicubic_antialias(n_in: int, n_out: int) -> torch.Tensor:
    """Antialiased bicubic (PIL's rule): a = -0.5, the kernel stretched by the scale when shrinking,
    taps outside the grid dropped and the rest renormalised to sum 1."""
    w = torch.zeros(n_out, n_in, dtype=torch.float64)
    scale = n_in / n_out
    stretch = max(scale, 1.0)
    for i in range(n_out):
        center = scale * (i + 0.5)
        lo = max(int(center - 2 * stretch + 0.5), 0)
        hi = min(int(center + 2 * stretch + 0.5), n_in)
        taps = torch.tensor([_keys_cubic((j - center + 0.5) / stretch, -0.5) for j in range(lo, hi)],
                            dtype=torch.float64)
        w[i, lo:hi] = taps / taps.sum()
    return w


HAND_RULES = {"bilinear": _weights_bilinear, "bicubic": _weights_bicubic,
              "bicubic-antialias": _weights_bicubic_antialias}


def _by_hand(patches: torch.Tensor, src: tuple[int, int], dst: tuple[int, int], rule: str) -> torch.Tensor:
    grid = patches.double().reshape(src[0], src[1], -1)
    rows, cols = HAND_RULES[rule](src[0], dst[0]), HAND_RULES[rule](src[1], dst[1])
    return torch.einsum("oi,ijd,pj->opd", rows, grid, cols).reshape(dst[0] * dst[1], -1)


def _rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).abs().max() / b.double().abs().max())


def test_every_configurable_rule_is_implemented_and_re_expressed():
    options = set(typing.get_args(typing.get_type_hints(BackboneConfig)["pos_embed_interp"]))
    assert options == set(POS_EMBED_RULES) == set(HAND_RULES)


# fp32 kernels (PyTorch computes the source coordinates in fp32) against float64 by hand:
# differences ~3e-6 of the largest value on 37-wide grids.
TOL = 2e-5


# (native grid, target grid): ViT-L/14@336 at 518 (ACD-CLIP, AdaCLIP, AnomalyCLIP), ViT-B-16-plus-240
# at FADE's 448 and 896, a shrink (the tiny configs: 224-native at 64 px) and a non-square target.
@pytest.mark.parametrize("src,dst", [((24, 24), (37, 37)), ((15, 15), (28, 28)), ((15, 15), (56, 56)),
                                     ((14, 14), (4, 4)), ((6, 6), (8, 10))])
@pytest.mark.parametrize("rule", sorted(POS_EMBED_RULES))
def test_resize_equals_the_rule_by_hand(rule, src, dst):
    patches = torch.randn(src[0] * src[1], 16, generator=torch.Generator().manual_seed(3))
    out = resize_patch_grid(patches, src, dst, rule)
    assert out.shape == (dst[0] * dst[1], 16) and out.dtype == patches.dtype
    assert _rel_err(out, _by_hand(patches, src, dst, rule)) < TOL


@pytest.mark.parametrize("src,dst", [((24, 24), (37, 37)), ((15, 15), (28, 28))])
def test_antialiased_bicubic_is_not_plain_bicubic_when_upsampling(src, dst):
    patches = torch.randn(src[0] * src[1], 16, generator=torch.Generator().manual_seed(4))
    aa = resize_patch_grid(patches, src, dst, "bicubic-antialias")
    plain = resize_patch_grid(patches, src, dst, "bicubic")
    # ~8% apart on random grids (measured 8.1% for 24 -> 37): far beyond any rounding.
    assert float((aa - plain).norm() / plain.norm()) > 0.03


@pytest.mark.parametrize("rule", sorted(POS_EMBED_RULES))
def test_backbone_positional_embedding_follows_its_rule(rule):
    bb = ClipBackbone(BackboneConfig(name="zsadx-tiny-p14", pretrained=None, image_size=112,
                                     pos_embed_interp=rule))
    pe = bb.visual.positional_embedding.detach()
    out = bb.positional_embedding((8, 10))
    assert torch.equal(out[0], pe[0])  # the CLS entry is kept apart
    assert _rel_err(out[1:], _by_hand(pe[1:], (6, 6), (8, 10), rule)) < TOL
    with torch.no_grad():
        tokens, grid = bb.embed_image(torch.zeros(1, 3, 8 * 14, 10 * 14))
    assert grid == (8, 10) and tokens.shape == (1, 81, 64)


def test_unknown_rule_set_at_run_time_is_a_config_error():
    bb = ClipBackbone(BackboneConfig(name="zsadx-tiny-p14", pretrained=None, image_size=112))
    bb.cfg.pos_embed_interp = "lanczos"
    with pytest.raises(ConfigError, match="pos_embed_interp: lanczos.*bicubic-antialias"):
        bb.positional_embedding((8, 8))


# ----------------------------------------------------------------------------------------------
# Each method config names its official code's rule
# ----------------------------------------------------------------------------------------------

OFFICIAL_RULE = {
    # zqhang/AnomalyCLIP AnomalyCLIP_lib/AnomalyCLIP.py VisionTransformer.forward:
    # interpolate(mode='bilinear') of the patch grid, CLS apart, from the native 24 x 24 grid.
    "anomalyclip": "bilinear",
    # mala-lab/FAPrompt AnomalyCLIP_lib/AnomalyCLIP.py (AnomalyCLIP's forward, unchanged).
    "faprompt": "bilinear",
    # caoyunkang/AdaCLIP method/clip_model.py resize_pos_embed: mode='bicubic', align_corners=False,
    # no antialias, once at load from the state dict's grid.
    "adaclip": "bicubic",
    # cockmake/ACD-CLIP model/model.py resize_pos_embed: mode='bicubic', antialias=True,
    # align_corners=False, once at load from the state dict's grid.
    "acdclip": "bicubic-antialias",
    # BMVC-FADE runs gem-torch: WalBouss/GEM gem/gem_utils.py modified_vit_forward ->
    # resample_abs_pos_embed(interpolation='bicubic', antialias=True) from the native grid, every forward.
    "fade": "bicubic-antialias",
}
# Methods whose official code never resizes: their configs must run at the native grid.
NATIVE_ONLY = {
    # anomalib src/anomalib/models/image/winclip/lightning_model.py: "Input image size is fixed at
    # 240x240"; torch_model.py runs open_clip's ViT-B-16-plus-240 (native 240 px) unchanged.
    "winclip",
}
# No official code to follow (zsadx's own baseline): the plain-bicubic default is kept.
NO_OFFICIAL_CODE = {"clip"}

METHOD_CONFIGS = sorted((REPO / "configs" / "methods").glob("*.yaml"))


def _resolved(path: Path):
    from zsadx.models.methods.base import method_config_type

    data = load_yaml(path)
    return from_dict(method_config_type(data, "method"), data)


@pytest.mark.parametrize("path", METHOD_CONFIGS, ids=lambda p: p.stem)
def test_method_config_uses_the_official_rule(path):
    cfg = _resolved(path)
    if cfg.name in OFFICIAL_RULE:
        assert cfg.backbone.pos_embed_interp == OFFICIAL_RULE[cfg.name]
    elif cfg.name in NATIVE_ONLY and not path.stem.endswith("-tiny"):
        import open_clip

        native = open_clip.get_model_config(cfg.backbone.name)["vision_cfg"]["image_size"]
        assert cfg.backbone.image_size == native and cfg.input_size in (None, native)
    else:
        assert cfg.name in NO_OFFICIAL_CODE | set(NATIVE_ONLY)


def test_every_method_has_a_resize_decision():
    from zsadx.models.methods import load_all

    decided = set(OFFICIAL_RULE) | set(NATIVE_ONLY) | NO_OFFICIAL_CODE
    assert set(load_all().names()) == decided


# ----------------------------------------------------------------------------------------------
# Exact weights from OpenAI-format files (backbone.name: auto)
# ----------------------------------------------------------------------------------------------

_OPENAI_EXTRAS = {"input_resolution": torch.tensor(224), "context_length": torch.tensor(77),
                  "vocab_size": torch.tensor(49408)}


@pytest.fixture(scope="module")
def openai_fp32_file(tmp_path_factory, tiny_backbone) -> Path:
    """The tiny CLIP as an fp32 OpenAI-format state dict (OpenAI's own files are fp16)."""
    path = tmp_path_factory.mktemp("weights_fp32") / "openai_fp32.pt"
    torch.save({**tiny_backbone.clip_state_dict(), **_OPENAI_EXTRAS}, path)
    return path


def _file_tensors(path: Path) -> dict[str, torch.Tensor]:
    sd = torch.load(path, map_location="cpu", weights_only=True)
    return {k: v for k, v in sd.items() if k not in _OPENAI_EXTRAS}


def _assert_bit_identical(bb: ClipBackbone, expected: dict[str, torch.Tensor]) -> None:
    loaded = bb.clip_state_dict()
    assert set(expected) <= set(loaded)
    changed = [k for k, v in expected.items() if loaded[k].dtype != v.dtype or not torch.equal(loaded[k], v)]
    assert not changed, f"{len(changed)} of {len(expected)} tensors differ from the file: {changed[:5]}"


@pytest.mark.parametrize("name", ["auto", TINY.name])
def test_fp32_openai_file_loads_bit_identical(openai_fp32_file, name):
    bb = ClipBackbone(BackboneConfig(name=name, pretrained=str(openai_fp32_file), image_size=224))
    assert bb.dtype == torch.float32
    _assert_bit_identical(bb, _file_tensors(openai_fp32_file))


@pytest.mark.parametrize("precision,dtype", [("fp32", torch.float32), ("fp16", torch.float16)])
def test_fp16_openai_file_loads_as_it_is_then_cast(tiny_files, precision, dtype):
    bb = ClipBackbone(BackboneConfig(name="auto", pretrained=str(tiny_files["openai_sd"]), image_size=224,
                                     precision=precision))
    assert bb.dtype == dtype
    # fp16 -> fp32 widens exactly; cast back to fp16 it is the file's tensor bit for bit.
    _assert_bit_identical(bb, {k: v.to(dtype) for k, v in _file_tensors(tiny_files["openai_sd"]).items()})
    with torch.no_grad():
        out = bb.encode_image(torch.randn(1, 3, 224, 224), layers=[4])
    assert out.pooled.dtype == dtype and torch.isfinite(out.pooled.float()).all()
