"""The open_clip backbone: loading from every file format, layer taps, pos-embed resize, hooks."""
from __future__ import annotations

import pytest
import torch

from zsadx.config import ConfigError
from zsadx.models.backbone import BackboneConfig, ClipBackbone, VisionHook, read_state_dict
from tests.conftest import TINY


def _outputs(bb: ClipBackbone, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    img = torch.randn(2, 3, 224, 224, generator=g)
    ids = bb.tokenize(["a photo of a normal object.", "a photo of a damaged object."])
    with torch.no_grad():
        return bb.encode_image(img, layers=[2, 4]).pooled, bb.encode_text(ids)


@pytest.mark.parametrize("kind", ["open_clip", "openai_jit", "ddp"])
def test_loading_round_trip_is_identical(tiny_backbone, tiny_files, kind):
    ref_img, ref_txt = _outputs(tiny_backbone)
    loaded = ClipBackbone(BackboneConfig(name=TINY.name, pretrained=str(tiny_files[kind]), image_size=224))
    img, txt = _outputs(loaded)
    assert torch.equal(img, ref_img) and torch.equal(txt, ref_txt)


def test_openai_fp16_state_dict_loads_into_fp32(tiny_backbone, tiny_files):
    loaded = ClipBackbone(BackboneConfig(name=TINY.name, pretrained=str(tiny_files["openai_sd"]), image_size=224))
    assert loaded.dtype == torch.float32
    # Same result as the reference model with its weights rounded through fp16.
    rounded = ClipBackbone(TINY, model=_copy_rounded(tiny_backbone.clip))
    a, b = _outputs(loaded), _outputs(rounded)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(a[0], _outputs(tiny_backbone)[0])  # the rounding is real


def _copy_rounded(model):
    import copy

    m = copy.deepcopy(model)
    with torch.no_grad():
        for p in m.parameters():
            p.copy_(p.half().float())
    return m


def test_openai_file_with_auto_architecture(tiny_files):
    bb = ClipBackbone(BackboneConfig(name="auto", pretrained=str(tiny_files["openai_sd"]), image_size=224))
    assert bb.num_layers == 4 and bb.width == 64 and bb.patch_size == 16


def test_bad_files_name_the_path(tmp_path):
    bad = tmp_path / "broken.pt"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="broken.pt"):
        read_state_dict(bad)
    with pytest.raises(FileNotFoundError, match="missing.pt"):
        ClipBackbone(BackboneConfig(name=TINY.name, pretrained=str(tmp_path / "missing.pt")))


def test_unknown_model_name_suggests():
    with pytest.raises(ConfigError, match="did you mean 'zsadx-tiny-p16'"):
        ClipBackbone(BackboneConfig(name="zsadx-tiny-p61", pretrained=None))


def test_weights_for_another_architecture_are_refused(tiny_files):
    with pytest.raises(ValueError, match="do not fit model 'zsadx-tiny-p14'"):
        ClipBackbone(BackboneConfig(name="zsadx-tiny-p14", pretrained=str(tiny_files["open_clip"])))


def test_layer_taps_shapes_and_differ(tiny_backbone):
    img = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        out = tiny_backbone.encode_image(img, layers=[1, 2, 4])
    assert out.grid == (14, 14)
    assert sorted(out.layers) == [1, 2, 4]
    for t in out.layers.values():
        assert t.shape == (2, 1 + 14 * 14, 64)
    assert not torch.allclose(out.layers[1], out.layers[2])
    assert torch.equal(out.layers[4], out.final)
    assert tiny_backbone.patch_tokens(out, 2).shape == (2, 196, 64)
    with pytest.raises(ConfigError, match="numbered from 1"):
        tiny_backbone.encode_image(img, layers=[0])


def test_matches_open_clip_forward(tiny_backbone):
    img = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        ours = tiny_backbone.encode_image(img).pooled
        theirs = tiny_backbone.clip.encode_image(img)
        ids = tiny_backbone.tokenize(["a photo of a cat"])
        assert torch.allclose(tiny_backbone.encode_text(ids), tiny_backbone.clip.encode_text(ids), atol=1e-6)
    assert torch.allclose(ours, theirs, atol=1e-6)


def test_positional_embedding_interpolation(tiny_backbone):
    bb = tiny_backbone
    native = bb.positional_embedding((14, 14))
    assert native is bb.visual.positional_embedding
    big = bb.positional_embedding((20, 20))
    assert big.shape == (401, 64)
    assert torch.equal(big[0], native[0])  # CLS entry untouched
    # Interpolating a linear ramp bilinearly keeps it a ramp; bicubic must agree at the corners' average.
    with torch.no_grad():
        out = bb.encode_image(torch.randn(1, 3, 320, 320), layers=[4])
    assert out.grid == (20, 20) and out.layers[4].shape == (1, 401, 64)
    assert torch.equal(bb.visual.positional_embedding, native)  # the parameter is not mutated
    with pytest.raises(ValueError, match="multiple of the patch size"):
        bb.encode_image(torch.randn(1, 3, 230, 230))


