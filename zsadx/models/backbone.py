"""The frozen CLIP backbone over open_clip: loading, layer taps and the hooks methods compose.

This is the only module that knows open_clip's internals. Methods never copy the transformer's
forward; they pass hooks:

* :class:`VisionHook` (an ``nn.Module``, so its parameters belong to the method) sees the token
  sequence after embedding (``begin``), around every residual block (``block``, middleware style:
  call ``call_next`` to run the rest of the chain and the block itself, or compute something else
  from the block's weights) and before pooling (``end``). Extra streams (AnomalyCLIP's V-V stream,
  FADE's GEM stream) live in ``ctx.streams`` and can be tapped by name.
* Text prompts: ``encode_text(ids, embeddings=..., deep_prompts=...)`` takes the method's own input
  embeddings (learnable context spliced in) and per-layer replacements of the tokens after SOT.

Layers are numbered from 1 (block 24 is the last block of ViT-L); the conversion to open_clip's
0-based ``resblocks`` happens here and nowhere else. Token sequences are batch-first (B, L, D); a
tapped layer holds the CLS token and the patch tokens only: tokens a hook appends after the patch
tokens (visual prompts) are cut off, so hooks must append, never insert before the patches.
"""
from __future__ import annotations

import functools
import json
import logging
import os
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Literal, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from zsadx.config import ConfigError, config_root
from zsadx.models.checkpoints import CheckpointError

log = logging.getLogger(__name__)

OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)

_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass
class BackboneConfig:
    """Which CLIP to load and how to run it.

    ``pretrained`` is an open_clip tag (``openai``, ``laion400m_e31``), a local file (an OpenAI
    ``.pt`` JIT archive or state dict, an open_clip ``.pt``/``.bin``/``.safetensors``), or null for
    random weights (tests). ``name`` may be ``auto`` with a local OpenAI file: the architecture is then
    read off the state dict. A file's tensors are loaded exactly as stored (fp16 widened to fp32
    without loss), then the whole model is cast to ``precision``.
    """

    name: str = "ViT-L-14-336"
    pretrained: Optional[str] = "openai"
    # auto: the open_clip config's own choice. OpenAI weights were trained with QuickGELU; the
    # official AdaCLIP and ACD-CLIP code run them with GELU (their model configs drop quick_gelu).
    activation: Literal["auto", "quick_gelu", "gelu"] = "auto"
    image_size: int = 518
    # How positional embeddings are resized to another patch grid (see POS_EMBED_RULES); each
    # method config names its official code's rule.
    pos_embed_interp: Literal["bicubic", "bilinear", "bicubic-antialias"] = "bicubic"
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"
    cache_dir: Optional[str] = None
    # Random weights (pretrained: null) are drawn from this seed, apart from the global RNG, so that a
    # training run, its evaluation and every rank build the same random CLIP. null: the global RNG.
    init_seed: Optional[int] = 0

    def validate(self) -> None:
        if self.image_size <= 0:
            raise ConfigError(f"'backbone.image_size' must be positive, got {self.image_size}")
        check_patch_multiple(self.name, self.image_size, "backbone.image_size")


# pos_embed_interp -> (F.interpolate mode, antialias). Every official code resizes the patch grid
# alone (CLS entry kept apart) from the grid the weights were trained at, with align_corners=False:
# * bilinear: AnomalyCLIP and FAPrompt (AnomalyCLIP_lib/AnomalyCLIP.py, VisionTransformer.forward).
# * bicubic: AdaCLIP (method/clip_model.py resize_pos_embed, at load).
# * bicubic-antialias: FADE (gem-torch gem/gem_utils.py resample_abs_pos_embed, every forward) and
#   ACD-CLIP (model/model.py resize_pos_embed, at load). PyTorch's antialiased bicubic is not plain
#   bicubic even when upsampling: its cubic kernel has a = -0.5 (plain: -0.75) and is truncated and
#   renormalised at the border instead of replicating the edge (24 -> 37: the grids differ by ~8%).
POS_EMBED_RULES: dict[str, tuple[str, bool]] = {
    "bilinear": ("bilinear", False),
    "bicubic": ("bicubic", False),
    "bicubic-antialias": ("bicubic", True),
}


