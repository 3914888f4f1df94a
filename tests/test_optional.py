"""Optional extras: one way to say that one is missing, and how to install it."""

from __future__ import annotations

import pytest

import torchkeep as tk
from torchkeep._optional import importing, install_command, installed, missing


def test_a_missing_import_names_the_extra_to_install():
    what = "reading URLs needs a package ({error})"
    with (
        pytest.raises(tk.MissingDependencyError) as info,
        importing("remote", what, also=" and more"),
    ):
        import torchkeep_no_such_package  # noqa: F401
    message = str(info.value)
    assert message.startswith("reading URLs needs a package (No module named ")
    assert message.endswith("; install it with: pip install 'torchkeep[remote]' and more")
    assert isinstance(info.value.__cause__, ModuleNotFoundError)


def test_a_missing_dependency_inside_passes_through_unchanged():
    inner = missing("demo", "inner")
    with pytest.raises(tk.MissingDependencyError) as info, importing("plot", "outer"):
        raise inner
    assert info.value is inner


def test_an_unknown_extra_is_a_usage_error():
    with pytest.raises(ValueError, match="'gpu' is not an extra of torchkeep"):
        install_command("gpu")


def test_installed_looks_without_importing():
    assert installed("torch")
    assert not installed("torchkeep_no_such_package")
