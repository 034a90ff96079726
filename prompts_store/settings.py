"""Typed settings for the store: the one source of the store location's default."""

from __future__ import annotations

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict


class StoreSettings(BaseSettings):
    """Read from the environment (``KEEPCLIP_STORE``) or passed explicitly."""

    model_config = SettingsConfigDict(env_prefix="KEEPCLIP_", extra="ignore")

    store: str = Field("./keepclip-store", description="store URL: a directory or an fsspec URL")
