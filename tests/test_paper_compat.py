"""``paper_compat`` of the trained methods: every method accepts it, each quirk is its own key, and the
official fp16 casts of the prompts are reproduced in the official order (expand to every sentence /
image, then cast: each copy's gradient is rounded before the sum)."""
from __future__ import annotations

import dataclasses

import pytest
import torch

from zsadx.config import load_config, load_yaml
from zsadx.eval.evaluator import EvalConfig
from zsadx.models.methods import load_all
from zsadx.models.methods.base import build_method


def method(name: str, **over):
    data = {"method": load_yaml(f"methods/{name}"), "data": {"shards": "-", "dataset": "-"}}
    cfg = load_config(EvalConfig, data=data, overrides=[f"method.{k}={v}" for k, v in over.items()]).method
    torch.manual_seed(0)
    return build_method(cfg).eval()


def batch(n: int = 2):
    g = torch.Generator().manual_seed(3)
    masks = torch.zeros(n, 64, 64)
    masks[0, 10:30, 20:40] = 1
    return {"image": torch.randn(n, 3, 64, 64, generator=g), "mask": masks,
            "label": torch.tensor([1] + [0] * (n - 1)), "cls": ["bottle"] * n, "dataset": ["mvtec-ad"] * n}


OFFICIAL = {
    "anomalyclip": {"fp16_deep_prompts": True},
    "faprompt": {"dap_gather": "first", "image_focal_on_logits": True, "fp16_deep_prompts": True,
                 "prior_batch_scale": None},
    "adaclip": {"dice_per_row": True, "fp16_deep_prompts": True},
    "acdclip": {},  # official runs in fp32, no result-changing quirk beyond zsadx's defaults
}


@pytest.mark.parametrize("name", sorted(load_all().names()))
def test_every_method_accepts_paper_compat_and_builds(name):
    m = method(f"{name}-tiny", paper_compat="true")
    cfg = m.cfg
    fields = {f.name for f in dataclasses.fields(cfg)}
    assert cfg.paper_compat and set(cfg.PAPER_COMPAT) <= fields      # every quirk is a key of its own
    for key, value in cfg.PAPER_COMPAT.items():
        assert getattr(cfg, key) == value
    size = cfg.input_size or cfg.backbone.image_size
    refs = {"bottle": torch.randn(cfg.shots, 3, size, size)} if cfg.shots else None
    m.prepare(["bottle"], "industrial", refs)
    out = m.predict({"image": torch.randn(1, 3, size, size), "cls": ["bottle"], "dataset": ["mvtec-ad"],
                     "domain": ["industrial"]})
    assert out.scores.shape == (1,) and torch.isfinite(out.scores).all()


@pytest.mark.parametrize("name", sorted(OFFICIAL))
def test_trained_methods_list_their_official_values(name):
    assert type(method(f"{name}-tiny").cfg).PAPER_COMPAT == OFFICIAL[name]
    assert not method(f"{name}-tiny").cfg.paper_compat


def test_one_quirk_alone_and_defaults_untouched():
    fa = method("faprompt-tiny", fp16_deep_prompts="true")
    assert fa.cfg.fp16_deep_prompts and fa.cfg.dap_gather == "topk" and fa.cfg.prior_batch_scale == 8.0
    assert method("faprompt-tiny", paper_compat="true", prior_batch_scale=4).cfg.prior_batch_scale == 4


def test_faprompt_prior_null_is_the_official_sum_over_the_batch():
    b = batch(3)
    official = method("faprompt-tiny", prior_batch_scale="null").loss(b)
    scaled = method("faprompt-tiny", prior_batch_scale=1).loss(b)      # per-image mean x 1
    # 2 normals of 3 images: sum = mean x 3
    torch.testing.assert_close(official["prior"], 3 * scaled["prior"], rtol=1e-5, atol=0)


# ---- fp16 rounding in the official order --------------------------------------------------------

def rounding_encode_text(bb, per_sentence: bool):
    """Wrap ``bb.encode_text`` so that its deep prompts are cast to fp16 the official way (expanded
    to the call's sentences, then ``.half()``; encode_text promotes them back as the official
    ``torch.cat`` does) or rounded once before expanding (the old zsadx order)."""
    plain = bb.encode_text

    def encode(ids, embeddings=None, deep_prompts=None, **kw):
        def cast(p):
            if per_sentence:
                p = p.expand(ids.shape[0], *p.shape[-2:])
            return p.half()
        deep = {b: cast(p) for b, p in (deep_prompts or {}).items()}
        return plain(ids, embeddings=embeddings, deep_prompts=deep, **kw)

    bb.encode_text = encode


def deep_grads(m, b):
    m.zero_grad()
    m.loss(b)["loss"].backward()
    return torch.cat([p.grad.flatten() for p in m.prompts.deep.tokens])


def relative(a, b):
    return ((a - b).norm() / b.norm()).item()


@pytest.mark.parametrize("name", ["anomalyclip-tiny", "faprompt-tiny"])
def test_deep_prompt_gradient_is_rounded_per_sentence(name):
    b = batch()
    compat = method(name, paper_compat="true")
    assert compat.prompts.fp16
    got = deep_grads(compat, b)
    references = {}
    for per_sentence in (True, False):
        ref = method(name, paper_compat="true")
        ref.prompts.fp16 = False                       # the wrapper does the rounding instead
        rounding_encode_text(ref.backbone, per_sentence)
        references[per_sentence] = deep_grads(ref, b)
    # Same values rounded the same way; only fp32 summation order may differ.
    assert relative(got, references[True]) < 1e-6
    # fp16 rounds each element to ~2^-11 relative: rounding the summed gradient once is visibly off.
    assert relative(references[False], references[True]) > 2e-5
    # And without the switch nothing is rounded.
    plain = method(name, paper_compat="true")
    plain.prompts.fp16 = False
    assert relative(deep_grads(plain, b), references[True]) > 2e-5


def test_adaclip_rounds_each_sentences_text_prompts_and_each_images_visual_prompts():
    b = batch()
    compat = method("adaclip-tiny", paper_compat="true")
    assert compat.text.fp16 and compat.visual_prompts.fp16

    ref = method("adaclip-tiny", paper_compat="true")
    ref.text.fp16 = ref.visual_prompts.fp16 = False
    rounding_encode_text(ref.backbone, per_sentence=True)
    vp = ref.visual_prompts

    def official_visual(i, x, ctx):   # official: dynamic + static expanded over the batch, then .half()
        return (ctx.extras["visual_prompts"] + vp.static[i][None].expand(x.shape[0], -1, -1)).half().to(x.dtype)

    vp._prompts = official_visual

    def grads(m):
        m.zero_grad()
        m.loss(b)["loss"].backward()
        ps = [*m.text.static.tokens, *m.visual_prompts.static, *m.text.dynamic.parameters(),
              *m.visual_dynamic.parameters()]
        return torch.cat([p.grad.flatten() for p in ps])

    got = grads(compat)
    assert relative(got, grads(ref)) < 1e-6
    plain = method("adaclip-tiny", paper_compat="true")
    plain.text.fp16 = plain.visual_prompts.fp16 = False
    assert relative(grads(plain), got) > 2e-5
