"""The `kernels/` folder is installed as `ulvideo.kernels` (through the `ulvideo/kernels` link); run
from the checkout's root (where `python -m ...` puts it on sys.path) it must not hide an installed
PyPI package named `kernels`."""
import importlib.metadata
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_top_level_kernels_is_the_installed_package_not_this_folder():
    try:
        dist = importlib.metadata.distribution("kernels")
    except importlib.metadata.PackageNotFoundError:
        pytest.skip("no PyPI `kernels` package installed")
    code = ("import kernels, ulvideo.kernels, pathlib; "
            "import ulvideo.kernels.reference as ref; "
            "print(pathlib.Path(kernels.__file__).resolve()); print(pathlib.Path(ref.__file__).resolve())")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True).stdout.split()
    top, ours = map(Path, out)
    assert ours == (ROOT / "kernels" / "reference.py").resolve()
    assert top != ours
    assert top.is_relative_to(Path(dist.locate_file("")).resolve())
