"""Reading a torchkeep checkpoint back: every checksum checked, then its pieces restored."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

from torchkeep.checkpoint import load_from
from torchkeep.container import Container, open_container
from torchkeep.errors import CorruptCheckpointError, StateMismatchError, UnsupportedFormatError
from torchkeep.integrations.transformers.stock import TRAINER_STATE
from torchkeep.storage import Storage

log = logging.getLogger("torchkeep.integrations.transformers")


@dataclass
class Resumed:
    """The pieces of a checkpoint the Trainer restores after the model, each in its own hook
    (the optimizer exists only once training is prepared, the random generators are set only
    when the first batch is due)."""

    path: str
    optimizer: Any = None
    scheduler: Any = None
    scaler: Any = None
    rng: Any = None


def read_checkpoint(storage: Storage, path: str, model: Any) -> Resumed:
    """Read the torchkeep checkpoint ``path``: ``model`` (unless None) filled in place, the
    other pieces kept for the hooks that restore them."""
    # Every member (the Trainer reads trainer_state.json itself, next) and every tensor is
    # checked before the model, filled in place, receives a byte; the load checks again.
    with open_container(path, storage=storage) as container:
        members = container.manifest.files if container.manifest is not None else {}
        if TRAINER_STATE not in members:
            raise UnsupportedFormatError(
                f"{path}: a torchkeep save without {TRAINER_STATE}: not a checkpoint of a "
                "Trainer. Load it with tk.load"
            )
        check_checksums(container, "Resume from another checkpoint-<step>")
    loaded = load_from(storage, path, into=None if model is None else {"model": model})
    log.info("resuming from %s", path)
    return Resumed(
        path,
        optimizer=loaded.get("optimizer"),
        scheduler=loaded.get("scheduler"),
        scaler=loaded.get("scaler"),
        rng=loaded.get("rng"),
    )


def check_checksums(container: Container, then: str) -> None:
    """Check every tensor and member file before anything is read into the model."""
    problems = container.verify()
    if problems:
        more = f" (and {len(problems) - 3} more)" if len(problems) > 3 else ""
        raise CorruptCheckpointError(
            f"{container.path}: damaged, nothing was loaded from it (the model keeps its "
            f"weights): {'; '.join(problems[:3])}{more}. {then} (`torchkeep verify` "
            "checks each)"
        )


def restore(obj: Any, state: Any, where: str) -> None:
    """Load ``state`` into ``obj`` (the optimizer, the scheduler or the scaler)."""
    try:
        obj.load_state_dict(state)
    except (RuntimeError, KeyError, ValueError, TypeError) as e:
        raise StateMismatchError(
            f"{where}: the saved state does not fit this {type(obj).__name__}: {e}. Resume "
            "with the same model, optimizer and scheduler settings as the run that saved it"
        ) from e
