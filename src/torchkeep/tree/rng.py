"""The random number generators of a training run, as one Stateful object."""

from __future__ import annotations

import random
from collections.abc import Mapping
from typing import Any

import torch


class RNGState:
    """Stateful view of every random number generator a training run draws from.

    Covers Python's ``random``, numpy's global generator (when numpy is importable), torch's CPU
    generator and the generator of every CUDA device (when CUDA is initialised).

    Example:
        ```python
        tk.save({"rng": tk.RNGState()}, "rng.safetensors")
        tk.load("rng.safetensors", into={"rng": tk.RNGState()})   # generators restored
        ```
    """

    def state_dict(self) -> dict[str, Any]:
        version, internal, gauss = random.getstate()
        state: dict[str, Any] = {
            "python": {"version": version, "state": list(internal), "gauss": gauss},
            "torch": torch.get_rng_state(),
        }
        np = _numpy()
        if np is not None:
            kind, keys, pos, has_gauss, cached = np.random.get_state()
            state["numpy"] = {
                "kind": str(kind),
                "keys": torch.from_numpy(keys.astype("int64")),
                "pos": int(pos),
                "has_gauss": int(has_gauss),
                "cached_gaussian": float(cached),
            }
        if torch.cuda.is_available() and torch.cuda.is_initialized():  # type: ignore[no-untyped-call]
            state["cuda"] = [torch.cuda.get_rng_state(i) for i in range(torch.cuda.device_count())]
        return state

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        py = state_dict["python"]
        random.setstate((py["version"], tuple(py["state"]), py["gauss"]))
        torch.set_rng_state(state_dict["torch"].to("cpu", torch.uint8))
        np = _numpy()
        if np is not None and "numpy" in state_dict:
            s = state_dict["numpy"]
            keys = s["keys"].cpu().numpy().astype("uint32")
            np.random.set_state((s["kind"], keys, s["pos"], s["has_gauss"], s["cached_gaussian"]))
        cuda = state_dict.get("cuda")
        if cuda and torch.cuda.is_available():
            for i, rng in enumerate(cuda[: torch.cuda.device_count()]):
                torch.cuda.set_rng_state(rng.to("cpu", torch.uint8), i)


def _numpy() -> Any:
    try:
        import numpy
    except ImportError:
        return None
    return numpy
