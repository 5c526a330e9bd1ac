"""zqhang/AnomalyCLIP's checkpoint: ``train.py`` saves ``{"prompt_learner": state_dict()}`` of
``prompt_ensemble.AnomalyCLIP_PromptLearner`` (``epoch_N.pth``), ``test.py`` loads it strictly.

Official layout (n_ctx 12, depth 9, length 4, D = text width 768 at ViT-L-14-336; all fp32:
``build_model.py`` leaves ``convert_weights`` commented out, so the prompt learner takes the fp32
dtype of the text tower):

=====================================  ==================  ====================================
official key                           shape               zsadx
=====================================  ==================  ====================================
ctx_pos                                (1, 1, n_ctx, D)    prompts.ctx_pos (n_ctx, D): "[ctx] object."
ctx_neg                                (1, 1, n_ctx, D)    prompts.ctx_neg: "[ctx] damaged object."
compound_prompts_text.j (j < depth-1)  (length, D)         prompts.deep.tokens.j (text block j + 2)
compound_prompt_projections.j.weight   (896, D), (896,)    dropped: dead (built, never called)
/.bias
token_prefix_pos/neg                   (1, 1, 1, D)        dropped: derived (the backbone's token
token_suffix_pos/neg                   (1, 1, 76-n_ctx, D)   embedding of the sentences)
tokenized_prompts_pos/neg              (1, 1, 77) int      dropped: derived; checked: same EOT position
=====================================  ==================  ====================================

The leading (1, 1) of the contexts is (classes, sentences per state): one class-agnostic class
"object", one normal and one abnormal template. Deep prompt j replaces positions 1..length at the
input of text block j + 2 (the block with 0-based index j + 1: block 0 has ``first_layer`` and
the counter starts at the list's index 0), which is zsadx's ``DeepTextPrompts`` order.
"""
from __future__ import annotations

from typing import Any

import torch

from zsadx.models.official import (CheckpointError, Imported, OfficialFormat, check_eot, check_width, indexed,
                                   matching, refuse_unknown, register, shape, unwrap)

SOURCE = "zqhang/AnomalyCLIP train.py"
DEAD = (r"compound_prompt_projections\.\d+\.(weight|bias)",)
DERIVED = (r"token_(prefix|suffix)_(pos|neg)", r"tokenized_prompts_(pos|neg)")


def state_of(obj: Any) -> dict[str, torch.Tensor] | None:
    return unwrap(obj, "prompt_learner")


def is_prompt_learner(sd: dict[str, torch.Tensor] | None) -> bool:
    """The AnomalyCLIP prompt learner's signature (FAPrompt's too, which adds patch_meta_net)."""
    return (sd is not None and {"ctx_pos", "ctx_neg"} <= set(sd)
            and sd["ctx_pos"].dim() == 4 and sd["ctx_neg"].dim() == 4)


def detect(obj: Any) -> bool:
    sd = state_of(obj)
    return is_prompt_learner(sd) and not any(k.startswith("patch_meta_net.") for k in sd)


def context(sd: dict[str, torch.Tensor], key: str, sentences: int) -> torch.Tensor:
    """``key`` (1 class, ``sentences``, n, D) -> (sentences, n, D)."""
    t = sd[key]
    if t.dim() != 4 or t.shape[0] != 1 or t.shape[1] != sentences:
        raise CheckpointError(f"'{key}' has shape {shape(t)}; the official layout is (1 class 'object', "
                              f"{sentences} sentence(s), n_ctx, width)")
    return t[0]


def deep_prompts(sd: dict[str, torch.Tensor], state: dict, origin: dict, decided: dict) -> list[str]:
    """compound_prompts_text.j -> prompts.deep.tokens.j; decides deep_depth (and deep_length)."""
    keys = indexed(sd, "compound_prompts_text")
    lengths = {shape(sd[k])[0] if sd[k].dim() == 2 else None for k in keys}
    if None in lengths or len(lengths) > 1:
        raise CheckpointError(f"compound_prompts_text: shapes {[shape(sd[k]) for k in keys]}; the official "
                              f"layout is depth - 1 tensors of (length, width), one length")
    for j, k in enumerate(keys):
        state[f"prompts.deep.tokens.{j}"], origin[f"prompts.deep.tokens.{j}"] = sd[k], k
    decided["deep_depth"] = len(keys) + 1
    if keys:
        decided["deep_length"] = lengths.pop()
    return keys


def check_text_widths(sd: dict[str, torch.Tensor], keys, method) -> None:
    for k in keys:
        check_width(k, sd[k], -1, method.backbone.text_width, "text width", method)


def check_sentences(sd: dict[str, torch.Tensor], method) -> None:
    """The file's tokenized sentences (normal, abnormal) end where the method's do."""
    ids = method.prompts.ids
    check_eot("tokenized_prompts_pos", sd["tokenized_prompts_pos"], ids[:1])
    check_eot("tokenized_prompts_neg", sd["tokenized_prompts_neg"][..., :1, :], ids[1:])


def dropped_keys(sd: dict[str, torch.Tensor]) -> list[str]:
    return matching(sd, DEAD + DERIVED)


def convert(obj: Any, method) -> Imported:
    sd = state_of(obj)
    pos, neg = context(sd, "ctx_pos", 1)[0], context(sd, "ctx_neg", 1)[0]
    if pos.shape != neg.shape:
        raise CheckpointError(f"ctx_pos {shape(pos)} and ctx_neg {shape(neg)} differ; official: one n_ctx for both")
    state = {"prompts.ctx_pos": pos, "prompts.ctx_neg": neg}
    origin = {"prompts.ctx_pos": "ctx_pos", "prompts.ctx_neg": "ctx_neg"}
    decided = {"n_ctx": pos.shape[0]}
    deep = deep_prompts(sd, state, origin, decided)
    dropped = dropped_keys(sd)
    refuse_unknown(sd, [*origin.values(), *dropped], SOURCE)
    check_text_widths(sd, ["ctx_pos", *deep], method)
    if {"tokenized_prompts_pos", "tokenized_prompts_neg"} <= set(sd) and decided["n_ctx"] == method.cfg.n_ctx:
        check_sentences(sd, method)
    return Imported(state=state, dropped=dropped, decided=decided, origin=origin)


register(OfficialFormat(method="anomalyclip", source=SOURCE, detect=detect, convert=convert))
