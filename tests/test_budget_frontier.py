"""tools/budget_frontier.py: the sweep over student budgets and its paired table (on hand-made results)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

pytest.importorskip("matplotlib")

from helpers import tool_module  # noqa: E402

frontier = tool_module("budget_frontier")


def entry(growth: str, arm: str, finals: list[float], lr: float = 0.01, sp=(None, None), reverse=False) -> dict:
    curves = [{"seed": seed, "test": [9.0, final]} for seed, final in enumerate(finals)]
    return {"growth": growth, "arm": arm, "lr": lr, "shrink": sp[0], "fresh": sp[1],
            "curves": curves[::-1] if reverse else curves}   # reverse: seeds listed in another order


def experiment(metric: str, T: int, arms: dict) -> dict:
    return {"metric": metric, "T": T, "arms": arms}


def write_run(out: Path, steps: int, model: str, exp: dict) -> None:
    folder = out / f"n{steps}"
    folder.mkdir(parents=True)
    (folder / "results.json").write_text(json.dumps({"experiments": {model: exp}}))


def test_bits_per_character_pairs_by_seed_with_lower_better(tmp_path):
    target = entry("widen", "random-init", [2.10, 2.00, 2.20])
    write_run(tmp_path, 300, "lm", experiment("bpc", 900, {
        "widen/random-init": target,
        "widen/net2net": entry("widen", "net2net", [2.05, 2.10, 2.20], sp=(0.4, 0.1), reverse=True)}))
    write_run(tmp_path, 600, "lm", experiment("bpc", 900, {
        "widen/random-init": target, "teacher/teacher+T/3": entry("teacher", "teacher+T/3", [2.0, 1.9, 2.1])}))
    (tmp_path / "n50").mkdir()   # a budget folder without results: not a run yet
    rows = frontier.frontier_rows("lm", frontier.budget_runs(tmp_path, "lm"))
    assert [(r["student_steps"], r["arm"]) for r in rows] == [(300, "net2net"), (600, "teacher+T/3")]
    net2net, teacher = rows
    assert net2net["paired_mean"] == pytest.approx((0.05 - 0.10 + 0.0) / 3)   # positive is better
    assert net2net["seeds_at_target"] == 2 and net2net["seeds"] == 3
    assert teacher["paired_mean"] == pytest.approx(0.1) and teacher["paired_sem"] == pytest.approx(0.0, abs=1e-12)
    assert net2net["target_mean"] == pytest.approx(2.1)
    table = frontier.format_frontier(rows)
    assert "| 300 | widen/net2net | 0.01 | 0.4/0.1 | 2.117 +- 0.044 | -0.017 +- 0.044 | 2/3 |" in table
    assert "teacher/teacher + N steps" in table


def test_accuracy_table_only_writes_table_rows_and_plot(tmp_path, capsys):
    for steps, grown in ((100, [0.90, 0.95]), (200, [0.97, 0.99])):
        write_run(tmp_path, steps, "cnn", experiment("acc", 300, {
            "widen/random-init": entry("widen", "random-init", [0.96, 0.98]),
            "widen/random-init-T/3": entry("widen", "random-init-T/3", [0.93, 0.94]),
            "widen/net2net+sp": entry("widen", "net2net+sp", grown)}))
    assert frontier.main(["--only", "cnn", "--out", str(tmp_path), "--table-only"]) == 0
    rows = json.loads((tmp_path / "frontier.json").read_text())
    assert [(r["student_steps"], r["arm"], r["seeds_at_target"]) for r in rows] == [
        (100, "random-init-T/3", 0), (100, "net2net+sp", 0), (200, "random-init-T/3", 0), (200, "net2net+sp", 2)]
    assert rows[-1]["paired_mean"] == pytest.approx(0.01)
    assert (tmp_path / "cnn-frontier.png").stat().st_size > 10_000
    assert "| 200 | widen/net2net+sp | 0.01 | - | 98.00 +- 1.00 | +1.00 +- 0.00 | 2/2 |" in capsys.readouterr().out


def test_sweep_runs_each_budget_into_its_folder_with_one_shared_cache(tmp_path, monkeypatch):
    reproduce = frontier.reproduce_module()
    calls = []

    def fake_main(argv):
        calls.append(argv)
        out = Path(argv[argv.index("--out") + 1])
        steps = int(argv[argv.index("--student-steps") + 1])
        assert (out / "cache").resolve() == (tmp_path / "cache").resolve()
        (out / "results.json").write_text(json.dumps({"experiments": {"cnn": experiment("acc", 30, {
            "widen/random-init": entry("widen", "random-init", [0.9]),
            "widen/net2net": entry("widen", "net2net", [0.8 + steps / 1000])})}}))
        return 0

    monkeypatch.setattr(reproduce, "main", fake_main)
    assert frontier.main(["--only", "cnn", "--steps", "10", "20", "--out", str(tmp_path),
                          "--", "--arms", "widen/net2net", "--seeds", "1"]) == 0
    assert calls == [["--only", "cnn", "--student-steps", str(n), "--out", str(tmp_path / f"n{n}"),
                      "--arms", "widen/net2net", "--seeds", "1"] for n in (10, 20)]
    assert len(json.loads((tmp_path / "frontier.json").read_text())) == 2


def test_runs_of_another_target_are_not_mixed_in(tmp_path, capsys):
    for steps, T in ((100, 300), (200, 600)):
        write_run(tmp_path, steps, "cnn", experiment("acc", T, {
            "widen/random-init": entry("widen", "random-init", [0.96, 0.98]),
            "widen/net2net": entry("widen", "net2net", [0.9, 0.9])}))
    assert frontier.main(["--only", "cnn", "--out", str(tmp_path), "--table-only"]) == 2
    assert "n200: T 600" in capsys.readouterr().err
    assert not (tmp_path / "frontier.json").exists()


def test_each_budget_links_the_shared_cache_replacing_a_stale_link_and_refusing_a_folder(tmp_path):
    (tmp_path / "cache").mkdir()
    stale = tmp_path / "n1" / "cache"
    stale.parent.mkdir()
    stale.symlink_to(tmp_path / "gone")
    frontier.share_cache(stale)
    assert stale.resolve() == (tmp_path / "cache").resolve() and not stale.readlink().is_absolute()
    frontier.share_cache(stale)   # already right: kept
    own = tmp_path / "n2" / "cache"
    own.mkdir(parents=True)
    with pytest.raises(frontier.FrontierError, match="folder of its own"):
        frontier.share_cache(own)


@pytest.mark.parametrize("argv, message", [
    (["--only", "cnn", "--out", "x"], "--steps N"),
    (["--only", "cnn", "--out", "x", "--steps", "0"], "at least 1"),
    (["--only", "cnn", "--out", "x", "--steps", "5", "--", "--student-steps", "3"], "this tool's own option"),
    (["--only", "cnn", "--out", "x", "--steps", "5", "--", "--student=3"], "this tool's own option"),
    (["--only", "cnn", "--out", "x", "--steps", "5", "--", "--out=/y"], "this tool's own option"),
    (["--only", "cnn", "--out", "x", "--steps", "5", "--", "--bogus"], "not options of reproduce_net2net.py"),
])
def test_bad_arguments_are_refused(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        frontier.parse_args(argv)
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err
