"""`featurelens bench modes --compare-thresholds`: its table and its checks before any engine starts (the
two-server run itself is a benchmark, run by hand; the servers it starts are the ones the engine tests cover)."""

from __future__ import annotations

import json

import pytest
from featurelens.server.bench import modes as bench_modes
from featurelens.server.cli import main as cli_main
from featurelens.server.modes.sparsity import DEFAULT_THRESHOLDS


@pytest.fixture()
def modes_40():
    saved = list(bench_modes._SELECTED)
    bench_modes._SELECTED[:] = ["dense", "sparse-40"]
    yield
    bench_modes._SELECTED[:] = saved


def test_compare_table_gives_each_server_its_own_dense_ratio_and_other_over_served() -> None:
    speeds = {"served": {"dense": 20.0, "sparse-40": 25.0}, "other": {"dense": 19.0, "sparse-40": 28.5}}
    lines = bench_modes.compare_table(speeds, "a.json", "b.json")
    assert "served = a.json; other = b.json" in lines[0]
    dense, sparse = lines[2].split(), lines[3].split()
    assert dense == ["dense", "20.0", "1.00x", "19.0", "1.00x", "0.95x"]
    assert sparse == ["sparse-40", "25.0", "1.25x", "28.5", "1.50x", "1.14x"]


def test_thresholds_file_checks_name_the_problem(tmp_path, modes_40) -> None:
    assert bench_modes.check_thresholds_file(str(DEFAULT_THRESHOLDS)) == ""
    assert "no such file" in bench_modes.check_thresholds_file(str(tmp_path / "missing.json"))
    garbage = tmp_path / "garbage.json"
    garbage.write_text("{not json")
    assert "is not a thresholds file: JSONDecodeError" in bench_modes.check_thresholds_file(str(garbage))
    no_levels = tmp_path / "no_levels.json"
    no_levels.write_text(json.dumps({"model": "x"}))
    assert "is not a thresholds file: KeyError" in bench_modes.check_thresholds_file(str(no_levels))
    only_25 = tmp_path / "only_25.json"
    only_25.write_text(json.dumps({"levels": {"25": {"0.q_proj": 0.1}}}))
    assert bench_modes.check_thresholds_file(str(only_25)) == (
        f"--compare-thresholds: {only_25} has no level(s) [40] (it has ['25'])")


def test_cli_refuses_a_missing_table_before_starting_any_engine(tmp_path, capsys, modes_40) -> None:
    missing = tmp_path / "nope.json"
    assert cli_main(["bench", "modes", "--modes", "sparse-40", "--compare-thresholds", str(missing)]) == 2
    assert f"--compare-thresholds: no such file: {missing}" in capsys.readouterr().out


def test_interp_bench_reports_the_quartiles_of_the_per_round_ratios():
    """`bench interp` prints the spread of the per-round latency ratios beside their median: on a small shared
    box the spread is as large as the effects the bench measures."""
    from featurelens.server.bench.interp import _quartiles

    assert _quartiles([1.2, 1.0, 1.1]) == (1.0, 1.2)
    q1, q3 = _quartiles([1.00, 1.02, 1.04, 1.06, 1.08, 1.30, 0.95, 1.05])
    assert 0.95 < q1 < 1.04 < q3 < 1.30 and q1 < q3
