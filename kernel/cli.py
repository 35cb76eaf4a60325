"""The ``llmgw`` command line.

Exit codes: 0 ok, 2 usage or configuration error, 1 runtime failure (including a route
that ended in an error envelope).
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import sys
import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, TextIO

import anyio

from . import __version__
from .errors import ConfigError, PluginError
from .logs import configure_logging

if TYPE_CHECKING:
    from .config import Settings
    from .envelope import Envelope
    from .gateway import Gateway

EXIT_OK, EXIT_FAIL, EXIT_USAGE = 0, 1, 2


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # type: ignore[override]
        self.print_usage(sys.stderr)
        sys.stderr.write(f"{self.prog}: error: {message}\n")
        raise SystemExit(EXIT_USAGE)


def _parser() -> argparse.ArgumentParser:
    p = _Parser(
        prog="llmgw",
        description="llm-gateway-mcp: an MCP server that routes prompts by task class.",
    )
    p.add_argument("--version", action="version", version=f"llmgw {__version__}")
    common = _Parser(add_help=False)
    common.add_argument(
        "--config",
        metavar="PATH",
        help="routing.yaml to use (default: $LLM_GATEWAY_CONFIG, else ./routing.yaml)",
    )
    common.add_argument(
        "--log-level",
        choices=["DEBUG", "INFO", "WARNING", "ERROR"],
        help="log level for the JSON logs on stderr (default: gateway.log_level, else WARNING "
        "for one-shot commands)",
    )
    sub = p.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)

    s = sub.add_parser("serve", parents=[common], help="run the MCP server (stdio by default)")
    s.add_argument("--http", action="store_true", help="serve streamable HTTP instead of stdio")
    s.add_argument("--host", default="127.0.0.1", help="HTTP bind address (default 127.0.0.1)")
    s.add_argument("--port", type=_port, default=8765, help="HTTP port (default 8765)")
    s.add_argument(
        "--allow-remote",
        action="store_true",
        help="allow a non-loopback --host (the bearer token is still required)",
    )
    s.add_argument(
        "--allowed-host",
        action="append",
        default=[],
        metavar="HOST:PORT",
        help="an extra Host header value to accept, e.g. gw.example:8765 (repeatable)",
    )
    s.add_argument(
        "--allowed-origin",
        action="append",
        default=[],
        metavar="ORIGIN",
        help="an extra allowed Origin, e.g. https://app.example (repeatable)",
    )

    r = sub.add_parser("route", parents=[common], help="route one prompt and print the envelope")
    r.add_argument("task_class")
    r.add_argument("prompt", help="the prompt, or - to read it from stdin")
    r.add_argument("--system")
    r.add_argument("--max-tokens", type=int)
    r.add_argument("--override-model")
    r.add_argument("--json", action="store_true", help="print the raw JSON envelope")

    o = sub.add_parser(
        "orchestrate", parents=[common], help="plan -> execute -> verify (roles plugin)"
    )
    o.add_argument("task")
    o.add_argument("--depth")
    o.add_argument("--json", action="store_true", help="print the raw JSON envelope")

    sub.add_parser("info", parents=[common], help="print what llm_routing_info returns")
    pl = sub.add_parser(
        "plugins", parents=[common], help="every hook with its implementations, in call order"
    )
    pl.add_argument(
        "--available",
        action="store_true",
        help="list installed plugins that plugins: does not enable",
    )
    sub.add_parser("check-config", parents=[common], help="validate routing.yaml and summarise it")
    sp = sub.add_parser(
        "spend", parents=[common], help="month-to-date spend, reservations and caps"
    )
    how = sp.add_mutually_exclusive_group()
    how.add_argument(
        "--check",
        action="store_true",
        help="also check the whole ledger against itself (exit 1 if it is damaged)",
    )
    how.add_argument(
        "--repair",
        action="store_true",
        help="rebuild damaged totals from the entries, after a backup copy (exit 1 if the "
        "ledger is still damaged)",
    )
    sub.add_parser("demo", parents=[common], help="offline demo against a local fake upstream")
    b = sub.add_parser(
        "bench", help="benchmarks against a local fake upstream (run from the repository)"
    )
    b.add_argument("bench_args", nargs=argparse.REMAINDER, help="arguments for python -m bench")
    i = sub.add_parser(
        "init",
        parents=[common],
        help="write a commented starter routing.yaml for the provider keys that are set",
    )
    i.add_argument(
        "--all", action="store_true", help="include every provider, whether its key is set or not"
    )
    return p


def _port(text: str) -> int:
    try:
        port = int(text)
    except ValueError:
        port = -1
    if not 1 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"{text!r} is not a port (1-65535)")
    return port


LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")


def env_log_level(env: Mapping[str, str] | None = None) -> str | None:
    """``LLM_GATEWAY_LOG_LEVEL`` of ``env`` (the process environment by default),
    upper-cased; :class:`ConfigError` if it is no level."""
    raw = (os.environ if env is None else env).get("LLM_GATEWAY_LOG_LEVEL", "").strip()
    if not raw:
        return None
    level = raw.upper()
    if level not in LOG_LEVELS:
        raise ConfigError(
            f"LLM_GATEWAY_LOG_LEVEL is {raw[:40]!r}, not a log level",
            file="environment",
            fix=f"set it to one of {', '.join(LOG_LEVELS)}, or unset it",
        )
    return level


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``llmgw`` console script."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["bench"]:
        # Everything after `bench` is the bench's own (argparse's REMAINDER drops a
        # leading option such as --quick).
        configure_logging("WARNING")
        return cmd_bench(argparse.Namespace(bench_args=argv[1:]))
    args = _parser().parse_args(argv)
    if not args.command:
        _parser().print_help(sys.stderr)
        return EXIT_USAGE
    try:
        level = args.log_level or env_log_level()
    except ConfigError as exc:
        sys.stderr.write(f"llmgw: configuration error\n{exc}\n")
        return EXIT_USAGE
    configure_logging(level or ("INFO" if args.command == "serve" else "WARNING"))
    handler: Callable[[argparse.Namespace], int] = _COMMANDS[args.command]
    try:
        return handler(args)
    except (ConfigError, PluginError) as exc:
        sys.stderr.write(f"llmgw: configuration error\n{exc}\n")
        return EXIT_USAGE
    except KeyboardInterrupt:
        return EXIT_FAIL
    except BrokenPipeError:
        # The reader went away (`llmgw info | head`): stop quietly, like other CLI tools.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return EXIT_FAIL


def _settings(args: argparse.Namespace) -> Settings:
    from .config import config_path, load_settings

    return load_settings(config_path(args.config, os.environ))


def _gateway(args: argparse.Namespace) -> Gateway:
    from .build import build_gateway

    settings = _settings(args)
    if not (args.log_level or env_log_level()):
        # The .env beside routing.yaml holds unset variables too (the level included).
        from_dotenv = env_log_level(settings.env)
        if from_dotenv:
            configure_logging(from_dotenv)
        elif args.command == "serve":
            configure_logging(settings.gateway.log_level)
    return build_gateway(settings)


# --- commands ----------------------------------------------------------------------------


def cmd_serve(args: argparse.Namespace) -> int:
    with _startup_collector() as started:
        return _serve(args, started)


def _serve(args: argparse.Namespace, started: Callable[[], None]) -> int:
    from .server import TOKEN_ENV, HttpConfigError, build_server, http_server

    gateway = _gateway(args)
    if not args.http:
        from .server import run_stdio

        server = build_server(gateway)
        started()
        with _sigterm_as_sigint() as terminated:
            try:
                anyio.run(run_stdio, server)
            except KeyboardInterrupt:
                if not terminated:
                    raise
        return EXIT_OK
    try:
        server, run_kwargs = http_server(
            gateway,
            # The process environment, else the .env beside routing.yaml (as every
            # other variable).
            token=gateway.settings.env.get(TOKEN_ENV),
            host=args.host,
            port=args.port,
            allow_remote=args.allow_remote,
            extra_hosts=args.allowed_host,
            extra_origins=args.allowed_origin,
        )
    except HttpConfigError as exc:
        anyio.run(gateway.aclose)
        sys.stderr.write(f"llmgw serve: {exc}\n")
        return EXIT_USAGE
    problem = _cannot_listen(args.host, args.port)
    if problem:
        anyio.run(gateway.aclose)
        sys.stderr.write(f"llmgw serve: cannot listen on {args.host}:{args.port}: {problem}\n")
        return EXIT_FAIL
    sys.stderr.write(f"llmgw: serving MCP on http://{args.host}:{args.port}/mcp\n")
    from sse_starlette.sse import AppStatus

    # On SIGTERM, sse-starlette ended every open response stream at once: a call in flight
    # lost its answer (charged as unknown). Stateless, every stream is one call's answer
    # and ends with it (a GET stream is refused: 405), so uvicorn's graceful shutdown can
    # wait for them, each bounded by gateway.deadline_s; a second signal still forces it.
    AppStatus.enable_automatic_graceful_drain = False
    started()
    try:
        server.run("streamable-http", **run_kwargs)
    except SystemExit as exc:  # uvicorn exits 3 when it cannot start
        if exc.code:
            sys.stderr.write("llmgw serve: the HTTP server could not start; see the log\n")
            return EXIT_FAIL
    return EXIT_OK


@contextlib.contextmanager
def _startup_collector() -> Iterator[Callable[[], None]]:
    """Start the server with Python's cyclic garbage collector paused; the ``started()``
    it yields freezes what the start built and resumes collecting.

    A start allocates some 150,000 objects (modules, classes, pydantic validators, the MCP
    types) that live as long as the process. Collecting while they pile up walks them
    again and again and frees almost nothing: ~10 % of a start here, most of it inside the
    ``mcp`` import (docs/performance.md). ``gc.freeze()`` then moves them to the permanent
    generation, so later full collections skip them too; what a start leaves unreachable
    stays allocated (no change in RSS measured). This is the pattern the ``gc`` module's
    documentation gives. If the start fails before ``started()``, collecting simply
    resumes. A program that turned the collector off itself is left as it is."""
    if not gc.isenabled():
        yield lambda: None
        return
    gc.disable()
    resumed = False

    def started() -> None:
        nonlocal resumed
        if not resumed:
            resumed = True
            gc.freeze()
            gc.enable()

    try:
        yield started
    finally:
        if not resumed:
            gc.enable()


@contextlib.contextmanager
def _sigterm_as_sigint() -> Iterator[list[bool]]:
    """While serving stdio, SIGTERM (what MCP clients send after closing stdin, and systemd
    and docker to stop a service) stops the server the way Ctrl-C does: calls in flight
    are cancelled and settled (sent ones charged as unknown), the frame being written is
    finished, the ledger's queued writes commit. Without it the process died at once,
    mid-frame, its reservations left to expire. Yields a list that holds True once a
    SIGTERM came (the stop was asked for: exit 0)."""
    import signal

    if threading.current_thread() is not threading.main_thread():
        yield []
        return
    terminated: list[bool] = []

    def on_term(signum: int, frame: Any) -> None:
        terminated.append(True)
        handler = signal.getsignal(signal.SIGINT)
        if callable(handler):  # asyncio's (cancels the main task) or Python's default
            handler(signal.SIGINT, frame)
        else:  # SIGINT ignored (a background job) or reset: stop all the same
            raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, on_term)
    try:
        yield terminated
    finally:
        signal.signal(signal.SIGTERM, previous)


def _cannot_listen(host: str, port: int) -> str | None:
    """Why ``host:port`` cannot be bound right now (in use, no such address), or None."""
    import socket

    try:
        infos = socket.getaddrinfo(host.strip("[]"), port, type=socket.SOCK_STREAM)
        family, _, _, _, addr = infos[0]
        with socket.socket(family, socket.SOCK_STREAM) as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind(addr)
    except OSError as exc:
        return exc.strerror or type(exc).__name__
    return None


def cmd_route(args: argparse.Namespace) -> int:
    from .types import Request

    prompt = sys.stdin.read() if args.prompt == "-" else args.prompt
    gateway = _gateway(args)
    request = Request(
        task_class=args.task_class,
        prompt=prompt,
        system=args.system,
        max_tokens=args.max_tokens,
        override_model=args.override_model,
    )

    async def run() -> Any:
        async with gateway:
            return await gateway.route(request)

    envelope = anyio.run(run)
    _print_envelope(envelope.to_dict(), args.json, sys.stdout)
    return _exit_code(envelope)


def _exit_code(envelope: Envelope) -> int:
    """0 success; 2 a request the gateway refused as it was given (an unknown task class,
    a bound out of range: nothing sent); 1 any other failure."""
    if envelope.status == "success":
        return EXIT_OK
    return EXIT_USAGE if envelope.error_class in _USAGE_CLASSES else EXIT_FAIL


_USAGE_CLASSES = frozenset({"bad_argument", "unknown_task_class"})


def cmd_orchestrate(args: argparse.Namespace) -> int:
    gateway = _gateway(args)
    tool = next((t for t in gateway.tools if t.name == "llm_orchestrate"), None)
    if tool is None:
        anyio.run(gateway.aclose)
        sys.stderr.write("llmgw: llm_orchestrate needs the `roles` plugin; add it to plugins:\n")
        return EXIT_USAGE

    async def progress(done: float, total: float, message: str) -> None:
        sys.stderr.write(f"  [{done:g}/{total:g}] {message}\n")

    async def run() -> Any:
        async with gateway:
            return await tool.fn(task=args.task, depth=args.depth, progress=progress)

    envelope = anyio.run(run)
    _print_envelope(envelope.to_dict(), args.json, sys.stdout)
    return _exit_code(envelope)


def cmd_info(args: argparse.Namespace) -> int:
    gateway = _gateway(args)
    info = gateway.routing_info()
    anyio.run(gateway.aclose)
    json.dump(info, sys.stdout, indent=2, default=str)
    sys.stdout.write("\n")
    return EXIT_OK


def cmd_plugins(args: argparse.Namespace) -> int:
    from .build import build_gateway
    from .loader import available_entry_points, describe_entry_point, hook_names

    settings = _settings(args)
    if args.available:
        enabled = set(settings.plugins)
        rest = [ep for name, ep in sorted(available_entry_points().items()) if name not in enabled]
        if not rest:
            print("every installed plugin is enabled")
        for ep in rest:
            print(f"{describe_entry_point(ep)}  ->  add `- {ep.name}` to plugins: in routing.yaml")
        return EXIT_OK
    gateway = build_gateway(settings)
    print("plugins (config order):")
    for p in gateway.plugins:
        where = f"{p.distribution} {p.version}" if p.distribution else p.origin
        note = f"  [essential: {p.essential_reason}]" if p.essential_reason else ""
        print(f"  {p.name:<20} {where}{note}")
    print("\nhooks (call order):")
    for hook in hook_names():
        impls = gateway.hooks.impls(hook)
        names = []
        for impl in impls:
            flags = [f for f in ("tryfirst", "trylast", "wrapper") if getattr(impl, f, False)]
            names.append(impl.plugin_name + (f" ({', '.join(flags)})" if flags else ""))
        print(f"  {hook:<20} {' -> '.join(names) if names else '(none)'}")
    anyio.run(gateway.aclose)
    return EXIT_OK


def cmd_check_config(args: argparse.Namespace) -> int:
    from .build import build_gateway

    settings = _settings(args)
    gateway = build_gateway(settings, check_only=True)  # creates no ledger, no directory
    out = sys.stdout
    # A plugin reports a start-up problem (a ledger it cannot open) as an "error" key:
    # then the file is not OK, whatever else holds.
    sections = gateway.hooks.report_info()
    problems = [
        (name, section["error"])
        for name, section in sections.items()
        if isinstance(section, dict) and section.get("error")
    ]
    verdict = "OK" if not problems else f"NOT OK ({len(problems)} plugin(s) cannot work)"
    out.write(f"{settings.file_label}: {verdict}\n")
    out.write(f"plugins (in order): {', '.join(p.name for p in gateway.plugins)}\n")
    out.write("task classes:\n")
    for name, spec in settings.task_classes.items():
        if spec.members:
            members = ", ".join(f"{m.provider}/{m.model}" for m in spec.members)
            out.write(f"  {name:<22} panel [{members}] quorum {spec.effective_quorum()}\n")
        else:
            out.write(f"  {name:<22} {spec.provider}/{spec.model} max_tokens {spec.max_tokens}\n")
    out.write("providers:\n")
    for name, provider in sorted(gateway.providers.items()):
        st = provider.status()
        state = "key present" if st.available else f"UNAVAILABLE ({st.reason})"
        out.write(f"  {name:<22} {state}\n")
    # "warnings" lists what a plugin will ignore (a fallback entry naming a provider
    # that no enabled plugin registers): printed, not fatal.
    warnings = [
        (name, str(w))
        for name, section in sections.items()
        if isinstance(section, dict) and isinstance(section.get("warnings"), list)
        for w in section["warnings"]
    ]
    anyio.run(gateway.aclose)
    for name, warning in warnings:
        sys.stderr.write(f"llmgw: warning: plugin {name!r}: {warning}\n")
    for name, error in problems:
        sys.stderr.write(f"llmgw: plugin {name!r} cannot work: {error}\n")
    return EXIT_USAGE if problems else EXIT_OK


def cmd_spend(args: argparse.Namespace) -> int:
    settings = _settings(args)
    try:
        from llmgw.plugins.policies.ledger import format_spend, spend_report
    except ImportError:
        sys.stderr.write("llmgw: the ledger plugin is not installed\n")
        return EXIT_FAIL
    if args.repair:
        from llmgw.plugins.policies.ledger_repair import format_repair, repair_ledger, repaired_ok

        result = repair_ledger(settings)
        sys.stdout.write(format_repair(result) + "\n")
        if not repaired_ok(result):
            return EXIT_FAIL
        sys.stdout.write("\n")
    report = spend_report(settings, check=args.check)
    sys.stdout.write(format_spend(report) + "\n")
    if args.check and not report["check"]["ok"]:
        return EXIT_FAIL
    return EXIT_OK


def cmd_demo(args: argparse.Namespace) -> int:
    from .config import config_path
    from .demo import run_demo

    path = config_path(args.config, os.environ)
    config = path if (args.config or path.is_file()) else None

    async def run() -> int:
        return await run_demo(sys.stdout, config=config)

    code: int = anyio.run(run)
    return code


def cmd_bench(args: argparse.Namespace) -> int:
    import importlib

    checkout = _checkout()
    if checkout is not None and str(checkout) not in sys.path:
        # The console script's path holds its own directory, not the checkout's.
        sys.path.insert(0, str(checkout))
    try:
        # By name: bench/ is a directory of the repository, not part of the package.
        bench = importlib.import_module("bench")
    except ImportError:
        sys.stderr.write(
            "llmgw bench: the bench/ suite lives in the repository; run it from a checkout "
            '(pip install -e ".[bench]", then llmgw bench or python -m bench)\n'
        )
        return EXIT_USAGE
    code = bench.main(list(args.bench_args))
    return int(code)


def _checkout() -> Path | None:
    """The repository checkout holding ``bench/``: the current directory or one above it,
    else where an editable install's package files lead (their links resolve into it)."""
    import llmgw.kernel

    here = Path.cwd()
    places = [here, *here.parents, Path(llmgw.kernel.__file__).resolve().parent.parent]
    for place in places:
        if (place / "bench" / "__main__.py").is_file() and (place / "pyproject.toml").is_file():
            return place
    return None


