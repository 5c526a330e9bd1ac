"""Official AdaCLIP (caoyunkang/AdaCLIP) and ACD-CLIP (cockmake/ACD-CLIP) checkpoint files.

The synthetic files are written here from the official save code's layout (key names, nesting,
shapes, fp32), read back with ``torch.load(weights_only=True)``, converted, loaded, and each value
is checked where the official forward would use it: prompt tokens at the block inputs they enter,
the linear heads, Conv-LoRA and the text LoRA re-expressed from the official modules' arithmetic.
"""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from zsadx.config import load_config, load_yaml
from zsadx.eval.evaluator import EvalConfig
from zsadx.models.checkpoints import CheckpointError
from zsadx.models.methods.base import build_method
from zsadx.models.official import load_all
from zsadx.models.prompt_learning import round_fp16

FORMATS = load_all()


def method(name: str, backbone=None, **over):
    data = {"method": load_yaml(f"methods/{name}"), "data": {"shards": "-", "dataset": "-"}}
    cfg = load_config(EvalConfig, data=data, overrides=[f"method.{k}={v}" for k, v in over.items()]).method
    torch.manual_seed(0)
    return build_method(cfg, backbone).eval()


def roundtrip(obj, tmp_path, name="official.pth"):
    path = tmp_path / name
    torch.save(obj, path)
    return torch.load(path, map_location="cpu", weights_only=True)


def randn(*shape, gen):
    return torch.randn(*shape, generator=gen)


class StubBackbone(nn.Module):
    """ViT-L-14-336's widths without its 400M weights: enough to build the trainable modules."""

    def __init__(self, width=1024, text_width=768, embed_dim=768, layers=24, text_layers=12):
        super().__init__()
        self.width, self.text_width, self.embed_dim = width, text_width, embed_dim
        self.num_layers, self.num_text_layers = layers, text_layers
        self.cfg = type("Cfg", (), {"name": "ViT-L-14-336 (stub)"})()

    def check_layers(self, layers):
        return sorted(int(l) for l in layers)


# ------------------------------------------------------------------------------------------
# AdaCLIP: AdaCLIP_Trainer.save -> {"clip_model.<module>...": tensor}
# ------------------------------------------------------------------------------------------

def adaclip_file(D, E, depth, length, levels, seed=1):
    """The official save layout: PromptLayer.static_prompts (a ParameterList), ProjectLayer.head (a
    ModuleList of Linear), under the trainer's ``clip_model.``."""
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for j in range(depth):
        sd[f"clip_model.text_prompter.static_prompts.{j}"] = randn(length, E, gen=g)
        sd[f"clip_model.visual_prompter.static_prompts.{j}"] = randn(length, D, gen=g)
    for k in range(levels):
        sd[f"clip_model.patch_token_layer.head.{k}.weight"] = randn(E, D, gen=g) / math.sqrt(D)
        sd[f"clip_model.patch_token_layer.head.{k}.bias"] = randn(E, gen=g)
    sd["clip_model.cls_token_layer.head.0.weight"] = randn(E, E, gen=g) / math.sqrt(E)
    sd["clip_model.cls_token_layer.head.0.bias"] = randn(E, gen=g)
    for i in range(length):
        sd[f"clip_model.dynamic_visual_prompt_generator.head.{i}.weight"] = randn(D, E, gen=g) / math.sqrt(E)
        sd[f"clip_model.dynamic_visual_prompt_generator.head.{i}.bias"] = randn(D, gen=g)
        sd[f"clip_model.dynamic_text_prompt_generator.head.{i}.weight"] = randn(E, E, gen=g) / math.sqrt(E)
        sd[f"clip_model.dynamic_text_prompt_generator.head.{i}.bias"] = randn(E, gen=g)
    return sd


def import_into(m, obj):
    fmt = FORMATS.get(m.cfg.name)
    assert fmt.detect(obj)
    imported = fmt.convert(obj, m)
    m.load_trainable_state_dict(imported.state)
    return imported


