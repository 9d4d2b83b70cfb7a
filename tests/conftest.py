import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.fixture
def world1():
    """A gloo world of one with Megatron's parallel state (TP=PP=EP=1) in the pytest process. Set up for every test
    that asks: commands run in-process end with distributed.shutdown(), as they do for users."""
    from megamod import distributed

    distributed.initialize(distributed.ParallelConfig())
    yield


@pytest.fixture(scope="session")
def engine_setup(tmp_path_factory):
    """Synthetic data, a trained tiny teacher, dense and sparse tiny students (tests/training_setup.py)."""
    from tests import training_setup

    return training_setup.build(str(tmp_path_factory.mktemp("engine")))
