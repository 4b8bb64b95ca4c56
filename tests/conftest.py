"""Shared test setup: fresh random inputs every run, reproducible from the seed printed in the header
(PYENGINE_TEST_SEED=<seed> pytest ... replays a run)."""
import os
import random
import zlib

import pytest
import torch

SESSION_SEED = int(os.environ.get("PYENGINE_TEST_SEED", random.SystemRandom().randrange(2**31)))


def pytest_report_header(config):
    return f"pyengine test seed: {SESSION_SEED} (replay with PYENGINE_TEST_SEED={SESSION_SEED})"


@pytest.fixture(autouse=True)
def _seed(request):
    seed = (SESSION_SEED + zlib.crc32(request.node.nodeid.encode())) % 2**31
    torch.manual_seed(seed)
    random.seed(seed)
    yield