def capture_block_inputs(blocks):
    """Record the input (B, L, D) of each block of ``blocks`` (1-based) at its last call (AdaCLIP runs
    the vision tower twice: un-prompted for the dynamic prompts, then prompted)."""
    seen, handles = {}, []

    def record(n, x):
        seen[n] = x.detach().clone()

    for idx, blk in enumerate(blocks):
        handles.append(blk.register_forward_pre_hook(
            lambda mod, args, kwargs, n=idx + 1: record(n, args[0]), with_kwargs=True))
    return seen, handles


def official_dynamic(sd, e, module, length):
    """ProjectLayer(stack=True, is_array=False): head i applied to the CLIP image embedding, stacked."""
    return torch.stack([F.linear(e, sd[f"clip_model.{module}.head.{i}.weight"],
                                 sd[f"clip_model.{module}.head.{i}.bias"]) for i in range(length)], dim=1)


@pytest.mark.parametrize("paper_compat", [False, True])
def test_adaclip_tiny_prompts_land_where_the_official_forward_splices_them(tmp_path, paper_compat):
    m = method("adaclip-tiny", paper_compat=str(paper_compat).lower())
    bb = m.backbone
    depth, length = m.cfg.prompt_depth, m.cfg.prompt_length
    sd = adaclip_file(bb.width, bb.embed_dim, depth, length, len(m.cfg.layers))
    imported = import_into(m, roundtrip(sd, tmp_path))
    assert imported.dropped == ["clip_model.text_prompter.static_prompts.0"]
    assert imported.decided == {"prompt_depth": depth, "prompt_length": length}
    assert imported.origin["text.static.tokens.0"] == "clip_model.text_prompter.static_prompts.1"
    # paper_compat still applies to the imported weights (the method config key, not the file)
    assert m.cfg.fp16_deep_prompts is paper_compat and m.cfg.dice_per_row is paper_compat
    cast = round_fp16 if paper_compat else (lambda t: t)

    image = torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        e = bb.encode_image(image).pooled.float()                      # the un-prompted CLIP embedding
    dyn_v = official_dynamic(sd, e, "dynamic_visual_prompt_generator", length)
    dyn_t = official_dynamic(sd, e, "dynamic_text_prompt_generator", length)
    vis, hv = capture_block_inputs(bb.visual.transformer.resblocks)
    txt, ht = capture_block_inputs(bb.clip.transformer.resblocks)
    try:
        m.predict({"image": image, "cls": ["bottle"], "dataset": ["mvtec-ad"], "domain": ["industrial"]})
    finally:
        for h in hv + ht:
            h.remove()
    # Vision: static_prompts[j] + dynamic appended at the end of the sequence before block j + 1.
    for j in range(depth):
        want = cast(sd[f"clip_model.visual_prompter.static_prompts.{j}"] + dyn_v[0])
        torch.testing.assert_close(vis[j + 1][0, -length:], want, rtol=1e-5, atol=1e-6)
    # Text: positions 1..n before blocks 2..depth carry static_prompts[j] + dynamic, in every sentence.
    for j in range(1, depth):
        want = cast(sd[f"clip_model.text_prompter.static_prompts.{j}"] + dyn_t[0])
        got = txt[j + 1][:, 1:1 + length]
        torch.testing.assert_close(got, want.expand_as(got), rtol=1e-5, atol=1e-6)
    # Block 1's text input is the plain sentence: the dead prompt 0 enters nowhere.
    dead = sd["clip_model.text_prompter.static_prompts.0"]
    assert not any(torch.allclose(txt[1][s, 1:1 + length], dead + dyn_t[0], atol=1e-3)
                   for s in range(txt[1].shape[0]))
    # Linear heads: weight (out, in) and bias, as nn.Linear in the official ProjectLayer.
    for k in range(len(m.cfg.layers)):
        assert torch.equal(m.patch_proj[k].weight, sd[f"clip_model.patch_token_layer.head.{k}.weight"])
        assert torch.equal(m.patch_proj[k].bias, sd[f"clip_model.patch_token_layer.head.{k}.bias"])
    assert torch.equal(m.cls_proj.weight, sd["clip_model.cls_token_layer.head.0.weight"])
    assert torch.equal(m.cls_proj.bias, sd["clip_model.cls_token_layer.head.0.bias"])


