"""bench.service_speed's JSON "summary": the 8-client figures other benchmarks pick up."""
from bench.service_speed import summarise


def run(clients, per_request, images_per_s, mean_batch):
    return {"clients": clients, "images_per_request": per_request, "images_per_s": images_per_s, "mean_batch": mean_batch}


def test_the_summary_takes_the_8_client_runs_against_the_best_zero_shot_figure():
    results = {
        "baseline_images_per_s": 100.0, "baseline_threads": 1, "engine_images_per_s": 150.0, "replica_threads": 1,
        "http": [run(1, 1, 40.0, 1.0), run(8, 1, 64.0, 4.5), run(32, 1, 70.0, 6.0), run(8, 8, 120.0, 16.0)],
    }
    summary = summarise(results)
    assert summary["http_over_zero_shot_8_clients"] == 0.64 and summary["mean_batch_8_clients"] == 4.5
    assert summary["http_over_zero_shot_8_clients_multi"] == 1.2 and summary["images_per_request_multi"] == 8
    assert summary["engine_over_zero_shot"] == 1.5 and summary["zero_shot_threads"] == 1
    results["http"].pop()
    assert "http_over_zero_shot_8_clients_multi" not in summarise(results)


def test_bench_speed_carries_the_http_figures_into_its_own_summary():
    from bench.speed import summary

    http = {"http": [run(8, 1, 64.0, 4.5)], "baseline_images_per_s": 100.0, "baseline_threads": 1,
            "engine_images_per_s": 150.0, "replica_threads": 1}
    http["summary"] = summarise(http)
    assert summary({"http": http}) == {"http_over_zero_shot_8_clients": 0.64, "mean_batch_8_clients": 4.5}
    assert summary({}) == {}
