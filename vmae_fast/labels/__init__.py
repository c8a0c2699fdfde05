"""Class names of the Kinetics label sets, and the official Kinetics-710 -> 400/600/700 head
conversion.

Data files (one name per line, line ``i`` = class ``i``):

- ``k400.txt``: Kinetics-400, the dataset's own class names in their standard (alphabetical)
  order, the order of the official fine-tuned K400 heads. The official repository's own K400
  list names 13 of these classes by their Kinetics-710 name (e.g. "balloon blowing" is
  "inflating balloons" there, "opening bottle" is "opening wine bottle"); same classes, same order.
- ``k600.txt``, ``k700.txt``, ``k710.txt``: the official repository's lists (``misc/label_map_*``),
  in its order, the order of its fine-tuned K600 / K700 / K710 heads.
- ``k710_to_k{400,600,700}.json``: the official ``misc/label_710to*.json``: entry ``i`` is the
  K710 class of target class ``i``. The official fine-tuning script converts a K710 head to a
  Kinetics one by taking those rows (``convert_k710_head``).
"""
from __future__ import annotations

import json
import os
from importlib import resources
from typing import Any, Mapping

import torch

LABEL_SETS = ("k400", "k600", "k700", "k710")
K710_TARGETS = ("k400", "k600", "k700")


def _read_text(name: str) -> str:
    return resources.files(__name__).joinpath(name).read_text(encoding="utf-8")


def load_labels(name_or_path: str | os.PathLike) -> list[str]:
    """Class names by index: a shipped set (``"k400"``, ``"k600"``, ``"k700"``, ``"k710"``) or a
    file: text with one name per line (blank lines at the end ignored), or JSON holding a list
    of names or a ``{index: name}`` mapping (e.g. a transformers ``config.json``'s ``id2label``,
    or the whole ``config.json``)."""
    if isinstance(name_or_path, str) and name_or_path in LABEL_SETS:
        return _parse_lines(_read_text(f"{name_or_path}.txt"), name_or_path)
    path = os.fspath(name_or_path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path!r} is neither a labels file nor one of {', '.join(LABEL_SETS)}")
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except UnicodeDecodeError:
        raise ValueError(f"labels {path}: not a text file (expected one name a line, or JSON)") from None
    if path.endswith(".json"):
        try:
            obj = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ValueError(f"labels {path}: not valid JSON ({exc})") from None
        return _parse_json(obj, path)
    return _parse_lines(text, path)


def _parse_lines(text: str, what: str) -> list[str]:
    names = text.splitlines()
    while names and not names[-1].strip():
        names.pop()
    if not names:
        raise ValueError(f"labels {what}: no names")
    return [n.strip() for n in names]


def _parse_json(obj: Any, what: str) -> list[str]:
    if isinstance(obj, Mapping) and "id2label" in obj:
        obj = obj["id2label"]
    if isinstance(obj, list) and all(isinstance(n, str) for n in obj):
        return list(obj)
    if isinstance(obj, Mapping):
        try:
            pairs = sorted((int(k), str(v)) for k, v in obj.items())
        except (TypeError, ValueError):
            pairs = []
        if pairs and [i for i, _ in pairs] == list(range(len(pairs))):
            return [v for _, v in pairs]
    raise ValueError(f"labels {what}: expected a JSON list of names or an {{index: name}} mapping 0..n-1")


def k710_index_map(target: str) -> list[int]:
    """The official map of a K710 head onto ``target`` (``"k400"``, ``"k600"`` or ``"k700"``):
    entry ``i`` is the K710 class of target class ``i``."""
    if target not in K710_TARGETS:
        raise ValueError(f"target must be one of {K710_TARGETS}, got {target!r}")
    return [int(i) for i in json.loads(_read_text(f"k710_to_{target}.json"))]


def convert_k710_head(state_dict: Mapping[str, Any], target: str, head: str = "head") -> dict[str, torch.Tensor]:
    """A fine-tuned Kinetics-710 classifier's weights with its head cut to ``target``'s classes,
    as the official fine-tuning script does (``head.weight[map]``, ``head.bias[map]``, with
    ``k710_index_map``). ``state_dict``: a file's dict or its ``model``/``module`` entry (wrappers
    and prefixes are removed as ``load_official_state_dict`` removes them); ``head``: the head's
    key prefix (``"classifier"`` for a Hugging Face state dict). Returns a new dict; the other
    tensors are the same objects."""
    from ..checkpoint import unwrap_state_dict

    sd = dict(unwrap_state_dict(state_dict))
    idx = k710_index_map(target)
    for k in (f"{head}.weight", f"{head}.bias"):
        if k not in sd:
            raise ValueError(f"no {k!r} in the state dict: not a classifier (or pass head=)")
        if sd[k].shape[0] != 710:
            raise ValueError(f"{k} has {sd[k].shape[0]} classes, expected a Kinetics-710 head (710)")
        sd[k] = sd[k][torch.as_tensor(idx, device=sd[k].device)].clone()
    return sd
