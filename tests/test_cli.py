from __future__ import annotations

import subprocess
import sys

import pytest
import torch

import torchkeep as tk
from conftest import TiedLM
from torchkeep.cli import main


def _corrupt(path, at_from_end: int = 10) -> None:
    data = bytearray(path.read_bytes())
    data[-at_from_end] ^= 0xFF
    path.write_bytes(bytes(data))


def test_inspect(tmp_path, capsys):
    tk.save_weights(TiedLM(), tmp_path / "lm.safetensors", metadata={"run": "a"})
    assert main(["inspect", str(tmp_path / "lm.safetensors")]) == 0
    out = capsys.readouterr().out
    assert "embed.weight" in out and "F32" in out and "[50, 16]" in out
    assert "tied: head.weight = embed.weight" in out
    assert '"run": "a"' in out and "torchkeep file, weights" in out


def test_verify_ok_and_corrupt(tmp_path, capsys):
    good, bad = tmp_path / "good.safetensors", tmp_path / "bad.safetensors"
    tk.save({"w": torch.randn(100), "b": torch.ones(3)}, good)
    tk.save({"w": torch.randn(100), "b": torch.ones(3)}, bad)
    _corrupt(bad, at_from_end=20)  # inside 'b'... or 'w': either is named
    assert main(["verify", str(good)]) == 0
    assert "ok" in capsys.readouterr().out
    assert main(["verify", str(good), str(bad)]) == 1
    out = capsys.readouterr().out
    assert "CORRUPT" in out and "does not match its checksum" in out


def test_missing_path_is_a_usage_error(tmp_path, capsys):
    assert main(["inspect", str(tmp_path / "nothing.safetensors")]) == 2
    assert "nothing.safetensors" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        main(["frobnicate"])
    assert e.value.code == 2


def test_damaged_header_is_a_problem(tmp_path, capsys):
    path = tmp_path / "x.safetensors"
    path.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json}      ")
    assert main(["inspect", str(path)]) == 1
    assert "invalid JSON" in capsys.readouterr().err
    assert main(["verify", str(path)]) == 1


