"""Class names that enter prompts: each method's phrase for a (dataset, class) is its official code's.

Expected strings are written out by hand from the official sources named in each comment; the
tests check zsadx's tables and rules against them, never read the official code.
"""
from __future__ import annotations

import pytest
import torch

from zsadx.config import ConfigError, load_config, load_yaml
from zsadx.data.convert.plugins import get_entry, load_all
from zsadx.eval.evaluator import EvalConfig
from zsadx.models.methods.base import build_method
from zsadx.models.prompts import ClassNameTable


def method(name: str, **over):
    data = {"method": load_yaml(f"methods/{name}"), "data": {"shards": "-", "dataset": "-"}}
    cfg = load_config(EvalConfig, data=data, overrides=[f"method.{k}={v}" for k, v in over.items()]).method
    torch.manual_seed(0)
    return build_method(cfg).eval()


def predict(m, classes, datasets=None):
    torch.manual_seed(1)
    batch = {"image": torch.randn(len(classes), 3, 64, 64), "cls": list(classes)}
    if datasets is not None:
        batch["dataset"] = list(datasets)
    return m.predict(batch)


# ---- ACD-CLIP ---------------------------------------------------------------------------------
# cockmake/ACD-CLIP dataset/info.py REAL_NAMES: official dataset -> {official class: phrase}; all 47.
ACDCLIP_REAL_NAMES = {
    "Brain": {"Brain": "scan"},
    "Liver": {"Liver": "scan"},
    "Retina": {"Retina": "scan"},
    "MVTec": {
        "bottle": "dark bottle", "cable": "top view of three cables", "capsule": "black and orange capsule",
        "carpet": "gray carpet", "grid": "metal or plastic mesh", "hazelnut": "single brown hazelnut",
        "leather": "brown leather", "metal_nut": "metal nut which has four notched edges",
        "pill": "oval white pill with small red speckles and the letters 'FF' engraved", "screw": "screw",
        "tile": "speckled tile surface", "transistor": "a three-legged transistor placed vertically",
        "toothbrush": "toothbrush head", "wood": "wood surface", "zipper": "a black zipper",
    },
    "VisA": {
        "candle": "candle", "pcb3": "infrared sensor pcb module", "capsules": "capsules",
        "pipe_fryum": "pipe-shaped fryum", "pcb4": "battery charging pcb module",
        "macaroni2": "scattered yellow macaroni", "pcb2": "integrated circuits board", "chewinggum": "chewing gum",
        "macaroni1": "orange macaroni", "cashew": "cashew nut", "fryum": "wheel-shaped fryum snack",
        "pcb1": "dual ultrasonic distance sensor pcb module",
    },
    "Colon_clinicDB": {"Colon_clinicDB": "colon endoscopy image"},
    "Colon_colonDB": {"Colon_colonDB": "colon endoscopy image"},
    "Colon_cvc300": {"CVC-300": "colon endoscopy image"},
    "Colon_Kvasir": {"Kvasir": "colon endoscopy image"},
    "MPDD": {
        "connector": "metal clamps with black adjustment knobs",
        "tubes": "scattered metal objects",
        "metal_plate": "blue rectangular metal plate with a notch on one side",
        "bracket_white": "white, elongated triangular metal bracket with a smooth, matte finish",
        "bracket_brown": "brown L-shaped metal bracket with smooth, glossy finish and multiple mounting holes "
                         "along its arms",
        "bracket_black": "black ornamental metal bracket with spiral design attached to a rectangular frame",
    },
    "BTAD": {
        "01": "Bright concentric rings in neon yellow and blue tones against a dark blue background, resembling "
              "a stylized wave or energy field radiating outward.",
        "02": "vertical fabric lines in warm, dusty pink and beige tones",
        "03": "oval concentric circular rings in gradient shades of blue and white",
    },
    "RSDD": {"Dent": "Dent", "Crush": "Crush", "Scratch": "Scratch", "Damage": "Damage"},
}
# Official dataset -> zsadx dataset (official DATA_PATH folders: MedAD/Brain_AD = BMAD brain, ...).
ACDCLIP_DATASETS = {
    "Brain": "bmad-brain", "Liver": "bmad-liver", "Retina": "bmad-retina", "MVTec": "mvtec-ad", "VisA": "visa",
    "Colon_clinicDB": "cvc-clinicdb", "Colon_colonDB": "cvc-colondb", "Colon_cvc300": "cvc-300",
    "Colon_Kvasir": "kvasir", "MPDD": "mpdd", "BTAD": "btad", "RSDD": "rsdd",
}
# The medical sets' single official class is named after the set; zsadx names the organ.
ACDCLIP_MEDICAL_CLASS = {"Brain": "brain", "Liver": "liver", "Retina": "retina", "Colon_clinicDB": "colon",
                         "Colon_colonDB": "colon", "Colon_cvc300": "colon", "Colon_Kvasir": "colon"}