def resize_patch_grid(patches: torch.Tensor, src: tuple[int, int], dst: tuple[int, int],
                      rule: str) -> torch.Tensor:
    """(src_h * src_w, D) row-major grid embeddings -> (dst_h * dst_w, D) by ``rule``.

    Computed in fp32 and cast back (the official code computes in the weights' dtype: the same at
    the fp32 precision they all run at)."""
    if rule not in POS_EMBED_RULES:
        raise ConfigError(f"'backbone.pos_embed_interp: {rule}' is unknown; use one of "
                          f"{', '.join(POS_EMBED_RULES)}")
    mode, antialias = POS_EMBED_RULES[rule]
    grid = patches.reshape(1, src[0], src[1], -1).permute(0, 3, 1, 2).float()
    grid = F.interpolate(grid, size=tuple(dst), mode=mode, antialias=antialias, align_corners=False)
    return grid.permute(0, 2, 3, 1).reshape(dst[0] * dst[1], -1).to(patches.dtype)


def patch_size_of(name: str) -> Optional[int]:
    """The vision patch size of an open_clip model config (zsadx's own or open_clip's), without
    building the model; None when it cannot be known before loading (``auto``, hub models, timm towers)."""
    return _patch_size(str(config_root()), name)


@functools.lru_cache(maxsize=None)  # a grid validates hundreds of cell configs of a few backbones
def _patch_size(root: str, name: str) -> Optional[int]:
    own = Path(root) / "clip_models" / f"{name}.json"
    if own.is_file():
        cfg = json.loads(own.read_text())
    elif name == "auto" or name.startswith(("hf-hub:", "local-dir:")):
        return None
    else:
        import open_clip

        cfg = open_clip.get_model_config(name) or {}
    patch = (cfg.get("vision_cfg") or {}).get("patch_size")
    return patch if isinstance(patch, int) and patch > 0 else None


def check_patch_multiple(model: str, size: int, key: str) -> None:
    """Images enter the ViT as whole patches: a size that is not a multiple fails at the first batch."""
    patch = patch_size_of(model)
    if patch and size % patch:
        lower, upper = size // patch * patch, (size // patch + 1) * patch
        raise ConfigError(f"'{key}': {size} is not a multiple of {model}'s patch size {patch}; use "
                          f"{lower or upper} or {upper}")


# --------------------------------------------------------------------------------------------
# Model configs shipped with zsadx (tiny CLIPs for tests and the demo)
# --------------------------------------------------------------------------------------------

_REGISTERED_CONFIG_DIRS: set[Path] = set()


def register_model_configs(folder: Path | None = None) -> list[str]:
    """Make the open_clip model configs in ``configs/clip_models`` known to open_clip."""
    import open_clip

    folder = Path(folder or config_root() / "clip_models")
    names = sorted(p.stem for p in folder.glob("*.json"))
    if folder.is_dir() and folder.resolve() not in _REGISTERED_CONFIG_DIRS:
        open_clip.add_model_config(folder)
        _REGISTERED_CONFIG_DIRS.add(folder.resolve())
    return names


# --------------------------------------------------------------------------------------------
# Reading checkpoint files
# --------------------------------------------------------------------------------------------

# Keys OpenAI files carry that are not parameters (attn_mask is a traced buffer in JIT archives).
_OPENAI_EXTRA_KEYS = ("input_resolution", "context_length", "vocab_size", "attn_mask")


def _is_torchscript(path: Path) -> bool:
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as zf:
        return any(n.endswith("constants.pkl") or "/code/" in n for n in zf.namelist())


def read_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Read any CLIP checkpoint file users have into a flat fp32 state dict.

    Handles OpenAI JIT archives (``ViT-L-14-336px.pt``), plain state dicts (OpenAI or open_clip,
    fp16 or fp32), ``{"state_dict": ...}`` wrappers with DDP's ``module.`` prefix, and safetensors.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint file not found: {path}")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file
            sd = load_file(str(path))
        elif _is_torchscript(path):
            sd = torch.jit.load(str(path), map_location="cpu").state_dict()
        else:
            sd = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any reader failure means the same thing to the user
        first = next((line.strip() for line in str(exc).splitlines() if line.strip()), "")[:200]
        raise CheckpointError(f"{path}: not a readable CLIP checkpoint ({type(exc).__name__}: {first})") from exc
    for wrapper in ("state_dict", "model", "module"):
        if isinstance(sd, dict) and wrapper in sd and isinstance(sd[wrapper], dict):
            sd = sd[wrapper]
    if not isinstance(sd, dict) or not sd:
        raise CheckpointError(f"{path}: holds no state dict")
    if all(k.startswith("module.") for k in sd):
        sd = {k[len("module."):]: v for k, v in sd.items()}
    for key in _OPENAI_EXTRA_KEYS:
        sd.pop(key, None)
    return {k: v.float() if v.is_floating_point() else v for k, v in sd.items()}


