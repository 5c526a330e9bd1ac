"""ACD-CLIP's official checkpoints (cockmake/ACD-CLIP, ``train.py``).

Each epoch ``train.py`` saves ``adapter_{epoch}.pth`` = ``{"epoch": int, "text_adapter":
model.text_adapter.state_dict(), "image_adapter": model.image_adapter.state_dict()}``; ``test.py``
loads the two dicts into the two ``nn.ModuleDict`` with strict ``load_state_dict``. Everything is
fp32. Official key -> zsadx key (shape), with g < N levels, k < number of conv kernels, D = vision
width, T = text width, r = LoRA rank, r_c = conv rank, c = kernel size, h = head hidden, h_g = gate
hidden:

* ``image_adapter.m_i_w.g.i_w`` -> ``image_blends.g.i_w`` (1, 1, D)
* ``image_adapter.lora_adapters.g.X`` -> ``image_adapters.g.X`` for X = ``conv_lora_blocks.k.lora_A``
  (D, r), ``.conv_lora_A.weight`` (r_c, r, c, c), ``.conv_lora_B.weight`` (r, r_c, c, c),
  ``.lora_B`` (r, D) and ``fusion_conv.weight`` (D, kD, 1, 1)
* ``image_adapter.seg_proj.g.fc.{0,2}.*`` -> ``seg_heads.g.{0,2}.*`` ((h, D), (T, h): the MLPAdapter's
  Linear, LeakyReLU, Linear); ``image_adapter.seg_layer_norms.g.*`` -> ``seg_heads.g.3.*`` (T,)
* ``image_adapter.det_proj.g.*``, ``det_layer_norms.g.*`` -> ``det_heads.g.*``, as seg
* ``image_adapter.vision_text_gate.g.{0,2}.*`` -> ``gateway.gates.g.{0,2}.*`` ((h_g, T), (2N, h_g))
* ``text_adapter.m_t_w.g.i_w`` -> ``text_blends.g.i_w`` (1, 1, T)
* ``text_adapter.lora_adapters.g.{lora_A,lora_B}`` -> ``text_adapters.g.*`` ((T, r), (r, T))
* ``text_adapter.layer_norms.g.*`` -> ``text_norms.g.*`` (T,)
* ``epoch``: an int, not a tensor (dropped)

No tensor is dead. Shapes decide ``n_groups`` (N), ``lora_rank`` (r; the official code uses one rank
for the image and text LoRA), ``conv_rank``, ``conv_kernels``, ``head_hidden`` and ``gate_hidden``;
the blend weights imply ``adapter_insertion: blend``. The alphas and blend initial values are not
in the file (the official defaults are zsadx's). A method config that disagrees with the file is an
error naming both values.
"""
from __future__ import annotations

import re
from typing import Any, Mapping

import torch

from zsadx.models.official import CheckpointError, Imported, OfficialFormat, register
from zsadx.models.official.keymap import (Rule, check_decided, consecutive, fit_to_method, indices, match_keys,
                                         origins)

SOURCE = "cockmake/ACD-CLIP (train.py torch.save of text_adapter / image_adapter)"
WHAT = "ACD-CLIP official checkpoint"
PARTS = ("image_adapter", "text_adapter")
METADATA = ("epoch",)


def _same(target: str) -> Rule:
    """``part.module.g.rest`` -> ``target.g.rest`` (the sub-module layout is zsadx's)."""
    return lambda m: f"{target}.{m.group(1)}.{m.group(2)}"


def _head(module: str, target: str) -> list[Rule]:
    # MLPAdapter.fc = Sequential(Linear, LeakyReLU, Linear): its 0 and 2 are zsadx Head's 0 and 2;
    # the separate LayerNorm is the Head's 3.
    return [(rf"image_adapter\.{module}_proj\.(\d+)\.fc\.([02]\.(?:weight|bias))", _same(target)),
            (rf"image_adapter\.{module}_layer_norms\.(\d+)\.(weight|bias)",
             lambda m: f"{target}.{m.group(1)}.3.{m.group(2)}")]


RULES: list[Rule] = [
    (r"image_adapter\.m_i_w\.(\d+)\.(i_w)", _same("image_blends")),
    (r"image_adapter\.lora_adapters\.(\d+)\.(conv_lora_blocks\.\d+\.(?:lora_A|lora_B|conv_lora_A\.weight|"
     r"conv_lora_B\.weight)|fusion_conv\.weight)", _same("image_adapters")),
    *_head("seg", "seg_heads"),
    *_head("det", "det_heads"),
    (r"image_adapter\.vision_text_gate\.(\d+)\.([02]\.(?:weight|bias))", _same("gateway.gates")),
    (r"text_adapter\.m_t_w\.(\d+)\.(i_w)", _same("text_blends")),
    (r"text_adapter\.lora_adapters\.(\d+)\.(lora_A|lora_B)", _same("text_adapters")),
    (r"text_adapter\.layer_norms\.(\d+)\.(weight|bias)", _same("text_norms")),
]


