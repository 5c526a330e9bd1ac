"""Hand-crafted prompt ensembles and the cache of their text features.

A :class:`PromptSet` is state words x templates: every normal state and every anomalous state is
put into every template together with the class name; the sentences of each side are encoded,
L2-normalised, averaged and normalised again (CLIP's prompt ensembling). Features are computed
once per (prompt set, class name, backbone) and cached -- never per image.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class PromptSet:
    name: str
    normal_states: tuple[str, ...]
    anomalous_states: tuple[str, ...]
    templates: tuple[str, ...]  # each with one '{}' for the state phrase

    def sentences(self, cls_name: str, anomalous: bool) -> list[str]:
        states = self.anomalous_states if anomalous else self.normal_states
        return [t.format(s.format(cls_name)) for s in states for t in self.templates]


# The plain zero-shot CLIP baseline of the papers' tables: one template, one state per side.
CLIP_BASELINE = PromptSet("clip", ("normal {}",), ("damaged {}",), ("a photo of a {}.",))

# WinCLIP's compositional prompt ensemble (CPE): 7 normal and 4 anomalous states, 22 templates
# (the paper's list, also FADE's). anomalib and the AnomalyCLIP authors' re-implementation use 21:
# "a cropped photo of a" is missing and "a jpeg corrupted photo of the" appears twice.
WINCLIP_NORMAL = ("{}", "flawless {}", "perfect {}", "unblemished {}", "{} without flaw", "{} without defect",
                  "{} without damage")
WINCLIP_ANOMALOUS = ("damaged {}", "{} with flaw", "{} with defect", "{} with damage")
WINCLIP_TEMPLATES = (
    "a cropped photo of the {}.", "a cropped photo of a {}.", "a close-up photo of a {}.",
    "a close-up photo of the {}.", "a bright photo of a {}.", "a bright photo of the {}.",
    "a dark photo of the {}.", "a dark photo of a {}.", "a jpeg corrupted photo of a {}.",
    "a jpeg corrupted photo of the {}.", "a blurry photo of the {}.", "a blurry photo of a {}.",
    "a photo of a {}.", "a photo of the {}.", "a photo of a small {}.", "a photo of the small {}.",
    "a photo of a large {}.", "a photo of the large {}.", "a photo of the {} for visual inspection.",
    "a photo of a {} for visual inspection.", "a photo of the {} for anomaly detection.",
    "a photo of a {} for anomaly detection.")
WINCLIP_TEMPLATES_21 = tuple("a jpeg corrupted photo of the {}." if t == "a jpeg corrupted photo of a {}." else t
                             for t in WINCLIP_TEMPLATES if t != "a cropped photo of a {}.")
WINCLIP = PromptSet("winclip", WINCLIP_NORMAL, WINCLIP_ANOMALOUS, WINCLIP_TEMPLATES)
WINCLIP_21 = PromptSet("winclip-21", WINCLIP_NORMAL, WINCLIP_ANOMALOUS, WINCLIP_TEMPLATES_21)

# AnomalyCLIP's hand-crafted baseline ensemble (encode_text_with_prompt_ensemble) and AdaCLIP's
# class-aware sets: WinCLIP's states plus "broken {}" on the anomalous side.
ANOMALY_STATES = ("damaged {}", "broken {}", "{} with flaw", "{} with defect", "{} with damage")
IMAGENET_TEMPLATES = (
    "a bad photo of a {}.", "a low resolution photo of the {}.", "a bad photo of the {}.", "a cropped photo of the {}.",
    "a bright photo of a {}.", "a dark photo of the {}.", "a photo of my {}.", "a photo of the cool {}.",
    "a close-up photo of a {}.", "a black and white photo of the {}.", "a bright photo of the {}.",
    "a cropped photo of a {}.", "a jpeg corrupted photo of a {}.", "a blurry photo of the {}.", "a photo of the {}.",
    "a good photo of the {}.", "a photo of one {}.", "a close-up photo of the {}.", "a photo of a {}.",
    "a low resolution photo of a {}.", "a photo of a large {}.", "a blurry photo of a {}.",
    "a jpeg corrupted photo of the {}.", "a good photo of a {}.", "a photo of the small {}.",
    "a photo of the large {}.", "a black and white photo of a {}.", "a dark photo of a {}.",
    "a photo of a cool {}.", "a photo of a small {}.", "there is a {} in the scene.",
    "there is the {} in the scene.", "this is a {} in the scene.", "this is the {} in the scene.",
    "this is one {} in the scene.")
ANOMALYCLIP_ENSEMBLE = PromptSet("anomalyclip-ensemble", WINCLIP_NORMAL, ANOMALY_STATES, IMAGENET_TEMPLATES)
ADACLIP_TEMPLATES = IMAGENET_TEMPLATES[:4]
ADACLIP = PromptSet("adaclip", WINCLIP_NORMAL, ANOMALY_STATES, ADACLIP_TEMPLATES)

# ACD-CLIP (dataset/info.py PROMPTS): 3 normal and 5 abnormal states x 2 templates, filled with a
# descriptive class name (configs/prompts/acdclip_class_names.yaml).
ACDCLIP = PromptSet("acdclip", ("{}", "a {}", "the {}"),
                    ("a damaged {}", "a broken {}", "a {} with flaw", "a {} with defect", "a {} with damage"),
                    ("{}.", "a photo of {}."))

PROMPT_SETS = {p.name: p for p in (CLIP_BASELINE, WINCLIP, WINCLIP_21, ANOMALYCLIP_ENSEMBLE, ADACLIP, ACDCLIP)}


def load_prompt_file(path) -> tuple[list[str], list[str]]:
    """FADE's prompt-file format: {"normal": {"prompts": [...]}, "abnormal": {"prompts": [...]}},
    sentences with an optional ``{classname}`` placeholder. Files live in ``configs/prompts/``."""
    import json
    from pathlib import Path

    from zsadx.config import ConfigError, config_root, suggest

    p = Path(path)
    if not p.is_file():
        p = config_root() / "prompts" / (p.name if p.suffix == ".json" else f"{p.name}.json")
    if not p.is_file():
        known = sorted(f.stem for f in (config_root() / "prompts").glob("*.json"))
        raise ConfigError(f"prompt file not found: '{path}'" + suggest(str(path), known)
                          + f"; in configs/prompts: {', '.join(known)}")
    data = json.loads(p.read_text())
    try:
        return list(data["normal"]["prompts"]), list(data["abnormal"]["prompts"])
    except (KeyError, TypeError) as exc:
        raise ConfigError(f"{p}: expected {{'normal': {{'prompts': [...]}}, 'abnormal': {{'prompts': [...]}}}}") from exc


def text_features(backbone, sentences: Sequence[str], normalize_each: bool = True, normalize_mean: bool = True,
                  batch: int = 256) -> torch.Tensor:
    """Mean embedding of ``sentences`` with the normalisation choices the seeds differ on."""
    feats = []
    with torch.no_grad():
        for lo in range(0, len(sentences), batch):
            ids = backbone.tokenize(sentences[lo:lo + batch]).to(backbone.visual.conv1.weight.device)
            feats.append(backbone.encode_text(ids, normalize=normalize_each).float())
    mean = torch.cat(feats).mean(0)
    return F.normalize(mean, dim=-1) if normalize_mean else mean


@torch.no_grad()
def ensemble(backbone, sentences: Sequence[str], batch: int = 256) -> torch.Tensor:
    """Mean of the normalised embeddings of ``sentences``, normalised: (E,)."""
    feats = []
    for lo in range(0, len(sentences), batch):
        ids = backbone.tokenize(sentences[lo:lo + batch]).to(backbone.visual.conv1.weight.device)
        feats.append(backbone.encode_text(ids, normalize=True).float())
    return F.normalize(torch.cat(feats).mean(0), dim=-1)


class TextFeatureCache:
    """(prompt set, class) -> (2, E) [normal, anomalous] text features, computed once."""

    def __init__(self, backbone):
        self.backbone = backbone
        self._cache: dict[tuple[str, str], torch.Tensor] = {}

    def get(self, prompts: PromptSet, cls_name: str) -> torch.Tensor:
        key = (prompts.name, cls_name)
        if key not in self._cache:
            self._cache[key] = torch.stack([ensemble(self.backbone, prompts.sentences(cls_name, False)),
                                            ensemble(self.backbone, prompts.sentences(cls_name, True))])
        return self._cache[key]

    def batch(self, prompts: PromptSet, classes: Sequence[str]) -> torch.Tensor:
        """(B, 2, E) for a batch's class names."""
        return torch.stack([self.get(prompts, c) for c in classes])

    def __len__(self) -> int:
        return len(self._cache)


