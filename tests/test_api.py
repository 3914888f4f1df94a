from __future__ import annotations

import subprocess
import sys

import torchkeep as tk


def test_all_is_sorted_and_complete():
    assert tk.__all__ == sorted(tk.__all__)
    for name in tk.__all__:
        assert hasattr(tk, name), name
    public = {n for n in dir(tk) if (not n.startswith("_") and n[0].isupper()) or n in tk.__all__}
    assert public <= set(tk.__all__) | {"annotations"}


def test_error_tree():
    assert issubclass(tk.CheckpointNotFoundError, FileNotFoundError)
    assert issubclass(tk.StorageError, OSError)
    assert issubclass(tk.MissingDependencyError, ImportError)
    assert issubclass(tk.UnsupportedObjectError, TypeError)
    for name in tk.__all__:
        obj = getattr(tk, name)
        if isinstance(obj, type) and name.endswith("Error"):
            assert issubclass(obj, tk.TorchkeepError), name


def test_import_stays_light():
    code = (
        "import sys, torchkeep, torchkeep.integrations; "
        "heavy = {'rich', 'fsspec', 's3fs', 'safetensors', 'numpy.random', 'sklearn', "
        "'lightning', 'lightning_fabric', 'pytorch_lightning', 'transformers', 'accelerate'}; "
        "print(sorted(heavy & set(sys.modules)))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
