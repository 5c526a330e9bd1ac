"""mala-lab/FAPrompt's checkpoint: ``train.py`` saves ``{"prompt_learner": state_dict()}`` of
``FAPrompt.FAPrompt`` (a fork of AnomalyCLIP's prompt learner), ``test.py`` loads it strictly.

Official layout (5 normal context tokens, 10 abnormal prompts of 2 own tokens, top-10 patches,
depth 9, length 4; D = text width 768, E = embedding width 768 at ViT-L-14-336, both hard-coded
as 768 in the official MetaNet; all fp32, as AnomalyCLIP):

=====================================  ====================  ==================================
official key                           shape                 zsadx
=====================================  ====================  ==================================
ctx_pos                                (1, 1, n_ctx, D)      prompts.ctx_pos (n_ctx, D): "N N N N N"
ctx_neg                                (1, A, a_ctx, D)      prompts.ctx_neg (A, a_ctx, D): "A A"
compound_prompts_text.j                (length, D)           prompts.deep.tokens.j (text block j + 2)
patch_meta_net.linear1.weight / .bias  (k E / 16, k E)       prior.linear1 (k E -> hidden)
patch_meta_net.linear2.weight / .bias  (D, k E / 16)         prior.linear2 (hidden -> D)
compound_prompt_projections.j.*        (896, D), (896,)      dropped: dead (built, never called)
token_prefix_*, token_suffix_*         (1, 1|A, ., D)        dropped: derived (token embedding)
tokenized_prompts_pos / _neg           (1, 1, 77), (1, A, 77)  dropped: derived; EOT position checked
=====================================  ====================  ==================================

Abnormal sentence a is "[ctx_pos] [ctx_neg[0, a]] damaged object." (positions 1..5, then 6..7),
the MetaNet's output added to every ctx_neg token. The MetaNet reads the k selected patch tokens
flattened token after token (``reshape(1, E * k)`` of (k, E)), as zsadx's ``AbnormalityPrior``.
"""
from __future__ import annotations

from typing import Any

from zsadx.models.official import (CheckpointError, Imported, OfficialFormat, check_width, refuse_unknown,
                                   register, shape)
from zsadx.models.official.anomalyclip import (check_sentences, check_text_widths, context, deep_prompts,
                                               dropped_keys, is_prompt_learner, state_of)

SOURCE = "mala-lab/FAPrompt train.py"
META = {f"prior.linear{i}.{p}": f"patch_meta_net.linear{i}.{p}" for i in (1, 2) for p in ("weight", "bias")}


def detect(obj: Any) -> bool:
    sd = state_of(obj)
    return is_prompt_learner(sd) and "patch_meta_net.linear1.weight" in sd


def convert(obj: Any, method) -> Imported:
    sd = state_of(obj)
    pos = context(sd, "ctx_pos", 1)[0]
    abnormal = context(sd, "ctx_neg", sd["ctx_neg"].shape[1])   # detect: 4-D
    state = {"prompts.ctx_pos": pos, "prompts.ctx_neg": abnormal}
    origin = {"prompts.ctx_pos": "ctx_pos", "prompts.ctx_neg": "ctx_neg"}
    decided = {"n_ctx": pos.shape[0], "n_abnormal": abnormal.shape[0], "abnormal_ctx": abnormal.shape[1]}
    deep = deep_prompts(sd, state, origin, decided)
    missing = [k for k in META.values() if k not in sd]
    if missing:
        raise CheckpointError(f"'{missing[0]}' is missing: the official FAPrompt layout has patch_meta_net "
                              f"linear1 and linear2 with weight and bias")
    for zsadx_key, key in META.items():
        state[zsadx_key], origin[zsadx_key] = sd[key], key
    dropped = dropped_keys(sd)
    refuse_unknown(sd, [*origin.values(), *dropped], SOURCE)
    check_text_widths(sd, ["ctx_pos", "ctx_neg", *deep], method)
    decided.update(metanet_sizes(sd, method))
    if {"tokenized_prompts_pos", "tokenized_prompts_neg"} <= set(sd) and decided["n_ctx"] == method.cfg.n_ctx \
            and decided["abnormal_ctx"] == method.cfg.abnormal_ctx:
        check_sentences(sd, method)
    return Imported(state=state, dropped=dropped, decided=decided, origin=origin)


def metanet_sizes(sd, method) -> dict[str, int]:
    """dap_topk and dap_hidden from linear1 (hidden, k E); linear2 must give the text width."""
    w1, w2 = sd["patch_meta_net.linear1.weight"], sd["patch_meta_net.linear2.weight"]
    if w1.dim() != 2 or w2.dim() != 2 or w2.shape[1] != w1.shape[0]:
        raise CheckpointError(f"patch_meta_net: linear1 {shape(w1)} and linear2 {shape(w2)} do not chain "
                              f"(official: (k E / 16, k E) then (D, k E / 16))")
    check_width("patch_meta_net.linear2.weight", w2, 0, method.backbone.text_width, "text width", method)
    embed = method.backbone.embed_dim
    if w1.shape[1] % embed:
        raise CheckpointError(f"'patch_meta_net.linear1.weight' {shape(w1)} reads {w1.shape[1]} inputs, not a "
                              f"multiple of this backbone's embedding width {embed} (k patch tokens of E each)")
    return {"dap_topk": w1.shape[1] // embed, "dap_hidden": w1.shape[0]}


register(OfficialFormat(method="faprompt", source=SOURCE, detect=detect, convert=convert))