def _set_activation(model: nn.Module, kind: str) -> None:
    """Swap the MLP activation of every residual block (both towers)."""
    from open_clip.transformer import QuickGELU

    for module in model.modules():
        mlp = getattr(module, "mlp", None)
        if isinstance(mlp, nn.Sequential) and hasattr(mlp, "gelu"):
            mlp.gelu = QuickGELU() if kind == "quick_gelu" else nn.GELU()


def build_clip(cfg: BackboneConfig) -> nn.Module:
    """Create the open_clip model that ``cfg`` describes, with its weights, in eval mode."""
    import open_clip

    register_model_configs()
    local = cfg.pretrained is not None and Path(cfg.pretrained).expanduser().is_file()
    if local:
        sd = read_state_dict(Path(cfg.pretrained).expanduser())
        if cfg.name == "auto":
            model = _architecture_of_openai_state_dict(sd)
        else:
            _check_model_name(cfg.name)
            with _quiet_random_init(True):
                model = open_clip.create_model(cfg.name, pretrained=None)
        _load_exact_weights(model, sd, cfg)
    else:
        if cfg.name == "auto":
            raise ConfigError("'backbone.name: auto' needs 'backbone.pretrained' to be a local OpenAI file")
        if cfg.pretrained is not None and ("/" in cfg.pretrained or cfg.pretrained.endswith((".pt", ".bin"))):
            raise FileNotFoundError(f"'backbone.pretrained' looks like a path but no file is there: {cfg.pretrained}")
        _check_model_name(cfg.name)
        seeded = cfg.pretrained is None and cfg.init_seed is not None
        with _quiet_random_init(cfg.pretrained is None), torch.random.fork_rng(enabled=seeded, devices=[]):
            if seeded:
                torch.manual_seed(cfg.init_seed)
            model = open_clip.create_model(cfg.name, pretrained=cfg.pretrained, cache_dir=cfg.cache_dir)
    if cfg.activation != "auto":
        _set_activation(model, cfg.activation)
    if not hasattr(model, "visual") or not hasattr(model, "token_embedding"):
        raise ValueError(f"model '{cfg.name}' is a {type(model).__name__}; zsadx needs a CLIP with a ViT "
                         "image tower and the built-in text transformer")
    return model.eval()


def _architecture_of_openai_state_dict(sd: dict[str, torch.Tensor]) -> nn.Module:
    """The fp32 CLIP an OpenAI-format state dict describes (OpenAI's rule: 64-wide heads, QuickGELU).

    open_clip's builder reads the architecture off the tensor shapes but loads the weights into a
    model it has half converted to fp16, rounding an fp32 file; only its architecture is kept here
    (the weights are loaded again, unrounded). ``cast_dtype=None`` gives the same plain LayerNorms
    as a named model.
    """
    from open_clip.model import build_model_from_openai_state_dict

    return build_model_from_openai_state_dict(dict(sd), quick_gelu=True, cast_dtype=None).float()


def _load_exact_weights(model: nn.Module, sd: dict[str, torch.Tensor], cfg: BackboneConfig) -> None:
    """Copy the file's tensors into the fp32 model as they are (an fp16 file widens exactly)."""
    try:
        model.load_state_dict(sd, strict=True)
    except RuntimeError as exc:
        raise CheckpointError(f"{cfg.pretrained}: weights do not fit model '{cfg.name}': "
                              f"{str(exc).splitlines()[0]}") from exc


class _quiet_random_init(logging.Filter):
    """Hide open_clip's 'initialized randomly' warning where random weights are what was asked for."""

    def __init__(self, active: bool):
        super().__init__()
        self.active = active

    def filter(self, record: logging.LogRecord) -> bool:
        return "Model initialized randomly" not in record.getMessage()

    def __enter__(self):
        if self.active:
            logging.getLogger().addFilter(self)
        return self

    def __exit__(self, *exc):
        logging.getLogger().removeFilter(self)


def _check_model_name(name: str) -> None:
    import open_clip
    from zsadx.config import suggest

    if name.startswith(("hf-hub:", "local-dir:")):
        return
    known = open_clip.list_models()
    if name not in known:
        raise ConfigError(f"unknown open_clip model 'backbone.name: {name}'" + suggest(name, known))


