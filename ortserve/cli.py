"""The `ortserve` command: thin commands that parse, call the library or converter, print."""

from __future__ import annotations

import os
import re
import sys
import textwrap
from pathlib import Path

import click

from ortserve import __version__, humanize
from ortserve.errors import OrtServeError
from ortserve.library import Library


class _Group(click.Group):
    """Turns every error into one line on stderr and a non-zero exit, never a traceback."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except OrtServeError as exc:
            _fail(exc.message)
        except KeyboardInterrupt:
            _fail("interrupted", code=130)
        except (click.ClickException, click.exceptions.Exit, click.exceptions.Abort):
            raise
        except Exception as exc:  # a bug: say what, keep the traceback for ORTSERVE_DEBUG
            if os.environ.get("ORTSERVE_DEBUG"):
                raise
            _fail(f"unexpected {type(exc).__name__}: {exc}")


def _fail(message: str, code: int = 1):
    click.echo(f"Error: {message}", err=True)
    sys.exit(code)


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, "-v", "--version", prog_name="ortserve")
def cli():
    """Run open-weight language models locally on ONNX Runtime GenAI."""


def _library() -> Library:
    return Library()


# ---- convert ---------------------------------------------------------------------------------


@cli.command()
@click.argument("source")
@click.option("--name", "-n", help="Library name NAME[:TAG] (default: the source's last part).")
@click.option(
    "--precision",
    "-p",
    type=click.Choice(["int4", "int8", "fp16", "fp32"]),
    default="int4",
    show_default=True,
    help="Weight precision.",
)
@click.option(
    "--block-size",
    type=int,
    default=32,
    show_default=True,
    help="Quantization block size for int4/int8.",
)
@click.option(
    "--provider",
    type=click.Choice(["cpu", "cuda", "dml"]),
    default="cpu",
    show_default=True,
    help="Execution provider the bundle targets.",
)
@click.option("--revision", help="Branch, tag or commit of a Hugging Face repository.")
@click.option("--trust-remote-code", is_flag=True, help="Run code shipped with the checkpoint.")
@click.option("--allow-pickle", is_flag=True, help="Accept .bin/.pt weights (unsafe to load).")
@click.option("--no-verify", is_flag=True, help="Skip the comparison with transformers.")
def convert(source, name, precision, block_size, provider, revision, trust_remote_code,
            allow_pickle, no_verify):  # fmt: skip
    """Convert a Hugging Face checkpoint (directory or repo id) into a library model."""
    from converters import convert as run_convert

    info = run_convert(
        source,
        name or _default_name(source),
        precision,
        block_size=block_size,
        provider=provider,
        revision=revision,
        trust_remote_code=trust_remote_code,
        allow_pickle=allow_pickle,
        verify=not no_verify,
        library=_library(),
    )
    click.echo(f"{info.name}  {info.short_id}  {humanize.size(info.size)}")
    _echo_verification(info.manifest.get("verification") or {})


def _default_name(source: str) -> str:
    base = Path(source.rstrip("/\\")).name.lower()
    return re.sub(r"[^a-z0-9_.-]", "-", base).strip("-_.") or "model"


def _echo_verification(figures: dict) -> None:
    if figures:
        click.echo("verified: " + ", ".join(f"{k} {v}" for k, v in figures.items()))


# ---- list / show / cp / rm -------------------------------------------------------------------


@cli.command("list")
def list_models():
    """List the models in the library."""
    rows = [
        [m.name, m.short_id, humanize.size(m.size), humanize.ago(m.modified)]
        for m in _library().list()
    ]
    click.echo(humanize.table(["NAME", "ID", "SIZE", "MODIFIED"], rows))


cli.add_command(list_models, "ls")


@cli.command()
@click.argument("model")
@click.option("--modelfile", is_flag=True, help="Print the model's Modelfile.")
@click.option("--parameters", is_flag=True, help="Print its default parameters.")
@click.option("--template", is_flag=True, help="Print its chat template.")
@click.option("--system", is_flag=True, help="Print its system prompt.")
@click.option("--license", "license_", is_flag=True, help="Print its license.")
def show(model, modelfile, parameters, template, system, license_):
    """Show a model's details."""
    from ortserve.library.modelfile import render_modelfile

    info = _library().get(model)
    m = info.manifest
    if modelfile:
        click.echo(render_modelfile(info), nl=False)
    elif parameters:
        click.echo(_parameter_lines(m.get("parameters") or {}))
    elif template:
        click.echo(m.get("template") or "")
    elif system:
        click.echo(m.get("system") or "")
    elif license_:
        click.echo(m.get("license") or "")
    else:
        click.echo(_describe(info))


