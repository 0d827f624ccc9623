"""The `family` fixture: a test that takes it runs once for each family's tiny model (tests/factory.py)."""

import pytest

from tests.factory import FAMILIES


@pytest.fixture(params=FAMILIES)
def family(request):
    return request.param
