"""Shared test set-up: tests import ``tiny_models`` (tiny random-initialised models from configs)."""

import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
torch.set_num_threads(min(2, torch.get_num_threads()))


@pytest.fixture
def tiny():
    """The ``tiny_models`` module."""
    import tiny_models

    return tiny_models
