"""What the tutorials do with a loaded model, on a model rebuilt from its exported program in a
process that cannot import its class: ``model.eval()`` first, then inference; moving and
casting it; and a clear refusal of ``train()``."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

import torchkeep as tk
from conftest import SimpleNet, TheModelClass, run_script


class MLP(nn.Module):
    """The multilayer perceptron of the tutorials (28×28 images, a dropout layer)."""

    def __init__(self) -> None:
        super().__init__()
        self.layers = nn.Sequential(
            nn.Conv2d(1, 5, kernel_size=3),
            nn.Flatten(),
            nn.Linear(26 * 26 * 5, 300),
            nn.ReLU(),
            nn.Linear(300, 64),
            nn.ReLU(),
            nn.Dropout(0.2),
            nn.Linear(64, 10),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


class SmallVGG(nn.Module):
    """torchvision's vgg16 as the tutorials build it (convolution blocks with in-place ReLUs and
    max pooling, adaptive average pooling, a classifier with dropout), at a width a test can
    export in a second (torchvision is not a dependency)."""

    def __init__(self) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        channels = 3
        for width in (8, "M", 16, "M", 16, 16, "M"):
            if width == "M":
                layers.append(nn.MaxPool2d(kernel_size=2, stride=2))
            else:
                layers += [nn.Conv2d(channels, int(width), 3, padding=1), nn.ReLU(inplace=True)]
                channels = int(width)
        self.features = nn.Sequential(*layers)
        self.avgpool = nn.AdaptiveAvgPool2d((7, 7))
        self.classifier = nn.Sequential(
            nn.Linear(16 * 7 * 7, 64),
            nn.ReLU(True),
            nn.Dropout(),
            nn.Linear(64, 64),
            nn.ReLU(True),
            nn.Dropout(),
            nn.Linear(64, 10),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.flatten(self.avgpool(self.features(x)), 1))


MODELS = {
    "TheModelClass": (TheModelClass, (2, 3, 32, 32)),
    "SimpleNet": (SimpleNet, (2, 10)),
    "MLP": (MLP, (2, 1, 28, 28)),
    "SmallVGG": (SmallVGG, (2, 3, 56, 56)),
}

_AS_A_USER_WOULD = """
    import copy, json, sys, torch, torchkeep as tk
    root, names = sys.argv[1], sys.argv[2].split(",")
    inputs = tk.load(root + "/inputs.safetensors")
    report, outputs = {}, {}
    for name in names:
        model = tk.load_model(root + "/" + name)
        seen = {"class": type(model).__name__, "training_as_loaded": model.training}
        assert model.eval() is model  # the tutorials' first line
        seen["training"] = model.training
        seen["all_eval"] = not any(m.training for m in model.modules())
        assert model.train(False) is model
        with torch.no_grad():
            outputs[name] = model(inputs[name]).contiguous()
        model.requires_grad_(False)
        seen["requires_grad"] = any(p.requires_grad for p in model.parameters())
        model.to("cpu")
        with torch.no_grad():
            outputs[name + ".double"] = model.to(torch.float64)(inputs[name].double()).contiguous()
            outputs[name + ".half"] = model.half()(inputs[name].half()).float().contiguous()
        try:
            model.train()
            seen["train"] = "allowed"
        except tk.TorchkeepError as e:
            seen["train"] = f"{type(e).__name__}: {e}"
        seen["training_after"] = model.training
        try:
            copy.deepcopy(model).train()  # a copy refuses too
            seen["copy_train"] = "allowed"
        except tk.TorchkeepError:
            seen["copy_train"] = "refused"
        report[name] = seen
    report["imported"] = [m for m in ("conftest", "test_loaded_models") if m in sys.modules]
    tk.save(outputs, root + "/outputs.safetensors")
    print(json.dumps(report))
"""


def test_each_tutorial_model_loaded_from_its_program_takes_eval_and_refuses_train(tmp_path):
    torch.manual_seed(0)
    inputs, expected = {}, {}
    for name, (cls, shape) in MODELS.items():
        model = cls()
        model.train()  # saved in the middle of training, as the tutorials do
        x = torch.randn(shape)
        tk.save_model(model, tmp_path / name, example_inputs=x)
        inputs[name] = x
        model.eval()
        with torch.no_grad():
            expected[name] = model(x)
    tk.save(inputs, tmp_path / "inputs.safetensors")

    done = run_script(_AS_A_USER_WOULD, tmp_path, ",".join(MODELS), cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-4000:]
    report = json.loads(done.stdout.strip().splitlines()[-1])
    assert report.pop("imported") == []  # no class could be imported: the programs ran
    outputs = tk.load(tmp_path / "outputs.safetensors")
    for name, seen in report.items():
        assert seen["class"] != name
        assert seen["training_as_loaded"] is False and seen["training"] is False, seen
        assert seen["all_eval"] and not seen["requires_grad"]
        assert torch.allclose(outputs[name], expected[name], atol=1e-5), name
        assert torch.allclose(outputs[name + ".double"], expected[name].double(), atol=1e-5)
        assert torch.allclose(outputs[name + ".half"], expected[name], atol=5e-2), name
        assert seen["train"].startswith("TorchkeepError: ") and "train() is refused" in seen["train"]
        # The two ways to a model that trains: its class's module allowed, or its weights.
        module = MODELS[name][0].__module__
        assert f"import {module}" in seen["train"], seen["train"]
        assert f"allowed_modules=[{module!r}]" in seen["train"]
        assert "tk.load_weights(model, path)" in seen["train"]
        assert seen["training_after"] is False and seen["copy_train"] == "refused"


def test_a_program_loaded_in_this_process_behaves_the_same(tmp_path):
    """With the class importable, load_model rebuilds the class (it trains); the program path
    is taken when the recipe cannot be used, and behaves as above."""
    import copy

    from torchkeep.model.program import inference_only

    model = SimpleNet().eval()
    program = torch.export.export(model, (torch.randn(2, 10),)).module()
    loaded = inference_only(program, "here")
    assert loaded.eval() is loaded and not loaded.training
    with pytest.raises(tk.TorchkeepError, match="train\\(\\) is refused") as refused:
        loaded.train()
    assert "allowed_modules" not in str(refused.value)  # no recipe: only the weights
    copied = copy.deepcopy(loaded)
    assert torch.equal(copied(torch.ones(2, 10)), loaded(torch.ones(2, 10)))
    with pytest.raises(tk.TorchkeepError, match="train\\(\\) is refused"):
        copied.train()
    rebuilt = tk.load_model(tk.save_model(SimpleNet(), tmp_path / "m").path)
    assert isinstance(rebuilt, SimpleNet) and not rebuilt.training
    rebuilt.train()
    assert rebuilt.training
