"""The `ortserve` command: thin commands that parse, call the library or converter, print."""

from __future__ import annotations

import os
import sys
import textwrap
from datetime import UTC

import click

from ortserve import __version__, humanize
from ortserve.errors import InvalidRequest, OrtServeError
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


def _precision_option(help_text: str, **kwargs):
    """--precision/-p of a conversion (convert, and pull of a checkpoint repository)."""
    choice = click.Choice(["int4", "int8", "fp16", "fp32"])
    return click.option("--precision", "-p", type=choice, help=help_text, **kwargs)


# ---- convert ---------------------------------------------------------------------------------


@cli.command()
@click.argument("source", required=False)
@click.option("--name", "-n", help="Library name NAME[:TAG] (default: the source's last part).")
@_precision_option("Weight precision.", default="int4", show_default=True)
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
@click.option(
    "--backend",
    type=click.Choice(["auto", "builder", "optimum"]),
    default="auto",
    show_default=True,
    help="Who makes the graph: the ORT GenAI model builder, optimum, or auto (the builder "
    "where it supports the architecture).",
)
@click.option("--revision", help="Branch, tag or commit of a Hugging Face repository.")
@click.option("--trust-remote-code", is_flag=True, help="Run code shipped with the checkpoint.")
@click.option("--allow-pickle", is_flag=True, help="Accept .bin/.pt weights (unsafe to load).")
@click.option("--no-verify", is_flag=True, help="Skip the comparison with transformers.")
@click.option("--batch", "batch_spec", metavar="SPEC", help="Convert the models a spec lists.")
@click.option("--jobs", "-j", type=click.IntRange(min=1), help="Parallel batch conversions.")
@click.option("--report", metavar="PATH", help="With --batch: JSON report path.")
@click.option("--ray", "ray_address", is_flag=False, flag_value="local", default=None,
              metavar="[ADDRESS|auto]", help="With --batch: each entry a task on a Ray cluster "
              "(the `ray` extra): its ADDRESS, auto (the running one), or none given: a Ray "
              "started here.")  # fmt: skip
@click.pass_context
def convert(ctx, source, name, precision, block_size, provider, backend, revision,
            trust_remote_code, allow_pickle, no_verify, batch_spec, jobs, report,
            ray_address):  # fmt: skip
    """Convert a Hugging Face checkpoint (directory or repo id) into a library model.

    With --batch SPEC, convert the list of models in SPEC instead (see docs/converter.md).
    """
    from converters import convert as run_convert
    from converters.source import default_name

    if batch_spec or source is None:
        _convert_batch(ctx, source, batch_spec, jobs, report, ray_address)
    if jobs is not None or report or ray_address is not None:
        raise InvalidRequest("--jobs, --report and --ray go with --batch SPEC", param="batch")
    info = run_convert(
        source,
        name or default_name(source),
        precision,
        block_size=block_size,
        provider=provider,
        backend=backend,
        revision=revision,
        trust_remote_code=trust_remote_code,
        allow_pickle=allow_pickle,
        verify=not no_verify,
        library=_library(),
    )
    click.echo(f"{info.name}  {info.short_id}  {humanize.size(info.size)}")
    _echo_verification(info.manifest.get("verification") or {}, precision)


def _convert_batch(ctx, source, spec, jobs, report, ray_address) -> None:
    """`convert --batch SPEC [--ray ADDRESS]`: exits 1 when any entry failed."""
    from click.core import ParameterSource

    from converters.batch import run_and_print
    from ortserve.models.push import push

    if source is not None:
        raise InvalidRequest("give either SOURCE or --batch SPEC, not both", param="batch")
    if not spec:
        raise InvalidRequest("missing SOURCE: a checkpoint directory or Hugging Face repo id "
                             "(or --batch SPEC)", param="source")  # fmt: skip
    for param in ctx.command.params:
        if param.name not in ("source", "batch_spec", "jobs", "report", "ray_address") and (
            ctx.get_parameter_source(param.name) == ParameterSource.COMMANDLINE
        ):
            raise InvalidRequest(
                f"{param.opts[0]} applies to one model; with --batch set it in the spec "
                "(per entry, or under defaults:)",
                param="batch",
            )
    if ray_address is not None and jobs is not None:
        raise InvalidRequest("--jobs does not apply with --ray: the cluster's resources bound "
                             "the run", param="jobs")  # fmt: skip
    ctx.exit(run_and_print(spec, jobs=jobs, report=report, library=_library(),
                           ray_address=ray_address, publish=push))  # fmt: skip


