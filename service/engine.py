"""The inference engine: frozen pass, per-image routing, prompted pass grouped by task, logits; and hot swap.

Works without HTTP and without Ray:

    engine = Engine.from_settings(ServiceSettings(model=..., pretrained=..., store=...))
    engine.start()                                         # first sync + background poller
    [result] = engine.run_batch([ClassifyJob(image=engine.preprocess(pil))])
    result.task, result.gate, result.scores                # routed task, its gate weight, top-k

**State.** Everything a request reads — loaded tasks (stats, cached text features), the FAISS router, the store
generation — sits in one immutable `EngineState`. The poller thread follows the store's change feed, loads new or
changed versions beside the live state, builds a new state and swaps one reference. A request takes a *lease* on
the state it started with and uses only that state until it ends.

**Kinds.** Each artifact kind is a plug-in (`service/kinds/`): its loader checks the artifact, installs its prompts
(if any) and returns a `ServedKind` that says how images reach it (the FAISS router and gate, or the task-identity
head for images no routed task claims), whether they need a prompted pass, and its logits. The engine never looks
at a kind's name (docs/service.md).

**Prompt slots.** `PromptedCLIP.load_task(name)` for a name already loaded drops the old prompts at once, which
would pull them from under a forward still routed to them. So every task *version* is loaded under its own internal
name (`"{task}@v{version}#{n}"`), never reused; after a swap, an internal name that neither the live state nor any
leased older state refers to is deleted. A forward therefore never loses the prompts it was routed to, and old
prompts are freed as soon as the last request that could use them has finished.
"""
from __future__ import annotations

import functools
import itertools
import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

import torch

from backbone import DEFAULT_TEMPLATES, TaskStats
from backbone.preprocessing import Reading
from backbone.task_identity import TaskIdentityHead
from prompts_store import StoreError, TaskArtifact, TaskNotFound, TaskStore, open_store

from .gallery import Gallery
from .kinds import ServedKind, UnservableTask, load_kind
from .router import Route, Router, Vocabulary
from .runtime import Runtime
from .runtime_onnx import select_runtime
from .settings import ServiceSettings
from .vocabulary import load_vocabulary

log = logging.getLogger(__name__)

LABEL_CACHE_SIZE = 16384  # text rows (D floats each: 32 MiB at D = 512) shared by frozen and prompted labels


class TaskNotLoaded(LookupError):
    """A request named a task this replica does not serve (unknown, deleted, or refused)."""

    def __init__(self, message: str, task: str):
        super().__init__(message)
        self.task = task

    def __str__(self) -> str:
        return str(self.args[0])


class WeightNotSupported(ValueError):
    """A prompt weight strictly between 0 and 1 for a task whose prompts apply only in full (image-text prompts)."""


# ----------------------------------------------------------------------------------------- state


@dataclass(frozen=True, eq=False)
class LoadedTask:
    name: str
    version: int
    served: ServedKind  # what its kind's plug-in loaded: routing, prompt slot, class text, logits
    class_names: tuple[str, ...]
    templates: tuple[str, ...]
    kind: str
    created_at: str | None
    checksum: str | None  # SHA-256 of task.json: identifies the exact artifact
    metrics: Mapping[str, Any]
    loaded_at: float  # time.time()

    @property
    def slot(self) -> str | None:
        """Internal runtime task name of its prompts, unique per load; None: answered from the frozen pass."""
        return self.served.slot

    @property
    def stats(self) -> TaskStats | None:
        return self.served.stats

    @property
    def identity_stats(self) -> Mapping[str, torch.Tensor] | None:
        return self.served.identity_stats

    @property
    def text_prompted(self) -> torch.Tensor:
        return self.served.text_prompted

    @property
    def text_frozen(self) -> torch.Tensor:
        return self.served.text_frozen


@dataclass(eq=False)
class EngineState:
    """Immutable once published (only `leases`, guarded by the engine's lock, changes)."""

    generation: int
    tasks: Mapping[str, LoadedTask]
    router: Router
    errors: Mapping[str, str]  # task -> why its live version is not served (the previous one may be)
    identity: "TaskIdentity | None" = None  # picks an image-text prompt task for images no residual task claims
    created_at: float = field(default_factory=time.time)
    leases: int = 0


