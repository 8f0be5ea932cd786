"""Every test gets its own checkpoint cache: nothing leaks into ~/.cache or between tests."""

import pytest


@pytest.fixture(autouse=True)
def isolated_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("PATCHBENCH_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"
