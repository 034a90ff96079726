"""Several images in one classify request, the image-count bound, and dynamic batching: concurrent requests (and a
request's several images) share one engine batch; a lone request never waits. No timing assertions: the tests hold
the engine's first batch until the other requests have queued."""
import asyncio
import base64
import threading
import time

import httpx
import pytest
from fastapi.testclient import TestClient

from service.api import create_app
from service.app import replica_torch_threads
from service.batching import MicroBatcher
from service.engine import Engine
from tests.unit.service.conftest import color_png, png, publish_colors
from tests.unit.service.test_api import error

GUARD_S = 60  # only a guard against a hang, never a measurement


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


@pytest.fixture
def client(settings, store, task_maker):
    publish_colors(store, task_maker, "red", "green")
    with TestClient(create_app(settings.model_copy(update={"max_images_per_request": 4}))) as c:
        yield c


# ----------------------------------------------------------------------------- several images per request
def test_several_images_over_multipart_and_json_come_back_in_order(client):
    red, green, gray = color_png("red"), color_png("green"), color_png("gray")
    files = [("file", ("r.png", red)), ("file", ("g.png", green)), ("file", ("x.png", gray))]
    many = client.post("/v1/classify", files=files).json()
    assert [r["task"] for r in many["results"]] == ["red", "green", None]
    assert all(r["mode"] == "auto" for r in many["results"]) and set(many) == {"results"}
    by_json = client.post("/v1/classify", json={"images": [b64(red), b64(green), b64(gray)]}).json()
    assert [r["task"] for r in by_json["results"]] == ["red", "green", None]
    assert by_json["results"][0]["scores"] == many["results"][0]["scores"]
    # the plural field answers a list even for one image; task, labels and top_k apply to every image
    one = client.post("/v1/classify", files=[("images", ("g.png", green))], data={"task": "red", "top_k": "1"}).json()
    assert len(one["results"]) == 1 and one["results"][0]["task"] == "red" and len(one["results"][0]["scores"]) == 1
    labelled = client.post("/v1/classify", json={"images": [b64(red), b64(green)], "labels": ["cat", "dog", "car"]}).json()
    assert [len(r["scores"]) for r in labelled["results"]] == [3, 3] and {r["mode"] for r in labelled["results"]} == {"labels"}


def test_one_image_keeps_the_single_result_shape(client):
    single = client.post("/v1/classify", files={"file": ("r.png", color_png("red"))}).json()
    assert single["task"] == "red" and "results" not in single
    assert client.post("/v1/classify", json={"image": b64(color_png("red"))}).json()["scores"] == single["scores"]


def test_the_image_count_is_bounded_by_max_images_per_request(client):
    four = [png(seed=i) for i in range(4)]
    assert len(client.post("/v1/classify", json={"images": [b64(p) for p in four]}).json()["results"]) == 4
    message = error(client.post("/v1/classify", json={"images": [b64(p) for p in four + four[:1]]}), 422, "too_many_images")
    assert "5" in message and "KEEPCLIP_MAX_IMAGES_PER_REQUEST" in message
    files = [("file", (f"{i}.png", p)) for i, p in enumerate(four + four[:2])]  # Starlette stops at the 5th file
    assert "at most 4" in error(client.post("/v1/classify", files=files), 422, "too_many_images")
    gallery = [("files", (f"{i}.png", p)) for i, p in enumerate(four + four[:1])]
    error(client.post("/v1/gallery", files=gallery), 422, "too_many_images")


@pytest.mark.parametrize("request_kwargs, code, needle", [
    ({"json": {"image": b64(png()), "images": [b64(png())]}}, "validation_error", "not both"),
    ({"json": {"task": "red"}}, "validation_error", "'images'"),
    ({"json": {"images": []}}, "validation_error", "at least one"),
    ({"json": {"images": "abc"}}, "validation_error", "images"),
    ({"json": {"images": [b64(png()), 5]}}, "validation_error", "images"),
    ({"json": {"images": [b64(png()), "@@@"]}}, "invalid_base64", "images[1]"),
    ({"json": {"images": [b64(png()), b64(b"not an image")]}}, "invalid_image", "images[1]"),
    # decoded on several threads: still the first bad image in the order sent
    ({"json": {"images": [b64(png()), b64(b"not an image"), b64(png()), b64(b"nor this")]}}, "invalid_image", "'images[1]' is not"),
    ({"files": [("file", ("a.png", png())), ("file", ("b.txt", b"no"))]}, "invalid_image", "file[1]"),
    ({"files": [("file", ("a.png", png())), ("images", ("b.png", png()))]}, "validation_error", "not in file and images"),
    ({"files": [("images", ("a.png", png()))], "data": {"labels": "a,b", "task": "red"}}, "validation_error", "not both"),
])
def test_bad_several_image_requests_get_4xx_json(client, request_kwargs, code, needle):
    assert needle in error(client.post("/v1/classify", **request_kwargs), 422, code)


