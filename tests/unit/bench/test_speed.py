"""`bench.speed` on a tiny random backbone, without ../shared: the three sections, their figures consistent with each
other, and bad input refused by argparse (exit code 2, no traceback)."""
import json

import pytest

from bench.speed import main
from tests.conftest import TINY_CONFIGS

TINY = TINY_CONFIGS / "keepclip-tiny-a.json"
CLASSES, TASKS, LOADED, BATCH = 5, (10, 20), 3, 4


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("speed")
    out = tmp / "out" / "speed.json"
    argv = ["--model", str(TINY), "--pretrained", "none", "--device", "cpu", "--data", str(tmp / "no-data"),
            "--threads", "1", "--per-domain", "4", "--batch-size", str(BATCH), "--seconds", "0.2", "--rounds", "1",
            "--tasks", *map(str, TASKS), "--classes-per-task", str(CLASSES), "--router-seconds", "0.05",
            "--load-tasks", str(LOADED), "--head-images", "16", "--memory-model", str(TINY), "--out", str(out)]
    assert main(argv) == 0
    return json.loads(out.read_text()), out


def test_engine_and_zero_shot_are_measured_on_the_same_images(run):
    results, _ = run
    e = results["engine_vs_zero_shot"]
    assert e["tasks"] == ["blue", "green", "red", "yellow"] and e["engine"]["tasks"] == 4  # hand-made, all served
    for key in ("zero_shot", "engine"):
        r = e[key]
        assert r["images_per_s"] > 0 and r["images"] == BATCH * r["batches"] > 0
        assert 0 < r["batch_latency_ms"]["p50"] <= r["batch_latency_ms"]["p99"]
    assert e["ratio_engine_to_zero_shot"] == pytest.approx(e["engine"]["images_per_s"] / e["zero_shot"]["images_per_s"])
    assert sum(e["engine"]["routed_share"].values()) == pytest.approx(1.0)


def test_the_engine_is_measured_again_with_head_tasks_learned_in_the_run(run):
    results, out = run
    e = results["engine_vs_zero_shot_head"]
    assert e["tasks"] == ["blue", "green", "red", "yellow"] and e["engine"]["tasks"] == 4
    assert e["ratio_engine_to_zero_shot"] == pytest.approx(e["engine"]["images_per_s"] / e["zero_shot"]["images_per_s"])
    assert "keepclip engine (4 head tasks)" in out.with_suffix(".md").read_text()


def test_router_rows_per_task_count(run):
    results, _ = run
    dim = json.loads(TINY.read_text())["embed_dim"]
    rows = results["router"]
    assert [r["tasks"] for r in rows] == list(TASKS)
    for r in rows:
        assert r["router_keys"] == r["tasks"] and r["build_s"] > 0  # one FAISS key per task
        assert r["checked_tasks"] == r["tasks"]  # every task's zero-shot check is part of the measured routing
        assert set(r["route_us_per_image"]) == {"1", str(BATCH)} and min(r["route_us_per_image"].values()) > 0
        for batch, windows in r["route_us_per_image_windows"].items():  # the figure is the median of its windows
            assert len(windows) == 5 and r["route_us_per_image"][batch] == sorted(windows)[2]
        assert r["faiss_index_bytes"] >= r["router_keys"] * dim * 4  # float32 keys
        # float32 mean, a whitener in float16 tiles (at most the square's d² halves), class keys, a float16 calibration sample
        assert r["stats_bytes"] <= r["tasks"] * (dim * 4 + dim * dim * 2 + CLASSES * dim * 4 + 256 * (dim * 2 + 4))


def test_memory_per_task_is_consistent_with_the_prompt_parameter_count(run):
    results, _ = run
    m = results["memory_per_task"]
    cfg = json.loads(TINY.read_text())
    depth, n = m["prompt_config"]["depth"], m["prompt_config"]["n_prefix"]
    per_layer = [(min(depth, cfg[t]["layers"]), cfg[t]["width"]) for t in ("vision_cfg", "text_cfg")]
    params = sum(2 * n * layers * width for layers, width in per_layer)  # keys + values, both towers
    assert m["prompt_parameters"] == params
    files = m["artifact_files_bytes"]
    assert set(files) == {"prompts.safetensors", "stats.safetensors", "task.json"}
    assert 4 * params < files["prompts.safetensors"] < 4 * params + 4096  # float32 + safetensors header
    assert m["artifact_bytes"] == sum(files.values())
    exact = m["exact_bytes_per_task"]
    assert exact["prompts"] == 4 * params and exact["text_features"] == 2 * CLASSES * cfg["embed_dim"] * 4
    assert exact["total"] == exact["prompts"] + exact["text_features"] + exact["stats"] + exact["zero_shot_check"] + exact["kind"]
    assert m["tasks_loaded"] == LOADED and m["load_s"] > 0
    assert m["rss_per_task_bytes"] == m["rss_delta_bytes"] / LOADED  # can be ~0 for tiny tasks: allocator pages


def test_bytes_per_task_of_each_kind_on_the_memory_model(run):
    results, out = run
    at = results["memory_per_task_at"]
    dim = json.loads(TINY.read_text())["embed_dim"]
    assert at["dim"] == dim and set(at["bytes_per_task"]) == {"head", "prompts"}
    head, prompts = at["bytes_per_task"]["head"], at["bytes_per_task"]["prompts"]
    assert head["prompts"] == 0 and head["kind"] > 0 and prompts["prompts"] > 0 and prompts["kind"] == 0
    for b in (head, prompts):
        assert b["total"] == sum(v for k, v in b.items() if k != "total") and b["stats"] > 0
    # the summary's 512-d figures come only from a 512-d memory model
    assert "kib_per_task_512d" not in results["summary"]
    assert set(results["summary"]) == {"engine_over_zero_shot_prompts", "engine_over_zero_shot_head"}
    assert "bytes per loaded task" in out.with_suffix(".md").read_text()


def test_report_records_the_machine_and_command_and_writes_markdown(run, capsys):
    results, out = run
    assert results["command"].startswith("python -m bench.speed --model") and "--tasks 10 20" in results["command"]
    assert results["machine"]["cores"] >= 1 and results["machine"]["torch_threads"] == 1 and results["machine"]["torch"]
    table = out.with_suffix(".md").read_text()
    assert "engine (prompt tasks) / zero-shot" in table and "engine (head tasks) / zero-shot" in table and "| 20 | 20 |" in table and "prompt parameters" in table


@pytest.mark.parametrize("argv, message", [
    (["--tasks", "0"], "argument --tasks: must be > 0, got 0"),
    (["--tasks", "10", "ten"], "argument --tasks: expected an integer > 0, got 'ten'"),
    (["--batch-size", "-1"], "argument --batch-size: must be > 0, got -1"),
    (["--seconds", "0"], "argument --seconds: must be > 0, got 0"),
    (["--store", "/nonexistent/keepclip-store"], "--store /nonexistent/keepclip-store: no such directory"),
])
def test_bad_input_is_an_argparse_error(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_:
        main(argv)
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and message in err and "Traceback" not in err, err


def test_a_store_without_tasks_is_refused_with_its_name(tmp_path):
    (tmp_path / "empty-store").mkdir()
    argv = ["--model", str(TINY), "--pretrained", "none", "--device", "cpu", "--data", str(tmp_path / "no-data"),
            "--store", str(tmp_path / "empty-store"), "--out", str(tmp_path / "speed.json")]
    with pytest.raises(SystemExit, match="empty-store holds no tasks"):
        main(argv)
    assert not (tmp_path / "speed.json").exists()
