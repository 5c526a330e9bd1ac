"""Official checkpoints (issue 18.1): AnomalyCLIP's and FAPrompt's ``epoch_N.pth`` read directly.

Synthetic files in the official layout (``{"prompt_learner": state_dict}``, the official key names,
shapes at ViT-L-14-336 and at the tiny backbone's widths, fp32 as the official code saves and fp16
as a user might) are built here from the official prompt learners' documented layout, written with
``torch.save`` and given to ``zsadx eval --checkpoint`` / ``zsadx import`` / ``load_checkpoint``.
"""
from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from zsadx.config import load_config, load_yaml
from zsadx.models.checkpoints import CheckpointError, METHOD_FORMAT, method_identity
from zsadx.models.methods.base import build_method, method_config_type
from zsadx.models.prompt_learning import round_fp16

VIT_L = {"text_width": 768, "embed_dim": 768}


def method(name: str, *overrides: str):
    data = load_yaml(f"methods/{name}")
    cfg = load_config(method_config_type(data, "method"), data=data, overrides=list(overrides))
    torch.manual_seed(0)
    return build_method(cfg).eval()


# ---- the official layouts, written out from prompt_ensemble.py / FAPrompt.py ------------------

def randn(*shape, dtype=torch.float32, seed=[100]):
    seed[0] += 1
    return (torch.randn(*shape, generator=torch.Generator().manual_seed(seed[0])) * 0.5).to(dtype)


def common(d: int, n_ctx: int, depth: int, length: int, dtype) -> dict[str, torch.Tensor]:
    sd = {}
    for j in range(depth - 1):
        sd[f"compound_prompts_text.{j}"] = randn(length, d, dtype=dtype)
        sd[f"compound_prompt_projections.{j}.weight"] = randn(896, d, dtype=dtype)
        sd[f"compound_prompt_projections.{j}.bias"] = randn(896, dtype=dtype)
    return sd


def buffers(d: int, pos_ids: torch.Tensor, neg_ids: torch.Tensor, n_pos: int, n_neg_ctx: int, dtype):
    """The registered buffers: token embeddings around the context, the tokenized sentences."""
    a = neg_ids.shape[0]
    return {"token_prefix_pos": randn(1, 1, 1, d, dtype=dtype), "token_suffix_pos": randn(1, 1, 76 - n_pos, d, dtype=dtype),
            "token_prefix_neg": randn(1, a, 1, d, dtype=dtype),
            "token_suffix_neg": randn(1, a, 76 - n_neg_ctx, d, dtype=dtype),
            "tokenized_prompts_pos": pos_ids.int().reshape(1, 1, -1), "tokenized_prompts_neg": neg_ids.int()[None]}


def anomalyclip_file(tokenize, d=64, n_ctx=4, depth=3, length=4, dtype=torch.float32) -> dict:
    """AnomalyCLIP_PromptLearner.state_dict(): "X X .. X object." / "X X .. X damaged object."."""
    x = " ".join(["X"] * n_ctx)
    pos_ids, neg_ids = tokenize([f"{x} object."]), tokenize([f"{x} damaged object."])
    sd = {"ctx_pos": randn(1, 1, n_ctx, d, dtype=dtype), "ctx_neg": randn(1, 1, n_ctx, d, dtype=dtype),
          **common(d, n_ctx, depth, length, dtype), **buffers(d, pos_ids, neg_ids, n_ctx, n_ctx, dtype)}
    return {"prompt_learner": sd}


