"""Shared fixtures: a tiny random CLIP and its checkpoint files, written once per session."""
from __future__ import annotations

import logging

import pytest
import torch

from zsadx.models.backbone import BackboneConfig, ClipBackbone

logging.getLogger().setLevel(logging.WARNING)

TINY = BackboneConfig(name="zsadx-tiny-p16", pretrained=None, image_size=224)


@pytest.fixture(scope="session")
def tiny_backbone() -> ClipBackbone:
    torch.manual_seed(0)
    return ClipBackbone(TINY)


@pytest.fixture(scope="session")
def tiny_files(tmp_path_factory, tiny_backbone):
    """The tiny model's weights in the file formats users have: open_clip, OpenAI state dict and JIT."""
    folder = tmp_path_factory.mktemp("weights")
    model = tiny_backbone.clip
    sd = model.state_dict()
    files = {"open_clip": folder / "open_clip.pt", "openai_sd": folder / "openai_fp16.pt",
             "openai_jit": folder / "openai_jit.pt", "ddp": folder / "ddp.pt"}
    torch.save(sd, files["open_clip"])
    # OpenAI's plain state dicts are fp16 and carry three scalar extras.
    openai_sd = {k: v.half() if v.is_floating_point() else v for k, v in sd.items()}
    openai_sd.update(input_resolution=torch.tensor(224), context_length=torch.tensor(77),
                     vocab_size=torch.tensor(49408))
    torch.save(openai_sd, files["openai_sd"])
    torch.save({"state_dict": {f"module.{k}": v for k, v in sd.items()}}, files["ddp"])
    traced = torch.jit.trace_module(model, {"encode_image": torch.zeros(1, 3, 224, 224)}, check_trace=False)
    traced.save(str(files["openai_jit"]))
    return files