def zsadx_pairs():
    """(zsadx dataset, zsadx class, official phrase) for every official REAL_NAMES entry."""
    for ds, entries in ACDCLIP_REAL_NAMES.items():
        for cls, phrase in entries.items():
            yield ACDCLIP_DATASETS[ds], ACDCLIP_MEDICAL_CLASS.get(ds, cls), phrase


def test_acdclip_has_every_official_description():
    m = method("acdclip-tiny")
    pairs = list(zsadx_pairs())
    assert len(pairs) == 47
    wrong = [(d, c, m.class_names(d, c), p) for d, c, p in pairs if m.class_names(d, c) != p]
    assert not wrong


def test_every_catalogued_class_of_acdclips_datasets_has_its_official_phrase():
    # The official code refuses a class it does not list: every class zsadx catalogues for these
    # datasets is an official entry (names matched: BTAD '01', VisA 'pcb1', ...) and gets its phrase.
    m = method("acdclip-tiny")
    official = {(d, c): p for d, c, p in zsadx_pairs()}
    for ds in ACDCLIP_DATASETS.values():
        for c in get_entry(ds).classes:
            assert (ds, c) in official, (ds, c)
            assert m.class_names(ds, c) == official[ds, c], (ds, c)


@pytest.mark.parametrize("table", ["prompts/acdclip_class_names.yaml", "prompts/adaclip_class_names.yaml"])
def test_tables_name_catalogued_datasets_and_classes(table):
    reg = load_all()
    for ds, entry in load_yaml(table).items():
        assert ds in reg and reg.canonical(ds) == ds, ds           # a typo would silently never match
        classes = set(get_entry(ds).classes)
        assert set(entry) - {"*"} <= classes, (ds, set(entry) - classes)


def test_acdclip_text_uses_the_dataset_of_each_image():
    m = method("acdclip-tiny")
    # Same class name, two datasets' descriptions: the text features (and so the scores) differ.
    torch.manual_seed(1)
    images = torch.randn(1, 3, 64, 64).repeat(2, 1, 1, 1)
    p = m.predict({"image": images, "cls": ["01", "01"], "dataset": ["btad", "other"],
                   "domain": ["industrial"] * 2})
    assert not torch.allclose(p.scores[0], p.scores[1])


# ---- AdaCLIP ----------------------------------------------------------------------------------
# caoyunkang/AdaCLIP dataset/{headct,brain_mri,br35h,clinicdb,colondb,isic,tn3k,mvtec,btad}.py
# *_CLS_NAMES, data_preprocess/endo.py CLSNAMES; method/adaclip.py encode_text: name.replace('-', ' ').
ADACLIP_NAMES = [
    ("headct", "brain", "headct"), ("brainmri", "brain", "brain_mri"), ("br35h", "brain", "br35h"),
    ("cvc-clinicdb", "colon", "ClinicDB"), ("cvc-colondb", "colon", "ColonDB"), ("endo", "colon", "endo"),
    ("isic", "skin", "isic"), ("tn3k", "thyroid", "tn3k"),
    ("mvtec-ad", "metal_nut", "metal_nut"), ("visa", "pipe_fryum", "pipe_fryum"), ("btad", "01", "01"),
    ("dtd-synthetic", "Woven_001", "Woven_001"), ("sdd", "SDD", "SDD"),
]