def test_adaclip_vit_l_14_336_layout_imports():
    m = method("adaclip", backbone=StubBackbone())
    sd = adaclip_file(1024, 768, 4, 5, 4)                              # official defaults: depth 4, length 5
    sd = {k: v.half() for k, v in sd.items()}                           # a half-precision copy converts too
    imported = import_into(m, sd)
    assert imported.decided == {"prompt_depth": 4, "prompt_length": 5}
    state = m.trainable_state_dict()
    assert state["text.static.tokens.2"].dtype == torch.float32
    assert torch.equal(state["text.static.tokens.2"], sd["clip_model.text_prompter.static_prompts.3"].float())
    assert torch.equal(state["visual_prompts.static.3"], sd["clip_model.visual_prompter.static_prompts.3"].float())
    assert torch.equal(state["visual_dynamic.head.4.weight"],
                       sd["clip_model.dynamic_visual_prompt_generator.head.4.weight"].float())
    assert state["patch_proj.3.weight"].shape == (768, 1024)


@pytest.mark.parametrize("edit, message", [
    (lambda sd: sd.__setitem__("clip_model.text_prompter.extra_thing", torch.zeros(1)),
     "'clip_model.text_prompter.extra_thing' is not part of the official layout"),
    (lambda sd: [sd.pop(k) for k in [k for k in sd if "dynamic_text" in k]],
     "nothing for zsadx's 'text.dynamic.head.0.bias'"),
    (lambda sd: [sd.pop(k) for k in [k for k in sd if "text_prompter" in k]],   # prompting_branch V
     "no 'clip_model.text_prompter.static_prompts.*': saved with prompting_branch without L"),
])
def test_adaclip_unknown_or_missing_keys_are_one_line_errors(edit, message):
    m = method("adaclip-tiny")
    sd = adaclip_file(64, 64, 2, 2, 4)
    edit(sd)
    with pytest.raises(CheckpointError, match=message) as err:
        FORMATS.get("adaclip").convert(sd, m)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("depth, length, levels, message", [
    (4, 2, 4, r"prompt_depth = 4 \(clip_model.visual_prompter.static_prompts.0..3\) but the method config has "
              r"prompt_depth = 2"),
    (2, 5, 4, "prompt_length = 5 .* but the method config has prompt_length = 2"),
    (2, 2, 3, r"3 levels .* but the method config taps 4 \(layers \[1, 2, 3, 4\]\)"),
])
def test_adaclip_shapes_that_disagree_with_the_config_name_both_values(depth, length, levels, message):
    m = method("adaclip-tiny")
    with pytest.raises(CheckpointError, match=message):
        FORMATS.get("adaclip").convert(adaclip_file(64, 64, depth, length, levels), m)


def test_adaclip_file_of_another_backbone_names_the_key_and_shapes():
    m = method("adaclip-tiny", prompt_depth=4, prompt_length=5)
    with pytest.raises(CheckpointError, match=r"'clip_model.visual_prompter.static_prompts.0' has shape \(5, 1024\) "
                                              r"but .* \(width 64, .* needs \(5, 64\)"):
        FORMATS.get("adaclip").convert(adaclip_file(1024, 768, 4, 5, 4), m)


def test_formats_tell_each_other_apart():
    ada, acd = FORMATS.get("adaclip"), FORMATS.get("acdclip")
    a, c = adaclip_file(64, 64, 2, 2, 4), acdclip_file(64, 64, 2, 4, 2, [3, 5], 32, 32)
    assert ada.detect(a) and not acd.detect(a)
    assert acd.detect(c) and not ada.detect(c)
    zsadx_final = {"format": "zsadx-method/1", "method": "adaclip", "state": {}}
    assert not ada.detect(zsadx_final) and not acd.detect(zsadx_final)
    assert not ada.detect({"patch_proj.0.weight": torch.zeros(1)})          # a plain zsadx state dict


