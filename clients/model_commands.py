"""`keepclip serve` and `keepclip info`: the commands that load the CLIP.

Their option defaults come from `ServiceSettings` / `BackboneSettings`, and importing those through their packages
imports torch and open_clip (seconds). clients/cli.py therefore imports this module only when one of these commands
runs (or shows its --help), so `keepclip --help`, `classify` and `tasks` stay fast.
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from backbone.settings import BackboneSettings
from service.settings import ServiceSettings

_backbone = BackboneSettings()
_service = ServiceSettings()  # the same settings the Serve app reads (KEEPCLIP_*)

info_app = typer.Typer(add_completion=False)
serve_app = typer.Typer(add_completion=False)


@info_app.command()
def info(
    model: str = typer.Option(_backbone.model, "--model", help="open_clip model name, or path to a model-config JSON [KEEPCLIP_MODEL]"),
    pretrained: Optional[str] = typer.Option(
        _backbone.pretrained, "--pretrained", help="open_clip pretrained tag, checkpoint path, or 'none' [KEEPCLIP_PRETRAINED]"
    ),
    device: str = typer.Option(_backbone.device, "--device", help="cuda, cpu or auto [KEEPCLIP_DEVICE]"),
) -> None:
    """Load the backbone and print its fingerprint, tower sizes and the size of one task's prompts."""
    from backbone import BackboneError, PromptConfig, PromptedCLIP, load_backbone
    from training.settings import ResidualPromptSettings

    try:
        backbone = load_backbone(model, pretrained, device)
    except BackboneError as e:
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(2) from None
    prompted = PromptedCLIP(backbone)
    recipe = ResidualPromptSettings().for_tower(len(backbone.image_blocks))
    prompted.add_task("probe", PromptConfig(**recipe.prompt_shape()))
    typer.echo(f"backbone     {backbone.fingerprint.name}")
    typer.echo(f"weights      sha256 {backbone.fingerprint.sha256}")
    typer.echo(f"device       {backbone.device}")
    for tower, blocks in (("visual", backbone.image_blocks), ("text", backbone.text_blocks)):
        typer.echo(f"{tower:<12} {len(blocks)} blocks, width {prompted.width(tower)}")
    typer.echo(f"task prompts {prompted.num_prompt_parameters('probe'):,} parameters (add-task's default: depth "
               f"{recipe.depth}, {recipe.n_prefix} prefix tokens, {recipe.prompt_placement} blocks)")


@serve_app.command()
def serve(
    host: str = typer.Option(_service.host, "--host", help="HTTP host [KEEPCLIP_HOST]"),
    port: int = typer.Option(_service.port, "--port", help="HTTP port [KEEPCLIP_PORT]"),
    address: Optional[str] = typer.Option(None, "--address", help="join this Ray cluster (e.g. ray://head:10001 or auto) instead of starting one"),
    model: str = typer.Option(_service.model, "--model", help="open_clip model name, or path to a model-config JSON [KEEPCLIP_MODEL]"),
    pretrained: Optional[str] = typer.Option(_service.pretrained, "--pretrained", help="pretrained tag, checkpoint path, or 'none' [KEEPCLIP_PRETRAINED]"),
    store: str = typer.Option(_service.store, "--store", help="store URL: a directory or an fsspec URL [KEEPCLIP_STORE]"),
    device: str = typer.Option(_service.device, "--device", help="cuda, cpu or auto [KEEPCLIP_DEVICE]"),
    replicas: int = typer.Option(_service.num_replicas, "--replicas", help="Serve replicas; 0 = auto: 2 (a primary and a hot standby) when the cluster has the CPUs, else 1 [KEEPCLIP_NUM_REPLICAS]"),
    settings_file: Optional[Path] = typer.Option(None, "--settings-file", help="YAML/JSON settings file [KEEPCLIP_SETTINGS_FILE]"),
) -> None:
    """Run the service (API, /docs and /ui on one port) on Ray Serve until Ctrl-C."""
    from pydantic import ValidationError

    from backbone import BackboneError
    from service.app import run_service

    try:
        settings = ServiceSettings.load(
            file=settings_file, host=host, port=port, model=model, pretrained=pretrained, store=store, device=device, num_replicas=replicas
        )
    except (ValidationError, ValueError) as e:
        typer.echo(f"error: invalid settings: {e}", err=True)
        raise typer.Exit(2) from None
    if device == "cuda" and settings.replica_gpus == 0:
        settings = settings.model_copy(update={"replica_gpus": 1.0})
    try:
        run_service(settings, address=address)
    except BackboneError as e:  # a model config or weights that do not exist: refused before Ray starts
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(2) from None
    except (TimeoutError, ConnectionError) as e:
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(1) from None
    except RuntimeError as e:  # Serve could not start or deploy: its first line, and where the details are
        typer.echo(f"error: {str(e).splitlines()[0] if str(e) else type(e).__name__}; the replicas' and Serve's logs are "
                   "in /tmp/ray/session_latest/logs/serve/", err=True)
        raise typer.Exit(1) from None
