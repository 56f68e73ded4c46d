"""The fault soak (bench/chaos.py) in small: kills and every remote fault, nothing lost."""

from __future__ import annotations

import argparse

import pytest

from bench import chaos


@pytest.mark.parametrize("delivery_workers", [0, 2])  # workers doing both; or split roles
def test_short_chaos_run_loses_nothing(tmp_path, delivery_workers: int) -> None:
    parser = argparse.ArgumentParser()
    chaos.add_arguments(parser)
    args = parser.parse_args(["--duration", "14", "--kill-every", "6", "--fault-every", "1.3",
                              "--rate", "40", "--sessions", "8", "--domains", "5",
                              "--delivery-workers", str(delivery_workers)])
    result = chaos.run_chaos(args, tmp_path)
    assert result["kills"] == 2 and set(result["faults"]) == {name for name, _ in chaos.fault_modes()}
    assert result["accepted"] > 100 and result["drained"]
    assert result["lost"] == 0 and result["delivered"] == result["accepted"]
