"""Whole models without pickle: ``save_model``/``load_model``, recipes, ``tk.capture()``, the
exported program, and the trust rules that decide what a saved model may import and call.

The models and factories used here are defined at the top level so that recipes can name them
(``test_model:Name``). Loads that must not find this module imported run in fresh interpreters.
"""

from __future__ import annotations

import importlib
import itertools
import json
import re
import sys
from collections import OrderedDict
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.nn import functional as F

import torchkeep as tk
from conftest import SimpleNet, TheModelClass, TiedLM, assert_same_state, run_script
from torchkeep.model.decode import Trust, decode_recipe, resolve

# ---------------------------------------------------------------------------------------------
# models, at the top level so that recipes can name them


class Stored(nn.Module):
    """Keeps every constructor argument as an attribute of the same name."""

    def __init__(
        self, in_features: int, hidden: int = 16, *, act: type[nn.Module] = nn.ReLU, p: float = 0.0
    ) -> None:
        super().__init__()
        self.in_features = in_features
        self.hidden = hidden
        self.act = act
        self.p = p
        self.body = nn.Sequential(nn.Linear(in_features, hidden), act(), nn.Dropout(p))
        self.out = nn.Linear(hidden, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(self.body(x))


class Unstored(nn.Module):
    """Keeps nothing of its argument: only a capture, a given recipe or a program rebuild it."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.fc = nn.Linear(width, 2 * width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.fc(x))


class SomeNet(nn.Module):
    def __init__(self, blocks: list[int], num_classes: int) -> None:
        super().__init__()
        self.features = nn.Sequential(
            *(nn.Linear(a, b) for a, b in zip([3, *blocks[:-1]], blocks, strict=True))
        )
        self.head = nn.Linear(blocks[-1], num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(F.relu(self.features(x)))


def resnet_like(num_classes: int = 10) -> SomeNet:
    """A torchvision-style factory, declared to return a module."""
    return SomeNet([4, 8], num_classes)


def unannotated_factory(num_classes=10):  # undeclared return type, on purpose
    return SomeNet([4, 8], num_classes)


class Wrapper(nn.Module):
    def __init__(self, encoder: nn.Module, out: int) -> None:
        super().__init__()
        self.encoder = encoder
        self.proj = nn.Linear(6, out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(self.encoder(x))


class Stack(nn.Module):
    def __init__(self, *widths: int) -> None:
        super().__init__()
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in itertools.pairwise(widths))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = layer(x)
        return x


class WithBuffers(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(3, 3)
        self.register_buffer("scale", torch.ones(3), persistent=False)
        self.register_buffer("steps", torch.zeros((), dtype=torch.long))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x) * self.scale + self.steps


class Shared(nn.Module):
    """One layer under two names."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(4, 4)
        self.b = self.a

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(self.a(x))


class ProgramNet(nn.Module):
    def __init__(self, width: int = 4) -> None:
        super().__init__()
        self.width = width
        self.fc = nn.Linear(width, 8)
        self.norm = nn.LayerNorm(8)
        self.out = nn.Linear(8, 3)
        self.register_buffer("shift", torch.zeros(3), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(F.gelu(self.norm(self.fc(x)))) + self.shift


WIDTH = 4


class GlobalWidth(nn.Module):
    """Its shapes come from a module global: changing it stands for the code changing."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(WIDTH, 2)


EXTRA = False


class MaybeExtra(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(2, 2)
        if EXTRA:
            self.extra = nn.Linear(2, 2)


class Branchy(nn.Module):
    """Python control flow on a tensor's value: torch.export cannot export it."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.sum().item() > 0:
            return self.fc(x)
        return x


class PickledCanaryNet(nn.Module):
    """Unpickling it writes a file: the canary that shows code from a pickle ran."""

    def __init__(self, canary: str = "") -> None:
        super().__init__()
        self.fc = nn.Linear(2, 2)
        self.canary = canary

    def __setstate__(self, state: dict) -> None:
        super().__setstate__(state)
        Path(self.canary).write_text("ran")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x)


class Scaled(nn.Module):
    """Keeps its defaulted argument under another name, and it changes no shape."""

    def __init__(self, scale: float = 1.0) -> None:
        super().__init__()
        self.fc = nn.Linear(2, 2)
        self.factor = scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x) * self.factor


HERE = __name__  # the name recipes give this module (pytest imports it as test_model)


# ---------------------------------------------------------------------------------------------
# helpers


def round_trip(
    model: nn.Module,
    path: Path,
    *inputs: torch.Tensor,
    allowed: tuple[str, ...] = (),
    **save: object,
) -> nn.Module:
    """Save and load ``model``; check the state and the eval outputs are bitwise the same."""
    model.eval()
    with torch.no_grad():
        expected = model(*inputs) if inputs else None
    tk.save_model(model, path, **save)  # type: ignore[arg-type]
    loaded = tk.load_model(path, allowed_modules=allowed)
    assert type(loaded) is type(model)
    assert loaded is not model
    assert_same_state(model, loaded)
    for name, t in [*loaded.named_parameters(), *loaded.named_buffers()]:
        assert t.device.type == "cpu", name
    if inputs:
        with torch.no_grad():
            assert torch.equal(loaded(*inputs), expected)
    return loaded


def model_section(path: Path) -> dict:
    return json.loads((path / "manifest.json").read_text())["model"]


