import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.fixture(scope="session")
def world1():
    """A gloo world of one with Megatron's parallel state (TP=PP=EP=1) in the pytest process."""
    from megamod import distributed

    distributed.initialize(distributed.ParallelConfig())
    yield
