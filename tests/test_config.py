"""Typed configs: composition, overrides, and errors that name the key or file."""
from __future__ import annotations

import dataclasses
from typing import Literal, Optional

import pytest
import yaml

from zsadx.config import ConfigError, apply_overrides, from_dict, load_config, load_yaml, save_resolved
from zsadx.models.backbone import BackboneConfig


@dataclasses.dataclass
class Model:
    layers: list[int] = dataclasses.field(default_factory=lambda: [24])
    temperature: float = 0.07
    mode: Literal["a", "b"] = "a"
    name: Optional[str] = None


@dataclasses.dataclass
class Run:
    backbone: BackboneConfig = dataclasses.field(default_factory=BackboneConfig)
    model: Model = dataclasses.field(default_factory=Model)
    seed: int = 0


def write(path, data):
    path.write_text(yaml.safe_dump(data))
    return path


def test_base_composition_and_nested_base(tmp_path):
    write(tmp_path / "bb.yaml", {"name": "zsadx-tiny-p16", "pretrained": None, "image_size": 224})
    write(tmp_path / "common.yaml", {"seed": 3, "model": {"temperature": 0.5, "layers": [1, 2]}})
    write(tmp_path / "run.yaml", {"_base_": "common.yaml", "backbone": {"_base_": "bb.yaml", "image_size": 112},
                                  "model": {"layers": [4]}})
    cfg = load_config(Run, tmp_path / "run.yaml")
    assert cfg.seed == 3
    assert cfg.model.temperature == 0.5 and cfg.model.layers == [4]  # own keys win, sections merge
    assert cfg.backbone.name == "zsadx-tiny-p16" and cfg.backbone.image_size == 112


def test_repo_backbone_configs_load():
    for name in ("tiny", "tiny-p14", "vit-l-14-336", "vit-b-16-plus-240"):
        bb = load_config(BackboneConfig, f"backbones/{name}")
        assert bb.image_size > 0


def test_dotted_overrides(tmp_path):
    cfg = load_config(Run, overrides=["model.layers=[6,12]", "model.temperature=1", "seed=7",
                                      "backbone.pretrained=null"])
    assert cfg.model.layers == [6, 12] and cfg.model.temperature == 1.0 and cfg.seed == 7
    assert cfg.backbone.pretrained is None
    with pytest.raises(ConfigError, match="must look like"):
        apply_overrides({}, ["model.layers"])
    with pytest.raises(ConfigError, match="is a value, not a section"):
        apply_overrides({"seed": 1}, ["seed.x=1"])


def test_unknown_key_names_it_and_suggests(tmp_path):
    f = write(tmp_path / "run.yaml", {"model": {"temprature": 0.1}})
    with pytest.raises(ConfigError) as err:
        load_config(Run, f)
    msg = str(err.value)
    assert "run.yaml" in msg and "'model.temprature'" in msg and "did you mean 'temperature'" in msg
    with pytest.raises(ConfigError, match="unknown key 'backbone.imagesize'.*'image_size'"):
        load_config(Run, overrides=["backbone.imagesize=3"])


@pytest.mark.parametrize("override, message", [
    ("seed=abc", "'seed': expected an integer"),
    ("seed=true", "'seed': expected an integer"),
    ("model.temperature=hot", "'model.temperature': expected a number"),
    ("model.layers=[1,x]", r"'model.layers\[1\]': expected an integer"),
    ("model.mode=c", "'model.mode': 'c' is not one of"),
    ("backbone.precision=fp8", "'backbone.precision'"),
    ("model=3", "'model': expected a section"),
])
def test_wrong_types_name_the_key(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(Run, overrides=[override])


def test_single_number_for_a_list_is_accepted():
    assert load_config(Run, overrides=["model.layers=24"]).model.layers == [24]


def test_missing_file_is_named_with_suggestion(tmp_path):
    with pytest.raises(ConfigError, match="not found: 'backbones/tinny'.*did you mean 'backbones/tiny'"):
        load_yaml("backbones/tinny")
    write(tmp_path / "a.yaml", {"_base_": "nope.yaml"})
    with pytest.raises(ConfigError, match="nope.yaml"):
        load_yaml(tmp_path / "a.yaml")


def test_base_cycle_is_reported(tmp_path):
    write(tmp_path / "a.yaml", {"_base_": "b.yaml"})
    write(tmp_path / "b.yaml", {"_base_": "a.yaml"})
    with pytest.raises(ConfigError, match="cycle"):
        load_yaml(tmp_path / "a.yaml")


def test_invalid_yaml_names_file(tmp_path):
    (tmp_path / "bad.yaml").write_text("a: [1, 2\n")
    with pytest.raises(ConfigError, match="bad.yaml: not valid YAML"):
        load_yaml(tmp_path / "bad.yaml")


def test_missing_required_key():
    @dataclasses.dataclass
    class Needs:
        path: str

    with pytest.raises(ConfigError, match="missing required key 'path'"):
        from_dict(Needs, {})


def test_resolved_config_round_trips(tmp_path):
    cfg = load_config(Run, overrides=["model.layers=[1,2]", "backbone.name=zsadx-tiny-p16",
                                          "backbone.image_size=224"])
    path = save_resolved(cfg, tmp_path / "run")
    assert path.name == "config.yaml"
    again = load_config(Run, path)
    assert again == cfg
