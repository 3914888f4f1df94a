"""Whole models without pickle: ``save_model`` and ``load_model``.

A saved model is a torchkeep directory: the weights (safetensors shards, non-persistent buffers
included), a manifest whose ``model`` section holds the recipe that rebuilds the module and its
architecture, and, when example inputs were given, ``program.pt2``: the model exported with
``torch.export``, which runs with no class code at all.

One idea a module: ``save`` and ``load``; ``assign`` (tensors and plain attributes into a rebuilt
module); ``capture`` (the Recipe, recorded by ``tk.capture()``), ``recipe`` (finding, checking
and encoding one), ``decode`` (reading a stored one back under ``Trust``); ``program`` (exported
programs, checked before torch loads them); ``convert`` and ``summary`` (for ``tk.convert`` and
``describe``).
"""

from torchkeep.format import MODEL_KIND
from torchkeep.model.assign import assign
from torchkeep.model.capture import capture
from torchkeep.model.convert import convert_model, is_saved_model
from torchkeep.model.load import load_model
from torchkeep.model.save import architecture, save_model
from torchkeep.model.summary import model_summary

__all__ = [
    "MODEL_KIND",
    "architecture",
    "assign",
    "capture",
    "convert_model",
    "is_saved_model",
    "load_model",
    "model_summary",
    "save_model",
]