# ----------------------------------------------------------------------------- batching
class HeldEngine:
    """Wraps Engine.run_batch: records each batch's size and holds the first batch until released."""

    def __init__(self, run):
        self.run, self.sizes = run, []
        self.started, self.release = threading.Event(), threading.Event()

    def __call__(self, jobs):
        self.sizes.append(len(jobs))
        self.started.set()
        if len(self.sizes) == 1:
            self.release.wait(GUARD_S)
        return self.run(jobs)


async def until(condition) -> None:
    for _ in range(GUARD_S * 100):
        if condition():
            return
        await asyncio.sleep(0.01)
    raise TimeoutError("condition not reached")


def test_concurrent_requests_share_one_engine_batch(settings, store, task_maker):
    publish_colors(store, task_maker, "red", "green")
    engine = Engine.from_settings(settings).start()
    held = engine.run_batch = HeldEngine(engine.run_batch)
    app = create_app(settings.model_copy(update={"engine_batches": 1}), engine=engine)  # one batch at a time
    bodies = [color_png("red", seed=i) for i in range(5)]

    async def scenario():
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://keepclip") as c:
            first = asyncio.create_task(c.post("/v1/classify", files={"file": ("0.png", bodies[0])}))
            await until(held.started.is_set)  # the engine is busy with the first request
            rest = [asyncio.create_task(c.post("/v1/classify", files={"file": (f"{i}.png", b)})) for i, b in enumerate(bodies[1:])]
            await until(lambda: app.state.batcher.queued == 4)
            held.release.set()
            return await asyncio.gather(first, *rest)

    try:
        answers = asyncio.run(scenario())
    finally:
        engine.close()
    assert [a.status_code for a in answers] == [200] * 5 and {a.json()["task"] for a in answers} == {"red"}
    assert held.sizes == [1, 4]  # what queued while the engine was busy ran as one batch


def test_a_requests_images_enter_the_batch_together(settings, store, task_maker):
    publish_colors(store, task_maker, "red")
    engine = Engine.from_settings(settings).start()
    sizes = []

    def run(jobs):
        sizes.append(len(jobs))
        return Engine.run_batch(engine, jobs)

    engine.run_batch = run
    try:
        with TestClient(create_app(settings.model_copy(update={"max_batch_size": 3, "engine_batches": 1}), engine=engine)) as c:
            files = [("images", (f"{i}.png", color_png("red", seed=i))) for i in range(5)]
            assert len(c.post("/v1/classify", files=files).json()["results"]) == 5
    finally:
        engine.close()
    assert sizes == [3, 2]  # one request's images fill a batch; the rest spill into the next


def held_first_batch():
    """(gate, batches, run): `run` records each batch and holds the first one until `gate` is set; job x -> 10x."""
    gate, batches = threading.Event(), []

    def run(jobs):
        batches.append(list(jobs))
        if len(batches) == 1:
            gate.wait(GUARD_S)
        return [job * 10 for job in jobs]

    return gate, batches, run


def test_a_lone_job_runs_at_once_and_the_queue_forms_the_next_batch():
    """The batcher alone: a job on an idle batcher runs at once whatever the wait (the wait is for a batch formed
    under load); jobs queued while a batch runs form the next one, results in order."""
    from concurrent.futures import ThreadPoolExecutor

    gate, batches, run = held_first_batch()

    async def scenario(batcher):
        assert await asyncio.wait_for(batcher.submit(1), GUARD_S) == 10  # 1 h wait configured: it did not wait
        gate.clear()
        batches.clear()
        first = asyncio.ensure_future(batcher.submit(2))
        await until(lambda: len(batches) == 1)
        later = asyncio.ensure_future(batcher.submit_many([3, 4, 5]))
        another = asyncio.ensure_future(batcher.submit(6))
        await until(lambda: batcher.queued == 4)
        batcher.set_batch_wait_timeout_s(0)  # the next batch is formed under load: no top-up wait in this test
        gate.set()
        return await first, await later, await another

    with ThreadPoolExecutor(1) as pool:
        gate.set()
        batcher = MicroBatcher(run, pool, max_batch_size=3, wait_s=3600)
        assert asyncio.run(scenario(batcher)) == (20, [30, 40, 50], 60)
    assert batches == [[2], [3, 6, 4], [5]]  # one job of each queued request in turn: the lone 6 does not wait for 5