def cmd_init(args: argparse.Namespace) -> int:
    from llmgw.plugins.starter import InitError, write_starter

    from .config import config_path, effective_env

    path = config_path(args.config, os.environ)
    try:
        # Keys may live in a .env beside the file, as they may for every other command.
        env = effective_env(path, os.environ)
        used = write_starter(path, env, include_all=args.all)
    except InitError as exc:
        sys.stderr.write(f"llmgw init: {exc}\n")
        return EXIT_USAGE
    except OSError as exc:
        sys.stderr.write(f"llmgw init: cannot write {path}: {exc.strerror or exc}\n")
        return EXIT_FAIL
    sys.stdout.write(
        f"wrote {path} for: {', '.join(used)}\nnext: llmgw check-config --config {path}\n"
    )
    return EXIT_OK


def _print_envelope(env: dict[str, Any], raw: bool, out: TextIO) -> None:
    if raw:
        json.dump(env, out, indent=2, default=str)
        out.write("\n")
        return
    meta = env.get("meta", {})
    out.write(f"status: {env['status']}\n")
    if env.get("error"):
        out.write(f"error:  {env['error']} ({meta.get('error_class')})\n")
    if meta.get("provider"):
        out.write(f"model:  {meta['provider']}/{meta['model']}\n")
    tokens = meta.get("tokens", {})
    out.write(
        f"tokens: in {tokens.get('input', 0)} / out {tokens.get('output', 0)}   "
        f"cost: {meta.get('cost_usd_approx')}   latency: {meta.get('latency_ms')} ms\n"
    )
    text = env.get("data", {}).get("text")
    if text:
        out.write(f"\n{text}\n")


_COMMANDS: dict[str, Callable[[argparse.Namespace], int]] = {
    "serve": cmd_serve,
    "route": cmd_route,
    "orchestrate": cmd_orchestrate,
    "info": cmd_info,
    "plugins": cmd_plugins,
    "check-config": cmd_check_config,
    "spend": cmd_spend,
    "demo": cmd_demo,
    "init": cmd_init,
    "bench": cmd_bench,
}


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