@pytest.mark.parametrize("dataset,cls,official", ADACLIP_NAMES)
def test_adaclip_class_names_are_the_official_ones(dataset, cls, official):
    assert method("adaclip-tiny").class_names(dataset, cls) == official


def test_adaclip_prompts_the_official_name_of_each_images_dataset():
    m = method("adaclip-tiny")
    via_dataset = predict(m, ["brain"], ["brainmri"])
    official = predict(m, ["brain_mri"])          # no dataset: the class name itself ('_' kept)
    zsadx_name = predict(m, ["brain"])
    torch.testing.assert_close(via_dataset.scores, official.scores, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(via_dataset.scores, zsadx_name.scores)
    assert m.class_names(None, "a-b_c") == "a b_c"  # official: only '-' becomes a space


# ---- WinCLIP ----------------------------------------------------------------------------------
# openvinotoolkit/anomalib src/anomalib/models/image/winclip/lightning_model.py _get_class_name:
# the class_name argument, else the datamodule's category as is ('metal_nut'); prompting.py puts it
# into the states unchanged.
def test_winclip_class_name_rule():
    default = method("winclip-tiny")
    assert default.cfg.class_name_rule == "spaces"
    compat = method("winclip-tiny", paper_compat="true")
    assert compat.cfg.class_name_rule == "raw"
    torch.testing.assert_close(predict(default, ["metal_nut"]).scores,
                               predict(method("winclip-tiny", class_name="'metal nut'"), ["metal_nut"]).scores)
    assert compat.cfg.templates == 21  # anomalib's template list comes with paper_compat too
    torch.testing.assert_close(predict(compat, ["metal_nut"]).scores,
                               predict(method("winclip-tiny", class_name="metal_nut", templates="21"), ["bottle"]).scores)
    assert not torch.allclose(predict(default, ["metal_nut"]).scores, predict(compat, ["metal_nut"]).scores)


def test_winclip_table_applies_per_dataset(tmp_path):
    table = tmp_path / "names.yaml"
    table.write_text("mvtec-ad: {metal_nut: hexagonal nut}\n")
    m = method("winclip-tiny", class_names=str(table))
    torch.testing.assert_close(predict(m, ["metal_nut"], ["mvtec-ad"]).scores,
                               predict(method("winclip-tiny", class_name="'hexagonal nut'"), ["x"]).scores)
    torch.testing.assert_close(predict(m, ["metal_nut"], ["visa"]).scores,      # not listed: the rule
                               predict(method("winclip-tiny"), ["metal_nut"]).scores)


# ---- object-agnostic methods ------------------------------------------------------------------
# zqhang/AnomalyCLIP prompt_ensemble.py AnomalyCLIP_PromptLearner: classnames = ["object"];
# mala-lab/FAPrompt FAPrompt.py: classnames = ["object"]. No dataset class enters their prompts.
@pytest.mark.parametrize("name", ["anomalyclip-tiny", "faprompt-tiny"])
def test_object_agnostic_methods_ignore_the_class_name(name):
    m = method(name)
    a = predict(m, ["brain"], ["bmad-brain"])
    b = predict(m, ["metal_nut"], ["mvtec-ad"])
    torch.testing.assert_close(a.scores, b.scores)
    torch.testing.assert_close(a.maps, b.maps)


# ---- the table file ---------------------------------------------------------------------------
def test_unquoted_numeric_class_is_a_config_error_naming_the_file(tmp_path):
    bad = tmp_path / "names.yaml"
    bad.write_text("btad:\n  01: rings\n")
    with pytest.raises(ConfigError, match=r"names\.yaml.*class 1 of 'btad' is not a string; quote it"):
        ClassNameTable(str(bad), "raw")


def test_missing_table_is_a_config_error_naming_the_key(tmp_path):
    with pytest.raises(ConfigError, match=r"method\.class_names: config file not found"):
        method("adaclip-tiny", class_names=str(tmp_path / "nope.yaml"))


def test_empty_phrase_is_a_config_error(tmp_path):
    bad = tmp_path / "names.yaml"
    bad.write_text("mpdd: {tubes: ''}\n")
    with pytest.raises(ConfigError, match=r"'mpdd: tubes' needs a non-empty phrase"):
        ClassNameTable(str(bad), "raw")
