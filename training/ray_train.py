"""The Ray Train path: the same learner on N data-parallel workers of a `TorchTrainer`.

The driver (the process `ray job submit` starts, or `add-task --workers N`) has already checked and decoded the data;
it puts the decoded images into the Ray object store once. Each worker loads the frozen backbone itself (and checks
it is the driver's), takes the images from the object store, and runs the `--kind`'s learner (`learners.py`) with a
`TorchComm` over the process group Ray Train set up: the prompts average their gradients; the head's workers each
compute the frozen features of their shard, gather them, and solve the same small system; rank 0 publishes. Per-epoch state goes through `ray.train.report(checkpoint=...)`
into `RunConfig(storage_path=<checkpoint-dir>, name=<run-name>)`, so a run that is started again under the same
name continues from its last epoch (`ray.train.get_checkpoint()`). Rank 0 publishes the artifact.
"""
from __future__ import annotations

import logging
from dataclasses import asdict, dataclass, field, fields
from typing import Any

from .checkpoint import TrainState, epoch_dir_name, load_state, save_state, temporary_directory
from .comm import Comm

log = logging.getLogger(__name__)


class RayCheckpoints:
    """Checkpoints through Ray Train: rank 0 writes the directory, every rank reports (report is collective)."""

    def __init__(self, comm: Comm):
        self.comm = comm

    def latest(self) -> TrainState | None:
        import ray.train

        checkpoint = ray.train.get_checkpoint()
        if checkpoint is None:
            return None
        with checkpoint.as_directory() as directory:
            return load_state(directory)

    def save(self, epoch: int, state, metrics: dict[str, Any]) -> None:
        import ray.train

        if not self.comm.is_main:
            ray.train.report(metrics)
            return
        with temporary_directory() as directory:
            save_state(directory, state())
            ray.train.report(
                metrics, checkpoint=ray.train.Checkpoint.from_directory(str(directory)), checkpoint_dir_name=epoch_dir_name(epoch)
            )


@dataclass(frozen=True)
class WorkerConfig:
    """What every worker needs besides the images. It travels in `train_loop_config` as a plain dict (`asdict`)."""

    task: str
    class_names: list[str]
    templates: list[str]
    source: dict[str, Any]  # the data's provenance, recorded in the recipe
    kind: str  # add-task --kind
    settings: dict[str, Any]  # learners.RecipeSettings.to_dict()
    model: str
    pretrained: str | None
    backbone: dict[str, str]  # the driver's fingerprint: a worker that loads another backbone refuses to train
    store: str
    resume: bool = False
    stop_after_epoch: int | None = None
    update_from: int | None = None  # --update: the live version the driver checked
    force: bool = False  # publish even below the live version or zero-shot
    progress: bool = True
    verbose: bool = False
    quiet: bool = False
    extra_metrics: dict[str, Any] = field(default_factory=dict)  # added to the artifact's metrics

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "WorkerConfig":
        return cls(**{f.name: data[f.name] for f in fields(cls)})


def worker_loop(config: dict[str, Any]) -> dict[str, Any]:
    """`train_loop_per_worker` of the TorchTrainer; rank 0's return value reaches the driver (`Result.return_value`)."""
    import ray
    import ray.train
    import torch

    from prompts_store import open_store

    from .comm import TorchComm
    from .data import ImageSet
    from .errors import TrainingStopped
    from .learner import RunContext, TaskData
    from .learners import RecipeSettings, make_learner
    from .runtime import configure_logging, load_frozen_backbone

    job, comm = WorkerConfig.from_dict(config), TorchComm()
    configure_logging(verbose=job.verbose, quiet=job.quiet or not comm.is_main)
    if not job.verbose:
        logging.getLogger().setLevel(logging.WARNING)  # open_clip logs every loading step on the root logger
    device = ray.train.torch.get_device() if config["use_gpu"] else torch.device("cpu")
    backbone = load_frozen_backbone(job.model, job.pretrained, str(device))
    if backbone.fingerprint.to_dict() != job.backbone:
        raise RuntimeError(
            f"worker {comm.rank} loaded backbone {backbone.fingerprint.to_dict()}, but the driver loaded "
            f"{job.backbone}: every node needs the same model config and weights ({job.model}, {job.pretrained})"
        )
    arrays = ray.get(config["images"])

    def image_set(split: str) -> ImageSet | None:
        return None if arrays.get(f"{split}_labels") is None else ImageSet(arrays[f"{split}_pixels"], arrays[f"{split}_labels"])

    task = TaskData(
        name=job.task, class_names=job.class_names, templates=job.templates,
        train=image_set("train"), val=image_set("val"), test=image_set("test"), source=job.source,
    )
    run = RunContext(
        comm=comm,
        checkpoints=RayCheckpoints(comm),
        resume=job.resume,
        stop_after_epoch=job.stop_after_epoch,
        progress=job.progress,
        runner="ray-train",
        extra_metrics={"workers": comm.world_size, "device": str(device), **job.extra_metrics},
    )
    learner = make_learner(job.kind, RecipeSettings.from_dict(job.settings))
    store = open_store(job.store)
    try:
        if job.update_from is not None:  # --update: the same live version the driver checked
            previous = store.get(task.name, job.update_from, backbone=job.backbone, with_update_state=True)
            artifact = learner.fit(task, backbone, run, previous=previous)
        else:
            artifact = learner.fit(task, backbone, run)
    except TrainingStopped as stopped:
        log.info("%s", stopped)
        return {"stopped_after_epoch": stopped.epoch}
    version = None
    if comm.is_main:
        from .publish_check import check_publishable, live_metrics

        check_publishable(artifact.metrics, live_metrics(store, task.name), job.force)
        version = store.publish(artifact)
    return {"published_version": version, "summary": {k: v for k, v in artifact.metrics.items() if k != "history"}}


def fit_on_ray(
    job: WorkerConfig,
    images: dict[str, Any],
    *,
    workers: int,
    use_gpu: bool,
    run_name: str,
    storage_path: str,
    max_failures: int,
) -> dict[str, Any]:
    """Run `worker_loop` on `workers` Ray Train workers; -> what rank 0 returned."""
    import ray
    from ray.train import CheckpointConfig, FailureConfig, LoggingConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    trainer = TorchTrainer(
        worker_loop,
        train_loop_config={**asdict(job), "images": ray.put(images), "use_gpu": use_gpu},
        scaling_config=ScalingConfig(num_workers=workers, use_gpu=use_gpu),
        run_config=RunConfig(
            name=run_name,
            storage_path=storage_path,
            checkpoint_config=CheckpointConfig(num_to_keep=2),
            failure_config=FailureConfig(max_failures=max_failures),
            logging_config=LoggingConfig(log_level="INFO" if job.verbose else "WARNING"),
        ),
    )
    return trainer.fit().return_value or {}


def unwrap_worker_error(error: BaseException) -> BaseException | None:
    """The first worker exception of a failed TorchTrainer.fit(), unwrapped from Ray's wrappers."""
    from prompts_store import StoreWriteFailed

    from .errors import InputError, TrainingDiverged

    failures = getattr(error, "worker_failures", None) or {}
    for _, failure in sorted(failures.items()):
        seen: set[int] = set()
        while failure is not None and id(failure) not in seen:
            seen.add(id(failure))
            if isinstance(failure, (InputError, TrainingDiverged, StoreWriteFailed)):
                return failure
            failure = getattr(failure, "cause", None) or failure.__cause__
        return list(failures.values())[0]
    return None