def faprompt_file(tokenize, d=64, e=64, n_ctx=5, a=4, a_ctx=2, k=4, hidden=32, depth=3, length=4,
                  dtype=torch.float32) -> dict:
    """FAPrompt.state_dict(): "N N N N N object." / A x "N N N N N A A damaged object."; MetaNet
    Linear(E k, hidden) -> ReLU -> Linear(hidden, D) (official: E = D = 768, k = 10, hidden E k / 16)."""
    n, ab = " ".join(["N"] * n_ctx), " ".join(["A"] * a_ctx)
    pos_ids, neg_ids = tokenize([f"{n} object."]), tokenize([f"{n} {ab} damaged object."] * a)
    sd = {"ctx_pos": randn(1, 1, n_ctx, d, dtype=dtype), "ctx_neg": randn(1, a, a_ctx, d, dtype=dtype),
          "patch_meta_net.linear1.weight": randn(hidden, e * k, dtype=dtype) * 0.1,
          "patch_meta_net.linear1.bias": randn(hidden, dtype=dtype),
          "patch_meta_net.linear2.weight": randn(d, hidden, dtype=dtype) * 0.1,
          "patch_meta_net.linear2.bias": randn(d, dtype=dtype),
          **common(d, n_ctx, depth, length, dtype), **buffers(d, pos_ids, neg_ids, n_ctx, n_ctx + a_ctx, dtype)}
    return {"prompt_learner": sd}


def save(obj, path: Path) -> Path:
    torch.save(obj, path)
    return path


@pytest.fixture(scope="module")
def tokenize():
    return method("anomalyclip-tiny").backbone.tokenize


def capture_text(m) -> list[dict]:
    """Every encode_text call of ``m``'s backbone: its token embeddings and deep prompts."""
    calls, encode = [], m.backbone.encode_text

    def spy(ids, embeddings=None, deep_prompts=None, **kw):
        calls.append({"ids": ids, "emb": embeddings.detach().clone(),
                      "deep": {b: t.detach().clone() for b, t in (deep_prompts or {}).items()}})
        return encode(ids, embeddings=embeddings, deep_prompts=deep_prompts, **kw)

    m.backbone.encode_text = spy
    return calls


def batch(n=2, size=64):
    return {"image": torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(3))}


# ---- AnomalyCLIP -------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_anomalyclip_values_land_where_the_official_code_uses_them(tokenize, tmp_path, dtype, caplog):
    sd = anomalyclip_file(tokenize, dtype=dtype)
    file = save(sd, tmp_path / "epoch_15.pth")
    m = method("anomalyclip-tiny")
    with caplog.at_level(logging.INFO, logger="zsadx"):
        m.load_checkpoint(str(file))
    lines = [r.getMessage() for r in caplog.records if "official" in r.getMessage()]
    assert len(lines) == 1 and "converted in memory" in lines[0] and "compound_prompt_projections.*" in lines[0]
    p = sd["prompt_learner"]
    assert torch.equal(m.prompts.ctx_pos, p["ctx_pos"][0, 0].float())
    assert torch.equal(m.prompts.ctx_neg, p["ctx_neg"][0, 0].float())
    for j in range(2):
        assert torch.equal(m.prompts.deep.tokens[j], p[f"compound_prompts_text.{j}"].float())
    calls = capture_text(m)
    m.predict(batch())
    (call,) = calls
    n = 4
    # sentence 0 "[ctx_pos] object.", sentence 1 "[ctx_neg] damaged object.": positions 1..n
    assert torch.equal(call["emb"][0, 1:1 + n], p["ctx_pos"][0, 0].float())
    assert torch.equal(call["emb"][1, 1:1 + n], p["ctx_neg"][0, 0].float())
    # official: compound_prompts_text[j] enters text block j + 2 (1-based; resblock index j + 1)
    assert sorted(call["deep"]) == [2, 3]
    for j in range(2):
        assert torch.equal(call["deep"][j + 2], p[f"compound_prompts_text.{j}"].float())


