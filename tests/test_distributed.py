"""Distributed saves: real gloo process groups of 2 and 4 ranks on the CPU, DTensor state saved
by every rank and loaded resharded, in other groups and in a plain process."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

import torchkeep as tk
from dist_workers import full, run

pytestmark = pytest.mark.slow


def _spawn(tmp_path: Path, world: int, job: str, **args) -> None:
    out = tmp_path / f"out-{job}-{world}-{os.urandom(4).hex()}"
    out.mkdir()
    init = f"file://{tmp_path}/store-{os.urandom(6).hex()}"
    args = {"out": str(out), **args}
    try:
        mp.spawn(run, args=(world, init, job, args), nprocs=world, join=True)
    except mp.ProcessRaisedException:
        errors = [p.read_text() for p in sorted(out.glob("error-*.txt"))]
        pytest.fail("a rank failed:\n" + "\n".join(errors))
    return out


def test_four_ranks_save_each_their_shards(tmp_path):
    ckpt = tmp_path / "ckpt"
    out = _spawn(tmp_path, 4, "save", path=str(ckpt))
    files = sorted(p.name for p in ckpt.iterdir())
    assert files[0] == "manifest.json" and len(files) == 5, files  # one file per rank
    assert all((out / f"saved-{r}.txt").read_text().endswith("manifest.json") for r in range(4))
    manifest = json.loads((ckpt / "manifest.json").read_text())
    assert manifest["format_version"] == 2
    assert len(manifest["distributed"]["model.w"]["chunks"]) == 4
    assert len(manifest["distributed"]["model.r"]["chunks"]) == 1  # replicated: written once
    assert len(manifest["distributed"]["model.b"]["chunks"]) == 3  # 5 rows: 2+2+1, none empty
    # A plain process with no process group gets the whole tensors.
    assert not torch.distributed.is_initialized()
    state = tk.load(ckpt)
    expected = full()
    for name in ("w", "b", "r"):
        assert torch.equal(state["model"][name], expected[name])
    assert state["step"] == 7 and torch.equal(state["plain"], torch.full((3,), 5.0))
    report = tk.verify(ckpt)
    assert report.ok and report.tensors == 4  # w, b, r, plain: chunks count as their tensor
    described = tk.describe(ckpt)
    assert described.format == "torchkeep distributed directory"
    assert {t.name: t.shape for t in described.tensors} == {
        "model.w": (12, 10), "model.b": (5,), "model.r": (6,), "plain": (3,)
    }


@pytest.mark.parametrize(
    ("world", "placements", "map_location"),
    [(2, "rows", None), (2, "cols", None), (1, "rows", None), (2, "replicated", "cpu")],
)
def test_saved_by_four_loads_resharded(tmp_path, world, placements, map_location):
    ckpt = tmp_path / "ckpt"
    _spawn(tmp_path, 4, "save", path=str(ckpt))
    out = _spawn(tmp_path, world, "load", path=str(ckpt), placements=placements, map_location=map_location)
    assert sorted(p.name for p in out.glob("loaded-*")) == [f"loaded-{r}.txt" for r in range(world)]
    reads = _reads(out, world)
    chunks = {c["tensor"] for s in _manifest(ckpt)["distributed"].values() for c in s["chunks"]}
    assert set().union(*reads) == chunks
    if (world, placements) == (2, "rows"):
        # Rows of four ranks into rows of two: each rank reads the chunks of two of them (the
        # replicated tensor's one chunk, and b's chunk that straddles both halves, by both).
        assert reads[0] & reads[1] == {"model.r@0", "model.b@2"}
        assert [sorted({n.split("@")[1] for n in r if n.startswith("model.w")}) for r in reads] == [
            ["0,0", "3,0"], ["6,0", "9,0"]
        ]


def _reads(out: Path, world: int) -> list[set[str]]:
    return [set(json.loads((out / f"reads-{r}.json").read_text())) for r in range(world)]


def _manifest(ckpt: Path) -> dict:
    return json.loads((ckpt / "manifest.json").read_text())


def test_saved_column_wise_by_two_loads_row_wise_by_four(tmp_path):
    ckpt = tmp_path / "ckpt"
    _spawn(tmp_path, 2, "save", path=str(ckpt), placements="cols")
    _spawn(tmp_path, 4, "load", path=str(ckpt), placements="rows")


def test_a_rank_that_fails_commits_nothing_and_every_rank_raises(tmp_path):
    ckpt = tmp_path / "ckpt"
    _spawn(tmp_path, 2, "save", path=str(ckpt), seed=0)
    before = tk.load(ckpt)["model"]["w"]
    out = _spawn(tmp_path, 2, "save", path=str(ckpt), seed=5, fail_rank=1)
    raised = [(out / f"raised-{r}.txt").read_text() for r in range(2)]
    for text in raised:
        assert text.startswith("StorageError") and "failed on rank 1" in text and "nothing was committed" in text, text
    assert torch.equal(tk.load(ckpt)["model"]["w"], before)  # the previous save is intact
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".ckpt")) == []


def test_missing_rank_file_and_mixed_saves_are_refused(tmp_path):
    ckpt = tmp_path / "ckpt"
    _spawn(tmp_path, 2, "save", path=str(ckpt))
    other = tmp_path / "other"
    _spawn(tmp_path, 2, "save", path=str(other), seed=3)
    shards = sorted(p for p in ckpt.iterdir() if p.name.startswith("shard-"))
    foreign = sorted(p for p in other.iterdir() if p.name.startswith("shard-"))
    # A shard of another save under this save's name.
    (ckpt / shards[1].name).write_bytes(foreign[1].read_bytes())
    with pytest.raises(tk.CorruptCheckpointError, match=r"different saves|does not match|header"):
        tk.load(ckpt)
    shards[1].unlink()
    with pytest.raises(tk.CorruptCheckpointError, match="missing"):
        tk.load(ckpt)


def test_fsdp2_model_and_adam_saved_by_two_load_in_one_and_in_a_plain_process(tmp_path):
    ckpt = tmp_path / "ckpt"
    out = _spawn(tmp_path, 2, "fsdp_save", path=str(ckpt))
    expected = out / "expected.safetensors"
    # A fresh Adam's moments come back as DTensors placed like their parameters, and the next
    # step continues the saved run.
    chunks = {c["tensor"] for s in _manifest(ckpt)["distributed"].values() for c in s["chunks"]}
    # 2 moments x 6 parameters x 2 ranks, less the last layer's on rank 1, which holds none of
    # its single row (empty parts are not stored).
    assert sum(n.startswith("optimizer.") for n in chunks) == 20
    one = _spawn(tmp_path, 1, "fsdp_load", path=str(ckpt), expected=str(expected))
    assert _reads(one, 1) == [chunks]
    # The same two ranks: each reads only what it wrote, moments included.
    two = _spawn(tmp_path, 2, "fsdp_load", path=str(ckpt), expected=str(expected))
    reads = _reads(two, 2)
    assert not reads[0] & reads[1] and reads[0] | reads[1] == chunks
    # No process group: everything comes back whole, for a plain model and optimizer, and the
    # plain run's next step matches the sharded one's.
    model = torch.nn.Sequential(
        torch.nn.Linear(16, 32), torch.nn.ReLU(), torch.nn.Linear(32, 8), torch.nn.ReLU(), torch.nn.Linear(8, 1)
    )
    optimizer = torch.optim.Adam(model.parameters(), lr=0.5)
    tk.load(ckpt, into={"model": model, "optimizer": optimizer})
    reference = tk.load_state_dict(expected)
    for k, v in model.state_dict().items():
        assert torch.equal(v, reference[k]), k
    optimizer.zero_grad()
    model(torch.randn(4, 16, generator=torch.Generator().manual_seed(2))).sum().backward()
    optimizer.step()
    after = tk.load_state_dict(out / "after.safetensors")
    for k, v in model.state_dict().items():
        torch.testing.assert_close(v, after[k], rtol=1e-5, atol=1e-6)
    # Saved whole by a plain process, loaded into FSDP2 state by two ranks.
    plain = tmp_path / "plain.safetensors"
    tk.load(ckpt, into={"model": model, "optimizer": optimizer})
    tk.save_checkpoint(plain, model=model, optimizer=optimizer)
    _spawn(tmp_path, 2, "fsdp_load_whole", path=str(plain), expected=str(out / "after.safetensors"))


@pytest.mark.parametrize("world", [2, 1])
def test_dcp_checkpoint_of_four_ranks_loads_into_other_groups(tmp_path, world):
    ckpt = tmp_path / "dcp"
    _spawn(tmp_path, 4, "dcp_save", path=str(ckpt))
    assert (ckpt / ".metadata").exists()
    _spawn(tmp_path, world, "dcp_load", path=str(ckpt), placements="cols")


def test_checkpoint_manager_in_a_process_group(tmp_path):
    root = tmp_path / "run"
    _spawn(tmp_path, 2, "manager", root=str(root))
    assert sorted(p.name for p in root.iterdir() if not p.name.startswith(".")) == [
        "step_000000002",
        "step_000000003",
    ]
    # In a plain process: the latest step, whole.
    with tk.CheckpointManager(root) as mgr:
        state = {"model": {"w": torch.zeros(12, 10), "b": torch.zeros(5, dtype=torch.bfloat16), "r": torch.zeros(6)}, "step": 0}
        assert mgr.restore(state) == 3
        assert torch.equal(state["model"]["w"], full(seed=3)["w"])


def test_incremental_steps_in_a_process_group(tmp_path):
    root = tmp_path / "run"
    _spawn(tmp_path, 2, "incremental", root=str(root))
    step3 = root / "step_000000003"
    manifest = json.loads((step3 / "manifest.json").read_text())
    # Both ranks' files of step 1 hold frozen chunks: both are linked into step 3.
    assert len(manifest["shared"]) == 2 and manifest["format_version"] == 4
    assert tk.verify(step3).ok
    state = tk.load(step3)
    frozen = torch.randn(256, 1024, generator=torch.Generator().manual_seed(11))
    assert torch.equal(state["model"]["frozen"], frozen)
    assert torch.equal(state["model"]["w"], full(seed=3)["w"])


def test_save_with_a_base_in_a_process_group(tmp_path):
    first, second = tmp_path / "v1", tmp_path / "v2"
    out = _spawn(tmp_path, 2, "save_on_base", path=str(first), base=str(tmp_path / "missing"))
    raised = sorted(p.read_text() for p in out.glob("raised-*.txt"))
    assert len(raised) == 2 and all("CheckpointNotFoundError" in r for r in raised), raised
    assert not first.exists()
    tk.save({"x": torch.ones(2)}, first)  # another state: not a base of this one
    out = _spawn(tmp_path, 2, "save_on_base", path=str(second), base=str(first))
    raised = sorted(p.read_text() for p in out.glob("raised-*.txt"))
    assert len(raised) == 2 and all("StateMismatchError" in r for r in raised), raised
    _spawn(tmp_path, 2, "save", path=str(tmp_path / "plain"))
    import shutil

    shutil.rmtree(first)
    _spawn(tmp_path, 2, "save_on_base", path=str(first), base=str(tmp_path / "plain"))
    out = _spawn(tmp_path, 2, "save_on_base", path=str(second), base=str(first))
    shared = [int(p.read_text()) for p in out.glob("saved-*.txt")]
    assert len(shared) == 2 and shared[0] == shared[1] > 0
    assert tk.verify(second).ok
    assert torch.equal(tk.load(second)["model"]["w"], tk.load(first)["model"]["w"])


def test_two_ranks_save_to_object_storage(tmp_path, s3):
    root, opts = s3
    url = f"{root}/ckpt"
    _spawn(tmp_path, 2, "save", path=url, storage_options=opts)
    _spawn(tmp_path, 2, "save", path=url, storage_options=opts, seed=4)  # replaced in place
    state = tk.load(url, storage_options=opts)
    assert torch.equal(state["model"]["w"], full(seed=4)["w"])
    from torchkeep.storage import storage_for

    storage, _ = storage_for(url, opts)
    names = storage.list_dir(url)
    assert len(names) == 3 and "manifest.json" in names, names  # the first save's shards are gone


def test_a_value_one_rank_cannot_store_makes_every_rank_raise(tmp_path):
    ckpt = tmp_path / "ckpt"
    out = _spawn(tmp_path, 2, "save", path=str(ckpt), bad_rank=1)
    raised = [(out / f"raised-{r}.txt").read_text() for r in range(2)]
    assert all(text.startswith("UnsupportedObjectError") for text in raised), raised
    assert "rank 1" in raised[0] and "step" in raised[1], raised
    assert not ckpt.exists()


def test_a_dtensor_only_one_rank_holds_is_refused_on_every_rank(tmp_path):
    ckpt = tmp_path / "ckpt"
    out = _spawn(tmp_path, 2, "save", path=str(ckpt), extra_rank=1)
    raised = [(out / f"raised-{r}.txt").read_text() for r in range(2)]
    assert all(text.startswith("UnsupportedObjectError") for text in raised), raised
    assert all("rank 1" in text and "model.only_here" in text for text in raised), raised
    assert not ckpt.exists() and not list(tmp_path.glob(".*ckpt*"))


def test_tied_dtensors_come_back_tied(tmp_path):
    ckpt = tmp_path / "ckpt"
    _spawn(tmp_path, 2, "save", path=str(ckpt))
    state = tk.load(ckpt)
    assert state["model"]["tied"] is state["model"]["w"]
