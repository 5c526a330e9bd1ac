"""Trained methods encode their (fixed at evaluation) text once, and never reuse it once the tensors
it comes from change, nor in training."""
from __future__ import annotations

import pytest
import torch

from zsadx.config import load_config, load_yaml
from zsadx.eval.evaluator import EvalConfig
from zsadx.models.methods.base import build_method
from zsadx.models.prompt_learning import TextCache

# Text encodings per predict call once the static text is cached: FAPrompt's per-image (DAP) text
# depends on the image and is encoded every call.
PER_CALL = {"anomalyclip-tiny": 0, "faprompt-tiny": 1, "acdclip-tiny": 0}


def method(name: str, seed: int = 0):
    data = {"method": load_yaml(f"methods/{name}"), "data": {"shards": "-", "dataset": "-"}}
    cfg = load_config(EvalConfig, data=data).method
    torch.manual_seed(seed)
    return build_method(cfg).eval()


def count_text_encodings(m) -> list[int]:
    calls = [0]
    plain = m.backbone.encode_text

    def counted(*a, **kw):
        calls[0] += 1
        return plain(*a, **kw)

    m.backbone.encode_text = counted
    return calls


def batch():
    g = torch.Generator().manual_seed(5)
    return {"image": torch.randn(2, 3, 64, 64, generator=g), "cls": ["bottle", "bottle"],
            "dataset": ["mvtec-ad"] * 2, "domain": ["industrial"] * 2}


def assert_same(a, b):
    torch.testing.assert_close(a.maps, b.maps, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(a.scores, b.scores, rtol=1e-6, atol=1e-7)


def first_prompt_tensor(m) -> torch.Tensor:
    return m.prompts.ctx_pos if hasattr(m, "prompts") else m.text_adapters[0].lora_B


@pytest.mark.parametrize("name", sorted(PER_CALL))
def test_predict_twice_encodes_the_text_once_with_equal_outputs(name):
    m = method(name)
    calls = count_text_encodings(m)
    first = m.predict(batch())
    once = calls[0]
    assert once >= 1
    second = m.predict(batch())
    assert calls[0] - once == PER_CALL[name]
    assert_same(first, second)
    m.text_cache.clear()                                    # uncached: the same numbers
    assert_same(m.predict(batch()), first)


@pytest.mark.parametrize("name", sorted(PER_CALL))
def test_an_edited_prompt_tensor_is_re_encoded(name):
    m = method(name)
    before = m.predict(batch())
    with torch.no_grad():
        t = first_prompt_tensor(m)
        t.add_(torch.randn(t.shape, generator=torch.Generator().manual_seed(2)))   # in place: bumps its version
    calls = count_text_encodings(m)
    after = m.predict(batch())
    assert calls[0] > PER_CALL[name]
    assert not torch.allclose(after.scores, before.scores) or not torch.allclose(after.maps, before.maps)
    m.text_cache.clear()
    assert_same(m.predict(batch()), after)


@pytest.mark.parametrize("name", sorted(PER_CALL))
def test_loading_another_checkpoint_re_encodes(name):
    m, other = method(name), method(name, seed=1)
    m.predict(batch())
    m.load_trainable_state_dict(other.trainable_state_dict())
    assert_same(m.predict(batch()), other.predict(batch()))


@pytest.mark.parametrize("name", sorted(PER_CALL))
def test_training_never_uses_the_cache(name):
    m = method(name)
    m.predict(batch())
    m.train()
    calls = count_text_encodings(m)
    m.predict(batch())                                      # train mode, gradients off: still fresh
    m.predict(batch())
    assert calls[0] > 2 * PER_CALL[name]
    m.eval()
    calls[0] = 0
    b = dict(batch(), mask=torch.zeros(2, 64, 64), label=torch.tensor([0, 1]))
    m.loss(b)
    seen = calls[0]
    loss = m.loss(b)["loss"]                                # eval mode, gradients on: fresh, with gradients
    assert seen > 0 and calls[0] == 2 * seen
    loss.backward()
    assert first_prompt_tensor(m).grad is not None and first_prompt_tensor(m).grad.abs().sum() > 0


def test_cache_key_follows_storage_and_version():
    cache, t = TextCache(), torch.zeros(3)
    n = [0]

    def compute():
        n[0] += 1
        return t.sum()

    with torch.no_grad():
        cache.get("k", compute, [t])
        cache.get("k", compute, [t])
        assert n[0] == 1
        t.add_(1)
        assert cache.get("k", compute, [t]) == 3 and n[0] == 2
        cache.get("k", compute, [t], training=True)
        assert n[0] == 3
    cache.get("k", compute, [t])                            # gradients on: fresh
    assert n[0] == 4
