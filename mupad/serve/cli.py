"""`mupad serve` (mounted by mupad.cli): a local web page that generates tiles.

mupad serve --checkpoint runs/kather                  # http://127.0.0.1:8000
mupad serve --checkpoint RUN --port 8080 --max-images 8 --out served/
mupad serve --checkpoint RUN --host 0.0.0.0           # reachable from other machines: a warning
"""

from __future__ import annotations

import ipaddress
import logging
import socket
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.console import Console
from rich.markup import escape

from mupad.applications.generate_cli import (
    Bf16,
    Device,
    GeneSets,
    ImageEncoder,
    Latents,
    ModelMpp,
    RnaPathways,
    RnaStandardiser,
    TextEncoder,
)
from mupad.errors import MupadError
from mupad.optional import require_extra

if TYPE_CHECKING:
    import uvicorn

console = Console(stderr=True)
logger = logging.getLogger(__name__)

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8000


def is_local(host: str) -> bool:
    """True for loopback addresses and 'localhost' (nothing else can reach them)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class ServeAddressError(MupadError):
    """The page cannot be served at the given --host / --port."""


def check_address(host: str, port: int) -> None:
    """Bind `host`:`port` once and let it go, so that a taken or forbidden address is one
    clear error before the model loads (not a server traceback after)."""
    try:
        family, kind, proto, _, address = socket.getaddrinfo(
            host, port, type=socket.SOCK_STREAM
        )[0]
    except (socket.gaierror, UnicodeError) as error:
        raise ServeAddressError(
            f"--host {host!r} is not an address of this machine ({error}); use 127.0.0.1"
        ) from None
    with socket.socket(family, kind, proto) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn does
        try:
            probe.bind(address)
        except OSError as error:
            raise ServeAddressError(
                f"cannot serve on {host}:{port} ({error.strerror or error}); choose another "
                "--port (ports below 1024 need privileges) or --host"
            ) from None


def build_server(
    app: Any, host: str = DEFAULT_HOST, port: int = DEFAULT_PORT, log_level: str = "info"
) -> uvicorn.Server:
    """A uvicorn server for `app` (call `.run()`); one process, one event loop."""
    uvicorn = require_extra("uvicorn", extra="serve", needed_for="mupad serve")
    config = uvicorn.Config(app, host=host, port=port, log_level=log_level, workers=1)
    return uvicorn.Server(config)


def serve(
    checkpoint: Annotated[
        Path | None,
        typer.Option(
            help="Run folder, checkpoint folder or SiT.save_pretrained folder (default: the "
            "model `mupad demo` trained)"
        ),
    ] = None,
    host: Annotated[
        str,
        typer.Option(help="Address to bind; anything but localhost is reachable from others"),
    ] = DEFAULT_HOST,
    port: Annotated[int, typer.Option(help="Port", min=1, max=65535)] = DEFAULT_PORT,
    out: Annotated[
        Path | None,
        typer.Option(help="Keep generated tiles + sidecars here (default: a temporary folder)"),
    ] = None,
    max_upload_mb: Annotated[
        float, typer.Option(help="Largest request body (uploads), MB", rich_help_panel="Limits")
    ] = 10.0,
    max_images: Annotated[
        int, typer.Option(help="Most images per request", rich_help_panel="Limits")
    ] = 4,
    max_steps: Annotated[
        int, typer.Option(help="Most sampler steps per request", rich_help_panel="Limits")
    ] = 250,
    max_queue: Annotated[
        int,
        typer.Option(
            help="Requests that may wait behind the running generation", rich_help_panel="Limits"
        ),
    ] = 4,
    text_encoder: TextEncoder = None,
    image_encoder: ImageEncoder = None,
    latents: Latents = None,
    model_mpp: ModelMpp = None,
    rna_pathways: RnaPathways = None,
    rna_standardiser: RnaStandardiser = None,
    gene_sets: GeneSets = None,
    bf16: Bf16 = False,
    device: Device = "auto",
) -> None:
    """Serve a page to generate H&E tiles from a checkpoint: caption, reference tile,
    expression profile, guidance, steps, seed; tiles download with their sidecar JSON.

    Binds to 127.0.0.1 (this machine only) unless --host says otherwise. One generation
    runs at a time; uploads, images and steps are capped (see Limits).
    """
    from mupad.serve.app import LOCAL_HOSTS, create_app  # one line naming the extra if missing
    from mupad.serve.service import ServeLimits

    check_address(host, port)
    local = is_local(host)
    if not local:
        console.print(
            f"[yellow]warning[/yellow]: binding to {escape(host)}: anyone who can reach this machine "
            "can use the page and its uploads (no authentication); use the default "
            f"{DEFAULT_HOST} unless you mean it",
            soft_wrap=True,
        )
    limits = ServeLimits(
        max_upload_bytes=int(max_upload_mb * 2**20),
        max_images=max_images,
        max_steps=max_steps,
        max_queue=max_queue,
    )
    if checkpoint is None:
        from mupad.applications.default_model import default_checkpoint

        checkpoint = default_checkpoint()
    console.print(f"loading {checkpoint} ...")
    allowed = (*LOCAL_HOSTS, host) if local else ("*",)  # "*": any name of this machine
    app = create_app(
        checkpoint, limits=limits, out=out, allowed_hosts=allowed,
        text_encoder=text_encoder, image_encoder=image_encoder, latents=latents,
        model_mpp=model_mpp, rna_pathways=rna_pathways, rna_standardiser=rna_standardiser,
        gene_sets=gene_sets, bf16=bf16, device=device,
    )  # fmt: skip
    shown = f"[{host}]" if ":" in host else host  # an IPv6 address in a URL
    console.print(f"[green]serving[/green] http://{escape(shown)}:{port}  (Ctrl+C stops)")
    build_server(app, host, port).run()
