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


def pytest_terminal_summary(terminalreporter):
    """How many tests skipped, and why, apart from those that need a GPU: on a CPU machine with everything built
    that count is 0, so a skip for another reason (an extension that did not build, a missing tool) shows."""
    skipped = terminalreporter.stats.get("skipped", [])
    other = {}
    for report in skipped:
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
        if not any(word in reason for word in ("GPU", "CUDA", "cuda")):
            other[reason] = other.get(reason, 0) + 1
    terminalreporter.write_sep("-", f"skips: {len(skipped)} in all, {sum(other.values())} not for want of a GPU")
    for reason, count in sorted(other.items(), key=lambda kv: -kv[1]):
        terminalreporter.write_line(f"  {count:5d}  {reason}")