@pytest.mark.parametrize("nesting", ["bare", "prompt_learner"])
def test_faprompt_fp16_and_a_bare_state_dict_load_as_fp32(tokenize, tmp_path, nesting):
    sd = faprompt_file(tokenize, dtype=torch.float16)
    obj = sd["prompt_learner"] if nesting == "bare" else sd
    m = method("faprompt-tiny")
    m.load_checkpoint(str(save(obj, tmp_path / "fa.pth")))
    assert m.prompts.ctx_neg.dtype == torch.float32
    assert torch.equal(m.prompts.ctx_neg, sd["prompt_learner"]["ctx_neg"][0].float())
    assert torch.equal(m.prior.linear2.bias, sd["prompt_learner"]["patch_meta_net.linear2.bias"].float())


def official_config(name: str):
    """configs/methods/NAME.yaml as loaded (not built: its ViT-L weights are not needed here)."""
    data = load_yaml(f"methods/{name}")
    return load_config(method_config_type(data, "method"), data=data)


class AtVitL:
    """A method at ViT-L-14-336's widths (text 768, embedding 768) without its weights: the
    official config, zsadx's sentences, and the trainable shapes zsadx builds at those widths."""

    def __init__(self, cfg, tokenize, sentences, shapes):
        self.cfg = cfg
        self.backbone = type("Widths", (), {"text_width": 768, "embed_dim": 768})()
        self.prompts = type("Sentences", (), {"ids": tokenize(sentences)})()
        self.shapes = shapes

    def trainable_state_dict(self):
        return {k: torch.zeros(s) for k, s in self.shapes.items()}


def test_anomalyclip_at_vit_l_shapes_fits_the_official_config(tokenize):
    from zsadx.models.official import convert_official

    sd = anomalyclip_file(tokenize, d=768, n_ctx=12, depth=9, length=4)
    x = " ".join(["X"] * 12)
    shapes = {"prompts.ctx_pos": (12, 768), "prompts.ctx_neg": (12, 768),
              **{f"prompts.deep.tokens.{j}": (4, 768) for j in range(8)}}
    fake = AtVitL(official_config("anomalyclip"), tokenize, [f"{x} object.", f"{x} damaged object."], shapes)
    fmt, out = convert_official(sd, fake)
    assert fmt.method == "anomalyclip"
    assert out.decided == {"n_ctx": 12, "deep_depth": 9, "deep_length": 4}
    assert {k: tuple(v.shape) for k, v in out.state.items()} == shapes
    assert torch.equal(out.state["prompts.deep.tokens.7"], sd["prompt_learner"]["compound_prompts_text.7"])
    assert len([k for k in out.dropped if k.startswith("compound_prompt_projections.")]) == 16


def test_a_vit_l_file_on_the_tiny_backbone_names_both_widths(tokenize, tmp_path):
    file = save(anomalyclip_file(tokenize, d=768, n_ctx=12, depth=9, length=4), tmp_path / "epoch_15.pth")
    with pytest.raises(CheckpointError, match=r"epoch_15\.pth: 'ctx_pos' \(1, 1, 12, 768\) is 768 wide.*"
                                              r"zsadx-tiny-p16 has text width 64"):
        method("anomalyclip-tiny").load_checkpoint(str(file))


@pytest.mark.parametrize("override,message", [
    ("n_ctx=6", "the file's shapes give n_ctx 4, the method config has n_ctx 6: set method.n_ctx=4"),
    ("deep_depth=2", "deep_depth 3, the method config has deep_depth 2"),
    ("deep_length=2", "deep_length 4, the method config has deep_length 2"),
])
def test_a_file_that_disagrees_with_the_config_names_both_values(tokenize, tmp_path, override, message):
    file = save(anomalyclip_file(tokenize), tmp_path / "epoch_15.pth")
    with pytest.raises(CheckpointError, match=message) as info:
        method("anomalyclip-tiny", override).load_checkpoint(str(file))
    assert str(file) in str(info.value) and "\n" not in str(info.value)


def test_an_unknown_key_is_an_error_naming_it(tokenize, tmp_path):
    sd = anomalyclip_file(tokenize)
    sd["prompt_learner"]["my_adapter.weight"] = torch.zeros(3)
    file = save(sd, tmp_path / "fork.pth")
    with pytest.raises(CheckpointError, match=r"fork\.pth: key 'my_adapter.weight' is not part of the "
                                              r"zqhang/AnomalyCLIP train.py layout"):
        method("anomalyclip-tiny").load_checkpoint(str(file))


