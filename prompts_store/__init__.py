"""Versioned store of task artifacts: atomic publish, verified reads and a change feed.

    store = open_store("./keepclip-store")          # or memory://, s3://bucket/prefix, gs://...
    version = store.publish(TaskArtifact(name="cifar10", class_names=[...], backbone={...}, ...))
    artifact = store.get("cifar10", backbone=fingerprint)   # checksums verified
    artifact = store.get("cifar10", with_update_state=True) # + update.safetensors, for a refit
    generation, changes = store.changes(since=last_seen)   # one small read per poll

See docs/store.md for the layout and the guarantees of each backend.
"""

from .artifact import (DEFAULT_KIND, FORMAT_VERSION, PROMPTS_FILE, STATS_FILE, TASK_FILE, UPDATE_FILE,
                       TaskArtifact)
from .errors import (ArtifactIntegrityError, BackboneMismatch, InvalidArtifact, InvalidTaskName,
                     InvalidVersion, StoreCorrupted, StoreError, StoreLockTimeout, StoreWriteFailed, TaskNotFound,
                     UnsupportedFormat, VersionNotFound)
from .feed import FEED_LENGTH, Change, ChangeBatch
from .names import validate_task_name
from .settings import StoreSettings
from .store import StoreSnapshot, TaskInfo, TaskStore, VersionInfo, open_store

__all__ = [
    "ArtifactIntegrityError", "BackboneMismatch", "Change", "ChangeBatch", "DEFAULT_KIND",
    "FEED_LENGTH", "FORMAT_VERSION", "InvalidArtifact", "InvalidTaskName", "InvalidVersion",
    "PROMPTS_FILE", "STATS_FILE", "StoreCorrupted", "StoreError", "StoreLockTimeout",
    "StoreSettings", "StoreSnapshot", "StoreWriteFailed", "TASK_FILE", "TaskArtifact", "TaskInfo", "TaskNotFound",
    "TaskStore", "UPDATE_FILE", "UnsupportedFormat", "VersionInfo", "VersionNotFound", "open_store",
    "validate_task_name",
]