# ------------------------------------------------------------------------------------------
# ACD-CLIP: train.py -> {"epoch", "text_adapter": ModuleDict state, "image_adapter": ModuleDict state}
# ------------------------------------------------------------------------------------------

def acdclip_file(D, T, n, r, rc, kernels, h, hg, seed=2, epoch=7):
    """model/adapter.py's ModuleDicts: AddWeight.i_w, ConvLoraAdapter, MLPAdapter.fc, LayerNorm, gate Sequential."""
    g = torch.Generator().manual_seed(seed)
    img, txt = {}, {}
    for i in range(n):
        img[f"m_i_w.{i}.i_w"] = torch.rand(1, 1, D, generator=g)
        for k, c in enumerate(kernels):
            p = f"lora_adapters.{i}.conv_lora_blocks.{k}"
            img[f"{p}.lora_A"] = randn(D, r, gen=g) / math.sqrt(D)
            img[f"{p}.conv_lora_A.weight"] = randn(rc, r, c, c, gen=g) / c
            img[f"{p}.conv_lora_B.weight"] = randn(r, rc, c, c, gen=g) / c
            img[f"{p}.lora_B"] = randn(r, D, gen=g)
        img[f"lora_adapters.{i}.fusion_conv.weight"] = randn(D, len(kernels) * D, 1, 1, gen=g) / math.sqrt(D)
        for head in ("seg", "det"):
            img[f"{head}_proj.{i}.fc.0.weight"] = randn(h, D, gen=g) / math.sqrt(D)
            img[f"{head}_proj.{i}.fc.0.bias"] = randn(h, gen=g)
            img[f"{head}_proj.{i}.fc.2.weight"] = randn(T, h, gen=g) / math.sqrt(h)
            img[f"{head}_proj.{i}.fc.2.bias"] = randn(T, gen=g)
            img[f"{head}_layer_norms.{i}.weight"] = 1 + randn(T, gen=g) / 10
            img[f"{head}_layer_norms.{i}.bias"] = randn(T, gen=g) / 10
        img[f"vision_text_gate.{i}.0.weight"] = randn(hg, T, gen=g) / math.sqrt(T)
        img[f"vision_text_gate.{i}.0.bias"] = randn(hg, gen=g)
        img[f"vision_text_gate.{i}.2.weight"] = randn(2 * n, hg, gen=g) / math.sqrt(hg)
        img[f"vision_text_gate.{i}.2.bias"] = randn(2 * n, gen=g)
        txt[f"m_t_w.{i}.i_w"] = torch.rand(1, 1, T, generator=g)
        txt[f"layer_norms.{i}.weight"] = 1 + randn(T, gen=g) / 10
        txt[f"layer_norms.{i}.bias"] = randn(T, gen=g) / 10
        txt[f"lora_adapters.{i}.lora_A"] = randn(T, r, gen=g) / math.sqrt(T)
        txt[f"lora_adapters.{i}.lora_B"] = randn(r, T, gen=g)
    return {"epoch": epoch, "text_adapter": txt, "image_adapter": img}


