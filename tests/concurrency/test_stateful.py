"""Stateful concurrency tests: random op batches from several processes through 2 and 4 real
workers (machine.py), spec §8.5 invariants checked between steps (docs/concurrency.md)."""

from __future__ import annotations

import pytest

from .cluster import Driver
from .machine import run_machine, setups


# The short 2-worker randomized run is part of every test run; the others run on demand (-m
# slow or MMSVC_SLOW=1).  The 4-worker run found a rare A6 (a fork racing 3 other CPUs; trace
# in findings/a6-fork-4cpu.json, ~1 replay in 30) that is not diagnosed yet: it stays on
# demand until it is (docs/concurrency.md, finding 15).
def test_two_workers(driver2: Driver) -> None:
    run_machine(driver2, examples=25, steps=20)


@pytest.mark.slow
def test_four_workers_two_nodes(driver4: Driver) -> None:
    run_machine(driver4, examples=15, steps=15, strategy=setups(nodes=(2,)))


@pytest.mark.slow
@pytest.mark.timeout(1800)
def test_two_workers_long(driver2: Driver) -> None:
    run_machine(driver2, examples=100, steps=30)


@pytest.mark.slow
@pytest.mark.timeout(1800)
def test_four_workers_long(driver4: Driver) -> None:
    run_machine(driver4, examples=50, steps=30, strategy=setups(nodes=(2,)))
