"""Without the binding, importing daemon.libvirt says which extra to install."""

from __future__ import annotations

import subprocess
import sys


def test_importing_without_libvirt_python_names_the_extra() -> None:
    # sys.modules[name] = None makes "import name" raise ImportError, as if not installed.
    code = "import sys; sys.modules['libvirt'] = None; import daemon.libvirt"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    assert done.returncode != 0
    assert "ImportError" in done.stderr
    assert "pip install 'reclaimd[libvirt]'" in done.stderr
    assert "libvirt-dev" in done.stderr


def test_importing_with_it_works() -> None:
    done = subprocess.run(
        [sys.executable, "-c", "import daemon.libvirt"], capture_output=True, text=True, check=False
    )
    assert done.returncode == 0, done.stderr