# --------------------------------------------------------------------------------------------
# Hooks
# --------------------------------------------------------------------------------------------

@dataclass
class ForwardContext:
    """State of one vision forward pass, shared by the hooks.

    ``grid`` is the patch grid (rows, cols); ``n_tokens`` counts CLS + patches (tokens appended by
    hooks come after them); ``streams`` holds extra token streams by name (``main`` is implicit).
    """

    grid: tuple[int, int]
    n_tokens: int
    streams: dict[str, torch.Tensor] = field(default_factory=dict)
    extras: dict[str, object] = field(default_factory=dict)


class VisionHook(nn.Module):
    """Base class for per-layer vision modifications; every method is a no-op by default.

    ``layers`` (1-based) limits ``block`` to those layers; None means every layer.
    """

    layers: Optional[frozenset[int]] = None

    def applies(self, layer: int) -> bool:
        return self.layers is None or layer in self.layers

    def begin(self, x: torch.Tensor, ctx: ForwardContext) -> torch.Tensor:
        return x

    def block(self, layer: int, block: nn.Module, x: torch.Tensor, ctx: ForwardContext,
              call_next: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
        return call_next(x)

    def end(self, x: torch.Tensor, ctx: ForwardContext) -> torch.Tensor:
        return x


@dataclass
class VisionOutput:
    """What a vision forward returns.

    ``pooled``: projected global embedding (B, E). ``layers``: tapped block outputs by 1-based
    layer, (B, 1 + N, D), CLS first. ``grid``: patch grid (rows, cols). ``final``: last block
    output of the main stream (B, 1 + N, D), before ``ln_post``.
    """

    pooled: torch.Tensor
    layers: dict[int, torch.Tensor]
    grid: tuple[int, int]
    final: torch.Tensor


_SCALARS = ("logit_scale", "logit_bias")


def _scalar_parameters_to_buffers(module: nn.Module) -> None:
    """Frozen 0-dim parameters (``logit_scale``, ``logit_bias``) become buffers of the same name.

    DeepSpeed broadcasts every parameter through a byte view at start-up, which 0-dim tensors
    cannot give. Non-persistent, so trainer checkpoints hold no backbone tensor at all.
    """
    for mod in module.modules():
        for name, p in list(mod.named_parameters(recurse=False)):
            if p.dim() == 0:
                delattr(mod, name)
                mod.register_buffer(name, p.detach(), persistent=False)


class ClipBackbone(nn.Module):
    """A frozen open_clip CLIP with layer taps, positional-embedding resizing and hooks."""

    def __init__(self, cfg: BackboneConfig, model: nn.Module | None = None):
        super().__init__()
        self.cfg = cfg
        self.clip = model if model is not None else build_clip(cfg)
        self.clip.requires_grad_(False)
        _scalar_parameters_to_buffers(self.clip)
        self.clip.to(_DTYPES[cfg.precision])
        self._pos_cache: dict[tuple, torch.Tensor] = {}
        import open_clip

        try:
            self.tokenizer = open_clip.get_tokenizer(cfg.name if cfg.name != "auto" else "ViT-L-14")
        except Exception:  # noqa: BLE001 - models without a named tokenizer use CLIP's BPE
            self.tokenizer = open_clip.tokenize

    # ---- geometry --------------------------------------------------------------------------
    @property
    def visual(self) -> nn.Module:
        return self.clip.visual

    @property
    def num_layers(self) -> int:
        return len(self.visual.transformer.resblocks)

    @property
    def num_text_layers(self) -> int:
        return len(self.clip.transformer.resblocks)

    @property
    def width(self) -> int:
        return self.visual.conv1.out_channels

    @property
    def text_width(self) -> int:
        return self.clip.token_embedding.embedding_dim

    @property
    def embed_dim(self) -> int:
        return self.visual.proj.shape[1]

    @property
    def patch_size(self) -> int:
        return self.visual.conv1.kernel_size[0]

    @property
    def native_grid(self) -> tuple[int, int]:
        n = self.visual.positional_embedding.shape[0] - 1
        side = int(round(n ** 0.5))
        return side, n // side

    @property
    def logit_scale(self) -> torch.Tensor:
        return self.clip.logit_scale.exp()

    def clip_state_dict(self) -> dict[str, torch.Tensor]:
        """The CLIP's weights as open_clip names them, scalars included (for exporting the backbone)."""
        sd = self.clip.state_dict()
        for name in _SCALARS:
            if isinstance(getattr(self.clip, name, None), torch.Tensor):
                sd[name] = getattr(self.clip, name).detach().clone()
        return sd

    @property
    def dtype(self) -> torch.dtype:
        return self.visual.conv1.weight.dtype

    def check_layers(self, layers: Iterable[int]) -> list[int]:
        layers = sorted(set(int(l) for l in layers))
        bad = [l for l in layers if not 1 <= l <= self.num_layers]
        if bad:
            raise ConfigError(f"layer(s) {bad} out of range: this backbone has blocks 1..{self.num_layers} "
                              "(layers are numbered from 1)")
        return layers

    # ---- positional embeddings --------------------------------------------------------------
    def positional_embedding(self, grid: tuple[int, int]) -> torch.Tensor:
        """Positional embeddings for a patch grid, resized from the native one by
        ``pos_embed_interp`` (CLS untouched).

        Computed without touching the parameter and cached per grid. The official AnomalyCLIP and
        FAPrompt code overwrite the parameter in their first forward, so a later call at another
        size resizes an already resized grid there; at one image size (as they run) both agree.
        """
        pe = self.visual.positional_embedding
        if tuple(grid) == self.native_grid:
            return pe
        key = (tuple(grid), pe.dtype, pe.device, pe._version, self.cfg.pos_embed_interp)
        if key not in self._pos_cache:
            patches = resize_patch_grid(pe[1:], self.native_grid, tuple(grid), self.cfg.pos_embed_interp)
            self._pos_cache = {key: torch.cat([pe[:1], patches], dim=0)}
        return self._pos_cache[key]

    # ---- vision ---------------------------------------------------------------------------
    def input_images(self, images: torch.Tensor) -> torch.Tensor:
        """Normalised float images in the backbone's dtype. Loaders yield uint8 pixels that the
        evaluator and trainer normalise on the device; uint8 reaching the model would be cast to
        0..255 floats and scored without an error, so it is refused here."""
        if images.dtype == torch.uint8:
            raise TypeError("uint8 images reached the model: normalise them first "
                            "(zsadx.data.transforms.normalise(batch['image']))")
        return images.to(self.dtype)

    def embed_image(self, images: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
        """Patchify, add CLS and positional embeddings, ln_pre: (B, 1 + N, D) and the grid."""
        images = self.input_images(images)
        p = self.patch_size
        h, w = images.shape[-2:]
        if h % p or w % p:
            raise ValueError(f"image size {h}x{w} is not a multiple of the patch size {p}")
        v = self.visual
        x = v.conv1(images)
        grid = (x.shape[-2], x.shape[-1])
        x = x.flatten(2).transpose(1, 2)
        cls = v.class_embedding.to(x.dtype).view(1, 1, -1).expand(x.shape[0], -1, -1)
        x = torch.cat([cls, x], dim=1) + self.positional_embedding(grid).to(x.dtype)
        x = v.patch_dropout(x)
        return v.ln_pre(x), grid

    def run_blocks(self, x: torch.Tensor, ctx: ForwardContext, hooks: Sequence[VisionHook] = (),
                   taps: Sequence[int] = (), tap_stream: str = "main",
                   last_layer: int | None = None) -> tuple[torch.Tensor, dict[int, torch.Tensor]]:
        """Run blocks 1..last_layer over ``x`` with hooks, collecting the tapped layers."""
        taps = set(taps)
        tapped: dict[int, torch.Tensor] = {}
        last = last_layer or self.num_layers
        for idx, blk in enumerate(self.visual.transformer.resblocks[:last]):
            layer = idx + 1
            chain = [h for h in hooks if h.applies(layer)]

            def call(i: int, t: torch.Tensor, _blk=blk, _chain=chain, _layer=layer) -> torch.Tensor:
                if i == len(_chain):
                    return _blk(t)
                return _chain[i].block(_layer, _blk, t, ctx, lambda u: call(i + 1, u))

            x = call(0, x)
            if layer in taps:
                src = x if tap_stream == "main" else ctx.streams[tap_stream]
                tapped[layer] = src[:, :ctx.n_tokens]
        return x, tapped

    def encode_image(self, images: torch.Tensor, layers: Sequence[int] = (),
                     hooks: Sequence[VisionHook] = (), tap_stream: str = "main",
                     extras: Optional[dict] = None) -> VisionOutput:
        """Full vision forward: pooled projected embedding plus the tapped layers (1-based).

        ``extras`` reaches the hooks as ``ctx.extras`` (per-image inputs such as dynamic prompts).
        """
        layers = self.check_layers(layers)
        x, grid = self.embed_image(images)
        ctx = ForwardContext(grid=grid, n_tokens=x.shape[1], extras=dict(extras or {}))
        for h in hooks:
            x = h.begin(x, ctx)
        x, tapped = self.run_blocks(x, ctx, hooks, layers, tap_stream)
        for h in hooks:
            x = h.end(x, ctx)
        final = x[:, :ctx.n_tokens]
        return VisionOutput(pooled=self.pool(final), layers=tapped, grid=grid, final=final)

    def pool(self, tokens: torch.Tensor) -> torch.Tensor:
        """CLS token -> ln_post -> proj: the standard CLIP image embedding."""
        return self.visual.ln_post(tokens[:, 0]) @ self.visual.proj

    def project(self, tokens: torch.Tensor, ln: bool = True) -> torch.Tensor:
        """Map width-D tokens into the joint embedding space (ln_post then proj, as for CLS)."""
        if ln:
            tokens = self.visual.ln_post(tokens)
        return tokens @ self.visual.proj

    def patch_tokens(self, out: VisionOutput, layer: int, project: bool = True) -> torch.Tensor:
        """(B, N, E or D) patch tokens of a tapped layer, without CLS."""
        if layer not in out.layers:
            raise KeyError(f"layer {layer} was not tapped (tapped: {sorted(out.layers)})")
        t = out.layers[layer][:, 1:]
        return self.project(t) if project else t

    # ---- text -----------------------------------------------------------------------------
    def tokenize(self, texts: Sequence[str]) -> torch.Tensor:
        return self.tokenizer(list(texts))

    def token_embeddings(self, ids: torch.Tensor) -> torch.Tensor:
        """Input embeddings of token ids, for methods that splice learnable context into them."""
        return self.clip.token_embedding(ids).to(self.dtype)

    def encode_text(self, ids: torch.Tensor, embeddings: torch.Tensor | None = None,
                    deep_prompts: dict[int, torch.Tensor] | None = None,
                    normalize: bool = False,
                    after_block: Callable[[int, torch.Tensor], torch.Tensor] | None = None) -> torch.Tensor:
        """Text embeddings (T, E), pooled at EOT.

        ``embeddings`` replaces the token embeddings (same shape (T, L, D_text)); ``deep_prompts``
        maps a 1-based text block to a tensor (n, D) or (T, n, D) that overwrites token positions
        1..n (right after SOT) at that block's input, as deep prompt tuning does. ``after_block(layer,
        x)`` may replace each block's output (T, L', D_text) (text adapters; taps by closure).
        """
        c = self.clip
        deep_prompts = deep_prompts or {}
        x = self.token_embeddings(ids) if embeddings is None else embeddings.to(self.dtype)
        eot = ids.argmax(dim=-1)
        if c.attn_mask is not None:
            # Causal attention: nothing after the last EOT can reach a pooled token, so the padding
            # is cut off (77 -> ~15 tokens: several times faster, same result up to float rounding).
            keep = max(int(eot.max()) + 1, 1 + max((p.shape[-2] for p in deep_prompts.values()), default=0))
            x = x[:, :keep]
        x = x + c.positional_embedding[: x.shape[1]].to(x.dtype)
        mask = c.attn_mask
        if mask is not None:
            mask = mask[: x.shape[1], : x.shape[1]].to(x.dtype)
        bad = [l for l in deep_prompts if not 1 <= l <= self.num_text_layers]
        if bad:
            raise ValueError(f"deep prompt layer(s) {bad} out of range 1..{self.num_text_layers}")
        for idx, blk in enumerate(c.transformer.resblocks):
            prompt = deep_prompts.get(idx + 1)
            if prompt is not None:
                n = prompt.shape[-2]
                prompt = prompt.to(x.dtype).expand(x.shape[0], n, x.shape[-1])
                x = torch.cat([x[:, :1], prompt, x[:, 1 + n:]], dim=1)
            x = blk(x, attn_mask=mask)
            if after_block is not None:
                x = after_block(idx + 1, x)
        x = c.ln_final(x)
        x = x[torch.arange(x.shape[0], device=x.device), eot] @ c.text_projection
        return F.normalize(x, dim=-1) if normalize else x


def load_backbone(cfg: BackboneConfig) -> ClipBackbone:
    return ClipBackbone(cfg)