def test_a_batch_takes_the_queued_requests_jobs_in_turn():
    """Round robin over requests: a one-image request queued behind two requests of 64 images rides in the next
    batch, not the fourth; a request with jobs left goes to the back of the line; cancelled jobs are skipped."""
    from concurrent.futures import ThreadPoolExecutor

    gate, batches, run = held_first_batch()

    async def scenario(batcher):
        first = asyncio.ensure_future(batcher.submit(0))  # held in the engine while the others queue
        await until(lambda: len(batches) == 1)
        big = [asyncio.ensure_future(batcher.submit_many(list(range(base, base + 64)))) for base in (100, 200)]
        gone = asyncio.ensure_future(batcher.submit_many([300, 301]))
        lone = asyncio.ensure_future(batcher.submit(1))
        await until(lambda: batcher.queued == 131)
        gone.cancel()  # its client left: its jobs are skipped, taking no place in a batch
        batcher.set_batch_wait_timeout_s(0)
        gate.set()
        return await first, [len(await b) for b in big], await lone

    with ThreadPoolExecutor(1) as pool:
        batcher = MicroBatcher(run, pool, max_batch_size=16, wait_s=3600)
        assert asyncio.run(scenario(batcher)) == (0, [64, 64], 10)
    assert batches[1] == [100, 200, 1, 101, 201, 102, 202, 103, 203, 104, 204, 105, 205, 106, 206, 107]
    assert batches[2][:2] == [207, 108] and sorted(j for b in batches[1:] for j in b) == [1, *range(100, 164), *range(200, 264)]


def test_with_engine_batches_two_batches_run_at_once_and_no_more():
    """concurrency 2 (the setting `engine_batches`): a second batch starts while the first runs; a third job waits
    for one of them."""
    from concurrent.futures import ThreadPoolExecutor

    both = threading.Barrier(2, timeout=GUARD_S)  # broken (an error) unless two batches run at the same time
    batches = []

    def run(jobs):
        batches.append(list(jobs))
        if len(batches) <= 2:
            both.wait()
        return [job * 10 for job in jobs]

    async def scenario(batcher):
        first = asyncio.ensure_future(batcher.submit(1))
        await until(lambda: len(batches) == 1)
        second = asyncio.ensure_future(batcher.submit(2))
        return await first, await second, await batcher.submit(3)

    with ThreadPoolExecutor(2) as pool:
        assert asyncio.run(scenario(MicroBatcher(run, pool, concurrency=2))) == (10, 20, 30)
    assert batches == [[1], [2], [3]]
    batches.clear()
    both.reset()
    with ThreadPoolExecutor(2) as pool:  # a callable limit (engine_batches auto) is asked per batch
        assert asyncio.run(scenario(MicroBatcher(run, pool, concurrency=lambda: 2))) == (10, 20, 30)
    assert batches == [[1], [2], [3]]

    one = threading.Barrier(2, timeout=0.5)  # with concurrency 1 the second batch cannot start: the first times out
    batches.clear()

    def run_alone(jobs):
        batches.append(list(jobs))
        if len(batches) == 1:
            with pytest.raises(threading.BrokenBarrierError):
                one.wait()
        return [job * 10 for job in jobs]

    async def alone(batcher):
        first = asyncio.ensure_future(batcher.submit(1))
        await until(lambda: len(batches) == 1)
        return await first, await batcher.submit(2)

    with ThreadPoolExecutor(2) as pool:
        assert asyncio.run(alone(MicroBatcher(run_alone, pool, concurrency=lambda: 1))) == (10, 20)
    assert batches == [[1], [2]]