def test_other_sentences_in_the_file_are_refused(tokenize, tmp_path):
    sd = anomalyclip_file(tokenize)
    sd["prompt_learner"]["tokenized_prompts_neg"] = tokenize(["X X X X a damaged object."]).int()[None]
    with pytest.raises(CheckpointError, match="tokenized_prompts_neg.*other prompt sentences"):
        method("anomalyclip-tiny").load_checkpoint(str(save(sd, tmp_path / "e.pth")))


def test_the_wrong_method_is_named(tokenize, tmp_path):
    file = save(anomalyclip_file(tokenize), tmp_path / "epoch_15.pth")
    with pytest.raises(CheckpointError, match="an official anomalyclip checkpoint .*this is method 'faprompt'"):
        method("faprompt-tiny").load_checkpoint(str(file))
    file = save(faprompt_file(tokenize), tmp_path / "fa.pth")
    with pytest.raises(CheckpointError, match="an official faprompt checkpoint .*this is method 'anomalyclip'"):
        method("anomalyclip-tiny").load_checkpoint(str(file))


def test_a_file_of_no_known_format_says_which_formats_exist(tmp_path):
    file = save({"model": {"w": torch.zeros(2)}}, tmp_path / "other.pth")
    with pytest.raises(CheckpointError, match="nor an official one .*anomalyclip: zqhang/AnomalyCLIP"):
        method("anomalyclip-tiny").load_checkpoint(str(file))


def test_paper_compat_applies_to_imported_weights(tokenize, tmp_path):
    """paper_compat: the imported deep prompts are rounded through fp16 per sentence, as official."""
    file = save(anomalyclip_file(tokenize), tmp_path / "epoch_15.pth")
    official = method("anomalyclip-tiny", "paper_compat=true")
    official.load_checkpoint(str(file))
    assert official.cfg.fp16_deep_prompts
    calls = capture_text(official)
    got = official.predict(batch())
    sd = torch.load(file, weights_only=True)["prompt_learner"]
    for j in range(2):
        rounded = sd[f"compound_prompts_text.{j}"].half().float()
        assert torch.equal(calls[0]["deep"][j + 2], rounded.expand(2, -1, -1))
    # the same values entered by hand into a default method reproduce the paper_compat prediction
    plain = method("anomalyclip-tiny")
    plain.load_checkpoint(str(file))
    with torch.no_grad():
        for t in plain.prompts.deep.tokens:
            t.copy_(round_fp16(t))
    want = plain.predict(batch())
    assert not torch.equal(sd["compound_prompts_text.0"].half().float(), sd["compound_prompts_text.0"])
    torch.testing.assert_close(got.scores, want.scores, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got.maps, want.maps, rtol=1e-5, atol=1e-6)


# ---- FAPrompt ----------------------------------------------------------------------------------

