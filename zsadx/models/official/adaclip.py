"""AdaCLIP's official checkpoints (caoyunkang/AdaCLIP, ``method/trainer.py``).

``AdaCLIP_Trainer.save`` writes a flat ``{name: tensor}`` dict: every entry of the trainer's
``state_dict()`` whose name contains one of its learnable module names, so every key starts with
``clip_model.`` (the trainer's attribute holding the ``AdaCLIP`` module); ``load`` reads it back with
``load_state_dict(strict=False)``. The trainable modules are built in fp32 and trained under
autocast, so the file is fp32. Layout (D = vision width, E = ``embed_dim``, J = prompting depth,
n = prompting length, K = tapped levels; the official text prompts and the dynamic text heads
are E wide, which is the text width on every official backbone; zsadx uses the text width):

=========================================================  ==========  ============================
official key (after ``clip_model.``)                       shape       zsadx key
=========================================================  ==========  ============================
``visual_prompter.static_prompts.j`` (j < J)               (n, D)      ``visual_prompts.static.j``
``text_prompter.static_prompts.0``                         (n, E)      dead (dropped)
``text_prompter.static_prompts.j`` (1 <= j < J)            (n, E)      ``text.static.tokens.{j-1}``
``dynamic_visual_prompt_generator.head.i.{weight,bias}``   (D, E)      ``visual_dynamic.head.i``
``dynamic_text_prompt_generator.head.i.{weight,bias}``     (E, E)      ``text.dynamic.head.i``
``patch_token_layer.head.k.{weight,bias}`` (k < K)         (E, D)      ``patch_proj.k``
``cls_token_layer.head.0.{weight,bias}``                   (E, E)      ``cls_proj``
=========================================================  ==========  ============================

The block-1 text prompt is dead: ``PromptLayer.forward_text`` leaves the sequence untouched at
``indx == 0`` and replaces positions 1..n before blocks 2..J only. Shapes decide ``prompt_depth``
(J), ``prompt_length`` (n) and the number of levels (must equal ``len(layers)``); a method config
that disagrees is an error naming both values. A file trained with another prompting type or
branch (no dynamic heads, or no text/visual prompts) lacks keys zsadx needs and is refused.

The key-mapping helpers live in :mod:`zsadx.models.official.keymap` (shared with acdclip.py).
"""
from __future__ import annotations

import re
from typing import Any, Mapping

import torch

from zsadx.models.official import CheckpointError, Imported, OfficialFormat, register
from zsadx.models.official.keymap import (Rule, check_decided, consecutive, fit_to_method, indices, match_keys,
                                          origins)

SOURCE = "caoyunkang/AdaCLIP (method/trainer.py AdaCLIP_Trainer.save)"
PREFIX = "clip_model."
MODULES = ("text_prompter", "visual_prompter", "patch_token_layer", "cls_token_layer",
           "dynamic_visual_prompt_generator", "dynamic_text_prompt_generator")

# ------------------------------------------------------------------------------------------
# AdaCLIP
# ------------------------------------------------------------------------------------------

WHAT = "AdaCLIP official checkpoint"
P = re.escape(PREFIX)


def _linear(module: str, target: str) -> Rule:
    return rf"{P}{module}\.head\.(\d+)\.(weight|bias)", lambda m: f"{target}.{m.group(1)}.{m.group(2)}"


RULES: list[Rule] = [
    (rf"{P}visual_prompter\.static_prompts\.(\d+)", lambda m: f"visual_prompts.static.{m.group(1)}"),
    (rf"{P}text_prompter\.static_prompts\.0", None),   # block 1's text prompt: never spliced in
    (rf"{P}text_prompter\.static_prompts\.(\d+)", lambda m: f"text.static.tokens.{int(m.group(1)) - 1}"),
    _linear("dynamic_visual_prompt_generator", "visual_dynamic.head"),
    _linear("dynamic_text_prompt_generator", "text.dynamic.head"),
    _linear("patch_token_layer", "patch_proj"),
    (rf"{P}cls_token_layer\.head\.0\.(weight|bias)", lambda m: f"cls_proj.{m.group(1)}"),
]
VISUAL, TEXT = f"{PREFIX}visual_prompter.static_prompts", f"{PREFIX}text_prompter.static_prompts"
HEADS = f"{PREFIX}patch_token_layer.head"


def detect(obj: Any) -> bool:
    """A flat tensor dict whose keys all start with ``clip_model.`` and name AdaCLIP's modules."""
    if not isinstance(obj, dict) or not obj or not all(isinstance(k, str) for k in obj):
        return False
    if not all(k.startswith(PREFIX) and torch.is_tensor(v) for k, v in obj.items()):
        return False
    return any(k[len(PREFIX):].split(".", 1)[0] in MODULES for k in obj)


def _decide(obj: Mapping[str, torch.Tensor]) -> tuple[dict[str, Any], dict[str, str]]:
    """prompt_depth and prompt_length from the prompts' count and rows."""
    depth = consecutive(indices(obj, rf"{re.escape(VISUAL)}\.(\d+)"), WHAT, VISUAL)
    text_depth = consecutive(indices(obj, rf"{re.escape(TEXT)}\.(\d+)"), WHAT, TEXT)
    for count, key, branch in ((depth, VISUAL, "V"), (text_depth, TEXT, "L")):
        if count == 0:
            raise CheckpointError(f"{WHAT}: no '{key}.*': saved with prompting_branch without {branch} or "
                                  f"prompting_type without S; zsadx's AdaCLIP is the default VL / SD")
    if text_depth != depth:
        raise CheckpointError(f"{WHAT}: {depth} visual but {text_depth} text static prompts; the official "
                              f"code builds both with the same prompting_depth")
    lengths = {int(v.shape[0]) for k, v in obj.items() if k.startswith((VISUAL + ".", TEXT + "."))}
    if len(lengths) != 1:
        raise CheckpointError(f"{WHAT}: static prompts of different lengths {sorted(lengths)}")
    decided = {"prompt_depth": depth, "prompt_length": lengths.pop()}
    evidence = {"prompt_depth": f"{VISUAL}.0..{depth - 1}", "prompt_length": f"rows of {VISUAL}.0"}
    return decided, evidence


def _check_levels(obj: Mapping[str, torch.Tensor], cfg) -> None:
    levels = consecutive(indices(obj, rf"{re.escape(HEADS)}\.(\d+)\.weight"), WHAT, HEADS)
    if levels != len(cfg.layers):
        raise CheckpointError(f"{WHAT}: the file has {levels} levels ({HEADS}.0..{levels - 1}) but the method "
                              f"config taps {len(cfg.layers)} (layers {cfg.layers}); set method.layers to "
                              f"{levels} blocks")


def convert(obj: Any, method) -> Imported:
    decided, evidence = _decide(obj)
    check_decided(decided, method.cfg, WHAT, evidence)
    _check_levels(obj, method.cfg)
    mapped, dropped = match_keys(obj, RULES, WHAT)
    return Imported(state=fit_to_method(mapped, method, WHAT), dropped=dropped, decided=decided,
                    origin=origins(mapped))


FORMAT = register(OfficialFormat(method="adaclip", source=SOURCE, detect=detect, convert=convert))
