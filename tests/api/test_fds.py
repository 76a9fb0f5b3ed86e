"""The open files limit: raised to the hard limit at start, and the HTTP share of it."""

from __future__ import annotations

import resource
import shutil
import subprocess
import sys

import pytest

from api.fds import http_connection_limit


def test_http_gets_a_quarter_of_the_descriptors_at_most() -> None:
    assert http_connection_limit(256, 1024) == 256
    assert http_connection_limit(256, 512) == 128
    assert http_connection_limit(256, 65536) == 256
    assert http_connection_limit(4096, 8192) == 2048
    assert http_connection_limit(256, 3) == 1
    assert http_connection_limit(256, resource.RLIM_INFINITY) == 256


def test_the_soft_limit_is_raised_to_the_hard_one_at_start() -> None:
    prlimit = shutil.which("prlimit")
    if prlimit is None:
        pytest.fail("prlimit not found: install util-linux")
    child = (
        "import resource; from api.fds import raise_soft_limit; "
        "print(raise_soft_limit(), *resource.getrlimit(resource.RLIMIT_NOFILE))"
    )
    done = subprocess.run(
        [prlimit, "--nofile=1024:4096", "--", sys.executable, "-c", child],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    assert done.stdout.split() == ["4096", "4096", "4096"]