def test_faprompt_values_land_where_the_official_code_uses_them(tokenize, tmp_path):
    sd = faprompt_file(tokenize)
    p = sd["prompt_learner"]
    m = method("faprompt-tiny")
    m.load_checkpoint(str(save(sd, tmp_path / "epoch_10.pth")))
    assert torch.equal(m.prompts.ctx_neg, p["ctx_neg"][0])
    assert torch.equal(m.prior.linear1.weight, p["patch_meta_net.linear1.weight"])
    prior_inputs = []
    m.prior.register_forward_pre_hook(lambda mod, args: prior_inputs.append(args[0].detach().clone()))
    calls = capture_text(m)
    m.predict(batch(n=2))
    static, dap = calls
    # static pass: 1 normal + A abnormal sentences; "N N N N N" at 1..5, abnormal "A A" at 6..7
    for s in range(5):
        assert torch.equal(static["emb"][s, 1:6], p["ctx_pos"][0, 0])
    for a in range(4):
        assert torch.equal(static["emb"][1 + a, 6:8], p["ctx_neg"][0, a])
    for j in range(2):
        assert torch.equal(static["deep"][j + 2], p[f"compound_prompts_text.{j}"])
    # DAP pass: the official patch_meta_net of the k selected tokens (flattened token after token,
    # official reshape(1, E k)) is added to every abnormal context token, per image
    (tokens,) = prior_inputs
    flat = tokens.reshape(tokens.shape[0], -1)
    bias = F.linear(F.relu(F.linear(flat, p["patch_meta_net.linear1.weight"], p["patch_meta_net.linear1.bias"])),
                    p["patch_meta_net.linear2.weight"], p["patch_meta_net.linear2.bias"])
    emb = dap["emb"].reshape(2, 5, *dap["emb"].shape[1:])
    for b in range(2):
        for a in range(4):
            torch.testing.assert_close(emb[b, 1 + a, 6:8], p["ctx_neg"][0, a] + bias[b], rtol=1e-5, atol=1e-6)
        assert torch.equal(emb[b, 0, 1:6], p["ctx_pos"][0, 0])