def _empty_state(top_k: int, threshold: float) -> EngineState:
    return EngineState(generation=0, tasks=MappingProxyType({}), router=Router({}, top_k, threshold), errors={})


# ----------------------------------------------------------------------------------------- jobs


@dataclass(frozen=True, eq=False)
class ClassifyJob:
    image: torch.Tensor  # (3, H, W), preprocessed
    task: str | None = None  # classify within this task's classes (its prompts at w = 1)
    labels: tuple[str, ...] | None = None  # open vocabulary (routing still applies, weighted)
    top_k: int = 5


@dataclass(frozen=True, eq=False)
class EmbedJob:
    image: torch.Tensor  # (3, H, W), preprocessed
    task: str | None = None  # None: frozen embedding
    weight: float = 1.0


@dataclass(frozen=True)
class Score:
    label: str
    score: float  # softmax probability over the classes/labels considered
    logit: float  # logit_scale * cosine


@dataclass(frozen=True)
class ClassifyResult:
    mode: str  # "task" | "labels" | "auto"
    task: str | None  # task whose prompts (and, unless labels were given, classes) were used
    version: int | None
    gate: float  # weight w applied to that task's prompts; 0 = frozen CLIP
    route: Route  # what the router said about this image
    scores: list[Score]
    message: str | None = None
    generation: int = 0  # store generation of the state that served it


@dataclass(frozen=True, eq=False)
class EmbedResult:
    embedding: torch.Tensor  # (D,), L2-normalised
    task: str | None
    version: int | None
    weight: float


class _NullMetrics:
    def observe_batch(self, size: int) -> None: ...
    def observe_route(self, task: str | None, weight: float) -> None: ...
    def observe_state(self, generation: int, tasks: int, refused: int = 0) -> None: ...


# ----------------------------------------------------------------------------------------- engine


