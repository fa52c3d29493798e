"""Shared test helpers: a `parity` fixture that asserts a max-abs difference and collects it, so the
end of every test run prints one table of "ours vs reference" numbers (the figures the README quotes)."""
import json

import pytest
import torch

PARITY = []   # (what was compared, measured max |difference|, tolerance)


@pytest.fixture
def parity():
    def check(name, ours, reference, tol):
        diff = (ours.detach().double() - reference.detach().double()).abs().max().item()
        PARITY.append((name, diff, tol))
        assert diff <= tol, f"{name}: max |ours - reference| = {diff:.2e} > {tol:.0e}"
        return diff
    return check


# Tiny models gain nothing from a second thread, and on a busy machine threads waiting for each other
# make small matmuls several times slower: one thread keeps the suite fast and its timings steady.
torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


# The suite runs on every core through pytest-xdist (pytest.ini): each worker process fills its own PARITY,
# so a worker hands its rows to the main process when it finishes, and the table prints there.
def pytest_sessionfinish(session):
    if hasattr(session.config, "workeroutput"):                            # in an xdist worker
        session.config.workeroutput["parity"] = json.dumps(PARITY)


@pytest.hookimpl(optionalhook=True)                                        # an xdist hook: fine without it
def pytest_testnodedown(node, error):                                      # in the main process: a worker ended
    PARITY.extend(tuple(row) for row in json.loads(getattr(node, "workeroutput", {}).get("parity", "[]")))


def pytest_terminal_summary(terminalreporter):
    if PARITY:
        terminalreporter.write_sep("-", "parity: max |ours - reference|")
        for name, diff, tol in PARITY:
            terminalreporter.write_line(f"{name:<60} {diff:9.2e}  (tolerance {tol:.0e})")
