"""Shared scoring pieces: smoothing equals scipy, upsampling, fusion rules, prompt ensembles."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy import ndimage

from zsadx.models.prompts import PromptSet, TextFeatureCache
from zsadx.models.scoring import fuse_image_score, gaussian_blur, similarity_probs, upsample


@pytest.mark.parametrize("sigma", [1.0, 4.0, 10.0])
@pytest.mark.parametrize("shape", [(2, 37, 41), (1, 8, 8)])
def test_gaussian_blur_equals_scipy(sigma, shape):
    x = torch.rand(*shape)
    ref = np.stack([ndimage.gaussian_filter(m, sigma) for m in x.numpy()])
    assert np.abs(gaussian_blur(x, sigma).numpy() - ref).max() < 1e-6


def test_upsample_keeps_constant_and_size():
    m = torch.full((2, 4, 4), 0.3)
    assert torch.allclose(upsample(m, 16), torch.full((2, 16, 16), 0.3))
    assert upsample(m, (4, 4)) is m


def test_fusion_rules():
    g = torch.tensor([0.2, 0.8])
    maps = torch.zeros(2, 3, 3)
    maps[0, 1, 1] = 1.0
    assert torch.equal(fuse_image_score(g, maps, "global"), g)
    assert torch.allclose(fuse_image_score(g, maps, "mean-with-max", 0.9), torch.tensor([0.28, 0.72]))
    with pytest.raises(ValueError, match="unknown fusion rule"):
        fuse_image_score(g, maps, "median")


def test_similarity_probs_hand_computed():
    tokens = torch.tensor([[[1.0, 0.0], [0.0, 1.0]]])
    text = torch.tensor([[1.0, 0.0], [0.0, 1.0]])  # normal, anomalous
    p = similarity_probs(tokens, text, scale=1.0)
    e = np.exp(1.0)
    assert torch.allclose(p, torch.tensor([[1 / (1 + e), e / (1 + e)]], dtype=torch.float32))


def test_prompt_ensemble_is_normalised_mean_and_cached(tiny_backbone):
    ps = PromptSet("t", ("normal {}", "good {}"), ("damaged {}",), ("a photo of a {}.", "a {}."))
    assert ps.sentences("bottle", False) == ["a photo of a normal bottle.", "a normal bottle.",
                                            "a photo of a good bottle.", "a good bottle."]
    cache = TextFeatureCache(tiny_backbone)
    feats = cache.get(ps, "bottle")
    with torch.no_grad():
        each = tiny_backbone.encode_text(tiny_backbone.tokenize(ps.sentences("bottle", False)), normalize=True)
    want = torch.nn.functional.normalize(each.mean(0), dim=-1)
    assert torch.allclose(feats[0], want, atol=1e-6) and torch.allclose(feats.norm(dim=-1), torch.ones(2))
    cache.get(ps, "bottle")
    assert len(cache) == 1
    assert cache.batch(ps, ["bottle", "bottle"]).shape == (2, 2, feats.shape[-1])


def test_prompt_set_sizes_match_the_seeds():
    from zsadx.models.prompts import PROMPT_SETS

    sizes = {n: (len(p.sentences("x", False)), len(p.sentences("x", True))) for n, p in PROMPT_SETS.items()}
    assert sizes["winclip"] == (154, 88) and sizes["winclip-21"] == (147, 84)
    assert sizes["adaclip"] == (28, 20) and sizes["anomalyclip-ensemble"] == (7 * 35, 5 * 35)
