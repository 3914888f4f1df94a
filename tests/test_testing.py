"""``torchkeep.testing``: its test doubles import nothing heavy until they are used."""

from __future__ import annotations

import subprocess
import sys


def test_importing_the_test_doubles_stays_light():
    code = (
        "import sys, torchkeep.testing; "
        "heavy = {'moto', 'boto3', 'botocore', 'fsspec', 's3fs', 'pytest', 'rich'}; "
        "print(sorted(heavy & set(sys.modules)))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_a_faulty_storage_names_a_real_step_and_action():
    import pytest

    from torchkeep.testing import FaultyStorage

    with pytest.raises(ValueError, match="'close' is not a step of the write path; one of mkdir, open"):
        FaultyStorage("close")
    with pytest.raises(ValueError, match="action 'crash' is neither 'raise' nor 'exit'"):
        FaultyStorage("rename", "crash")