class Engine:
    def __init__(self, runtime: Runtime, store: TaskStore, settings: ServiceSettings | None = None, metrics=None):
        self.runtime = runtime
        self.store = store
        self.settings = settings or ServiceSettings()
        self.metrics = metrics or _NullMetrics()
        self.top_k = self.settings.router_top_k
        self.threshold = self.settings.gate_threshold
        self.poll_interval_s = self.settings.poll_interval_s
        self.gallery = Gallery(runtime.embed_dim, self.settings.max_gallery_items)
        self._state = _empty_state(self.top_k, self.threshold)
        self._lock = threading.Lock()  # guards leases, retired states, registered slots
        self._sync_lock = threading.Lock()  # one sync at a time (poller or an explicit refresh)
        self._retired: list[EngineState] = []
        self._slots: set[str] = set()  # internal names referenced by some published state
        self._slot_ids = itertools.count()
        self._label_cache: OrderedDict[tuple, torch.Tensor] = OrderedDict()  # (slot, weight, label) -> text row
        self._label_lock = threading.Lock()
        self._synced_once = False
        self.vocabulary_name, self._vocabulary = load_vocabulary(self.settings.vocabulary)
        self._vocabulary_text: torch.Tensor | None = None  # (V, D) frozen class text, built once (start, or first use)
        self._vocabulary_lock = threading.Lock()
        self._router_vocabulary: Vocabulary | None = None  # the same text, as the router's zero-shot check reads it
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None
        self.last_poll_error: str | None = None
        self.last_poll_at: float | None = None

    @classmethod
    def from_settings(cls, settings: ServiceSettings, metrics=None) -> "Engine":
        runtime = select_runtime(settings)  # settings.runtime: torch | onnx | auto (the faster on a startup probe)
        return cls(runtime, open_store(settings.store), settings, metrics)

    # ------------------------------------------------------------------ public state
    @property
    def state(self) -> EngineState:
        return self._state

    @property
    def preprocess(self):
        return self.runtime.preprocess

    @functools.cached_property
    def reading(self) -> Reading:
        """How an upload is read for this backbone: as add-task reads files (backbone.preprocessing.Reading)."""
        return Reading.for_transform(self.runtime.preprocess)

    @property
    def fingerprint(self) -> dict[str, str]:
        return self.runtime.fingerprint.to_dict()

    def reconfigure(self, router_top_k=None, gate_threshold=None, poll_interval_s=None, **_ignored) -> None:
        """Runtime knobs; each takes effect on the next batch (or poll)."""
        if router_top_k is not None:
            self.top_k = int(router_top_k)
        if gate_threshold is not None:
            self.threshold = float(gate_threshold)
        if poll_interval_s is not None:
            self.poll_interval_s = float(poll_interval_s)

    @contextmanager
    def lease(self) -> Iterator[EngineState]:
        """The live state, kept (with its prompt slots) until the block ends, whatever swaps meanwhile."""
        with self._lock:
            state = self._state
            state.leases += 1
        try:
            yield state
        finally:
            with self._lock:
                state.leases -= 1
                if state is not self._state and state.leases == 0:
                    self._reap_locked()

    # ------------------------------------------------------------------ hot swap
    def start(self, poll: bool = True) -> "Engine":
        """First sync (from the store snapshot), then follow the change feed in a daemon thread."""
        try:
            self.sync()
        except Exception as e:  # store unreachable at start: serve frozen CLIP and keep trying
            self.last_poll_error = f"{type(e).__name__}: {e}"
            log.exception("first sync with store %s failed; will retry", self.store.url)
        if poll and self._thread is None:
            self._thread = threading.Thread(target=self._poll_loop, name="keepclip-store-poller", daemon=True)
            self._thread.start()
        self.vocabulary_text()  # built now, so that the first unclaimed image does not wait for it
        return self

    def vocabulary_text(self) -> torch.Tensor | None:
        """(V, D) frozen class text of the open vocabulary (None without one), built on first use."""
        if not self._vocabulary:
            return None
        with self._vocabulary_lock:
            if self._vocabulary_text is None:
                started = time.perf_counter()
                self._vocabulary_text = self.runtime.class_text(self._vocabulary, DEFAULT_TEMPLATES)
                log.info("vocabulary %s: %d names encoded in %.1f s", self.vocabulary_name, len(self._vocabulary),
                         time.perf_counter() - started)
            return self._vocabulary_text

    def request_sync(self) -> None:
        """Ask the poller to look at the store now instead of at the end of its interval."""
        self._wake.set()

    def close(self) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
            self._thread = None

    @property
    def polling(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def _poll_loop(self) -> None:
        while not self._stop.is_set():
            self._wake.wait(self.poll_interval_s)
            self._wake.clear()
            if self._stop.is_set():
                break
            try:
                self.sync()
                self.last_poll_error = None
            except Exception as e:  # a store hiccup never stops the poller or the service
                self.last_poll_error = f"{type(e).__name__}: {e}"
                log.warning("polling store %s failed: %s", self.store.url, self.last_poll_error)

    def sync(self) -> bool:
        """Apply what changed in the store since the live state's generation; True if a new state was swapped in."""
        with self._sync_lock:
            self.last_poll_at = time.time()
            live = self._state
            batch = self.store.changes(live.generation)
            if batch.resync or not self._synced_once:
                snapshot = self.store.snapshot()
                generation, names = snapshot.generation, {t.name for t in snapshot.tasks} | set(live.tasks)
            elif batch.changes:
                generation, names = batch.generation, {c.name for c in batch.changes}
            else:
                return False
            tasks, errors, fresh = dict(live.tasks), dict(live.errors), []
            for name in sorted(names):
                self._refresh(name, tasks, errors, fresh)
            router = self._router(tasks)
            identity = TaskIdentity.build(tasks, previous=live.identity)
            state = EngineState(generation, MappingProxyType(tasks), router, MappingProxyType(errors), identity)
            self._swap(state, fresh)
            self._synced_once = True
            self.metrics.observe_state(generation, len(tasks), len(errors))
            log.info("store generation %d live: %d tasks %s", generation, len(tasks), sorted(tasks))
            return True

    def _refresh(self, name: str, tasks: dict, errors: dict, fresh: list) -> None:
        """Bring `tasks[name]` to the store's live version; on any refusal keep what is loaded."""
        try:
            artifact = self.store.get(name, backbone=self.fingerprint, fallback=True)
        except TaskNotFound:
            if tasks.pop(name, None) is not None:
                log.info("task %s removed", name)
            errors.pop(name, None)
            return
        except StoreError as e:  # BackboneMismatch, ArtifactIntegrityError, ...: logged and skipped
            log.warning("task %s not loaded, %s: %s", name, "keeping the loaded version" if name in tasks else "", e)
            errors[name] = str(e)
            return
        current = tasks.get(name)
        checksum = artifact.checksums.get("task.json")
        if current is not None and current.version == artifact.version and current.checksum == checksum:
            _note_refusal(errors, name, artifact)
            return
        try:
            loaded = self._load(artifact)
        except Exception as e:  # unservable kind, shapes for another backbone, ...
            log.warning("task %s v%s not loaded: %s", name, artifact.version, e)
            errors[name] = f"{type(e).__name__}: {e}"
            return
        if loaded.slot is not None:
            fresh.append(loaded.slot)
        tasks[name] = loaded
        _note_refusal(errors, name, artifact)
        log.info("task %s v%d loaded (%d classes)", name, artifact.version, len(loaded.class_names))

    def _router(self, tasks: Mapping[str, LoadedTask]) -> Router:
        """The router of a new state, every task's zero-shot check calibrated here, off the request path (a task's
        check is calibrated once per version: it is kept on its fingerprint, and the calibration sample let go)."""
        routed = {n: t for n, t in tasks.items() if t.stats is not None}
        vocabulary = self.router_vocabulary() if self.settings.zero_shot_check else None
        classes = {n: (t.class_names, t.text_frozen) for n, t in routed.items()} if vocabulary is not None else None
        router = Router({n: t.stats for n, t in routed.items()}, self.top_k, self.threshold,
                        vocabulary=vocabulary, classes=classes)
        router.calibrate(release=True)  # this engine's vocabulary never changes: the samples are not needed again
        return router

    def router_vocabulary(self) -> Vocabulary | None:
        """The open vocabulary every task is checked against (None without one), built once."""
        text = self.vocabulary_text()
        if text is None:
            return None
        if self._router_vocabulary is None:
            self._router_vocabulary = Vocabulary(tuple(self._vocabulary), text, float(self.runtime.logit_scale()))
        return self._router_vocabulary

    def _load(self, artifact: TaskArtifact) -> LoadedTask:
        """Load the artifact with its kind's plug-in (prompts, if any, go under a fresh slot)."""
        served = load_kind(artifact, self.runtime, f"{artifact.name}@v{artifact.version}#{next(self._slot_ids)}")
        return LoadedTask(
            name=artifact.name,
            version=int(artifact.version),
            served=served,
            class_names=tuple(artifact.class_names),
            templates=tuple(artifact.templates) or DEFAULT_TEMPLATES,
            kind=artifact.kind,
            created_at=artifact.created_at,
            checksum=artifact.checksums.get("task.json"),
            metrics=MappingProxyType(dict(artifact.metrics)),
            loaded_at=time.time(),
        )

    def _swap(self, state: EngineState, fresh: list[str]) -> None:
        with self._lock:
            old, self._state = self._state, state  # the one reference swap: new requests see the new state
            self._slots.update(fresh)
            self._retired.append(old)
            self._reap_locked()

    def _reap_locked(self) -> None:
        """Delete prompt slots no published state that a request may still hold refers to (caller holds _lock)."""
        self._retired = [s for s in self._retired if s.leases > 0]
        in_use = {t.slot for s in (self._state, *self._retired) for t in s.tasks.values() if t.slot is not None}
        for slot in self._slots - in_use:
            self.runtime.delete_task(slot)
            self._slots.discard(slot)

    def loaded_slots(self) -> set[str]:
        with self._lock:
            return set(self._slots)

    # ------------------------------------------------------------------ inference
    @torch.no_grad()
    def run_batch(self, jobs: Sequence[ClassifyJob | EmbedJob]) -> list[ClassifyResult | EmbedResult | Exception]:
        """One dynamic batch: results in order; a job that cannot be served gets its exception, not the batch."""
        if not jobs:
            return []
        self.metrics.observe_batch(len(jobs))
        with self.lease() as state:
            images = torch.stack([j.image for j in jobs])
            # (B, D) frozen pass: router input, then retrieval embeddings and frozen answers (made exact below when
            # it is provisional); `resume`: the blocks below every task's prompts
            frozen, resume = self.runtime.encode_frozen(images)
            classify = [i for i, j in enumerate(jobs) if isinstance(j, ClassifyJob)]
            routes: dict[int, Route] = {}
            if classify:
                for i, r in zip(classify, state.router.route(frozen[classify], self.top_k, self.threshold)):
                    routes[i] = r
            # images no residual-prompt task claims: the identity head's image-text prompt task, all or nothing (w = 1)
            unclaimed = [i for i in classify if jobs[i].task is None and routes[i].task is None]
            picked = state.identity.pick(frozen[unclaimed]) if state.identity is not None and unclaimed else []
            identity_pick = dict(zip(unclaimed, picked))
            # per job: (task, weight) of its prompted pass, or an error
            plan: list[tuple[str | None, float] | Exception] = []
            for i, job in enumerate(jobs):
                if isinstance(job, ClassifyJob) and job.task is None:
                    plan.append((identity_pick[i], 1.0) if i in identity_pick else self._routed(state, routes[i]))
                elif job.task is not None and job.task not in state.tasks:
                    plan.append(self._unknown(job.task, state))
                elif isinstance(job, ClassifyJob):
                    plan.append((job.task, 1.0))
                else:
                    refused = _weight_error(state.tasks[job.task], job.weight) if job.task else None
                    plan.append(refused or (job.task, float(job.weight)))
            prompted = [i for i, p in enumerate(plan) if not isinstance(p, Exception) and p[0] is not None and p[1] > 0
                        and state.tasks[p[0]].slot is not None]  # kinds answered from the frozen pass need no other
            answered_frozen = sorted(set(range(len(jobs))) - set(prompted))
            if resume is not None and resume.provisional and answered_frozen:
                # exact frozen bits for those rows: the whole last block over the whole batch, the frozen pass's own
                # op (over a subset of rows the same math may round differently)
                frozen[answered_frozen] = self.runtime.finish_frozen(resume)[answered_frozen]
            features = frozen.clone()
            if prompted:  # one pass; the wrappers group the samples by task
                slots = [state.tasks[plan[i][0]].slot for i in prompted]
                weights = [plan[i][1] for i in prompted]
                resume_rows = resume.rows(prompted) if resume is not None else None
                features[prompted] = self.runtime.encode_image(images[prompted], tasks=slots, weights=weights, resume=resume_rows)
            results: list[Any] = []
            for i, job in enumerate(jobs):
                if isinstance(plan[i], Exception):
                    results.append(plan[i])
                elif isinstance(job, EmbedJob):
                    task, w = plan[i]
                    loaded = state.tasks.get(task) if task else None
                    results.append(EmbedResult(features[i], task, loaded.version if loaded else None, w if task else 0.0))
                else:
                    results.append(self._classify_one(state, job, routes[i], plan[i], features[i], frozen[i]))
            return results

    @staticmethod
    def _routed(state: EngineState, route: Route) -> tuple[str | None, float]:
        """(task, weight) of a routed image: prompts that cannot be scaled apply in full to the images their task claims."""
        if route.task is not None and state.tasks[route.task].served.all_or_nothing:
            return route.task, 1.0
        return route.task, route.gate

    def _unknown(self, task: str, state: EngineState) -> TaskNotLoaded:
        why = state.errors.get(task)
        detail = f": {why}" if why else f" (serving: {', '.join(sorted(state.tasks)) or 'none'})"
        return TaskNotLoaded(f"task '{task}' is not served{detail}", task)

    def _classify_one(self, state: EngineState, job: ClassifyJob, route: Route, plan, feature: torch.Tensor,
                      frozen: torch.Tensor) -> ClassifyResult:
        task, w = plan
        loaded = state.tasks.get(task) if task else None
        if job.labels is not None:
            mode, names = "labels", list(job.labels)
            text = self._label_text(job.labels, loaded.slot if loaded else None, w)
        elif job.task is not None:
            mode, names = "task", list(loaded.class_names)
        else:
            mode = "auto"
            if loaded is None:
                self.metrics.observe_route(None, route.best_gate)
                return self._frozen_answer(job, route, feature, state.generation)
            names = list(loaded.class_names)
        if job.task is None:
            self.metrics.observe_route(task, w if task else route.best_gate)
        if mode == "labels":
            logits = self.runtime.logit_scale() * feature @ text.T  # (C,)
        else:  # the task's kind answers: cosine with its class text, a head on the frozen feature, ...
            logits = loaded.served.logits(feature[None], frozen[None], torch.tensor([float(w)]))[0]
        scores = _top_scores(logits, names, job.top_k)
        message = None if loaded else "no learned task matches this image: frozen CLIP"
        return ClassifyResult(
            mode, task if loaded else None, loaded.version if loaded else None, w if loaded else 0.0, route, scores,
            message, state.generation,
        )

    def _frozen_answer(self, job: ClassifyJob, route: Route, feature: torch.Tensor, generation: int) -> ClassifyResult:
        """No learned task claims the image: the frozen CLIP answer over the open vocabulary (empty without one)."""
        text = self.vocabulary_text()
        if text is None:
            message = "no learned task matches this image (frozen CLIP answer); no vocabulary is set: pass labels to classify it"
            return ClassifyResult("auto", None, None, 0.0, route, [], message, generation)
        scores = _top_scores(self.runtime.logit_scale() * feature @ text.T, self._vocabulary, job.top_k)
        message = f"no learned task matches this image: the frozen CLIP answer over the vocabulary {self.vocabulary_name} ({len(self._vocabulary)} names)"
        return ClassifyResult("auto", None, None, 0.0, route, scores, message, generation)

    def _label_text(self, labels: tuple[str, ...], slot: str | None, weight: float) -> torch.Tensor:
        """Open-vocabulary class embeddings: with the routed task's text prompts at the image's weight, else frozen.
        One LRU (LABEL_CACHE_SIZE rows) keyed by (slot, weight, label): 256 prompted labels cost a second or two of
        the engine thread. A slot names one task version and is never reused, so a stale row is never hit, only aged out."""
        key = (slot, float(weight)) if slot is not None and weight > 0 else (None, 0.0)
        rows = self._cached_rows(key, labels)
        missing = [label for label in dict.fromkeys(labels) if label not in rows]
        if missing:  # outside the lock; the rows are kept by this call, whatever another thread evicts meanwhile
            feats = self.runtime.class_text(missing, DEFAULT_TEMPLATES, task=key[0], weight=key[1] if key[0] else 1.0)
            rows.update((label, f.clone()) for label, f in zip(missing, feats))  # clone: a row must not pin its batch
            with self._label_lock:
                self._label_cache.update(((*key, label), rows[label]) for label in missing)
                while len(self._label_cache) > LABEL_CACHE_SIZE:
                    self._label_cache.popitem(last=False)
        return torch.stack([rows[label] for label in labels])

    def _cached_rows(self, key: tuple, labels: Sequence[str]) -> dict[str, torch.Tensor]:
        """The cached text rows of `labels` under `key` (slot, weight), marked recently used."""
        rows: dict[str, torch.Tensor] = {}
        with self._label_lock:
            for label in dict.fromkeys(labels):
                if (row := self._label_cache.get((*key, label))) is not None:
                    self._label_cache.move_to_end((*key, label))
                    rows[label] = row
        return rows

    def labels_cached(self, labels: Sequence[str]) -> bool:
        """Whether every label's frozen text is cached already (a dictionary look-up per label: no engine work)."""
        return len(self._cached_rows((None, 0.0), labels)) == len(set(labels))

    # ------------------------------------------------------------------ convenience (no batching)
    def classify(self, images: Sequence[torch.Tensor], task: str | None = None, labels=None, top_k: int = 5):
        jobs = [ClassifyJob(im, task, tuple(labels) if labels else None, top_k) for im in images]
        return _raise_first(self.run_batch(jobs))

    def embed_images(self, images: Sequence[torch.Tensor], task: str | None = None, weight: float = 1.0):
        return _raise_first(self.run_batch([EmbedJob(im, task, weight) for im in images]))

    @torch.no_grad()
    def encode_labels(self, labels: Sequence[str]) -> None:
        """Put the frozen text of `labels` in the label cache, off the batch: what an image that no prompted task
        claims (none, or a head) is answered over. New labels then cost a text call of their own, not the time of
        every image batched with them (256 new labels: 0.41 s of a batch)."""
        self._label_text(tuple(labels), None, 0.0)

    @torch.no_grad()
    def embed_texts(self, texts: Sequence[str], task: str | None = None, weight: float = 1.0) -> tuple[torch.Tensor, int | None]:
        """(N, D) text embeddings, frozen or with a task's text prompts at `weight`; and the task version used."""
        with self.lease() as state:
            if task is None:
                return self.runtime.encode_text(texts), None
            if task not in state.tasks:
                raise self._unknown(task, state)
            loaded = state.tasks[task]
            if (refused := _weight_error(loaded, weight)) is not None:
                raise refused
            return self.runtime.encode_text(texts, loaded.slot, weight), loaded.version

    def search_text(self, text: str, k: int) -> list[tuple[str, float]]:
        feats, _ = self.embed_texts([text])
        return self.gallery.search(feats[0], k)

    def health(self) -> dict[str, Any]:
        state = self._state
        return {
            "generation": state.generation,
            "tasks": len(state.tasks),
            "polling": self.polling,
            "last_poll_error": self.last_poll_error,
            "device": str(self.runtime.device),
            "backbone": self.fingerprint,
        }


def _note_refusal(errors: dict, name: str, artifact: TaskArtifact) -> None:
    """The store fell back from a damaged live version: that is the task's error, though an older version serves."""
    if artifact.refused_live:
        errors[name] = f"live version refused ({artifact.refused_live}); serving version {artifact.version}"
    else:
        errors.pop(name, None)


def _weight_error(loaded: LoadedTask, weight: float) -> WeightNotSupported | None:
    """Image-text prompt tokens cannot be scaled: for such a task only the weights 0 and 1 are allowed."""
    if loaded.served.all_or_nothing and float(weight) not in (0.0, 1.0):
        return WeightNotSupported(
            f"task '{loaded.name}' is of kind '{loaded.kind}': its prompts apply in full or not at all; weight must be 0 or 1, got {weight:g}"
        )
    return None


@dataclass(frozen=True, eq=False)
class TaskIdentity:
    """The task-identity head over the loaded image-text prompt tasks, trained on their statistics only."""

    names: tuple[str, ...]
    versions: tuple[tuple[str, int, str | None], ...]  # (task, version, checksum): what it was trained on
    head: TaskIdentityHead | None  # None with a single such task: it is the pick

    @classmethod
    def build(cls, tasks: Mapping[str, LoadedTask], previous: "TaskIdentity | None" = None) -> "TaskIdentity | None":
        chosen = sorted(name for name, t in tasks.items() if t.identity_stats is not None)
        if not chosen:
            return None
        versions = tuple((n, tasks[n].version, tasks[n].checksum) for n in chosen)
        if previous is not None and previous.versions == versions:
            return previous  # same tasks, same statistics: no retraining
        head = TaskIdentityHead.fit([dict(tasks[n].identity_stats) for n in chosen]) if len(chosen) > 1 else None
        return cls(tuple(chosen), versions, head)

    def pick(self, frozen: torch.Tensor) -> list[str]:
        """The task of each frozen image feature (the only task when there is one)."""
        if self.head is None:
            return [self.names[0]] * len(frozen)
        return [self.names[int(i)] for i in self.head.predict(frozen)]


def _top_scores(logits: torch.Tensor, names: Sequence[str], k: int) -> list[Score]:
    """The k most probable of `names` (softmax over all of them), most probable first."""
    probs = logits.softmax(-1)
    top = probs.topk(min(k, len(names)))
    return [Score(names[c], float(p), float(logits[c])) for p, c in zip(top.values.tolist(), top.indices.tolist())]


def _raise_first(results: list) -> list:
    for r in results:
        if isinstance(r, Exception):
            raise r
    return results