def test_a_batch_starts_beside_a_running_one_only_with_half_the_recent_load():
    """concurrency 2: with a batch of 4 running, the jobs queued meanwhile wait until they are half of the 8 the
    replica then holds, rather than run in ones beside it; the fourth starts them beside it."""
    from concurrent.futures import ThreadPoolExecutor

    gate, batches, run = held_first_batch()

    async def scenario(batcher):
        first = asyncio.ensure_future(batcher.submit_many(range(1, 5)))
        await until(lambda: len(batches) == 1)
        singles = [asyncio.ensure_future(batcher.submit(job)) for job in (5, 6, 7)]
        await until(lambda: batcher.queued == 3)
        await asyncio.sleep(0.05)  # the worker has seen all three: they still wait, not in batches of their own
        assert len(batches) == 1
        fourth = asyncio.ensure_future(batcher.submit(8))
        await until(lambda: len(batches) == 2)  # beside the first batch, which is still held
        gate.set()
        return await first, [await job for job in singles], await fourth

    with ThreadPoolExecutor(2) as pool:
        assert asyncio.run(scenario(MicroBatcher(run, pool, concurrency=2))) == (
            [10, 20, 30, 40], [50, 60, 70], 80)
    assert batches == [[1, 2, 3, 4], [5, 6, 7, 8]]


def test_a_top_up_wait_ends_when_the_recent_load_is_queued():
    """A batch formed under load waits for more jobs only until as many are queued as the replica recently held
    (3 here), not for a full batch: with an hour's wait configured it starts as soon as the third job arrives."""
    from concurrent.futures import ThreadPoolExecutor

    gate, batches, run = held_first_batch()

    async def scenario(batcher):
        first = asyncio.ensure_future(batcher.submit(1))
        await until(lambda: len(batches) == 1)
        queued = [asyncio.ensure_future(batcher.submit(job)) for job in (2, 3)]  # 3 jobs in the replica
        await until(lambda: batcher.queued == 2)
        gate.set()
        assert await first == 10  # its client's next job is what the top-up waits for
        third = asyncio.ensure_future(batcher.submit(4))
        return await asyncio.wait_for(asyncio.gather(*queued, third), GUARD_S)

    with ThreadPoolExecutor(1) as pool:
        batcher = MicroBatcher(run, pool, max_batch_size=16, wait_s=3600)
        assert asyncio.run(scenario(batcher)) == [20, 30, 40]
    assert batches == [[1], [2, 3, 4]]


def test_batch_cost_is_fitted_from_batches_of_several_sizes():
    """The fixed part of a batch's run time: exact on exact data, clipped to [0, median run time], none until
    batches of two sizes have run, and not moved by a stalled batch."""
    from service.batching import BatchCost

    cost = BatchCost()
    for _ in range(20):
        cost.add(4, 0.019)
    assert cost.fixed_s() == 0  # one size only: not determined
    for size in (1, 2, 8, 16) * 5:
        cost.add(size, 0.003 + 0.004 * size)
    assert cost.fixed_s() == pytest.approx(0.003)
    cost.add(1, 5.0)  # a stall (a swap, a graph's first run)
    assert cost.fixed_s() == pytest.approx(0.003)
    gpu = BatchCost()
    for size in (1, 4, 8, 16) * 5:
        gpu.add(size, 0.01)  # a batch costs the same at any size: all of it is fixed
    assert gpu.fixed_s() == pytest.approx(0.01)
    cpu = BatchCost()
    for size in (1, 4, 8, 16) * 5:
        cpu.add(size, 0.004 * size - 0.001)  # a negative intercept is noise: no wait
    assert cpu.fixed_s() == 0
    window = BatchCost(window=8)
    for size in (1, 4) * 4:
        window.add(size, 0.01)
    for size in (1, 4) * 4:
        window.add(size, 0.002 * size)  # the device got busier per image: the old batches leave the window
    assert window.fixed_s() == pytest.approx(0)


