"""Pieces of the trained methods pinned on hand-made inputs (FAPrompt, AdaCLIP, shared prompt learning)."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from zsadx.config import load_config, load_yaml
from zsadx.eval.evaluator import EvalConfig
from zsadx.models.backbone import ForwardContext, VisionHook
from zsadx.models.clustering import kmeans
from zsadx.models.losses import binary_focal_loss, dice_loss, focal_loss, orthogonality_loss
from zsadx.models.methods.base import build_method
from zsadx.models.methods.faprompt import AbnormalityPrior, select_prior_patches
from zsadx.models.prompt_learning import DeepVisualPrompts, splice_tokens
from zsadx.models.scoring import hybrid_semantic_fusion


def method(name: str, **over):
    data = {"method": load_yaml(f"methods/{name}"), "data": {"shards": "-", "dataset": "-"}}
    cfg = load_config(EvalConfig, data=data, overrides=[f"method.{k}={v}" for k, v in over.items()]).method
    torch.manual_seed(0)
    return build_method(cfg).eval()


# ---- shared prompt pieces -------------------------------------------------------------------

def test_splice_tokens_replaces_exactly_the_given_positions():
    emb = torch.arange(2 * 6 * 3, dtype=torch.float32).reshape(2, 6, 3)
    tok = -torch.ones(2, 3)
    out = splice_tokens(emb, tok, start=2)
    assert out.shape == emb.shape
    assert torch.equal(out[:, 2:4], -torch.ones(2, 2, 3))
    assert torch.equal(out[:, :2], emb[:, :2]) and torch.equal(out[:, 4:], emb[:, 4:])


class _Recorder(VisionHook):
    def __init__(self):
        super().__init__()
        self.seen = {}

    def block(self, layer, block, x, ctx, call_next):
        self.seen[layer] = x.detach().clone()
        return call_next(x)


def test_visual_prompts_are_appended_then_replaced_per_block(tiny_backbone):
    bb = tiny_backbone
    prompts = DeepVisualPrompts(bb.width, length=2, depth=3)
    rec = _Recorder()
    dyn = torch.randn(2, 2, bb.width)
    images = torch.randn(2, 3, 64, 64)
    out = bb.encode_image(images, layers=[1, 4], hooks=[prompts, rec], extras={"visual_prompts": dyn})
    n = 1 + 16  # CLS + 4x4 patches
    for layer in (1, 2, 3):  # block 1 sees the appended prompts, blocks 2..3 freshly replaced ones
        assert rec.seen[layer].shape == (2, n + 2, bb.width)
        torch.testing.assert_close(rec.seen[layer][:, n:], prompts.static[layer - 1][None] + dyn)
    assert not torch.allclose(rec.seen[4][:, n:], prompts.static[2][None] + dyn)  # block 4 carries outputs along
    assert out.layers[1].shape == (2, n, bb.width) and out.final.shape == (2, n, bb.width)  # prompts cut


def test_deep_text_prompt_blocks_and_shapes_per_method():
    ac = method("anomalyclip-tiny")
    fa = method("faprompt-tiny")
    ada = method("adaclip-tiny")
    assert ac.prompts.deep.blocks == [2, 3] and fa.prompts.deep.blocks == [2, 3]
    assert ada.text.static.blocks == [2]  # depth 2: block 1 gets nothing (the official dead prompt is not built)
    assert [tuple(p.shape) for p in fa.prompts.deep.tokens] == [(4, 64), (4, 64)]
    assert tuple(fa.prompts.ctx_pos.shape) == (5, 64) and tuple(fa.prompts.ctx_neg.shape) == (4, 2, 64)
    assert [tuple(p.shape) for p in ada.visual_prompts.static] == [(2, 64), (2, 64)]
    assert len(ada.visual_dynamic.head) == 2 and len(ada.patch_proj) == 4


def test_faprompt_sentences_put_normal_and_abnormal_context_where_official_does():
    fa = method("faprompt-tiny")
    bb = fa.backbone
    ids = fa.prompts.ids
    x = bb.tokenize(["X"])[0, 1]
    damaged = bb.tokenize(["damaged"])[0, 1]
    assert (ids[0, 1:6] == x).all() and ids[0, 6] != x                     # 5 normal context slots
    assert (ids[1, 1:8] == x).all() and ids[1, 8] == damaged                # + 2 abnormal slots, then "damaged"
    # Abnormal prompt k depends on ctx_neg[k] only; the normal prompt on no ctx_neg at all.
    normal, abnormal = fa.prompts.encode(bb)
    grads = torch.autograd.grad(abnormal[1].sum(), fa.prompts.ctx_neg, retain_graph=True)[0]
    assert grads[1].abs().sum() > 0 and grads[[0, 2, 3]].abs().sum() == 0
    g = torch.autograd.grad(normal.sum(), fa.prompts.ctx_neg, allow_unused=True)[0]
    assert g is None or g.abs().sum() == 0


def test_dap_prior_uses_the_most_abnormal_patches_patch_major():
    tokens = torch.arange(1 * 6 * 2, dtype=torch.float32).reshape(1, 6, 2)
    anomaly = torch.tensor([[0.1, 0.9, 0.2, 0.8, 0.0, 0.3]])
    top = select_prior_patches(tokens, anomaly, k=3, gather="topk")
    assert torch.equal(top[0], tokens[0, [1, 3, 5]])
    assert torch.equal(select_prior_patches(tokens, anomaly, 3, "first")[0], tokens[0, :3])  # official bug
    net = AbnormalityPrior(k=3, embed_dim=2, hidden=4, text_width=5)
    with torch.no_grad():
        net.linear1.weight.copy_(torch.eye(4, 6))  # hidden = the first 4 entries of the flattened input
        net.linear1.bias.zero_()
        net.linear2.weight.copy_(torch.ones(5, 4))
        net.linear2.bias.zero_()
    # patch-major flattening: [p1.x, p1.y, p3.x, p3.y, ...] -> sum of the first four = 2+3+6+7
    assert torch.equal(net(top), torch.full((1, 5), 18.0))


def test_faprompt_paper_compat_switches_the_official_bugs_back_on():
    fa = method("faprompt-tiny", paper_compat="true")
    assert fa.cfg.dap_gather == "first" and fa.cfg.image_focal_on_logits


def test_kmeans_finds_separated_clusters_and_batches_like_single_items():
    g = torch.Generator().manual_seed(0)
    centres = torch.tensor([[0.0, 0.0], [10.0, 0.0], [0.0, 10.0]])
    pts = torch.cat([c + 0.1 * torch.randn(5, 2, generator=g) for c in centres])      # 15 points, 3 blobs
    batch = torch.stack([pts, pts[torch.randperm(15, generator=g)]])
    labels, found = kmeans(batch, 3)
    for b in range(2):
        groups = {tuple(torch.nonzero(labels[b] == c).flatten().tolist()) for c in range(3)}
        truth = {tuple(torch.nonzero(torch.cdist(batch[b], centres).argmin(1) == c).flatten().tolist())
                 for c in range(3)}
        assert groups == truth
    single, _ = kmeans(batch[1:], 3)
    assert torch.equal(single[0], labels[1])
    pp_labels, _ = kmeans(batch, 3, init="k-means++", generator=torch.Generator().manual_seed(1))
    assert len(set(pp_labels[0].tolist())) == 3


def test_hsf_on_a_hand_made_map():
    # 8 patches, E = 2, two levels. The 4 most anomalous patches form two tight pairs; HSF must be
    # the normalised mean of the two pair centroids (each averaged over both levels).
    e = F.normalize
    a, b = e(torch.tensor([1.0, 0.0]), dim=0), e(torch.tensor([0.0, 1.0]), dim=0)
    lvl1 = torch.stack([a, a, b, b, -a, -a, -b, -b])[None]
    lvl2 = torch.stack([a, a, b, b, -b, -b, -a, -a])[None]
    anomaly = torch.tensor([[0.9, 0.8, 0.7, 0.6, 0.1, 0.1, 0.1, 0.1]])
    f = hybrid_semantic_fusion([lvl1, lvl2], anomaly, top=4, clusters=2)
    torch.testing.assert_close(f[0], e((a + b) / 2, dim=0))
    # Uneven clusters: 3 x a and 1 x b -> centroids a and b, mean of centroids (not of tokens).
    lvl = torch.stack([a, a, a, b, -a, -a, -a, -a])[None]
    f = hybrid_semantic_fusion([lvl, lvl], anomaly, top=4, clusters=2)
    torch.testing.assert_close(f[0], e((a + b) / 2, dim=0))


def test_losses_by_hand():
    probs = torch.tensor([[0.8, 0.2], [0.3, 0.7]])                 # (B=2, C=2) image probabilities
    labels = torch.tensor([0, 1])
    pt = torch.tensor([0.8, 0.7]) + 1e-5 - 1e-5 * torch.tensor([0.8 - 0.2, 0.7 - 0.3])  # clamped one-hot
    assert focal_loss(probs, labels).item() == pytest.approx((-(1 - pt) ** 2 * pt.log()).mean().item(), rel=1e-4)
    pred, gt = torch.tensor([[[1.0, 0.0], [0.0, 0.0]]]), torch.tensor([[[1, 0], [1, 0]]])
    # per image: 1 - (2*1 + 1) / (1 + 2 + 1) = 0.25; per row: rows (3/3, 1/2) -> 1 - 0.75 = 0.25
    assert dice_loss(pred, gt).item() == pytest.approx(0.25)
    assert dice_loss(pred, gt, per_row=True).item() == pytest.approx(1 - (1.0 + 0.5) / 2)
    f = torch.tensor([[1.0, 0.0], [1.0, 1.0], [0.0, 1.0]])
    assert orthogonality_loss(f).item() == pytest.approx(2 ** -0.5 + 0 + 2 ** -0.5, rel=1e-6)
    p = torch.tensor([0.9, 0.2])
    bce = -torch.log(torch.tensor([0.9, 0.8]))
    expect = ((1 - torch.exp(-bce)) ** 2 * bce).mean()
    assert binary_focal_loss(p, torch.tensor([1, 0])).item() == pytest.approx(expect.item(), rel=1e-5)


@pytest.mark.parametrize("name", ["faprompt-tiny", "adaclip-tiny", "anomalyclip-tiny", "acdclip-tiny"])
def test_inference_is_batch_size_invariant(name):
    m = method(name)
    for p in m.parameters():  # move away from the init so that every path carries signal
        if p.requires_grad:
            p.data.add_(0.05 * torch.randn_like(p))
    g = torch.Generator().manual_seed(1)
    images = torch.randn(4, 3, 64, 64, generator=g)
    classes = ["bottle", "screw", "bottle", "pcb1"]
    whole = m.predict({"image": images, "cls": classes})
    parts = [m.predict({"image": images[i:i + 1], "cls": classes[i:i + 1]}) for i in range(4)]
    torch.testing.assert_close(whole.maps, torch.cat([p.maps for p in parts]), atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(whole.scores, torch.cat([p.scores for p in parts]), atol=1e-5, rtol=1e-4)


def test_adaclip_text_depends_on_the_image_and_the_class():
    m = method("adaclip-tiny")
    e = torch.randn(2, m.backbone.embed_dim)
    t = m.text(m.backbone, ["bottle", "bottle"], e)
    assert t.shape == (2, 2, m.backbone.embed_dim)
    torch.testing.assert_close(t.norm(dim=-1), torch.ones(2, 2))
    assert not torch.allclose(t[0], t[1])                                   # dynamic prompts differ
    t2 = m.text(m.backbone, ["metal-nut", "bottle"], e)
    assert not torch.allclose(t2[0], t[0]) and torch.allclose(t2[1], t[1], atol=1e-6)


# ---- ACD-CLIP ---------------------------------------------------------------------------------

from zsadx.models.adapters import AdapterBlend, ConvLoRA  # noqa: E402
from zsadx.models.methods.acdclip import DynamicFusionGateway, VisionAdapterHook, level_blocks  # noqa: E402


def test_zero_up_projection_leaves_the_backbone_unchanged(tiny_backbone):
    bb = tiny_backbone
    adapters = torch.nn.ModuleList([ConvLoRA(bb.width, rank=4, conv_rank=2, b_init="zeros") for _ in range(2)])
    images = torch.randn(2, 3, 64, 64)
    plain = bb.encode_image(images, layers=[2, 4])
    for mode in ("residual", "blend"):
        blends = torch.nn.ModuleList([AdapterBlend(bb.width, 0.2, mode) for _ in range(2)])
        if mode == "blend":
            for b in blends:  # the official blend scales x by (1 - w): identity only at w = 0
                b.i_w.data.zero_()
        hooked = bb.encode_image(images, layers=[2, 4], hooks=[VisionAdapterHook([2, 4], adapters, blends)])
        for l in (2, 4):
            torch.testing.assert_close(hooked.layers[l], plain.layers[l])
        torch.testing.assert_close(hooked.pooled, plain.pooled)
    assert torch.equal(adapters[0](torch.randn(2, 16, bb.width), (4, 4)), torch.zeros(2, 16, bb.width))


def test_conv_lora_sees_the_patch_grid_row_major():
    # A 3 x 5 grid (not square, so a transposed reshape would fail): one lit patch at (row 1, col 2).
    d, rows, cols = 2, 3, 5
    lora = ConvLoRA(d, rank=d, alpha=d ** 0.5, kernels=[3], conv_rank=d, conv_alpha=d)
    br = lora.conv_lora_blocks[0]
    with torch.no_grad():
        br.lora_A.copy_(torch.eye(d))
        br.lora_B.copy_(torch.eye(d))                           # scale alpha / sqrt(r) = 1
        shift = torch.zeros(d, d, 3, 3)
        shift[range(d), range(d), 1, 0] = 1.0                    # output(r, c) = input(r, c - 1): moves right
        br.conv_lora_A.weight.copy_(shift)
        centre = torch.zeros(d, d, 3, 3)
        centre[range(d), range(d), 0, 1] = 1.0                   # output(r, c) = input(r - 1, c): moves down
        br.conv_lora_B.weight.copy_(centre)                      # conv scale conv_alpha / conv_rank = 1
        lora.fusion_conv.weight.copy_(torch.eye(d)[:, :, None, None])
    tokens = torch.zeros(1, rows * cols, d)
    tokens[0, 1 * cols + 2] = torch.tensor([1.0, -2.0])
    out = lora(tokens, (rows, cols))
    lit = torch.nonzero(out[0].abs().sum(-1)).flatten().tolist()
    assert lit == [2 * cols + 3]                                 # (row 2, col 3)
    torch.testing.assert_close(out[0, 2 * cols + 3], torch.tensor([1.0, -2.0]))


def test_conv_lora_fusion_merges_exactly():
    torch.manual_seed(0)
    lora = ConvLoRA(8, rank=4, kernels=[3, 5], conv_rank=2)
    x = torch.randn(3, 20, 8)
    before = lora(x, (4, 5))
    lora.merge_fusion()
    torch.testing.assert_close(lora(x, (4, 5)), before, atol=1e-6, rtol=1e-5)
    lora.unmerge()
    torch.testing.assert_close(lora(x, (4, 5)), before)


def test_acdclip_merged_adapters_predict_the_same():
    m = method("acdclip-tiny")
    images = torch.randn(2, 3, 64, 64)
    batch = {"image": images, "cls": ["bottle", "screw"], "dataset": ["mvtec-ad"] * 2, "domain": ["industrial"] * 2}
    before = m.predict(batch)
    for a in m.image_adapters:
        a.merge_fusion()
    after = m.predict(batch)
    torch.testing.assert_close(after.maps, before.maps, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(after.scores, before.scores, atol=1e-5, rtol=1e-4)


def test_dfg_gating_on_hand_made_inputs():
    dfg = DynamicFusionGateway(dim=2, hidden=3, n_groups=2)
    with torch.no_grad():
        last = dfg.gates[0][2]
        last.weight.zero_()
        # r = (level0 normal, level0 abnormal, level1 normal, level1 abnormal)
        last.bias.copy_(torch.tensor([0.0, 2.0, 0.0, 0.0]))
    seg = torch.randn(1, 4, 2)
    text = torch.tensor([[[[1.0, 0.0], [0.0, 1.0]],             # level 0: normal, abnormal
                          [[3.0, 0.0], [0.0, 5.0]]]])            # level 1
    w = dfg.weights(0, seg)
    p = torch.sigmoid(torch.tensor(2.0))                         # softmax(2, 0)[0]
    torch.testing.assert_close(w[0], torch.tensor([[0.5, p], [0.5, 1 - p]]))
    mixed = dfg(0, seg, text)[0]
    torch.testing.assert_close(mixed[0], torch.tensor([0.5 * 1 + 0.5 * 3, 0.0]))
    torch.testing.assert_close(mixed[1], torch.tensor([0.0, p * 1 + (1 - p) * 5]))


def test_acdclip_levels_and_domain_rules():
    assert level_blocks(24, 4, "image") == [6, 12, 18, 24] and level_blocks(12, 4, "text") == [3, 6, 9, 12]
    assert level_blocks(24, 6, "image") == [4, 8, 12, 16, 20, 24] and level_blocks(12, 3, "text") == [4, 8, 12]
    from zsadx.config import ConfigError

    with pytest.raises(ConfigError, match="n_groups"):
        level_blocks(24, 5, "image")
    m = method("acdclip-tiny")
    assert m.image_blocks == [2, 4] and m.text_blocks == [2, 4]
    assert m.class_names("mvtec-ad", "bottle") == "dark bottle"
    assert m.class_names("cvc-colondb", "polyp") == "colon endoscopy image"
    assert m.class_names("not-catalogued", "metal_plate") == "metal plate"   # fallback: separators become spaces
    images = torch.randn(2, 3, 64, 64)
    ind = m.predict({"image": images, "cls": ["x", "x"], "dataset": ["d", "d"], "domain": ["industrial"] * 2})
    med = m.predict({"image": images, "cls": ["x", "x"], "dataset": ["d", "d"], "domain": ["medical"] * 2})
    assert not torch.allclose(ind.maps, med.maps)               # different blur per domain
    assert set(m.param_groups()) == {"image", "text"}
    assert len(m.grad_clip_groups()) == 4                        # 2 image + 2 text blend weights


def test_every_trainable_tensor_is_saved_once():
    for name in ("acdclip-tiny", "adaclip-tiny", "faprompt-tiny", "anomalyclip-tiny"):
        m = method(name)
        state = m.trainable_state_dict()
        assert sum(v.numel() for v in state.values()) == sum(p.numel() for p in m.trainable_parameters()), name