# -- class names that enter prompts ---------------------------------------------------------
# How a catalogued class name (the dataset's folder / record name) becomes a word of the prompt
# when no table lists it. Each method names the rule of its official code.
CLASS_NAME_RULES = {
    "raw": lambda c: c,                                            # anomalib's WinCLIP: the category as is
    "spaces": lambda c: c.replace("_", " "),                       # FADE, AnomalyCLIP's 'object'
    "dashes": lambda c: c.replace("-", " "),                       # AdaCLIP (method/adaclip.py encode_text)
    "spaces_and_dashes": lambda c: c.replace("_", " ").replace("-", " "),
}


class ClassNameTable:
    """(dataset, class) -> the phrase a method puts into its prompts.

    The table file (YAML, ``configs/prompts/<method>_class_names.yaml``) maps a zsadx dataset name
    to ``{class: phrase}``; ``'*'`` stands for every class of that dataset. A listed phrase is used
    verbatim; any other class goes through ``rule`` (a key of :data:`CLASS_NAME_RULES`). ``key`` is
    the config key that named the file, for error messages.
    """

    def __init__(self, path, rule: str, key: str = "class_names"):
        if rule not in CLASS_NAME_RULES:
            from zsadx.config import ConfigError
            raise ConfigError(f"unknown class-name rule '{rule}'; use one of {', '.join(CLASS_NAME_RULES)}")
        self.rule = CLASS_NAME_RULES[rule]
        self.table = read_class_name_table(path, key) if path else {}

    def __call__(self, dataset, cls: str) -> str:
        entry = self.table.get(dataset, {})
        return entry.get(cls) or entry.get("*") or self.rule(cls)