def _echo_verification(figures: dict, precision: str) -> None:
    """The figures and a verdict: within what the precision normally loses, or a WARNING."""
    from converters.verify import verdict

    if not figures:
        return
    shown = {k: v for k, v in figures.items() if k != "greedy_tokens"}
    if "greedy_tokens" in figures and "greedy_match" in shown:
        shown["greedy_match"] = f"{figures['greedy_match']}/{figures['greedy_tokens']}"
    ok, line = verdict(figures, precision)
    click.echo("verified: " + ", ".join(f"{k} {v}" for k, v in shown.items())
               + (f": {line}" if ok else ""))  # fmt: skip
    if not ok:
        click.echo(line, err=True)


# ---- pull ------------------------------------------------------------------------------------


@cli.command()
@click.argument("ref")
@click.option("--name", "-n", help="Library name NAME[:TAG] (default: the reference as typed).")
@_precision_option("Weight precision of a checkpoint repository's conversion (default int4).")
def pull(ref, name, precision):
    """Pull [hf.co/]ORG/REPO[:VARIANT][@REVISION] (or a directory) into the library."""
    from ortserve.models.pull import pull as run_pull

    display = _PullDisplay()
    try:
        info = run_pull(ref, name=name, precision=precision, library=_library(), progress=display)
    finally:
        display.close()
    click.echo(f"{info.name}  {info.short_id}  {humanize.size(info.size)}")