def official_conv_lora(img, i, kernels, x, grid, r, rc, alpha=2.0, conv_alpha=2.0):
    """ConvLoraAdapter.forward on (N, B, D) tokens, re-expressed from model/adapter_modules.py."""
    N, B, D = x.shape
    outs = []
    for k, c in enumerate(kernels):
        p = f"lora_adapters.{i}.conv_lora_blocks.{k}"
        down = (x @ img[f"{p}.lora_A"]).permute(1, 2, 0).reshape(B, r, *grid)
        up = F.conv2d(F.conv2d(down, img[f"{p}.conv_lora_A.weight"], padding=c // 2),
                      img[f"{p}.conv_lora_B.weight"], padding=c // 2) * (conv_alpha / rc)
        up = up.reshape(B, r, N).permute(2, 0, 1)
        outs.append((up @ img[f"{p}.lora_B"] * (alpha / r ** 0.5)).permute(1, 2, 0).reshape(B, D, *grid))
    fused = F.conv2d(torch.cat(outs, dim=1), img[f"lora_adapters.{i}.fusion_conv.weight"])
    return fused.reshape(B, D, N).permute(2, 0, 1)


def official_head(img, head, i, x):
    """MLPAdapter (Linear, LeakyReLU, Linear) -> LayerNorm -> L2 normalise, as ACDCLIP.forward."""
    y = F.linear(F.leaky_relu(F.linear(x, img[f"{head}_proj.{i}.fc.0.weight"], img[f"{head}_proj.{i}.fc.0.bias"])),
                 img[f"{head}_proj.{i}.fc.2.weight"], img[f"{head}_proj.{i}.fc.2.bias"])
    y = F.layer_norm(y, y.shape[-1:], img[f"{head}_layer_norms.{i}.weight"], img[f"{head}_layer_norms.{i}.bias"])
    return F.normalize(y, dim=-1)


def official_blend(i_w, x, a):
    """AddWeight(change_x=True) after the norm matching of ACDCLIP.forward / encode_text."""
    a = a * x.norm(dim=-1, keepdim=True) / a.norm(dim=-1, keepdim=True)
    return (1 - i_w) * x + i_w * a


@pytest.mark.parametrize("paper_compat", [False, True])
def test_acdclip_tiny_every_tensor_acts_as_in_the_official_modules(tmp_path, paper_compat):
    m = method("acdclip-tiny", paper_compat=str(paper_compat).lower())
    cfg, bb = m.cfg, m.backbone
    D, T, n, r, rc, kernels = bb.width, bb.text_width, cfg.n_groups, cfg.lora_rank, cfg.conv_rank, cfg.conv_kernels
    obj = acdclip_file(D, T, n, r, rc, kernels, cfg.head_hidden, cfg.gate_hidden)
    imported = import_into(m, roundtrip(obj, tmp_path, "adapter_7.pth"))
    assert imported.dropped == ["epoch"]
    assert imported.decided == {"n_groups": n, "lora_rank": r, "conv_rank": rc, "conv_kernels": kernels,
                                "head_hidden": cfg.head_hidden, "gate_hidden": cfg.gate_hidden,
                                "adapter_insertion": "blend"}
    img, txt = obj["image_adapter"], obj["text_adapter"]
    g = torch.Generator().manual_seed(9)
    grid = (4, 4)
    with torch.no_grad():
        for i in range(n):
            x = randn(2, 16, D, gen=g)                                    # (B, N, D) zsadx, (N, B, D) official
            xo = x.transpose(0, 1)
            want = official_blend(img[f"m_i_w.{i}.i_w"], xo, official_conv_lora(img, i, kernels, xo, grid, r, rc))
            got = m.image_blends[i](x, m.image_adapters[i](x, grid))
            torch.testing.assert_close(got, want.transpose(0, 1), rtol=1e-4, atol=1e-5)
            for head, mod in (("seg", m.seg_heads), ("det", m.det_heads)):
                torch.testing.assert_close(mod[i](x), official_head(img, head, i, x), rtol=1e-5, atol=1e-6)
            s = F.normalize(randn(2, 16, T, gen=g), dim=-1)
            raw = F.linear(F.gelu(F.linear(s.mean(1), img[f"vision_text_gate.{i}.0.weight"],
                                           img[f"vision_text_gate.{i}.0.bias"])),
                           img[f"vision_text_gate.{i}.2.weight"], img[f"vision_text_gate.{i}.2.bias"])
            torch.testing.assert_close(m.gateway.weights(i, s), raw.view(2, n, 2).softmax(1), rtol=1e-5, atol=1e-6)
            h = randn(3, 5, T, gen=g)
            a = h @ txt[f"lora_adapters.{i}.lora_A"] @ txt[f"lora_adapters.{i}.lora_B"] * (cfg.lora_alpha / r ** 0.5)
            torch.testing.assert_close(m.text_blends[i](h, m.text_adapters[i](h)),
                                       official_blend(txt[f"m_t_w.{i}.i_w"], h, a), rtol=1e-5, atol=1e-6)
            assert torch.equal(m.text_norms[i].weight, txt[f"layer_norms.{i}.weight"])
            assert torch.equal(m.text_norms[i].bias, txt[f"layer_norms.{i}.bias"])
    out = m.predict({"image": torch.randn(1, 3, 64, 64), "cls": ["bottle"], "dataset": ["mvtec-ad"],
                     "domain": ["industrial"]})
    assert torch.isfinite(out.scores).all()


def test_acdclip_vit_l_14_336_layout_decides_the_levels():
    for n in (2, 4):
        m = method("acdclip" if n == 4 else f"acdclip-n{n}", backbone=StubBackbone())
        obj = acdclip_file(1024, 768, n, 16, 8, [3, 5], 256, 256)
        imported = import_into(m, obj)
        assert imported.decided["n_groups"] == n
        state = m.trainable_state_dict()
        assert torch.equal(state[f"image_adapters.{n - 1}.fusion_conv.weight"],
                           obj["image_adapter"][f"lora_adapters.{n - 1}.fusion_conv.weight"])
        assert torch.equal(state[f"gateway.gates.{n - 1}.2.weight"],
                           obj["image_adapter"][f"vision_text_gate.{n - 1}.2.weight"])
        assert state["gateway.gates.0.2.weight"].shape == (2 * n, 256)


@pytest.mark.parametrize("file_args, over, message", [
    ((4, 4, 2, [3, 5], 32, 32), {}, r"n_groups = 4 \(image_adapter.lora_adapters.0..3\) but the method config has "
                                    r"n_groups = 2; set method.n_groups: 4"),
    ((2, 8, 2, [3, 5], 32, 32), {}, "lora_rank = 8 .* but the method config has lora_rank = 4"),
    ((2, 4, 2, [3], 32, 32), {}, r"conv_kernels = \[3\] .* has conv_kernels = \[3, 5\]"),
    ((2, 4, 2, [3, 5], 16, 32), {}, "head_hidden = 16 .* has head_hidden = 32"),
    ((2, 4, 2, [3, 5], 32, 32), {"adapter_insertion": "residual"},
     "adapter_insertion = blend .* has adapter_insertion = residual"),
])
def test_acdclip_shapes_that_disagree_with_the_config_name_both_values(file_args, over, message):
    m = method("acdclip-tiny", **over)
    with pytest.raises(CheckpointError, match=message) as err:
        FORMATS.get("acdclip").convert(acdclip_file(64, 64, *file_args), m)
    assert "\n" not in str(err.value)


def test_acdclip_unknown_keys_and_foreign_values_are_errors():
    m = method("acdclip-tiny")
    fmt = FORMATS.get("acdclip")
    obj = acdclip_file(64, 64, 2, 4, 2, [3, 5], 32, 32)
    obj["image_adapter"]["aspp.0.weight"] = torch.zeros(1)
    with pytest.raises(CheckpointError, match="'image_adapter.aspp.0.weight' is not part of the official layout"):
        fmt.convert(obj, m)
    assert not fmt.detect({**obj, "optimizer": {}})                      # another top-level key: not this format
    obj = acdclip_file(1024, 768, 2, 4, 2, [3, 5], 32, 32)
    with pytest.raises(CheckpointError, match=r"'image_adapter.lora_adapters.0.conv_lora_blocks.0.lora_A' has "
                                              r"shape \(1024, 4\) .* needs \(64, 4\)"):
        fmt.convert(obj, m)


# ------------------------------------------------------------------------------------------
# Through the load path: Method.load_checkpoint and zsadx eval --checkpoint
# ------------------------------------------------------------------------------------------

def test_load_checkpoint_converts_both_formats_and_errors_name_the_file(tmp_path):
    ada = method("adaclip-tiny")
    file = tmp_path / "pretrained_all.pth"
    torch.save(adaclip_file(64, 64, 2, 2, 4), file)
    ada.load_checkpoint(str(file))
    want = adaclip_file(64, 64, 2, 2, 4)["clip_model.text_prompter.static_prompts.1"]
    assert torch.equal(ada.text.static.tokens[0], want)
    acd = method("acdclip-tiny")
    obj = acdclip_file(64, 64, 2, 4, 2, [3, 5], 32, 32)
    torch.save(obj, tmp_path / "adapter_7.pth")
    acd.load_checkpoint(str(tmp_path / "adapter_7.pth"))
    assert torch.equal(acd.seg_heads[1][3].bias, obj["image_adapter"]["seg_layer_norms.1.bias"])
    torch.save(acdclip_file(64, 64, 4, 4, 2, [3, 5], 32, 32), tmp_path / "n4.pth")
    with pytest.raises(CheckpointError, match=r"n4.pth: .*n_groups.* 4.*n_groups.* 2") as err:
        acd.load_checkpoint(str(tmp_path / "n4.pth"))
    assert "\n" not in str(err.value)


@pytest.mark.slow
def test_eval_takes_official_adaclip_and_acdclip_files(tmp_path, caplog):
    """``zsadx eval --checkpoint FILE.pth`` converts in memory, says so once, and scores as the
    zsadx checkpoint of the directly converted method does."""
    import json
    import logging

    from conftest import make_shards
    from zsadx.cli import main
    from zsadx.models.checkpoints import save_method_checkpoint

    shards = make_shards(tmp_path / "data", {"mvtec-ad": 2})
    files = {"adaclip": adaclip_file(64, 64, 2, 2, 4), "acdclip": acdclip_file(64, 64, 2, 4, 2, [3, 5], 32, 32)}

    def evaluate(name, checkpoint, out):
        assert main(["eval", "--method", f"methods/{name}-tiny", "--checkpoint", str(checkpoint), "--shards",
                     str(shards), "--dataset", "mvtec-ad", "--out", str(out), "data.num_workers=0"]) == 0
        return json.loads(next(out.glob("*-mvtec-ad.json")).read_text())["mean"]

    for name, obj in files.items():
        torch.save(obj, tmp_path / f"{name}.pth")
        caplog.clear()
        with caplog.at_level(logging.INFO, logger="zsadx"):
            official = evaluate(name, tmp_path / f"{name}.pth", tmp_path / f"eval-{name}")
        assert len([r for r in caplog.records if f"an official {name} checkpoint" in r.getMessage()]) == 1
        m = method(f"{name}-tiny")
        import_into(m, obj)
        direct = evaluate(name, save_method_checkpoint(m, tmp_path / f"{name}-final.pt"), tmp_path / f"eval2-{name}")
        assert official.keys() == direct.keys()
        for key, value in official.items():
            assert value == pytest.approx(direct[key], rel=1e-6), key


def test_zsadx_import_writes_zsadx_checkpoints_of_both(tmp_path, capsys):
    from zsadx.cli import main
    from zsadx.models.checkpoints import METHOD_FORMAT, method_identity

    files = {"adaclip": adaclip_file(64, 64, 2, 2, 4), "acdclip": acdclip_file(64, 64, 2, 4, 2, [3, 5], 32, 32)}
    for name, obj in files.items():
        torch.save(obj, tmp_path / f"{name}.pth")
        out = tmp_path / f"{name}-ckpt.pt"
        assert main(["import", f"methods/{name}-tiny", str(tmp_path / f"{name}.pth"), "--out", str(out)]) == 0
        assert f"an official {name} checkpoint" in capsys.readouterr().out
        ck = torch.load(out, weights_only=True)
        m = method(f"{name}-tiny")
        assert ck["format"] == METHOD_FORMAT and ck["backbone"] == method_identity(m)["backbone"]
        assert set(ck["state"]) == set(m.trainable_state_dict())
        m.load_checkpoint(str(out))
    # a file of 4 levels into the 2-level config: one line naming both, nothing written
    torch.save(acdclip_file(64, 64, 4, 4, 2, [3, 5], 32, 32), tmp_path / "n4.pth")
    assert main(["import", "methods/acdclip-tiny", str(tmp_path / "n4.pth"), "--out", str(tmp_path / "x.pt")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "n_groups = 4" in err and "n_groups = 2" in err
    assert not (tmp_path / "x.pt").exists()
