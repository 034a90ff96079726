"""`bench.image_decode` on a small JPEG: both decodes are timed and compared through the service's own path."""
import json


def test_image_decode_times_both_decodes_and_compares_the_inputs(capsys):
    from bench.image_decode import main

    assert main(["--width", "1200", "--height", "900", "--input-sizes", "64", "--rounds", "1"]) == 0
    out = capsys.readouterr().out
    report = json.loads(out[: out.index("\n|")])
    [row] = report["rows"]
    assert row["input_size"] == 64 and row["draft_size"] == 128
    assert row["whole_ms"] > 0 and row["reduced_ms"] > 0 and 0 <= row["max_grey_levels_moved"] <= 4
    assert "| 64 px (draft 128) |" in out
