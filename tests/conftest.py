import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from nstools import NetPair  # noqa: E402


@pytest.fixture
def netpair():
    pair = NetPair()
    try:
        yield pair
    finally:
        pair.close()
