"""Where a file keeps a model's weights: under which key a checkpoint stores them, which stored
tensor holds each state-dict key of a torchkeep or safetensors file (or which recipe, for a
sparse or quantized tensor), and the dict of tensors inside a loaded ``torch.save`` file or DCP
checkpoint.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from torchkeep.container import Container
from torchkeep.errors import UnsupportedFormatError
from torchkeep.format import Manifest, Tag
from torchkeep.tree import METADATA, STATEFUL, TENSOR, parts_of

# Where a checkpoint keeps its model, in the order they are looked for.
MODEL_KEYS = ("model_state_dict", "model", "state_dict", "module")


def weight_names(container: Container) -> dict[str, str]:
    """Map each state-dict key of the file's model to the stored tensor holding it."""
    aliases = container.aliases
    manifest = container.manifest
    if manifest is None or manifest.tree is None:
        keys = {name: name for name in container.entries}
        keys.update(aliases)
        section = manifest.model_section() if isinstance(manifest, Manifest) else None
        if section is not None:
            # A whole model also stores its non-persistent buffers, which state_dict leaves out.
            for name in section.buffers:
                keys.pop(name, None)
        return keys
    tree = _model_tree(manifest.tree)
    if not isinstance(tree, dict) or not any(_is_tensor(v) for v in tree.values()):
        raise UnsupportedFormatError(
            f"{container.path}: holds no model weights (looked for a dict of tensors under "
            f"{', '.join(MODEL_KEYS)}); load it with tk.load instead"
        )
    return {k: aliases.get(v[TENSOR], v[TENSOR]) for k, v in tree.items() if _is_tensor(v)}


def _is_tensor(node: Any) -> bool:
    return isinstance(node, dict) and set(node) == {TENSOR}


def weights_in(obj: Any, path: str) -> dict[str, torch.Tensor]:
    """Return the model weights inside a loaded object: a flat dict of tensors, or one stored
    under a key such as ``state_dict`` (Lightning) or ``model_state_dict`` (the tutorials)."""
    candidates = [obj] + [obj[k] for k in MODEL_KEYS if isinstance(obj, Mapping) and k in obj]
    for candidate in candidates:
        if (
            isinstance(candidate, Mapping)
            and candidate
            and all(
                isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in candidate.items()
            )
        ):
            return dict(candidate)
    raise UnsupportedFormatError(
        f"{path}: holds no model weights (a dict of tensors, or one under "
        f"{', '.join(MODEL_KEYS)}); load it with tk.load instead"
    )


def stored_weights(container: Container) -> tuple[dict[str, str], dict[str, Any]]:
    """Map each state-dict key of the file's model to the stored tensor holding it, and each
    key of a sparse or quantized tensor to its node (a recipe naming its stored parts)."""
    manifest = container.manifest
    if manifest is None or manifest.tree is None:
        return weight_names(container), {}
    tree, aliases = manifest.tree, container.aliases
    flat_dict = manifest.kind == "weights"  # save_weights' tree: every key at its top
    if not flat_dict:
        tree = _model_tree(tree)
    if isinstance(tree, dict) and set(tree) == {Tag.DICT}:
        items = {k: v for k, v in tree[Tag.DICT] if isinstance(k, str)}
    else:
        items = {k: v for k, v in tree.items() if k != METADATA} if isinstance(tree, dict) else {}
    composites = {k: v for k, v in items.items() if parts_of(v) is not None}
    if flat_dict:
        plain = {k: v for k, v in items.items() if isinstance(v, dict) and set(v) == {TENSOR}}
        names = {k: str(v[TENSOR]) for k, v in plain.items()}
        return {k: aliases.get(n, n) for k, n in names.items()}, composites
    try:
        names = weight_names(container)
    except UnsupportedFormatError:
        if not composites:
            raise
        names = {}  # a model of sparse or quantized tensors only
    return names, composites


def _model_tree(tree: Any) -> Any:
    """The part of a saved state tree that holds the model: under the first of ``MODEL_KEYS``
    the tree has, inside a Stateful's state."""
    for key in MODEL_KEYS:
        if isinstance(tree, dict) and key in tree:
            tree = tree[key]
            break
    if isinstance(tree, dict) and set(tree) == {STATEFUL, "state"}:
        tree = tree["state"]
    return tree
