"""The `keepclip` command line. Option defaults come from the same typed settings as the service (KEEPCLIP_*)."""
from __future__ import annotations

import logging
from typing import Optional

import typer

from backbone.settings import BackboneSettings

app = typer.Typer(
    help="keepclip: keep one CLIP frozen and keep adding image-classification tasks to it.",
    no_args_is_help=True,
    add_completion=False,
)
_defaults = BackboneSettings()

ModelOpt = typer.Option(_defaults.model, "--model", help="open_clip model name, or path to a model-config JSON [KEEPCLIP_MODEL]")
PretrainedOpt = typer.Option(
    _defaults.pretrained, "--pretrained", help="open_clip pretrained tag, checkpoint path, or 'none' [KEEPCLIP_PRETRAINED]"
)
DeviceOpt = typer.Option(_defaults.device, "--device", help="cuda, cpu or auto [KEEPCLIP_DEVICE]")


@app.callback()
def main_options(verbose: bool = typer.Option(False, "--verbose", "-v", help="debug logging")) -> None:
    # libraries stay at WARNING (open_clip logs every step at INFO); our own packages log progress at INFO
    logging.basicConfig(level=logging.DEBUG if verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    for package in ("backbone", "prompts_store", "training", "service", "clients", "bench"):
        logging.getLogger(package).setLevel(logging.DEBUG if verbose else logging.INFO)


@app.command()
def info(model: str = ModelOpt, pretrained: Optional[str] = PretrainedOpt, device: str = DeviceOpt) -> None:
    """Load the backbone and print its fingerprint, tower sizes and the size of one task's prompts."""
    from backbone import BackboneError, PromptConfig, PromptedCLIP, load_backbone

    try:
        backbone = load_backbone(model, pretrained, device)
    except BackboneError as e:
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(2) from None
    prompted = PromptedCLIP(backbone)
    prompted.add_task("probe", PromptConfig())
    typer.echo(f"backbone     {backbone.fingerprint.name}")
    typer.echo(f"weights      sha256 {backbone.fingerprint.sha256}")
    typer.echo(f"device       {backbone.device}")
    for tower, blocks in (("visual", backbone.image_blocks), ("text", backbone.text_blocks)):
        typer.echo(f"{tower:<12} {len(blocks)} blocks, width {prompted.width(tower)}")
    typer.echo(f"task prompts {prompted.num_prompt_parameters('probe'):,} parameters (default depth 8, 8 prefix tokens)")


def main() -> None:
    app()