class _PullDisplay:
    """Pull progress on stderr: a byte bar per file on a terminal, status lines otherwise."""

    def __init__(self):
        import threading

        self._lock = threading.Lock()  # progress also comes from the download watcher
        self._status = None
        self._bar = None
        self._tty = sys.stderr.isatty()

    def __call__(self, event) -> None:
        with self._lock:
            if event.status != self._status:
                self._close_bar()
                self._status = event.status
                if self._tty and event.total:
                    from tqdm import tqdm

                    self._bar = tqdm(total=event.total, desc=event.status, unit="B",
                                     unit_scale=True, file=sys.stderr)  # fmt: skip
                else:
                    click.echo(event.status, err=True)
            if self._bar is not None and event.completed is not None:
                self._bar.update(event.completed - self._bar.n)

    def close(self) -> None:
        with self._lock:
            self._close_bar()

    def _close_bar(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None


# ---- push ------------------------------------------------------------------------------------


@cli.command()
@click.argument("model")
@click.argument("destination", required=False)
def push(model, destination):
    """Push MODEL to hf.co/ORG/REPO[:VARIANT] (default: MODEL's own name, if it is one).

    One commit holds the bundle and its manifest (parameters, template, system, messages,
    adapters, licence), so `ortserve pull DESTINATION` elsewhere makes the same model. An
    interrupted push resumes: what the hub already has is not sent again. HF_TOKEN (with
    write access) and HF_ENDPOINT are used.
    """
    from ortserve.models.push import push as run_push

    display = _PullDisplay()
    try:
        result = run_push(model, destination, library=_library(), progress=display)
    finally:
        display.close()
    done = f"commit {result.commit[:12]}" if result.commit else "already up to date"
    click.echo(f"pushed {model} to {result.target.text} ({done})")


# ---- list / show / cp / rm -------------------------------------------------------------------


@cli.command("list")
@click.option("--catalog", is_flag=True, help="List the catalog of short names `pull` knows.")
def list_models(catalog):
    """List the models in the library (or, with --catalog, the names `pull` resolves)."""
    if catalog:
        _list_catalog()
        return
    rows = [
        [m.name, m.short_id, humanize.size(m.size), humanize.ago(m.modified)]
        for m in _library().list()
    ]
    click.echo(humanize.table(["NAME", "ID", "SIZE", "MODIFIED"], rows))


def _list_catalog() -> None:
    """The catalog's entries, and what `pull NAME` would fetch on this machine (HERE)."""
    from ortserve.models import catalog
    from ortserve.models.pull import preferred_providers

    rows = catalog.rows(catalog.load(_library().root), preferred_providers())
    click.echo(humanize.table(["NAME", "ALSO", "HERE", "BUNDLES", "CHECKPOINT"], rows))


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
            ("graph", d.get("graph")),
            ("size", humanize.size(info.size)),
            ("digest", info.digest),
        ]),
        ("Capabilities", [(c, "") for c in info.capabilities]),
        ("Parameters", list((m.get("parameters") or {}).items())),
        ("System", [(textwrap.shorten(m["system"], 70), "")] if m.get("system") else []),
        ("Source", [
            ("from", source.get("source")),
            ("revision", source.get("revision")),
            ("variant", source.get("variant")),
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
@click.argument("name")
@click.option("--file", "-f", "modelfile", default="Modelfile", show_default=True,
              help="The Modelfile to read.")  # fmt: skip
@click.option(
    "--quantize",
    "-q",
    type=click.Choice(["int4", "int8", "q4_K_M", "q4_0", "q8_0"], case_sensitive=False),
    help="Quantize the weights (an fp32/fp16 base, or a checkpoint being converted).",
)
def create(name, modelfile, quantize):
    """Create model NAME from a Modelfile (FROM a model, a bundle or a checkpoint)."""
    from ortserve.library.modelfile import read_modelfile
    from ortserve.models.create import create_model

    spec = read_modelfile(modelfile)
    create_model(_library(), name, spec, quantize=quantize, progress=click.echo)


@cli.command()
@click.argument("models", nargs=-1, required=True)
def rm(models):
    """Remove models (a running server unloads them first)."""
    from ortserve.errors import ModelNotFound

    library = _library()
    try:  # every name checked before anything is unloaded or removed
        names = {model: library.get(model).name for model in models}
    except ModelNotFound as exc:  # a name mistyped, not a model to fetch: say what exists
        raise OrtServeError(f'model "{exc.name}" not found, nothing removed: `ortserve list` '
                            "shows the models in the library") from None  # fmt: skip
    for model, name in names.items():
        _unload_from_server(name)
        library.delete(name)
        click.echo(f"deleted '{model}'")


def _unload_from_server(name: str) -> None:
    """A running server that has `name` loaded unloads it now (keep_alive 0), as Ollama's rm."""
    from ortserve import client

    backend = client.connect(_settings(), in_process=False)
    if not backend.is_running():
        return
    try:
        loaded = {m.get("name") for m in backend.get("/api/ps").get("models", [])}
        if name in loaded:
            backend.unload(name)
    except client.ServerError as exc:  # the library is ours to change; the server may differ
        click.echo(f"warning: the server at {backend.base_url} did not unload it: {exc}", err=True)


@cli.command()
def prune():
    """Remove bundles no model uses and leftovers of interrupted conversions."""
    removed, leftovers = _library().prune_all()
    click.echo(f"removed {len(removed)} unused bundle(s) and blob(s), "
               f"{leftovers} leftover(s) of interrupted work")  # fmt: skip


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


def _check_install() -> None:
    """Stop before serving or loading when the onnxruntime-genai install cannot work."""
    from ortserve.engine.install import check_flavours

    check_flavours()


def _env_epilog() -> str:
    """Every variable, from config.VARIABLES (\\b: click keeps the lines as they are)."""
    from ortserve.config import env_help

    return "\b\n" + env_help()


@cli.command(epilog=_env_epilog())
@click.option("--waitress", is_flag=True, help="Serve with waitress (the Windows server).")
@click.option("--ray", "ray_address", is_flag=False, flag_value="local", default=None,
              metavar="[ADDRESS|auto]", help="Serve replicas on a Ray cluster (the `ray` extra): "
              "its ADDRESS, auto (the running one), or none given: a Ray started here.")  # fmt: skip
def serve(waitress, ray_address):
    """Serve the library over Ollama's API (ORTSERVE_HOST, default 127.0.0.1:11434)."""
    _check_install()
    if ray_address is not None:
        _serve_on_ray(None if ray_address == "local" else ray_address)
        return
    from ortserve.serve import serve as run_server

    run_server(_settings(), server="waitress" if waitress else None)


def _serve_on_ray(address: str | None) -> None:
    """Ray Serve replicas of the same app (docs/cluster.md)."""
    try:
        from ortserve.cluster.deployments import run
    except ImportError as exc:
        _fail(f"serving on Ray needs the ray extra: pip install 'ortserve[ray]' ({exc})")
    run(address, _settings())


@cli.command()
@click.argument("input_path", metavar="INPUT.jsonl",
                type=click.Path(exists=True, dir_okay=False))  # fmt: skip
@click.option("--output", "-o", required=True, type=click.Path(dir_okay=False),
              help="Where every record goes (answers and failed lines), in input order.")  # fmt: skip
@click.option("--errors", type=click.Path(dir_okay=False),
              help="Put the non-2xx records here instead, as OpenAI's error file.")  # fmt: skip
@click.option("--ray", "ray_address", is_flag=False, flag_value="local", default=None,
              metavar="[ADDRESS|auto]", help="Spread the lines over a Ray cluster's nodes (the "
              "`ray` extra): its ADDRESS, auto (the running one), or none given: a Ray started here.")  # fmt: skip
def batch(input_path, output, errors, ray_address):
    """Run a file of OpenAI batch lines offline, writing OUTPUT when all are done.

    A rerun with the same OUTPUT skips the lines already done (docs/batch.md). Exits 0
    once every line has run, failed lines included (see the summary and their records)."""
    from pathlib import Path

    from ortserve.batch import run_batch, write_report

    _check_install()
    summary = run_batch(Path(input_path), Path(output), errors=errors and Path(errors),
                        settings=_settings(), ray_address=ray_address)  # fmt: skip
    write_report(summary, click.echo)
    if not summary.complete:
        _fail(f"stopped with {summary.ok + summary.failed} of {summary.total} lines done: "
              "run the same command again to resume", code=130)  # fmt: skip
    click.echo(f"written: {output}" + (f" and {errors}" if errors else ""))


@cli.command()
@click.argument("model")
@click.argument("prompt", nargs=-1)
@click.option("--verbose", is_flag=True, help="Print timings and tokens/s after each answer.")
@click.option("--keepalive", help="How long the model stays loaded (e.g. 5m, 1h, -1).")
@click.option("--think/--nothink", default=None,
              help="Think before answering, or not (default: the model's own).")  # fmt: skip
@click.option("--hidethinking", is_flag=True, help="Think, but print only the answer.")
def run(model, prompt, verbose, keepalive, think, hidethinking):
    """Chat with MODEL: one answer for PROMPT (or piped stdin), else an interactive session."""
    from ortserve import client, interactive

    settings = _settings()
    backend = client.connect(settings)
    if isinstance(backend, client.InProcessBackend):
        _check_install()
    try:
        session = interactive.Session(backend, model, keep_alive=keepalive, verbose=verbose,
                                      think=think, hide_thinking=hidethinking)  # fmt: skip
        text = " ".join(prompt)
        if not text and not sys.stdin.isatty():
            text = sys.stdin.read().strip()
        if text:
            session.ask(text)
            return
        session.load()
        history = None if settings.nohistory else interactive.history_path()
        interactive.repl(session, interactive.line_reader(history))
    finally:
        if isinstance(backend, client.InProcessBackend):
            backend.close()


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
    """Ollama's PROCESSOR column, naming the execution provider: "100% GPU (cuda)"."""
    provider = entry.get("provider", "cpu")
    return "100% CPU" if provider == "cpu" else f"100% GPU ({provider})"


def _until(stamp: str) -> str:
    from datetime import datetime

    when = datetime.fromisoformat(stamp.replace("Z", "+00:00"))
    seconds = (when - datetime.now(UTC)).total_seconds()
    if seconds > 3600 * 24 * 365:
        return "Forever"
    if seconds <= 1:
        return "Now" if seconds > -1 else "Stopping..."
    return humanize.ago(datetime.now(UTC), when).replace(" ago", " from now")


@cli.command()
@click.argument("model")
def stop(model):
    """Unload MODEL from a running server now."""
    from ortserve import client

    backend = client.connect(_settings(), in_process=False)
    if not backend.is_running():
        _fail(f"no ortserve server is running at {backend.base_url}")
    backend.unload(model)


@cli.command()
def doctor():
    """Check this installation: runtimes, execution providers, library, port."""
    from ortserve.doctor import render, run_checks

    checks = run_checks()
    click.echo(render(checks))
    broken = [c for c in checks if c.broken]
    if broken:
        _fail(f"{len(broken)} problem(s) found: {', '.join(c.name for c in broken)}")


def main() -> None:
    cli(prog_name="ortserve")


if __name__ == "__main__":
    main()
