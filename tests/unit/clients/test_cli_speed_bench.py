"""`python -m bench.cli_speed` runs every command once and writes its table and JSON (figures are not checked here)."""
import json

from bench.cli_speed import main


def test_the_benchmark_times_each_command(tmp_path, capsys):
    out = tmp_path / "speed.json"
    assert main(["--repeat", "1", "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    names = [r["name"] for r in report["results"]]
    assert names[0] == "keepclip --help" and any("--store" in n for n in names) and len(names) == 5
    assert all(len(r["runs_s"]) == 1 and r["median_s"] > 0 for r in report["results"])
    assert "| `keepclip --help` |" in capsys.readouterr().out
