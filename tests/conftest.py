"""Shared fixtures: real images built by qemu-img/qemu-io (see tests/oracle.py).

The QEMU tools are required: without them these fixtures raise (tests FAIL, never skip).
Corpus images are shared by the whole session; treat them as read-only and use
``oracle.copy_sample(sample, tmp_path)`` before modifying one.
"""

from __future__ import annotations

import pytest

# the assert_* helpers shared by the oracle tests report like asserts in a test module
pytest.register_assert_rewrite("checks")

try:  # tests/ is on sys.path (pytest "prepend" import mode, no tests/__init__.py)
    import oracle
except ImportError:  # pragma: no cover - tests/ turned into a package
    from tests import oracle


@pytest.fixture(scope="session")
def qcow2_corpus(tmp_path_factory) -> dict[str, "oracle.Sample"]:
    """name -> oracle.Sample for every image built by ``oracle.build_qcow2_corpus``."""
    oracle.require_tools()
    return oracle.build_qcow2_corpus(tmp_path_factory.mktemp("corpus"))


@pytest.fixture(scope="session")
def raw_sample(tmp_path_factory) -> "oracle.Sample":
    """A sparse raw image (truncate + data at a few offsets), independent of the corpus."""
    oracle.require_tools()
    return oracle.build_raw_sample(tmp_path_factory.mktemp("raw"))


@pytest.fixture(scope="session")
def vmdk_corpus(tmp_path_factory) -> dict[str, "oracle.VmdkSample"]:
    """name -> oracle.VmdkSample for every image built by ``oracle.build_vmdk_corpus``."""
    oracle.require_tools()
    return oracle.build_vmdk_corpus(tmp_path_factory.mktemp("vmdk_corpus"))