def flip_byte(path: Path, offset: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0xFF
    path.write_bytes(bytes(data))


def run_python(code: str, *args: object, cwd: Path) -> dict:
    """Run ``code`` in a fresh interpreter that has not imported this module; return the JSON
    it prints last."""
    result = run_script(code, *args, cwd=cwd)
    assert result.returncode == 0, result.stderr[-4000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


def test_models_here_are_named_by_this_module():
    # The subprocess tests rely on the recipes naming a module a fresh interpreter lacks.
    assert Stored.__module__ == HERE
    assert sys.modules[HERE].ProgramNet is ProgramNet
    assert HERE not in ("__main__", "torch", "torchkeep")


# ---------------------------------------------------------------------------------------------
# 1. round trips


def test_the_model_class_round_trip(tmp_path):
    loaded = round_trip(TheModelClass(), tmp_path / "model", torch.randn(2, 3, 32, 32))
    section = model_section(tmp_path / "model")
    assert section["class"] == f"{TheModelClass.__module__}:TheModelClass"
    assert section["recipe"]["call"] == section["class"]
    assert section["recipe"]["args"] == [] and section["recipe"]["kwargs"] == {}
    assert section["program"] is None
    assert not (tmp_path / "model" / "program.pt2").exists()
    arch = section["architecture"]
    assert arch["parameters"] == sum(p.numel() for p in loaded.parameters())
    assert arch["children"]["conv1"]["type"] == "torch.nn.modules.conv:Conv2d"
    assert list(arch["children"]) == ["conv1", "pool", "conv2", "fc1", "fc2", "fc3"]


def test_simple_net_round_trip(tmp_path):
    round_trip(SimpleNet(), tmp_path / "model", torch.randn(5, 10))


def test_sequential_mlp_round_trip_keeps_layer_options(tmp_path):
    model = nn.Sequential(
        nn.Linear(6, 12, bias=False),
        nn.LayerNorm(12, eps=1e-3),
        nn.GELU(approximate="tanh"),
        nn.Dropout(0.25),
        nn.BatchNorm1d(12, momentum=0.2),
        nn.LeakyReLU(0.3),
        nn.Linear(12, 3),
    )
    model(torch.randn(8, 6))  # training mode: BatchNorm running stats move
    loaded = round_trip(model, tmp_path / "mlp", torch.randn(4, 6))
    assert loaded[0].bias is None
    assert loaded[1].eps == 1e-3
    assert loaded[2].approximate == "tanh"
    assert loaded[3].p == 0.25
    assert loaded[4].momentum == 0.2
    assert loaded[4].num_batches_tracked.item() == 1
    assert loaded[5].negative_slope == 0.3


def test_conv_layers_round_trip_with_non_default_options(tmp_path):
    model = nn.Sequential(
        nn.Conv2d(3, 4, 3, stride=2, padding=1, bias=False, padding_mode="reflect"),
        nn.BatchNorm2d(4, eps=1e-3, affine=False),
        nn.MaxPool2d(3, stride=2, padding=1, ceil_mode=True),
        nn.ConvTranspose2d(4, 2, 3, stride=2, output_padding=1, dilation=2),
        nn.AdaptiveAvgPool2d((2, 3)),
        nn.Flatten(),
    )
    loaded = round_trip(model, tmp_path / "conv", torch.randn(2, 3, 16, 16))
    assert loaded[0].padding_mode == "reflect"
    assert loaded[2].ceil_mode is True


def test_sequential_with_ordered_dict_names_round_trip(tmp_path):
    model = nn.Sequential(
        OrderedDict(
            [("encoder", nn.Linear(4, 8)), ("act", nn.ReLU()), ("decoder", nn.Linear(8, 4))]
        )
    )
    loaded = round_trip(model, tmp_path / "seq", torch.randn(3, 4))
    assert [name for name, _ in loaded.named_children()] == ["encoder", "act", "decoder"]


def test_module_list_and_module_dict_round_trip(tmp_path):
    container = nn.ModuleDict(
        {
            "towers": nn.ModuleList([nn.Linear(3, 3), nn.Sequential(nn.Linear(3, 5), nn.Tanh())]),
            "head": nn.Linear(5, 2),
            "nested": nn.ModuleDict({"norm": nn.LayerNorm(5)}),
        }
    )
    loaded = round_trip(container, tmp_path / "dict")
    assert list(loaded) == ["towers", "head", "nested"]
    assert type(loaded["towers"]) is nn.ModuleList and len(loaded["towers"]) == 2

    def run(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
        hidden = model["towers"][1](model["towers"][0](x))
        return model["head"](model["nested"]["norm"](hidden))

    x = torch.randn(2, 3)
    with torch.no_grad():
        assert torch.equal(run(loaded, x), run(container, x))

    plain = nn.ModuleList([nn.Linear(2, 2), nn.Linear(2, 1)])
    loaded_list = round_trip(plain, tmp_path / "list")
    assert type(loaded_list) is nn.ModuleList and len(loaded_list) == 2


def test_class_that_stores_its_arguments_round_trip(tmp_path):
    model = Stored(5, hidden=7, act=nn.GELU, p=0.5)
    loaded = round_trip(model, tmp_path / "model", torch.randn(3, 5))
    assert (loaded.in_features, loaded.hidden, loaded.act, loaded.p) == (5, 7, nn.GELU, 0.5)
    recipe = model_section(tmp_path / "model")["recipe"]
    assert recipe["call"] == f"{HERE}:Stored"
    assert recipe["kwargs"]["hidden"] == 7
    assert recipe["kwargs"]["act"] == {"$ref": "torch.nn.modules.activation:GELU"}


def test_captured_class_with_unstored_arguments_round_trip(tmp_path):
    with tk.capture():
        model = Unstored(3)
    loaded = round_trip(model, tmp_path / "model", torch.randn(2, 3))
    assert loaded.fc.in_features == 3
    recipe = model_section(tmp_path / "model")["recipe"]
    assert recipe["call"] == f"{HERE}:Unstored"
    assert 3 in recipe["args"] or recipe["kwargs"] == {"width": 3}


def test_captured_factory_function_round_trip(tmp_path):
    with tk.capture():
        model = resnet_like(num_classes=7)
    with pytest.raises(tk.UnsafeFileError, match="allowed_modules"):  # a function: not trusted
        round_trip(model, tmp_path / "model", torch.randn(2, 3))
    loaded = round_trip(model, tmp_path / "model", torch.randn(2, 3), allowed=(HERE,))
    assert loaded.head.out_features == 7
    section = model_section(tmp_path / "model")
    assert section["class"] == f"{HERE}:SomeNet"
    assert section["recipe"] == {
        "call": f"{HERE}:resnet_like",
        "args": [],
        "kwargs": {"num_classes": 7},
    }


def test_capture_records_module_arguments_and_varargs(tmp_path):
    with tk.capture():
        wrapped = Wrapper(Unstored(3), out=4)
        stack = Stack(3, 5, 2)
    round_trip(wrapped, tmp_path / "wrapped", torch.randn(2, 3))
    loaded = round_trip(stack, tmp_path / "stack", torch.randn(2, 3))
    assert [layer.out_features for layer in loaded.layers] == [5, 2]


def test_capture_records_only_inside_the_block(tmp_path):
    with tk.capture():
        pass
    model = Unstored(3)
    with pytest.raises(tk.UnsupportedObjectError):
        tk.save_model(model, tmp_path / "model")


def test_explicit_recipe_round_trip(tmp_path):
    round_trip(Unstored(4), tmp_path / "class", torch.randn(2, 4), recipe=(Unstored, {"width": 4}))
    model = resnet_like(num_classes=3)
    round_trip(
        model,
        tmp_path / "factory",
        torch.randn(2, 3),
        allowed=(HERE,),
        recipe=(resnet_like, {"num_classes": 3}),
    )
    assert model_section(tmp_path / "factory")["recipe"]["call"] == f"{HERE}:resnet_like"


def test_explicit_recipe_that_builds_another_model_is_refused(tmp_path):
    with pytest.raises(tk.UnsupportedObjectError, match="does not rebuild"):
        tk.save_model(Unstored(4), tmp_path / "model", recipe=(Unstored, {"width": 5}))
    assert not (tmp_path / "model").exists()
    with pytest.raises(tk.UnsupportedObjectError, match="recipe must be"):
        tk.save_model(Unstored(4), tmp_path / "model", recipe=Unstored)  # type: ignore[arg-type]


def test_lstm_needs_a_capture_and_then_round_trips(tmp_path):
    with pytest.raises(tk.UnsupportedObjectError, match=re.escape("tk.capture()")):
        tk.save_model(nn.LSTM(4, 6, num_layers=2), tmp_path / "plain")
    with tk.capture():
        model = nn.LSTM(4, 6, num_layers=2, batch_first=True, bidirectional=True)
    model.eval()
    x = torch.randn(2, 3, 4)
    expected, _ = model(x)
    tk.save_model(model, tmp_path / "lstm")
    loaded = tk.load_model(tmp_path / "lstm")
    assert torch.equal(loaded(x)[0], expected)
    assert loaded.bidirectional and loaded.batch_first and loaded.num_layers == 2


def test_inferred_recipe_does_not_silently_rebuild_another_model(tmp_path):
    # Scaled keeps `scale` as `factor`: inferring Scaled() would load a model that computes
    # something else. Either the save refuses, or the load computes what the model did.
    model = Scaled(scale=3.0)
    x = torch.randn(2, 2)
    with torch.no_grad():
        expected = model(x)
    try:
        tk.save_model(model, tmp_path / "model")
    except tk.UnsupportedObjectError:
        return
    with torch.no_grad():
        assert torch.equal(tk.load_model(tmp_path / "model")(x), expected)


# ---------------------------------------------------------------------------------------------
# 2. buffers, tied weights, shared modules


def test_non_persistent_buffers_come_back_with_their_values(tmp_path):
    model = WithBuffers()
    model.scale.copy_(torch.tensor([2.0, -1.0, 0.5]))  # not what the constructor makes
    model.steps.fill_(7)
    loaded = round_trip(model, tmp_path / "model", torch.randn(2, 3))
    assert torch.equal(loaded.scale, torch.tensor([2.0, -1.0, 0.5]))
    assert "scale" not in loaded.state_dict()  # still non-persistent
    assert loaded.steps.item() == 7
    assert model_section(tmp_path / "model")["buffers"] == ["scale"]


def test_tied_weights_stay_tied(tmp_path):
    with tk.capture():  # TiedLM does not keep its arguments: record them
        model = TiedLM()
    loaded = round_trip(model, tmp_path / "model", torch.tensor([[1, 2, 3]]))
    assert loaded.head.weight is loaded.embed.weight
    assert isinstance(loaded.embed.weight, nn.Parameter)
    assert len(list(loaded.parameters())) == len(list(model.parameters()))
    with torch.no_grad():
        loaded.embed.weight[0, 0] = 123.0
    assert loaded.head.weight[0, 0].item() == 123.0


def test_shared_module_stays_shared(tmp_path):
    model = Shared()
    loaded = round_trip(model, tmp_path / "model", torch.randn(2, 4))
    assert loaded.a is loaded.b
    assert loaded.a.weight is loaded.b.weight
    assert loaded.a.bias.shape == (4,)
    assert all(isinstance(p, nn.Parameter) for p in loaded.parameters())


def test_frozen_parameters_stay_frozen(tmp_path):
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2))
    model[0].requires_grad_(False)
    tk.save_model(model, tmp_path / "model")
    loaded = tk.load_model(tmp_path / "model")
    assert [p.requires_grad for p in loaded.parameters()] == [False, False, True, True]


def test_unkept_argument_with_a_default_is_not_assumed(tmp_path):
    class_arguments_message = "not kept on the module"
    with pytest.raises(tk.UnsupportedObjectError, match=class_arguments_message):
        tk.save_model(TiedLM(vocab=50, dim=16), tmp_path / "model")
    assert not (tmp_path / "model").exists()


# ---------------------------------------------------------------------------------------------
# 3. load options


def test_load_model_returns_eval_mode(tmp_path):
    model = nn.Sequential(nn.Linear(3, 3), nn.Dropout(0.5), nn.BatchNorm1d(3))
    model.train()
    tk.save_model(model, tmp_path / "model")
    assert model.training  # saving did not change the caller's model
    loaded = tk.load_model(tmp_path / "model")
    assert not any(m.training for m in loaded.modules())


def test_load_model_dtype_casts_floating_tensors_only(tmp_path):
    model = WithBuffers()
    model.steps.fill_(3)
    tk.save_model(model, tmp_path / "model")
    loaded = tk.load_model(tmp_path / "model", device="cpu", dtype=torch.bfloat16)
    assert loaded.fc.weight.dtype == torch.bfloat16
    assert loaded.fc.bias.dtype == torch.bfloat16
    assert loaded.scale.dtype == torch.bfloat16
    assert loaded.steps.dtype == torch.long and loaded.steps.item() == 3
    assert torch.equal(loaded.fc.weight, model.fc.weight.bfloat16())
    assert isinstance(loaded.fc.weight, nn.Parameter)
    assert all(t.device.type == "cpu" for t in loaded.state_dict().values())
    with torch.no_grad():
        assert loaded(torch.randn(2, 3).bfloat16()).dtype == torch.bfloat16


@pytest.mark.parametrize("dtype", [torch.int8, torch.long, torch.bool])
def test_load_model_refuses_non_floating_dtype(tmp_path, dtype):
    tk.save_model(SimpleNet(), tmp_path / "model")
    with pytest.raises(ValueError, match="floating-point"):
        tk.load_model(tmp_path / "model", dtype=dtype)


# ---------------------------------------------------------------------------------------------
# 4. the exported program

_RUN_PROGRAMS = """
    import json, sys, torch, torchkeep as tk
    root = sys.argv[1]
    x = tk.load(root + "/inputs.safetensors")
    out, info = {}, {}
    with torch.no_grad():
        for name in ("dyn1", "dyn4"):
            m = tk.load_model(root + "/" + name)
            info[name] = type(m).__name__
            for b in (1, 3, 17):
                out[f"{name}.{b}"] = m(x[f"x{b}"]).contiguous()
        m = tk.load_model(root + "/static")
        info["static"] = type(m).__name__
        out["static.4"] = m(x["x4"]).contiguous()
        try:
            m(x["x3"])
            info["static_batch3"] = "ran"
        except Exception as e:
            info["static_batch3"] = type(e).__name__
    info["imported"] = [n for n in ("test_model", "conftest") if n in sys.modules]
    tk.save(out, root + "/outputs.safetensors")
    print(json.dumps(info))
"""


def test_exported_program_runs_where_the_class_is_not_imported(tmp_path):
    torch.manual_seed(0)
    model = ProgramNet(width=4)
    model.shift.copy_(torch.tensor([0.5, -0.5, 1.0]))
    model.train()
    tk.save_model(model, tmp_path / "dyn1", example_inputs=torch.randn(1, 4))
    tk.save_model(model, tmp_path / "dyn4", example_inputs=(torch.randn(4, 4),))
    tk.save_model(model, tmp_path / "static", example_inputs=torch.randn(4, 4), dynamic_batch=False)
    assert model.training  # exporting ran in eval mode and put the mode back

    dyn = model_section(tmp_path / "dyn1")
    assert dyn["recipe"]["call"] == f"{HERE}:ProgramNet"
    assert dyn["program"]["dynamic_batch"] is True
    assert dyn["program"]["inputs"] == [{"shape": [None, 4], "dtype": "float32"}]
    static = model_section(tmp_path / "static")
    assert static["program"]["dynamic_batch"] is False
    assert static["program"]["inputs"] == [{"shape": [4, 4], "dtype": "float32"}]
    assert (tmp_path / "static" / "program.pt2").is_file()

    inputs = {f"x{b}": torch.randn(b, 4) for b in (1, 3, 4, 17)}
    tk.save(inputs, tmp_path / "inputs.safetensors")
    info = run_python(_RUN_PROGRAMS, tmp_path, cwd=tmp_path)

    assert info["imported"] == []  # the recipe could not be used: the program ran
    assert info["dyn1"] != "ProgramNet" and info["static"] != "ProgramNet"
    assert info["static_batch3"] != "ran"  # fixed shapes
    outputs = tk.load(tmp_path / "outputs.safetensors")
    model.eval()
    with torch.no_grad():
        for name in ("dyn1", "dyn4"):
            for b in (1, 3, 17):
                got = outputs[f"{name}.{b}"]
                assert got.shape == (b, 3)
                assert torch.allclose(got, model(inputs[f"x{b}"]), atol=1e-6), (name, b)
        assert torch.allclose(outputs["static.4"], model(inputs["x4"]), atol=1e-6)


def test_model_without_recipe_loads_its_program(tmp_path):
    model = Unstored(3)
    x = torch.randn(5, 3)
    with torch.no_grad():
        expected = model(x)
    tk.save_model(model, tmp_path / "model", example_inputs=torch.randn(2, 3))
    section = model_section(tmp_path / "model")
    assert section["recipe"] is None
    assert "width" in section["recipe_problem"]
    loaded = tk.load_model(tmp_path / "model")
    assert not isinstance(loaded, Unstored)
    with torch.no_grad():
        assert torch.allclose(loaded(x), expected, atol=1e-6)
        assert loaded(torch.randn(1, 3)).shape == (1, 6)
    as_bf16 = tk.load_model(tmp_path / "model", dtype=torch.bfloat16)
    assert all(p.dtype == torch.bfloat16 for p in as_bf16.parameters())


def test_corrupted_program_is_refused(tmp_path):
    tk.save_model(Unstored(3), tmp_path / "model", example_inputs=torch.randn(2, 3))
    program = tmp_path / "model" / "program.pt2"
    flip_byte(program, program.stat().st_size // 2)
    with pytest.raises(tk.CorruptCheckpointError, match=re.escape("program.pt2")):
        tk.load_model(tmp_path / "model")
    report = tk.verify(tmp_path / "model")
    assert not report.ok
    assert any("program.pt2" in problem for problem in report.problems)


def test_missing_program_is_refused(tmp_path):
    tk.save_model(Unstored(3), tmp_path / "model", example_inputs=torch.randn(2, 3))
    (tmp_path / "model" / "program.pt2").unlink()
    with pytest.raises(tk.CorruptCheckpointError, match=re.escape("program.pt2")):
        tk.load_model(tmp_path / "model")


# ---------------------------------------------------------------------------------------------
# 5. trust rules, in fresh interpreters

_TRUST_MODULE = "tk_trust_models"
_TRUST_SOURCE = """
import os
from torch import nn

# The canary: importing this module runs this line.
open(os.path.join(os.path.dirname(os.path.abspath(__file__)), "canary-" + __name__), "w").close()


class Net(nn.Module):
    def __init__(self, width=4):
        super().__init__()
        self.width = width
        self.fc = nn.Linear(width, 3)

    def forward(self, x):
        return self.fc(x)


def make(width: int = 4) -> Net:
    return Net(width)


def make_unannotated(width=4):
    return Net(width)
"""


@pytest.fixture
def trust_models(tmp_path):
    """A module written to ``tmp_path/mods`` that leaves a canary file when imported; saved
    models that need it, and their expected outputs."""
    mods = tmp_path / "mods"
    mods.mkdir()
    (mods / f"{_TRUST_MODULE}.py").write_text(_TRUST_SOURCE)
    sys.path.insert(0, str(mods))
    try:
        module = importlib.import_module(_TRUST_MODULE)
        x = torch.randn(2, 4)
        net = module.Net(4)
        factory_net = module.make(4)
        unannotated_net = module.make_unannotated(4)
        tk.save_model(net, tmp_path / "net")
        tk.save_model(factory_net, tmp_path / "factory", recipe=(module.make, {"width": 4}))
        tk.save_model(
            unannotated_net,
            tmp_path / "unannotated",
            recipe=(module.make_unannotated, {"width": 4}),
        )
        with torch.no_grad():
            expected = {
                "net": net(x),
                "factory": factory_net(x),
                "unannotated": unannotated_net(x),
            }
    finally:
        sys.path.remove(str(mods))
        sys.modules.pop(_TRUST_MODULE, None)
    tk.save({"x": x}, tmp_path / "x.safetensors")
    canary = mods / f"canary-{_TRUST_MODULE}"
    assert canary.exists()  # the canary works
    canary.unlink()
    return mods, canary, expected


_LOAD_WITH_ALLOWED_MODULES = """
    import json, os, sys, torch, torchkeep as tk
    root, mods, name = sys.argv[1], sys.argv[2], sys.argv[3]
    sys.path.insert(0, mods)  # importable: only the trust rules stand in the way
    canary = os.path.join(mods, "canary-" + name)
    info, out = {}, {}
    x = tk.load(root + "/x.safetensors")["x"]
    for key, allowed in (("refused", ()), ("refused_prefix", ("tk_trust",))):
        try:
            tk.load_model(root + "/net", allowed_modules=allowed)
            info[key] = None
        except tk.UnsafeFileError as e:
            info[key] = str(e)
    info["imported_after_refusal"] = name in sys.modules
    info["canary_after_refusal"] = os.path.exists(canary)
    with torch.no_grad():
        m = tk.load_model(root + "/net", allowed_modules=[name])
        info["allowed_type"] = type(m).__module__ + ":" + type(m).__qualname__
        info["canary_after_allowed"] = os.path.exists(canary)
        out["net"] = m(x)
        # Now imported: its classes need no permission; its functions still do, annotated
        # to return a module or not.
        try:
            tk.load_model(root + "/factory")
            info["factory_refused"] = None
        except tk.UnsafeFileError as e:
            info["factory_refused"] = str(e)
        out["factory"] = tk.load_model(root + "/factory", allowed_modules=[name])(x)
        try:
            tk.load_model(root + "/unannotated")
            info["unannotated_refused"] = None
        except tk.UnsafeFileError as e:
            info["unannotated_refused"] = str(e)
        out["unannotated"] = tk.load_model(root + "/unannotated", allowed_modules=[name])(x)
    tk.save(out, root + "/out.safetensors")
    print(json.dumps(info))
"""


def test_unimported_module_is_refused_until_allowed(tmp_path, trust_models):
    mods, _, expected = trust_models
    info = run_python(_LOAD_WITH_ALLOWED_MODULES, tmp_path, mods, _TRUST_MODULE, cwd=tmp_path)

    assert info["refused"] is not None, "loaded without permission"
    assert _TRUST_MODULE in info["refused"]
    assert "allowed_modules" in info["refused"]
    assert info["refused_prefix"] is not None, "allowed_modules=['tk_trust'] let tk_trust_models in"
    assert not info["imported_after_refusal"]
    assert not info["canary_after_refusal"], "the refused load imported the module"
    assert info["allowed_type"] == f"{_TRUST_MODULE}:Net"
    assert info["canary_after_allowed"]
    assert info["factory_refused"] is not None and "allowed_modules" in info["factory_refused"]
    assert info["unannotated_refused"] is not None
    assert "make_unannotated" in info["unannotated_refused"]
    assert "allowed_modules" in info["unannotated_refused"]
    out = tk.load(tmp_path / "out.safetensors")
    for key in ("net", "factory", "unannotated"):
        assert torch.equal(out[key], expected[key]), key


_LOAD_WITH_TRUST_CODE = """
    import json, os, sys, torch, torchkeep as tk
    root, mods, name = sys.argv[1], sys.argv[2], sys.argv[3]
    sys.path.insert(0, mods)
    canary = os.path.join(mods, "canary-" + name)
    info = {"canary_before": os.path.exists(canary)}
    with torch.no_grad():
        x = tk.load(root + "/x.safetensors")["x"]
        out = {}
        for key in ("net", "unannotated"):
            m = tk.load_model(root + "/" + key, trust_code=True)
            info[key] = type(m).__module__ + ":" + type(m).__qualname__
            out[key] = m(x)
    info["canary_after"] = os.path.exists(canary)
    tk.save(out, root + "/out.safetensors")
    print(json.dumps(info))
"""


def test_trust_code_imports_the_module(tmp_path, trust_models):
    mods, _, expected = trust_models
    info = run_python(_LOAD_WITH_TRUST_CODE, tmp_path, mods, _TRUST_MODULE, cwd=tmp_path)
    assert not info["canary_before"]
    assert info["canary_after"]
    assert info["net"] == info["unannotated"] == f"{_TRUST_MODULE}:Net"
    out = tk.load(tmp_path / "out.safetensors")
    assert torch.equal(out["net"], expected["net"])
    assert torch.equal(out["unannotated"], expected["unannotated"])


# ---------------------------------------------------------------------------------------------
# 6. what a recipe may call


def test_unannotated_factory_needs_allowed_modules(tmp_path):
    model = unannotated_factory(num_classes=3)
    x = torch.randn(2, 3)
    with torch.no_grad():
        expected = model(x)
    tk.save_model(model, tmp_path / "model", recipe=(unannotated_factory, {"num_classes": 3}))
    with pytest.raises(tk.UnsafeFileError, match="allowed_modules") as refused:
        tk.load_model(tmp_path / "model")
    assert "unannotated_factory" in str(refused.value)
    loaded = tk.load_model(tmp_path / "model", allowed_modules=[HERE])
    with torch.no_grad():
        assert torch.equal(loaded(x), expected)


def test_resolve_allows_module_classes_and_allowed_factories_only():
    assert resolve(f"{HERE}:Stored", Trust(), where="x", call=True) is Stored
    # A function is never trusted for its annotation: an imported library may hold functions
    # declared to return a module that run code from their arguments.
    with pytest.raises(tk.UnsafeFileError, match="allowed_modules"):
        resolve(f"{HERE}:resnet_like", Trust(), where="x", call=True)
    with pytest.raises(tk.UnsafeFileError, match="allowed_modules"):
        resolve("torch.fx.graph_module:reduce_graph_module", Trust(), where="x", call=True)
    assert resolve(f"{HERE}:resnet_like", Trust((HERE,)), where="x", call=True) is resnet_like
    with pytest.raises(tk.UnsafeFileError, match="allowed_modules"):
        resolve(f"{HERE}:unannotated_factory", Trust(), where="x", call=True)
    allowed = Trust((HERE,))
    assert (
        resolve(f"{HERE}:unannotated_factory", allowed, where="x", call=True) is unannotated_factory
    )
    assert resolve("torch.nn.functional:relu", Trust(), where="x", call=False) is F.relu


def test_trust_allows_sub_modules_not_prefixes():
    trust = Trust(("torch",))
    assert trust.allows("torch") and trust.allows("torch.nn.modules")
    assert not trust.allows("torchvision") and not trust.allows("tor")
    assert Trust(trust_code=True).allows("anything")
    assert not Trust().allows("torch")


@pytest.mark.parametrize(
    "name",
    [
        "os:system",
        "builtins:eval",
        "builtins:exec",
        "subprocess:run",
        "torch:load",
        "os:_wrap_close",
    ],
)
def test_resolve_refuses_dangerous_callables(name):
    importlib.import_module(name.partition(":")[0])
    with pytest.raises(tk.UnsafeFileError, match="allowed_modules"):
        resolve(name, Trust(), where="x", call=True)
    with pytest.raises(tk.UnsafeFileError):
        resolve(name, Trust(), where="x", call=False)


def test_decoding_a_hostile_recipe_runs_nothing(tmp_path):
    canary = tmp_path / "canary"
    calls = [
        {"call": "os:system", "args": [f"touch {canary}"], "kwargs": {}},
        {
            "call": "torch.nn.modules.container:Sequential",
            "args": [{"$module": {"call": "os:system", "args": [f"touch {canary}"], "kwargs": {}}}],
            "kwargs": {},
        },
        {
            "call": "torch.nn.modules.linear:Linear",
            "args": [],
            "kwargs": {"in_features": {"$ref": "os:system"}},
        },
    ]
    for recipe in calls:
        with pytest.raises(tk.UnsafeFileError):
            decode_recipe(recipe, Trust(), where="x").build()
    assert not canary.exists()


@pytest.mark.parametrize(
    "name",
    [
        "os.system",
        "os:",
        ":system",
        "os:1abc",
        "os:a-b",
        "os:path..join",
        "builtins:__import__",
        "os:__loader__",
        "torch.nn:Module.__subclasses__",
    ],
)
def test_resolve_rejects_malformed_names(name):
    for trust in (Trust(), Trust(trust_code=True)):
        with pytest.raises(tk.CorruptCheckpointError):
            resolve(name, trust, where="x", call=True)


def test_resolve_rejects_malformed_module_names_under_trust_code():
    # A relative or otherwise invalid module name is a malformed recipe, however far the
    # caller trusts the file.
    with pytest.raises(tk.CorruptCheckpointError):
        resolve("..evil:Net", Trust(trust_code=True), where="x", call=True)


@pytest.mark.parametrize(
    "recipe",
    [
        None,
        {"call": 5},
        {"args": []},
        {"call": "torch.nn.modules.linear:Linear", "args": {"a": 1}, "kwargs": {}},
        {"call": "torch.nn.modules.linear:Linear", "args": [], "kwargs": []},
        {"call": "torch.nn.modules.linear:Linear", "args": [{"$pickle": "x"}], "kwargs": {}},
        {"call": "torch.nn.modules.linear:Linear", "args": [{"$dtype": "Tensor"}], "kwargs": {}},
        {"call": "torch.nn.modules.linear:Linear", "args": [{"$dict": [[1]]}], "kwargs": {}},
        {"call": "torch.nn.modules.linear:Linear", "args": [{"a": 1, "b": 2}], "kwargs": {}},
    ],
)
def test_decode_rejects_malformed_recipes(recipe):
    with pytest.raises(tk.CorruptCheckpointError):
        decode_recipe(recipe, Trust(), where="x")


# ---------------------------------------------------------------------------------------------
# 7. errors


def test_save_model_refuses_what_it_cannot_save(tmp_path):
    with pytest.raises(tk.UnsupportedObjectError, match=re.escape("nn.Module")):
        tk.save_model({"w": torch.ones(2)}, tmp_path / "model")  # type: ignore[arg-type]
    with pytest.raises(tk.UnsupportedObjectError, match="save_weights"):
        tk.save_model(SimpleNet(), tmp_path / "model.safetensors")
    for bad in ([1, 2], "x", {"x": torch.ones(1, 10)}, (torch.ones(1, 10), 3)):
        with pytest.raises(tk.UnsupportedObjectError, match="example_inputs"):
            tk.save_model(SimpleNet(), tmp_path / "model", example_inputs=bad)
    assert list(tmp_path.iterdir()) == []


def test_save_model_without_a_recipe_says_how_to_give_one(tmp_path):
    with pytest.raises(tk.UnsupportedObjectError) as refused:
        tk.save_model(Unstored(3), tmp_path / "model")
    message = str(refused.value)
    assert "tk.capture()" in message
    assert "'width'" in message
    assert "recipe=" in message and "example_inputs" in message
    assert not (tmp_path / "model").exists()


def test_save_model_refuses_a_class_defined_in_a_function(tmp_path):
    class Local(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(2, 2)

    with pytest.raises(tk.UnsupportedObjectError, match="top level"):
        tk.save_model(Local(), tmp_path / "model")


def test_load_model_on_weights_or_state_points_to_load_weights(tmp_path):
    tk.save_weights(SimpleNet(), tmp_path / "weights.safetensors")
    with pytest.raises(tk.UnsupportedFormatError, match="load_weights"):
        tk.load_model(tmp_path / "weights.safetensors")
    tk.save({"model": SimpleNet().state_dict(), "epoch": 1}, tmp_path / "state")
    with pytest.raises(tk.UnsupportedFormatError, match="load_weights"):
        tk.load_model(tmp_path / "state")


def test_load_model_on_a_missing_path(tmp_path):
    with pytest.raises(tk.CheckpointNotFoundError):
        tk.load_model(tmp_path / "nothing")
    with pytest.raises(tk.CheckpointNotFoundError):
        tk.load_model(tmp_path / "nothing.safetensors")


def test_changed_shapes_are_a_state_mismatch(tmp_path, monkeypatch):
    tk.save_model(GlobalWidth(), tmp_path / "model")
    monkeypatch.setattr(sys.modules[HERE], "WIDTH", 5)
    with pytest.raises(tk.StateMismatchError, match=re.escape("fc.weight")):
        tk.load_model(tmp_path / "model")


def test_changed_modules_are_a_state_mismatch(tmp_path, monkeypatch):
    tk.save_model(MaybeExtra(), tmp_path / "model")
    monkeypatch.setattr(sys.modules[HERE], "EXTRA", True)
    with pytest.raises(tk.StateMismatchError, match=re.escape("extra.weight")):
        tk.load_model(tmp_path / "model")


def test_corrupted_shard_is_refused(tmp_path):
    tk.save_model(SimpleNet(), tmp_path / "model")
    (shard,) = (tmp_path / "model").glob("shard-*.safetensors")
    flip_byte(shard, shard.stat().st_size - 1)  # tensor data sits at the end
    with pytest.raises(tk.CorruptCheckpointError):
        tk.load_model(tmp_path / "model")
    assert not tk.verify(tmp_path / "model").ok


# ---------------------------------------------------------------------------------------------
# 8. torch.save files


def test_pickled_model_is_refused_without_trust_and_runs_nothing(tmp_path):
    canary = tmp_path / "canary"
    torch.save(PickledCanaryNet(str(canary)), tmp_path / "model.pt")
    with pytest.raises(tk.UnsafeFileError) as refused:
        tk.load_model(tmp_path / "model.pt")
    message = str(refused.value)
    assert "torchkeep scan" in message and "trust_code" in message
    assert "PickledCanaryNet" in message
    assert not canary.exists()


def test_pickled_model_loads_with_trust_code(tmp_path):
    canary = tmp_path / "canary"
    model = PickledCanaryNet(str(canary))
    torch.save(model, tmp_path / "model.pt")
    loaded = tk.load_model(tmp_path / "model.pt", trust_code=True)
    assert canary.exists()  # the pickle's code ran, as asked
    assert type(loaded) is PickledCanaryNet
    assert not loaded.training
    assert_same_state(model, loaded)
    as_bf16 = tk.load_model(tmp_path / "model.pt", trust_code=True, dtype=torch.bfloat16)
    assert as_bf16.fc.weight.dtype == torch.bfloat16


def test_pickled_state_dict_points_to_load_weights(tmp_path):
    torch.save(SimpleNet().state_dict(), tmp_path / "weights.pt")
    with pytest.raises(tk.UnsupportedFormatError, match="load_weights"):
        tk.load_model(tmp_path / "weights.pt")


# ---------------------------------------------------------------------------------------------
# 9. verify and describe


def test_verify_and_describe_a_saved_model(tmp_path):
    with tk.capture():
        model = TiedLM()
    tk.save_model(
        model, tmp_path / "model", example_inputs=torch.tensor([[1, 2, 3]]), metadata={"epoch": 3}
    )
    report = tk.verify(tmp_path / "model")
    assert report.ok and report.problems == () and report.checksummed
    info = tk.describe(tmp_path / "model")
    assert info.kind == "model"
    assert info.format == "torchkeep directory"
    assert info.metadata == {"epoch": 3}
    names = {t.name for t in info.tensors} | set(info.aliases)
    assert names == set(model.state_dict())
    assert len(info.tensors) == len(model.state_dict()) - 1  # the tied weight is stored once
    summary = info.model
    assert summary is not None
    assert summary["class"] == f"{TiedLM.__module__}:TiedLM"
    assert summary["recipe"] == f"{TiedLM.__module__}.TiedLM()"
    assert summary["recipe_modules"] == [TiedLM.__module__]
    assert summary["program"]["file"] == "program.pt2"
    assert summary["architecture"]["children"]["head"]["type"] == "torch.nn.modules.linear:Linear"
    assert tk.describe(tmp_path / "model").model == summary


# ---------------------------------------------------------------------------------------------
# 10. atomic saves


def test_saving_over_a_model_replaces_it(tmp_path):
    path = tmp_path / "model"
    tk.save_model(Unstored(3), path, example_inputs=torch.randn(2, 3))
    assert (path / "program.pt2").exists()
    second = Stored(3, hidden=5)
    round_trip(second, path, torch.randn(2, 3))
    assert not (path / "program.pt2").exists()  # nothing left from the first save
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]
    assert tk.verify(path).ok


def test_failed_export_leaves_the_previous_save(tmp_path):
    path = tmp_path / "model"
    first = SimpleNet()
    x = torch.randn(2, 10)
    with torch.no_grad():
        expected = first(x)
    tk.save_model(first, path)
    before = {p.name: p.read_bytes() for p in path.iterdir()}
    with pytest.raises(tk.UnsupportedObjectError, match=re.escape("torch.export")):
        tk.save_model(Branchy(), path, example_inputs=torch.randn(2, 4))
    assert {p.name: p.read_bytes() for p in path.iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]
    with torch.no_grad():
        assert torch.equal(tk.load_model(path)(x), expected)


def test_failed_export_message_says_how_to_keep_only_the_recipe(tmp_path):
    for dynamic_batch in (True, False):
        with pytest.raises(tk.UnsupportedObjectError) as refused:
            tk.save_model(
                Branchy(),
                tmp_path / "model",
                example_inputs=torch.randn(2, 4),
                dynamic_batch=dynamic_batch,
            )
        # "save it without example_inputs to keep only the recipe", in both cases
        assert "without example_inputs" in str(refused.value), str(refused.value)


def test_capture_keeps_a_running_profiler_informed(tmp_path):
    seen: list[str] = []

    def profiler(frame, event, arg):
        if event == "call":
            seen.append(frame.f_code.co_name)

    sys.setprofile(profiler)
    try:
        with tk.capture():
            model = resnet_like(num_classes=3)
    finally:
        sys.setprofile(None)
    assert "resnet_like" in seen
    tk.save_model(model, tmp_path / "model")
    assert model_section(tmp_path / "model")["recipe"]["call"].endswith(":resnet_like")


class ReadsATensorInInit(nn.Module):
    """A constructor that reads a tensor's value, which the meta device cannot give."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(3, int(torch.tensor([2.0]).item()))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.linear(x)
        return out


def test_a_constructor_that_cannot_run_on_meta_is_built_on_the_cpu_when_allowed(tmp_path):
    model = ReadsATensorInInit()
    # Building on the CPU allocates what the constructor asks for: only for allowed code.
    with pytest.raises(tk.UnsupportedObjectError, match="allowed_modules"):
        round_trip(model, tmp_path / "model", torch.randn(2, 3))
    loaded = round_trip(model, tmp_path / "model", torch.randn(2, 3), allowed=(HERE,))
    assert loaded.linear.weight.shape == (2, 3)


class Tempered(nn.Module):
    """Keeps a value derived from its argument under the argument's name."""

    def __init__(self, temperature: float = 1.0) -> None:
        super().__init__()
        self.temperature = 1 / temperature
        self.linear = nn.Linear(3, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.linear(x) * self.temperature
        return out


def test_plain_attributes_come_back_as_saved(tmp_path):
    model = Tempered(temperature=4.0)  # self.temperature == 0.25: inferred as the argument
    model.linear.note = "set after construction"  # not the class's: never set from a file
    loaded = round_trip(model, tmp_path / "model", torch.randn(2, 3))
    assert loaded.temperature == 0.25 and not hasattr(loaded.linear, "note")