def test_faprompt_at_vit_l_shapes_fits_the_official_config(tokenize):
    from zsadx.models.official import convert_official

    sd = faprompt_file(tokenize, d=768, e=768, n_ctx=5, a=10, a_ctx=2, k=10, hidden=768 * 10 // 16, depth=9)
    shapes = {"prompts.ctx_pos": (5, 768), "prompts.ctx_neg": (10, 2, 768),
              **{f"prompts.deep.tokens.{j}": (4, 768) for j in range(8)},
              "prior.linear1.weight": (480, 7680), "prior.linear1.bias": (480,),
              "prior.linear2.weight": (768, 480), "prior.linear2.bias": (768,)}
    x = " ".join(["X"] * 5)
    fake = AtVitL(official_config("faprompt"), tokenize, [f"{x} object.", f"{x} X X damaged object."], shapes)
    _, out = convert_official(sd, fake)
    assert out.decided == {"n_ctx": 5, "n_abnormal": 10, "abnormal_ctx": 2, "deep_depth": 9, "deep_length": 4,
                           "dap_topk": 10, "dap_hidden": 480}
    assert {k: tuple(v.shape) for k, v in out.state.items()} == shapes


@pytest.mark.parametrize("override,value", [("dap_topk=3", "dap_topk 4"), ("n_abnormal=10", "n_abnormal 4"),
                                            ("dap_hidden=16", "dap_hidden 32")])
def test_faprompt_shapes_disagreeing_with_the_config_name_both(tokenize, tmp_path, override, value):
    file = save(faprompt_file(tokenize), tmp_path / "fa.pth")
    with pytest.raises(CheckpointError, match=f"give {value}, the method config has {override.split('=')[0]} "
                                              f"{override.split('=')[1]}"):
        method("faprompt-tiny", override).load_checkpoint(str(file))


def test_faprompt_paper_compat_applies_to_imported_weights(tokenize, tmp_path):
    file = save(faprompt_file(tokenize), tmp_path / "fa.pth")
    m = method("faprompt-tiny", "paper_compat=true")
    m.load_checkpoint(str(file))
    assert m.cfg.dap_gather == "first" and m.cfg.fp16_deep_prompts
    prior_inputs = []
    m.prior.register_forward_pre_hook(lambda mod, args: prior_inputs.append(args[0].detach().clone()))
    calls = capture_text(m)
    m.predict(batch(n=1))
    # dap_gather first: the MetaNet reads patches 0..k-1 of the grid (the official loop's indices)
    with torch.inference_mode():
        (tokens,), _, _ = m.vision(m.backbone, batch(n=1)["image"])
    torch.testing.assert_close(prior_inputs[0], tokens[:, :4], rtol=1e-5, atol=1e-6)
    sd = torch.load(file, weights_only=True)["prompt_learner"]
    assert torch.equal(calls[0]["deep"][2][0], sd["compound_prompts_text.0"].half().float())


# ---- the CLI: zsadx import, zsadx eval --checkpoint ---------------------------------------------

def test_import_writes_a_zsadx_checkpoint_with_identity(tokenize, tmp_path, capsys):
    from zsadx.cli import main

    file = save(anomalyclip_file(tokenize), tmp_path / "epoch_15.pth")
    out = tmp_path / "ckpt.pt"
    assert main(["import", "methods/anomalyclip-tiny", str(file), "--out", str(out)]) == 0
    assert "converted in memory" in capsys.readouterr().out
    ck = torch.load(out, weights_only=True)
    m = method("anomalyclip-tiny")
    assert ck["format"] == METHOD_FORMAT and ck["method"] == "anomalyclip"
    assert ck["backbone"] == method_identity(m)["backbone"]
    assert torch.equal(ck["state"]["prompts.ctx_neg"], torch.load(file, weights_only=True)["prompt_learner"]["ctx_neg"][0, 0])
    m.load_checkpoint(str(out))  # a zsadx checkpoint now: its identity is checked
    # the file exists: refused, untouched
    before = out.read_bytes()
    assert main(["import", "methods/anomalyclip-tiny", str(file), "--out", str(out)]) == 2
    assert "exists" in capsys.readouterr().err and out.read_bytes() == before


def test_import_errors_are_one_line(tokenize, tmp_path, capsys):
    from zsadx.cli import main

    file = save(anomalyclip_file(tokenize), tmp_path / "epoch_15.pth")
    assert main(["import", "methods/anomalyclip-tiny", str(file), "--out", str(tmp_path / "a.pt"), "--set", "n_ctx=6"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "zsadx import: error:" in err and "n_ctx 4" in err and "n_ctx 6" in err
    assert not (tmp_path / "a.pt").exists()
    m = method("anomalyclip-tiny")
    from zsadx.models.checkpoints import save_method_checkpoint
    own = save_method_checkpoint(m, tmp_path / "final.pt")
    assert main(["import", "methods/anomalyclip-tiny", str(own), "--out", str(tmp_path / "b.pt")]) == 2
    assert "pass it to --checkpoint" in capsys.readouterr().err


@pytest.mark.slow
def test_eval_takes_the_official_file_directly(tokenize, tmp_path, capsys, caplog):
    from conftest import make_shards
    from zsadx.cli import main

    shards = make_shards(tmp_path / "data", {"mvtec-ad": 2})
    file = save(anomalyclip_file(tokenize), tmp_path / "epoch_15.pth")
    with caplog.at_level(logging.INFO, logger="zsadx"):
        assert main(["eval", "--method", "methods/anomalyclip-tiny", "--checkpoint", str(file), "--shards",
                     str(shards), "--dataset", "mvtec-ad", "--out", str(tmp_path / "eval"), "data.num_workers=0"]) == 0
    assert len([r for r in caplog.records if "converted in memory" in r.getMessage()]) == 1
    # the same numbers as the zsadx checkpoint zsadx import writes
    out = tmp_path / "ckpt.pt"
    assert main(["import", "methods/anomalyclip-tiny", str(file), "--out", str(out)]) == 0
    assert main(["eval", "--method", "methods/anomalyclip-tiny", "--checkpoint", str(out), "--shards",
                 str(shards), "--dataset", "mvtec-ad", "--out", str(tmp_path / "eval2"), "data.num_workers=0"]) == 0
    import json
    a, b = (json.loads(next(p for p in (tmp_path / d).glob("*.json")).read_text())["mean"] for d in ("eval", "eval2"))
    assert a
    for k in a:
        if isinstance(a[k], float):
            assert a[k] == pytest.approx(b[k], rel=1e-6)