def test_bench_without_safetensors_names_the_extra():
    code = (
        "import sys; sys.modules['safetensors'] = None; "
        "from torchkeep.cli import main; sys.exit(main(['bench', '--size-mib', '1']))"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.returncode == 1
    assert "pip install 'torchkeep[bench]'" in done.stderr


def test_bench_plot_without_matplotlib_names_the_extra_before_running():
    code = (
        "import sys; sys.modules['matplotlib'] = None; "
        "from torchkeep.cli import main; "
        "sys.exit(main(['bench', '--size', '1MiB', '--plot', 'x.png']))"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.returncode == 1
    assert "pip install 'torchkeep[plot]'" in done.stderr
    assert "torchkeep bench" not in done.stdout  # refused before any run started


def _evil_pth(tmp_path):
    import os as _os

    class Evil:
        def __reduce__(self):
            return (_os.system, (f"touch {tmp_path / 'canary'}",))

    path = tmp_path / "evil.pth"
    torch.save({"w": torch.ones(2), "evil": Evil()}, path)
    return path


def test_scan_command(tmp_path, capsys):
    torch.save({"w": torch.ones(2)}, tmp_path / "ok.pth")
    assert main(["scan", str(tmp_path / "ok.pth")]) == 0
    assert "safe" in capsys.readouterr().out
    evil = _evil_pth(tmp_path)
    assert main(["scan", str(evil)]) == 1
    out = capsys.readouterr().out
    assert "UNSAFE" in out and "posix.system" in out
    assert main(["scan", "--json", str(evil)]) == 1
    assert '"unsafe"' in capsys.readouterr().out
    assert not (tmp_path / "canary").exists()


def test_convert_and_diff_commands(tmp_path, capsys):
    model = TiedLM()
    torch.save(model.state_dict(), tmp_path / "m.pth")
    out16 = tmp_path / "m16.safetensors"
    assert main(["convert", str(tmp_path / "m.pth"), str(out16), "--dtype", "fp16"]) == 0
    assert "wrote" in capsys.readouterr().out
    assert tk.load_state_dict(out16)["embed.weight"].dtype == torch.float16
    assert main(["convert", str(tmp_path / "m.pth"), str(tmp_path / "m.safetensors")]) == 0
    capsys.readouterr()
    assert main(["diff", str(tmp_path / "m.pth"), str(tmp_path / "m.safetensors")]) == 0
    assert "same" in capsys.readouterr().out
    assert main(["diff", str(tmp_path / "m.pth"), str(out16)]) == 1
    assert "dtype float32 → float16" in capsys.readouterr().out
    assert main(["diff", "--json", str(tmp_path / "m.pth"), str(out16)]) == 1
    assert '"same": false' in capsys.readouterr().out
    assert (
        main(["convert", str(tmp_path / "m.pth"), str(tmp_path / "hf"), "--max-shard-size", "huge"])
        == 2
    )
    assert "size" in capsys.readouterr().err


def test_inspect_json_and_torch_files(tmp_path, capsys):
    torch.save({"w": torch.ones(2, 3)}, tmp_path / "w.pth")
    assert main(["inspect", "--json", str(tmp_path / "w.pth")]) == 0
    out = capsys.readouterr().out
    assert '"torch zip (pickle)"' in out and '"w"' in out
    assert main(["verify", "--json", str(tmp_path / "w.pth")]) == 0
    assert '"ok": true' in capsys.readouterr().out
    assert main(["inspect", str(_evil_pth(tmp_path))]) == 1
    assert "posix.system" in capsys.readouterr().err


@pytest.mark.parametrize(
    "command",
    [
        ["inspect", "{w}"],
        ["verify", "{w}"],
        ["scan", "{w}"],
        ["convert", "{w}", "{dir}/out.safetensors"],
        ["diff", "{w}", "{w}"],
        ["convert", "--help"],
    ],
    ids=lambda c: c[0] if c[-1] != "--help" else "help",
)
def test_every_command_in_a_real_process(tmp_path, command):
    weights = tmp_path / "w.safetensors"
    tk.save_weights(TiedLM(), weights)
    argv = [part.format(w=weights, dir=tmp_path) for part in command]
    done = subprocess.run(
        [sys.executable, "-m", "torchkeep", *argv], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout.strip()


def test_inspect_summarises_modules_and_optimizer(tmp_path, capsys):
    from conftest import TheModelClass

    model = TheModelClass()
    optimizer = torch.optim.Adam(model.parameters(), lr=0.01)
    model(torch.randn(1, 3, 32, 32)).sum().backward()
    optimizer.step()
    tk.save_checkpoint(tmp_path / "c.safetensors", model=model, optimizer=optimizer)
    info = tk.describe(tmp_path / "c.safetensors")
    assert info.modules["fc1"] == 400 * 120 + 120 and sum(info.modules.values()) == 62006
    assert "state for 10 parameters (exp_avg, exp_avg_sq, step)" in info.optimizer
    assert main(["inspect", str(tmp_path / "c.safetensors")]) == 0
    out = capsys.readouterr().out
    assert "parameters: 62,006 in all" in out
    # One row per module, its name then its count: readable without knowing a format.
    rows = {line.split("│")[0].strip(): line.split("│")[1].strip() for line in out.splitlines() if line.count("│") == 1}
    assert rows["fc1"] == "48,120" and rows["conv1"] == "456"
    assert "(conv1" not in out


def test_inspect_lists_at_most_twelve_modules_unless_all(tmp_path, capsys):
    model = torch.nn.Sequential(*[torch.nn.Linear(2, 2) for _ in range(15)])
    tk.save_weights(model, tmp_path / "m.safetensors")
    assert main(["inspect", str(tmp_path / "m.safetensors")]) == 0
    out = capsys.readouterr().out
    assert "parameters: 90 in all" in out and "… and 3 more modules (--all" in out
    assert main(["inspect", "--all", str(tmp_path / "m.safetensors")]) == 0
    assert "more modules" not in capsys.readouterr().out


def test_diff_shows_a_random_generator_state_and_long_lists_as_one_row(tmp_path, capsys):
    import json
    import random

    model = torch.nn.Linear(4, 2)
    state = {"model": model, "rng": tk.RNGState(), "history": [0.5] * 40, "epoch": 1}
    tk.save(state, tmp_path / "a.safetensors")
    for _ in range(700):  # past the Mersenne twister's 624 words: it regenerates them all
        random.random()
    torch.rand(3)
    with torch.no_grad():
        model.weight.add_(1)
    state.update(history=[0.5] * 20 + [0.25] * 25, epoch=2)
    tk.save(state, tmp_path / "b.safetensors")
    a, b = str(tmp_path / "a.safetensors"), str(tmp_path / "b.safetensors")
    assert main(["diff", a, b]) == 1
    out = capsys.readouterr().out
    rows = [line for line in out.splitlines() if line.count("│") == 2]
    assert len(rows) == 4, out  # epoch, history, model.weight, rng
    assert any("rng" in r and "random generator state: " in r and " changed" in r for r in rows)
    assert any("history[…]" in r and "5 added, 20 changed" in r for r in rows)
    assert any("model.weight" in r and "values" in r for r in rows)
    assert "--json lists every entry" in out
    # --json keeps every entry.
    assert main(["diff", "--json", a, b]) == 1
    detail = json.loads(capsys.readouterr().out)
    names = {c["name"] for c in detail["changed"]} | set(detail["added"])
    assert "history.40" in detail["added"] and "history.25" in names and "history.0" not in names
    assert sum(n.startswith("rng.python.state.") for n in names) > 500
    # --limit bounds the rows, grouped or not.
    assert main(["diff", "--limit", "2", a, b]) == 1
    assert "… and 2 more (--limit to show more)" in capsys.readouterr().out


class Deployable(torch.nn.Module):
    def __init__(self, width: int = 32) -> None:
        super().__init__()
        self.width = width
        self.body = torch.nn.Sequential(
            torch.nn.Linear(8, width), torch.nn.ReLU(), torch.nn.Linear(width, 3)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.body(x)
        return out


def test_inspect_a_saved_model_shows_how_it_rebuilds(tmp_path, capsys):
    tk.save_model(Deployable(width=16), tmp_path / "model", example_inputs=torch.randn(1, 8))
    assert main(["inspect", str(tmp_path / "model")]) == 0
    out = capsys.readouterr().out
    assert f"rebuilt by: {Deployable.__module__}.Deployable(width=16)" in out
    assert "exported program: program.pt2" in out and "[batch, 8] float32" in out
    assert "body: Sequential 195 parameters" in out and "0: Linear 144 parameters" in out


def test_convert_a_model_for_deployment_reports_size_and_output_difference(tmp_path, capsys):
    model = Deployable()
    tk.save_model(model, tmp_path / "model", example_inputs=torch.randn(1, 8))
    target = tmp_path / "model-bf16"
    assert main(["convert", str(tmp_path / "model"), str(target), "--dtype", "bf16"]) == 0
    capsys.readouterr()
    assert main(["inspect", str(target)]) == 0
    out = capsys.readouterr().out
    assert "converted to bfloat16 from model:" in out and "output difference: max abs" in out
    info = tk.describe(target)
    assert {t.dtype for t in info.tensors} == {"BF16"}
    assert info.file_bytes < tk.describe(tmp_path / "model").file_bytes
    converted = info.model["converted"]
    difference = float(converted["output_difference"].split()[2])
    assert 0 < difference < 0.1
    loaded = tk.load_model(target)
    x = torch.randn(4, 8)
    assert torch.allclose(loaded(x.bfloat16()).float(), model.eval()(x), atol=0.1)


def test_diff_folds_plain_values_only(tmp_path, capsys):
    """Tensors in a list keep a row each; a top-level list of numbers is one row; a generator
    state only one save has is one row that says so; names are never read as markup."""
    tk.save({"w": [torch.zeros(2)], "[red]x[/red]": 1.0}, tmp_path / "a.safetensors")
    tk.save(
        {"w": [torch.zeros(2), torch.ones(2), torch.ones(3)], "[red]x[/red]": 2.0, "rng": tk.RNGState()},
        tmp_path / "b.safetensors",
    )
    assert main(["diff", str(tmp_path / "a.safetensors"), str(tmp_path / "b.safetensors")]) == 1
    out = capsys.readouterr().out
    assert "w.1" in out and "w.2" in out and "w[…]" not in out
    assert "random generator state: " in out and " added" in out
    assert "[red]x[/red]" in out
    tk.save([0.5] * 30, tmp_path / "c.safetensors")
    tk.save([0.25] * 30, tmp_path / "d.safetensors")
    assert main(["diff", str(tmp_path / "c.safetensors"), str(tmp_path / "d.safetensors")]) == 1
    out = capsys.readouterr().out
    assert "(the saved object)[…]" in out and "values 30 changed" in out
    assert len([line for line in out.splitlines() if line.count("│") == 2]) == 1
