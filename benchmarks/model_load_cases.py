"""Loading a whole model: peak memory and time of ``tk.load_model`` against the usual ways.

Each load runs in a fresh process, the file dropped from the page cache first; the process
reports the growth of its peak resident memory (VmHWM, reset after imports) and the seconds the
load took, every byte of the model read once. The ways compared:

* torchkeep: ``tk.load_model(dir)`` (rebuilt on the meta device, tensors read into place);
* torch: the tutorials' ``model = Net(); model.load_state_dict(torch.load(path))``;
* torch, mmap + assign: ``torch.load(path, mmap=True)`` into a meta-device model with
  ``load_state_dict(assign=True)``, the most frugal way torch offers;
* safetensors: ``model = Net(); safetensors.torch.load_model(model, path)``.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

import torchkeep as tk
from torchkeep.bench.workload import MIB, drop_cache, fsync_file

TORCHKEEP = "torchkeep"
TORCH = "torch"
TORCH_MMAP = "torch, mmap + assign"
SAFETENSORS = "safetensors"
WAYS = (TORCHKEEP, TORCH, TORCH_MMAP, SAFETENSORS)


class BenchModel(nn.Module):
    """A transformer-shaped stack of linear layers: embedding, blocks of attention projections
    and an MLP, layer norms, a head. Its size is set by ``width`` and ``layers``."""

    def __init__(self, vocab: int = 8192, width: int = 1024, layers: int = 4) -> None:
        super().__init__()
        self.vocab, self.width, self.layers = vocab, width, layers
        self.embed = nn.Embedding(vocab, width)
        self.blocks = nn.ModuleList(
            nn.ModuleDict(
                {
                    "norm": nn.LayerNorm(width),
                    "qkv": nn.Linear(width, 3 * width),
                    "out": nn.Linear(width, width),
                    "up": nn.Linear(width, 4 * width),
                    "down": nn.Linear(4 * width, width),
                }
            )
            for _ in range(layers)
        )
        self.head = nn.Linear(width, vocab, bias=False)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x = self.embed(tokens)
        for block in self.blocks:
            assert isinstance(block, nn.ModuleDict)
            h = block["norm"](x)
            x = x + block["out"](block["qkv"](h)[..., : self.width])
            x = x + block["down"](torch.relu(block["up"](h)))
        out: torch.Tensor = self.head(x)
        return out


def model_config(size_bytes: int) -> dict[str, int]:
    """A vocabulary of 16384, width 2048 (512 for models under 512 MiB), and as many layers as
    bring the fp32 weights nearest ``size_bytes``."""
    vocab, width = 16384, 2048 if size_bytes >= 512 * MIB else 512
    per_layer = 4 * (width * 3 * width + width * width + 2 * width * 4 * width)
    layers = max(1, round((size_bytes - 4 * 2 * vocab * width) / per_layer))
    return {"vocab": vocab, "width": width, "layers": layers}


_SCRIPT = """
import json, sys, time
import torch
import torchkeep as tk
from model_load_cases import BenchModel, peak_kib, reset_peak
way, path, config = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
reset_peak()
before = peak_kib()
started = time.perf_counter()
if way == "torchkeep":
    model = tk.load_model(path)
elif way == "torch":
    model = BenchModel(**config)
    model.load_state_dict(torch.load(path, weights_only=True))
elif way == "torch, mmap + assign":
    with torch.device("meta"):
        model = BenchModel(**config)
    model.load_state_dict(torch.load(path, mmap=True, weights_only=True), assign=True)
elif way == "safetensors":
    import safetensors.torch
    model = BenchModel(**config)
    safetensors.torch.load_model(model, path)
total = sum(float(t.sum()) for t in model.state_dict().values())  # every byte read, no copy
seconds = time.perf_counter() - started
print(json.dumps({"before_kib": before, "after_kib": peak_kib(), "seconds": seconds}))
"""


def peak_kib() -> int:
    """This process's peak resident memory (VmHWM) in KiB."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    raise OSError("no VmHWM in /proc/self/status")