def detect(obj: Any) -> bool:
    """``{"image_adapter": {...}, "text_adapter": {...}}``, optionally with ``epoch``."""
    return (isinstance(obj, dict) and all(isinstance(obj.get(p), dict) for p in PARTS)
            and set(obj) <= {*PARTS, *METADATA})


def _flatten(obj: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    flat = {}
    for part in PARTS:
        for key, value in obj[part].items():
            name = f"{part}.{key}"
            if not torch.is_tensor(value):
                raise CheckpointError(f"{WHAT}: '{name}' is a {type(value).__name__}, not a tensor")
            flat[name] = value
    return flat


def _count(flat: Mapping[str, torch.Tensor], module: str) -> int:
    return consecutive(indices(flat, rf"{re.escape(module)}\.(\d+)\..*"), WHAT, module)


def _decide(flat: Mapping[str, torch.Tensor]) -> tuple[dict[str, Any], dict[str, str]]:
    lora = "image_adapter.lora_adapters"
    n = _count(flat, lora)
    if n == 0:
        raise CheckpointError(f"{WHAT}: no '{lora}.*' tensors: not an ACD-CLIP adapter file")
    for module in ("image_adapter.m_i_w", "image_adapter.seg_proj", "image_adapter.det_proj",
                   "image_adapter.vision_text_gate", "text_adapter.lora_adapters", "text_adapter.layer_norms",
                   "text_adapter.m_t_w"):
        if (found := _count(flat, module)) not in (n, 0):   # 0: left to the missing-key check
            raise CheckpointError(f"{WHAT}: {n} levels in '{lora}' but {found} in '{module}'")
    first = f"{lora}.0.conv_lora_blocks"
    kernels = [int(flat[f"{first}.{k}.conv_lora_A.weight"].shape[-1])
               for k in range(_count(flat, first))]
    if not kernels:
        raise CheckpointError(f"{WHAT}: no '{first}.*' tensors")
    image_rank = int(flat[f"{first}.0.lora_A"].shape[1])
    text_rank = int(flat["text_adapter.lora_adapters.0.lora_A"].shape[1]) \
        if "text_adapter.lora_adapters.0.lora_A" in flat else image_rank
    if text_rank != image_rank:
        raise CheckpointError(f"{WHAT}: image LoRA rank {image_rank} ({first}.0.lora_A) but text LoRA rank "
                              f"{text_rank} (text_adapter.lora_adapters.0.lora_A); the official code and zsadx "
                              f"use one lora_rank for both")
    decided = {"n_groups": n, "lora_rank": image_rank,
               "conv_rank": int(flat[f"{first}.0.conv_lora_A.weight"].shape[0]), "conv_kernels": kernels,
               "head_hidden": int(flat["image_adapter.seg_proj.0.fc.0.weight"].shape[0]),
               "gate_hidden": int(flat["image_adapter.vision_text_gate.0.0.weight"].shape[0])}
    if "image_adapter.m_i_w.0.i_w" in flat:
        decided["adapter_insertion"] = "blend"
    evidence = {"n_groups": f"{lora}.0..{n - 1}", "lora_rank": f"columns of {first}.0.lora_A",
                "conv_rank": f"{first}.0.conv_lora_A.weight", "conv_kernels": f"{first}.*.conv_lora_A.weight",
                "head_hidden": "image_adapter.seg_proj.0.fc.0.weight",
                "gate_hidden": "image_adapter.vision_text_gate.0.0.weight",
                "adapter_insertion": "image_adapter.m_i_w.*.i_w, the blend weights"}
    return decided, evidence


def convert(obj: Any, method) -> Imported:
    flat = _flatten(obj)
    try:
        decided, evidence = _decide(flat)
    except KeyError as exc:   # a tensor the shapes are read from is absent
        raise CheckpointError(f"{WHAT}: '{exc.args[0]}' is missing") from None
    check_decided(decided, method.cfg, WHAT, evidence)
    mapped, dropped = match_keys(flat, RULES, WHAT)
    dropped += [k for k in METADATA if k in obj]
    return Imported(state=fit_to_method(mapped, method, WHAT), dropped=dropped, decided=decided,
                    origin=origins(mapped))


FORMAT = register(OfficialFormat(method="acdclip", source=SOURCE, detect=detect, convert=convert))