def _describe(info) -> str:
    m, d = info.manifest, info.details
    source = m.get("source") or {}
    sections = [
        ("Model", [
            ("architecture", d.get("family")),
            ("parameters", d.get("parameter_size")),
            ("context length", d.get("context_length")),
            ("embedding length", d.get("embedding_length")),
            ("quantization", d.get("quantization")),
            ("format", d.get("format")),
            ("size", humanize.size(info.size)),
            ("digest", info.digest),
        ]),
        ("Capabilities", [(c, "") for c in info.capabilities]),
        ("Parameters", list((m.get("parameters") or {}).items())),
        ("System", [(textwrap.shorten(m["system"], 70), "")] if m.get("system") else []),
        ("Source", [
            ("from", source.get("source")),
            ("revision", source.get("revision")),
            *((k.replace("_", " "), v) for k, v in (source.get("options") or {}).items()),
            ("created", m.get("created")),
        ]),
        ("Verification", [(k.replace("_", " "), v) for k, v in (m.get("verification") or {}).items()]),
        ("License", [(line, "") for line in (m.get("license") or "").strip().splitlines()[:2]]),
    ]  # fmt: skip
    out = []
    for title, rows in sections:
        rows = [(k, v) for k, v in rows if v is not None]
        if rows:
            out.append(f"  {title}")
            out.extend(f"    {k:<24}{'' if v == '' else v}".rstrip() for k, v in rows)
            out.append("")
    return "\n".join(out)


def _parameter_lines(parameters: dict) -> str:
    lines = []
    for key, value in parameters.items():
        for item in value if isinstance(value, list) else [value]:
            lines.append(f"{key:<20}{item}")
    return "\n".join(lines)


@cli.command()
@click.argument("source")
@click.argument("destination")
def cp(source, destination):
    """Copy a model under a new name (the bundle is shared, not copied)."""
    info = _library().copy(source, destination)
    click.echo(f"copied '{source}' to '{info.name}'")


@cli.command()
@click.argument("models", nargs=-1, required=True)
def rm(models):
    """Remove models."""
    library = _library()
    for model in models:
        library.delete(model)
        click.echo(f"deleted '{model}'")


@cli.command()
def prune():
    """Remove bundles no model uses and leftovers of interrupted conversions."""
    removed = _library().prune()
    click.echo(f"removed {len(removed)} unused bundle(s)")


@cli.command()
@click.argument("model", required=False)
def verify(model):
    """Re-check the digests of every bundle (or of MODEL's)."""
    results = _library().verify(model)
    for result in results:
        names = ", ".join(result.names) or "(unused)"
        click.echo(f"{'ok' if result.ok else 'FAILED'}  {result.digest[:19]}  {names}"
                   + ("" if result.ok else f"  {result.problem}"))  # fmt: skip
    if not all(r.ok for r in results):
        sys.exit(1)


# ---- serving -----------------------------------------------------------------------------


def _settings():
    from ortserve.config import Settings

    return Settings.from_env()


@cli.command()
@click.option("--waitress", is_flag=True, help="Serve with waitress (the Windows server).")
def serve(waitress):
    """Serve the library over Ollama's API (ORTSERVE_HOST, default 127.0.0.1:11434)."""
    from ortserve.serve import serve as run_server

    run_server(_settings(), server="waitress" if waitress else None)


@cli.command()
@click.argument("model")
@click.argument("prompt", nargs=-1)
@click.option("--verbose", is_flag=True, help="Print timings and tokens/s after each answer.")
@click.option("--keepalive", help="How long the model stays loaded (e.g. 5m, 1h, -1).")
def run(model, prompt, verbose, keepalive):
    """Chat with MODEL: one answer for PROMPT (or piped stdin), else an interactive session."""
    from ortserve import client, interactive

    backend = client.connect(_settings())
    try:
        session = interactive.Session(backend, model, keep_alive=keepalive, verbose=verbose)
        text = " ".join(prompt)
        if not text and not sys.stdin.isatty():
            text = sys.stdin.read().strip()
        if text:
            session.ask(text)
            return
        session.load()
        interactive.repl(session, _read_line())
    finally:
        if isinstance(backend, client.InProcessBackend):
            backend.close()


def _read_line():
    import contextlib

    with contextlib.suppress(ImportError):
        import readline  # noqa: F401  (line editing and history for input())
    return input


@cli.command()
def ps():
    """List the models a running server has loaded."""
    from ortserve import client

    backend = client.connect(_settings(), in_process=False)
    if not backend.is_running():
        _fail(f"no ortserve server is running at {backend.base_url}")
    rows = [
        [m["name"], m["digest"][:12], humanize.size(m["size"]), _processor(m),
         str(m.get("context_length", "")), _until(m["expires_at"])]
        for m in backend.get("/api/ps").get("models", [])
    ]  # fmt: skip
    click.echo(humanize.table(["NAME", "ID", "SIZE", "PROCESSOR", "CONTEXT", "UNTIL"], rows))


def _processor(entry: dict) -> str:
    provider = entry.get("provider", "cpu")
    return "100% CPU" if provider == "cpu" else f"100% {provider.upper()}"


def _until(stamp: str) -> str:
    from datetime import datetime, timezone

    when = datetime.fromisoformat(stamp.replace("Z", "+00:00"))
    seconds = (when - datetime.now(timezone.utc)).total_seconds()
    if seconds > 3600 * 24 * 365:
        return "Forever"
    if seconds <= 1:
        return "Now" if seconds > -1 else "Stopping..."
    return humanize.ago(datetime.now(timezone.utc), when).replace(" ago", " from now")


@cli.command()
@click.argument("model")
def stop(model):
    """Unload MODEL from a running server now."""
    from ortserve import client

    backend = client.connect(_settings(), in_process=False)
    if not backend.is_running():
        _fail(f"no ortserve server is running at {backend.base_url}")
    for _ in backend.stream("/api/generate", {"model": model, "keep_alive": 0}):
        pass


def main() -> None:
    cli(prog_name="ortserve")


if __name__ == "__main__":
    main()
