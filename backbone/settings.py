"""Which backbone to load: the single source of defaults for the CLI, the Python API and the service."""
from typing import Literal

from pydantic_settings import BaseSettings, SettingsConfigDict

# The class text of a task that gives no templates (recorded in its artifact) and of the service's vocabulary. It
# lives here, beside the other defaults, because this module imports no torch: `add-task --help` shows it.
DEFAULT_TEMPLATES = ("a photo of a {}.",)
# The largest image (width x height) the service and add-task decode by default; judged from the header, so a
# decompression bomb (a small file of a huge image) is refused before it takes any memory.
MAX_IMAGE_PIXELS = 40_000_000


class BackboneSettings(BaseSettings):
    """Backbone selection, read from `KEEPCLIP_MODEL`, `KEEPCLIP_PRETRAINED`, `KEEPCLIP_DEVICE`."""

    model_config = SettingsConfigDict(env_prefix="KEEPCLIP_", extra="ignore")

    model: str = "ViT-B-16"
    """open_clip model name, or path to a model-config JSON (its file stem becomes the model name)."""
    pretrained: str | None = "openai"
    """open_clip pretrained tag, or path to a checkpoint (.safetensors or open_clip state dict); `none` = random init."""
    device: Literal["auto", "cpu", "cuda"] = "auto"
    """`auto` picks CUDA when available."""
