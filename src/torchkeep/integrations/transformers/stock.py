"""Checkpoints of the stock transformers.Trainer: which are its, and reading them safely.

The stock Trainer writes its optimizer, scheduler, scaler and random generators with
``torch.save``; here they are read only through torchkeep's restricted unpickler.
"""

from __future__ import annotations

import logging
import os
import re
from typing import Any

from torchkeep.checkpoint import load_from
from torchkeep.format import MANIFEST_FILE
from torchkeep.storage import Storage

log = logging.getLogger("torchkeep.integrations.transformers")

TRAINER_STATE = "trainer_state.json"
# What the stock Trainer writes with torch.save; read here only through the safe unpickler.
_STOCK_OPTIMIZER = "optimizer.pt"
_STOCK_SCHEDULER = "scheduler.pt"
_STOCK_SCALER = "scaler.pt"
_STOCK_RNG = re.compile(r"rng_state(_\d+)?\.pth")
_STOCK_WEIGHTS = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin")
_STOCK_ARGS = "training_args.bin"


def is_stock(path: str) -> bool:
    """Whether ``path`` looks like a checkpoint of the stock Trainer."""
    return os.path.isfile(os.path.join(path, TRAINER_STATE)) and any(
        os.path.isfile(os.path.join(path, name)) for name in (*_STOCK_WEIGHTS, _STOCK_OPTIMIZER)
    )


def is_stock_step(path: str) -> bool:
    """Whether ``path`` is, beyond doubt, a step directory the stock Trainer wrote (and so one
    a save of the same step may replace): no manifest, and nothing but plain files, among them
    the ones the stock Trainer always writes."""
    if os.path.islink(path) or not os.path.isdir(path) or not is_stock(path):
        return False
    names = os.listdir(path)
    return (
        _STOCK_ARGS in names
        and MANIFEST_FILE not in names
        and all(
            os.path.isfile(p) and not os.path.islink(p)
            for p in (os.path.join(path, n) for n in names)
        )
    )


def read_stock_state(storage: Storage, path: str) -> dict[str, Any]:
    """The states a stock checkpoint holds of the optimizer, the scheduler and the scaler, by
    name, each read by the restricted unpickler; its random generators' state is not read."""
    found: dict[str, Any] = {}
    for attribute, name in (
        ("optimizer", _STOCK_OPTIMIZER),
        ("scheduler", _STOCK_SCHEDULER),
        ("scaler", _STOCK_SCALER),
    ):
        if os.path.isfile(os.path.join(path, name)):
            found[attribute] = load_from(storage, os.path.join(path, name))
    if any(_STOCK_RNG.fullmatch(name) for name in storage.list_dir(path)):
        log.warning(
            "%s: the random generators' state not restored: rng_state.pth pickles numpy "
            "arrays, which torchkeep does not unpickle. The generators go on from their "
            "current state, so dropout and other random draws differ from the original run",
            path,
        )
    return found
