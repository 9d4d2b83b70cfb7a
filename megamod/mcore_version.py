"""The megatron-core releases megamod supports, and the start-up check that refuses the others.

megamod reaches into megatron-core internals (cpu_compat's adjustments, a few private names in models/ and
training/) that move between releases, so only the series the test suite runs on are accepted: 0.16 (Python 3.11
and later, `make test`'s .venv) and 0.19 (Python 3.12, .venv312). setup.py reads SUPPORTED as the package's range.
`distributed.initialize` calls `check()`, so an unsupported install stops at start-up with the version and range
named, not deep inside megatron.
"""
from __future__ import annotations

from packaging.specifiers import SpecifierSet
from packaging.version import Version

SUPPORTED = ">=0.16.1,!=0.17.*,!=0.18.*,<0.20"
SERIES = ("0.16", "0.19")  # the minor series SUPPORTED admits; cpu_compat keys its adjustments by these


class UnsupportedMegatronCore(RuntimeError):
    pass


def installed() -> str:
    from megatron.core import package_info

    return package_info.__version__


def series(version: str | None = None) -> str:
    """'0.16' or '0.19' for a supported version (the installed one by default); raises for any other."""
    version = installed() if version is None else version
    parsed = Version(Version(version).public)  # 0.19's package_info appends the git hash of the cwd's repository
    # prereleases count: a 0.19.3rc0 is a 0.19; the release tags megatron-core ships are plain.
    if not SpecifierSet(SUPPORTED, prereleases=True).contains(parsed):
        raise UnsupportedMegatronCore(
            f"megatron-core {version} is installed; megamod supports megatron-core{SUPPORTED} "
            f"(the {' and '.join(s + '.x' for s in SERIES)} series): "
            f"pip install 'megatron-core{SUPPORTED}'"
        )
    return f"{parsed.major}.{parsed.minor}"


def check() -> str:
    """Start-up check of the installed megatron-core; returns its series."""
    return series()
