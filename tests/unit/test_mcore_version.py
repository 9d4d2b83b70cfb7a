"""megamod.mcore_version: the supported megatron-core range, the start-up refusal of others, and the package's
requirements (setup.py) and test environments (requirements*.txt) agreeing with it."""
from __future__ import annotations

import ast
import os
import re

import pytest

from megamod import mcore_version

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.mark.parametrize("version, series", [
    ("0.16.1", "0.16"), ("0.16.2", "0.16"), ("0.19.0", "0.19"), ("0.19.2", "0.19"),
    ("0.19.2+98c7568", "0.19"),  # 0.19's package_info appends the git hash of the repository it sits in
    ("0.19.3rc0", "0.19"),
])
def test_supported_versions_map_to_their_series(version, series):
    assert mcore_version.series(version) == series


@pytest.mark.parametrize("version", ["0.15.3", "0.16.0", "0.17.1", "0.18.2", "0.20.0", "1.0.0", "0.18.2+abc"])
def test_unsupported_version_is_refused_naming_version_and_range(version):
    with pytest.raises(mcore_version.UnsupportedMegatronCore) as info:
        mcore_version.series(version)
    message = str(info.value)
    assert f"megatron-core {version} is installed" in message
    assert mcore_version.SUPPORTED in message and "0.16.x and 0.19.x" in message


def test_installed_version_is_supported():
    assert mcore_version.check() in mcore_version.SERIES


def test_initialize_refuses_unsupported_megatron_before_starting(monkeypatch):
    """The start-up check runs first, on the GPU path too (where cpu_compat, which checks as well, is not used)."""
    import torch
    from megatron.core import package_info

    from megamod import distributed

    monkeypatch.setattr(package_info, "__version__", "0.17.1")
    monkeypatch.setattr(distributed, "_use_cuda", lambda: True)
    monkeypatch.setattr(torch.cuda, "set_device", lambda *a: pytest.fail("CUDA set up with an unsupported megatron"))
    monkeypatch.setattr(torch.distributed, "init_process_group",
                        lambda *a, **k: pytest.fail("init_process_group reached with an unsupported megatron-core"))
    with pytest.raises(mcore_version.UnsupportedMegatronCore, match=r"megatron-core 0\.17\.1 is installed"):
        distributed.initialize()


def _setup_py_range() -> str:
    """Run setup.py's own _megatron_core_range (setup.py itself cannot be imported: it calls setup())."""
    path = os.path.join(REPO, "setup.py")
    tree = ast.parse(open(path).read())
    func = next(n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == "_megatron_core_range")
    namespace = {"os": os, "re": re, "HERE": REPO}
    exec(compile(ast.Module(body=[func], type_ignores=[]), path, "exec"), namespace)
    return namespace["_megatron_core_range"]()


def test_package_requires_the_checked_range_and_test_pins_lie_in_it():
    assert _setup_py_range() == mcore_version.SUPPORTED
    pins = {}
    for name in ("requirements.txt", "requirements-mcore019.txt"):
        text = open(os.path.join(REPO, name)).read()
        pins[name] = re.search(r"^megatron-core==(\S+)$", text, re.M).group(1)
    assert {mcore_version.series(v) for v in pins.values()} == set(mcore_version.SERIES), pins
