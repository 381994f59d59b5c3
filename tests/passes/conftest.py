"""Fixtures for the passes' tests: captured prefill and decode graphs per family (``_graphs.py``)."""

import pytest

from _graphs import FAMILIES, capture


@pytest.fixture(scope="module", params=FAMILIES)
def graphs(request):
    return capture(request.param)


@pytest.fixture(scope="module")
def llama():
    return capture("llama")