def test_the_auto_top_up_wait_is_the_fixed_cost_of_a_batch():
    """wait_s None (auto): a batch formed under load waits for the recent load at most the fixed part of a batch's
    run time. Batches that cost 0.3 s at any size (a GPU's): a job arriving at once joins the batch, one arriving
    after a second does not. Batches whose cost is all per image (a CPU's, in the extreme): no wait at all."""
    from concurrent.futures import ThreadPoolExecutor

    async def scenario(batcher, gate, batches, late_s):
        first = asyncio.ensure_future(batcher.submit(1))
        await until(lambda: len(batches) == 1)
        queued = [asyncio.ensure_future(batcher.submit(job)) for job in (2, 3)]  # 3 jobs in the replica
        await until(lambda: batcher.queued == 2)
        gate.set()
        assert await first == 10
        await asyncio.sleep(late_s)
        return await asyncio.wait_for(asyncio.gather(*queued, batcher.submit(4)), GUARD_S)

    for per_image_s, fixed_s, late_s, expected in (
            (0.0, 0.3, 0.0, [[1], [2, 3, 4]]), (0.0, 0.3, 1.0, [[1], [2, 3], [4]]), (0.1, 0.0, 0.0, [[1], [2, 3], [4]])):
        gate, batches, run = held_first_batch()
        with ThreadPoolExecutor(1) as pool:
            batcher = MicroBatcher(run, pool, wait_s=None)
            for size in (1, 4, 8, 16) * 25:  # the recent batches' cost
                batcher.cost.add(size, fixed_s + per_image_s * size)
            assert batcher.wait_limit() == pytest.approx(fixed_s)
            assert asyncio.run(scenario(batcher, gate, batches, late_s)) == [20, 30, 40]
        assert batches == expected, (per_image_s, fixed_s, late_s)


def test_concurrent_engine_batches_answer_like_one_at_a_time(settings, store, task_maker):
    """Two engine threads at once (prompt tasks in the last blocks: shared bottom, pooled last block) give the bits
    one thread gives: per-call routing state is per thread."""
    from concurrent.futures import ThreadPoolExecutor

    from backbone import PromptConfig
    from testkit.tasks import color_sample, make_color_task
    from PIL import Image

    config = PromptConfig(depth=1, n_prefix=4, placement="output")
    for i, name in enumerate(("red", "green")):
        store.publish(make_color_task(task_maker, name, seed=i, prompt_scale=0.5, config=config))
    engine = Engine.from_settings(settings).start()
    try:
        batches = [[engine.preprocess(Image.fromarray(color_sample(n, 1, seed=17 * b + i)[0]))
                    for i, n in enumerate(["red", "green", "blue", "red"][b % 4:] + ["green"] * (b % 4))] for b in range(6)]

        def answers(images):
            return [(r.task, r.gate, [(s.label, s.score) for s in r.scores]) for r in engine.classify(images)]

        alone = [answers(images) for images in batches]
        with ThreadPoolExecutor(2) as pool:
            together = list(pool.map(answers, batches * 3))
    finally:
        engine.close()
    assert {task for batch in alone for task, _, _ in batch} == {"red", "green", None}
    assert together == alone * 3


def test_a_batch_failure_reaches_every_caller():
    from concurrent.futures import ThreadPoolExecutor

    def run(jobs):
        raise RuntimeError("bug")

    async def scenario(batcher):
        results = await asyncio.gather(batcher.submit(1), batcher.submit_many([2, 3]), return_exceptions=True)
        return [type(r).__name__ for r in results]

    with ThreadPoolExecutor(1) as pool:
        assert asyncio.run(scenario(MicroBatcher(run, pool))) == ["RuntimeError", "RuntimeError"]


# ----------------------------------------------------------------------------- replica threads
def test_a_replica_runs_one_torch_thread_on_cpu_unless_told(settings):
    assert replica_torch_threads(settings.model_copy(update={"device": "cpu"})) == 1
    assert replica_torch_threads(settings.model_copy(update={"device": "cpu", "torch_threads": 3})) == 3


def test_text_calls_hold_one_engine_thread_at_most():
    """`InEngine` (embed and search texts) runs one call at a time, so a batch of images always finds the other
    engine thread free instead of queueing behind every text request before it."""
    from concurrent.futures import ThreadPoolExecutor

    from service.http.deps import InEngine

    running, most, done = [0], [0], [0]
    lock = threading.Lock()

    def slow(x):
        with lock:
            running[0] += 1
            most[0] = max(most[0], running[0])
        time.sleep(0.05)
        with lock:
            running[0] -= 1
            done[0] += 1
        return x

    async def scenario(in_engine, pool):
        texts = [asyncio.ensure_future(in_engine(slow, i)) for i in range(4)]
        await asyncio.sleep(0.01)
        done_at_batch = await asyncio.get_running_loop().run_in_executor(pool, lambda: done[0])  # a batch's turn
        return await asyncio.gather(*texts), done_at_batch

    with ThreadPoolExecutor(2) as pool:
        texts, done_at_batch = asyncio.run(scenario(InEngine(pool), pool))
    assert texts == [0, 1, 2, 3] and most[0] == 1
    assert done_at_batch <= 1  # it ran beside the first text call, not behind the queued ones (first come: 2 or more)