def test_bilinear_and_bicubic_modes_differ():
    bb = ClipBackbone(BackboneConfig(name="zsadx-tiny-p14", pretrained=None, image_size=112,
                                     pos_embed_interp="bilinear"))
    lin = bb.positional_embedding((8, 8)).clone()
    bb.cfg.pos_embed_interp = "bicubic"
    cub = bb.positional_embedding((8, 8))
    assert lin.shape == cub.shape == (65, 64)
    assert not torch.allclose(lin, cub)
    # Bilinear with align_corners=False of a 6x6 grid to 8x8 -- check one value by hand.
    pe = bb.visual.positional_embedding[1:].reshape(6, 6, -1)
    # Output pixel (0,0) maps to source coordinate (0.5*6/8 - 0.5) = -0.125 -> clamped to 0.
    assert torch.allclose(lin[1], pe[0, 0], atol=1e-6)


class _AddConstant(VisionHook):
    def __init__(self, layers, value):
        super().__init__()
        self.layers = frozenset(layers)
        self.value = value

    def block(self, layer, block, x, ctx, call_next):
        return call_next(x) + self.value


class _AppendTokens(VisionHook):
    """Appends prompt tokens after the patches, as visual prompt tuning does."""

    def begin(self, x, ctx):
        return torch.cat([x, torch.zeros(x.shape[0], 3, x.shape[2])], dim=1)


class _SecondStream(VisionHook):
    """Keeps an extra stream that accumulates the block inputs, as DPAM keeps its V-V stream."""

    def block(self, layer, block, x, ctx, call_next):
        ctx.streams["extra"] = ctx.streams.get("extra", torch.zeros_like(x)) + x
        return call_next(x)


def test_hooks_compose(tiny_backbone):
    bb = tiny_backbone
    img = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        plain = bb.encode_image(img, layers=[1, 2])
        hooked = bb.encode_image(img, layers=[1, 2], hooks=[_AddConstant([2], 0.5)])
        assert torch.equal(plain.layers[1], hooked.layers[1])
        assert torch.allclose(plain.layers[2] + 0.5, hooked.layers[2], atol=1e-6)
        # Two hooks on one layer nest in order.
        both = bb.encode_image(img, layers=[2], hooks=[_AddConstant([2], 0.5), _AddConstant([2], 0.25)])
        assert torch.allclose(plain.layers[2] + 0.75, both.layers[2], atol=1e-6)
        prompted = bb.encode_image(img, layers=[2], hooks=[_AppendTokens()])
        assert prompted.layers[2].shape == plain.layers[2].shape  # prompts cut from taps
        assert not torch.allclose(prompted.layers[2], plain.layers[2])  # but they were attended to
        streamed = bb.encode_image(img, layers=[2], hooks=[_SecondStream()], tap_stream="extra")
        assert streamed.layers[2].shape == plain.layers[2].shape
        assert torch.equal(streamed.final, plain.final)  # the main stream is untouched


def test_text_deep_prompts_replace_positions(tiny_backbone):
    bb = tiny_backbone
    ids = bb.tokenize(["X X X X object.", "X X X X damaged object."])
    with torch.no_grad():
        base = bb.encode_text(ids)
        emb = bb.token_embeddings(ids)
        assert torch.equal(bb.encode_text(ids, embeddings=emb), base)
        ctx = torch.randn(4, bb.text_width)
        spliced = emb.clone()
        spliced[:, 1:5] = ctx
        a = bb.encode_text(ids, embeddings=spliced)
        assert not torch.allclose(a, base)
        deep = bb.encode_text(ids, embeddings=spliced, deep_prompts={2: torch.randn(4, bb.text_width)})
        assert not torch.allclose(deep, a)
        # A deep prompt at block 1 replaces exactly the input tokens 1..4 (positional embeddings are
        # added before block 1, so replacing there equals splicing ctx - pos into the embeddings).
        pos = bb.clip.positional_embedding[1:5]
        same = bb.encode_text(ids, embeddings=emb, deep_prompts={1: ctx + pos})
        assert torch.allclose(same, a, atol=1e-5)


def test_gradients_flow_through_frozen_backbone(tiny_backbone):
    bb = tiny_backbone
    assert not any(p.requires_grad for p in bb.parameters())
    ctx = torch.zeros(4, bb.text_width, requires_grad=True)
    ids = bb.tokenize(["X X X X object."])
    emb = bb.token_embeddings(ids)
    emb = torch.cat([emb[:, :1], ctx[None], emb[:, 5:]], dim=1)
    bb.encode_text(ids, embeddings=emb).sum().backward()
    assert ctx.grad is not None and ctx.grad.abs().sum() > 0


def test_activation_switch():
    from open_clip.transformer import QuickGELU

    gelu = ClipBackbone(BackboneConfig(name=TINY.name, pretrained=None, activation="gelu"))
    acts = {type(b.mlp.gelu) for b in gelu.visual.transformer.resblocks}
    assert acts == {torch.nn.GELU}
    quick = ClipBackbone(BackboneConfig(name=TINY.name, pretrained=None, activation="quick_gelu"))
    assert {type(b.mlp.gelu) for b in quick.clip.transformer.resblocks} == {QuickGELU}


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_reduced_precision(precision):
    bb = ClipBackbone(BackboneConfig(name=TINY.name, pretrained=None, precision=precision))
    with torch.no_grad():
        out = bb.encode_image(torch.randn(1, 3, 224, 224), layers=[4])
    assert out.pooled.dtype == bb.dtype != torch.float32