def reset_peak() -> None:
    """Reset the peak to the current resident memory (Linux 4.0 and later)."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


@dataclass(frozen=True)
class ModelLoadResult:
    """Medians over the runs of one way of loading."""

    way: str
    seconds: float
    peak_extra_bytes: int
    model_bytes: int

    @property
    def memory_ratio(self) -> float:
        return self.peak_extra_bytes / self.model_bytes


def write_files(size_bytes: int, directory: str) -> tuple[dict[str, str], dict[str, int], int]:
    """Save one model in each way's format; return the paths, the config and the model bytes."""
    config = model_config(size_bytes)
    torch.manual_seed(0)
    with torch.no_grad():
        model = BenchModel(**config)
    paths = {
        TORCHKEEP: os.path.join(directory, "model"),
        TORCH: os.path.join(directory, "model.pth"),
        SAFETENSORS: os.path.join(directory, "model.safetensors"),
    }
    paths[TORCH_MMAP] = paths[TORCH]
    tk.save_model(model, paths[TORCHKEEP])
    torch.save(model.state_dict(), paths[TORCH])
    import safetensors.torch

    safetensors.torch.save_model(model, paths[SAFETENSORS])
    for path in (paths[TORCH], paths[SAFETENSORS]):
        fsync_file(path)
    return paths, config, sum(t.nbytes for t in model.state_dict().values())


def _run_once(way: str, path: str, config: dict[str, int]) -> dict[str, float]:
    for file in _files(path):
        drop_cache(file)
    package_root = os.path.dirname(os.path.dirname(os.path.abspath(tk.__file__)))
    here = os.path.dirname(os.path.abspath(__file__))  # this module, for the child to import
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(
        p for p in (package_root, here, env.get("PYTHONPATH", "")) if p
    )
    done = subprocess.run(
        [sys.executable, "-c", _SCRIPT, way, path, json.dumps(config)],
        capture_output=True,
        text=True,
        env=env,
        check=False,
    )
    if done.returncode != 0:
        raise RuntimeError(f"loading with {way} failed:\n{done.stderr}")
    values: dict[str, float] = json.loads(done.stdout.strip().splitlines()[-1])
    return values


def _files(path: str) -> list[str]:
    if os.path.isdir(path):
        return [os.path.join(path, name) for name in sorted(os.listdir(path))]
    return [path]


def run_model_load(
    size_bytes: int,
    directory: str,
    *,
    repeats: int,
    progress: Callable[[str], None] | None = None,
) -> list[ModelLoadResult]:
    """Time and measure every way of loading, interleaved, ``repeats`` runs each."""
    paths, config, model_bytes = write_files(size_bytes, directory)
    runs: dict[str, list[dict[str, float]]] = {way: [] for way in WAYS}
    for round_index in range(repeats):
        order = WAYS[round_index % len(WAYS) :] + WAYS[: round_index % len(WAYS)]
        for way in order:
            values = _run_once(way, paths[way], config)
            runs[way].append(values)
            if progress is not None:
                extra = (values["after_kib"] - values["before_kib"]) / 1024
                progress(f"{way}: run {round_index + 1}/{repeats} {values['seconds']:.3f} s, "
                         f"peak +{extra:.0f} MiB")  # fmt: skip
    return [
        ModelLoadResult(
            way,
            statistics.median(r["seconds"] for r in runs[way]),
            int(statistics.median((r["after_kib"] - r["before_kib"]) * 1024 for r in runs[way])),
            model_bytes,
        )
        for way in WAYS
    ]


def format_model_load(results: list[ModelLoadResult]) -> str:
    """The Markdown table of a model-load run."""
    base = next(r for r in results if r.way == TORCHKEEP)
    lines = [
        f"Model: {results[0].model_bytes / MIB:.0f} MiB of fp32 weights",
        "",
        "| way | median s | peak extra MiB | × model size | time ratio (torchkeep faster by ×) |",
        "|---|---:|---:|---:|---:|",
    ]
    for r in results:
        lines.append(
            f"| {r.way} | {r.seconds:.3f} | {r.peak_extra_bytes / MIB:.0f} | "
            f"{r.memory_ratio:.2f} | {r.seconds / base.seconds:.2f}× |"
        )
    return "\n".join(lines) + "\n"
