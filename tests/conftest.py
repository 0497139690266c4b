"""Suite-wide: the slow tests start first, so that on two workers
(``pytest -n 2``) the longest ones do not come last and leave a worker idle."""

from __future__ import annotations

import pytest


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    items.sort(key=lambda item: item.get_closest_marker("slow") is None)