def read_class_name_table(path, key: str) -> dict[str, dict[str, str]]:
    """Load and check a class-name table: every key and phrase a non-empty string."""
    from zsadx.config import ConfigError, load_yaml, resolve_config_path

    try:
        file = resolve_config_path(path)
    except ConfigError as exc:
        raise ConfigError(f"method.{key}: {exc}") from exc
    data = load_yaml(file)
    for dataset, entry in data.items():
        if not isinstance(entry, dict):
            raise ConfigError(f"{file} (method.{key}): '{dataset}' must map class names to phrases, "
                              f"got {type(entry).__name__}")
        for cls, phrase in entry.items():
            if not isinstance(cls, str):
                # YAML reads 01 as the number 1: BTAD's classes must be quoted.
                raise ConfigError(f"{file} (method.{key}): class {cls!r} of '{dataset}' is not a string; "
                                  f"quote it ('{cls}')")
            if not isinstance(phrase, str) or not phrase.strip():
                raise ConfigError(f"{file} (method.{key}): '{dataset}: {cls}' needs a non-empty phrase")
    return {str(d): e for d, e in data.items()}


def batch_phrases(names: ClassNameTable, batch) -> list[str]:
    """Each image's class phrase: its record's dataset and class (``batch['dataset']`` may be absent,
    e.g. ``zsadx predict`` on one file: then only the rule applies)."""
    classes = batch["cls"]
    datasets = batch.get("dataset") or [None] * len(classes)
    return [names(d, c) for d, c in zip(datasets, classes)]
