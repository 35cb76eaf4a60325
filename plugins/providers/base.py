"""What every provider shares: key, base URL, timeouts, prices, status and report.

A concrete provider implements :meth:`BaseProvider._send` and :meth:`BaseProvider._close`;
:meth:`BaseProvider.complete` refuses to send without a key and turns any exception that
escapes ``_send`` into a classified outcome, so ``complete`` never raises for upstream
trouble.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, replace
from typing import Any, TypeVar
from urllib.parse import urlsplit, urlunsplit

import httpx2
import structlog
from pydantic import SecretStr

from llmgw.kernel import (
    ErrorClass,
    Outcome,
    PluginContext,
    Price,
    Provider,
    ProviderRequest,
    ProviderStatus,
    hookimpl,
    wire,
)
from llmgw.kernel.config import ProviderSpec
from llmgw.kernel.errors import default_message
from llmgw.kernel.logs import REDACTOR

from .http_errors import (
    failure,
    find_cause,
    missing_key,
    transport_failure,
    unusable_key,
    unusable_key_reason,
)
from .pool import cheap_idle_checks
from .pricing import PriceBook, PriceInfo, price_dict

log = structlog.get_logger("llmgw.providers")

T = TypeVar("T")


@dataclass(frozen=True)
class Connection:
    """Where and how to reach a provider; the key is a ``SecretStr`` (repr shows ``****``)."""

    name: str
    base_url: str
    key_env: str | None
    key: SecretStr | None
    timeout_s: float
    connect_timeout_s: float
    base_url_from: str
    #: The largest answer body read (decompressed); see ``gateway.max_response_bytes``.
    max_response_bytes: int = 16 * 1024 * 1024

    @property
    def key_value(self) -> str:
        return self.key.get_secret_value() if self.key is not None else ""

    @property
    def key_unusable(self) -> bool:
        """The key holds characters an HTTP header cannot carry (non-ASCII, control
        characters, inner spaces): usually a paste with smart quotes or a stray word."""
        value = self.key_value
        return bool(value) and not (value.isascii() and value.isprintable() and " " not in value)

    def deadline_limited(self, request_timeout_s: float) -> bool:
        """True when the remaining deadline, not the configured connect timeout, bounds
        the connect (see :meth:`timeout`): a connect timeout then says nothing about the
        upstream."""
        return request_timeout_s < self.connect_timeout_s

    def http_client(
        self, factory: Callable[..., httpx2.AsyncClient] = httpx2.AsyncClient, **options: Any
    ) -> httpx2.AsyncClient:
        """A provider's HTTP client (``factory``: an SDK's own ``httpx2.AsyncClient``
        subclass, or the plain one, given ``options``), with what every provider's client
        has: the configured timeouts, the kernel's "request on the wire" hook
        (:mod:`llmgw.kernel.wire`; paces panels) and the cheap idle-connection checks of
        its pool (:mod:`.pool`)."""
        client = factory(
            timeout=httpx2.Timeout(self.timeout_s, connect=self.connect_timeout_s),
            event_hooks={"request": [wire.request_hook]},
            **options,
        )
        cheap_idle_checks(client)
        return client

    def timeout(self, request_timeout_s: float) -> httpx2.Timeout:
        """The smaller of the configured timeout and the request's remaining deadline."""
        total = max(0.001, min(self.timeout_s, request_timeout_s))
        return httpx2.Timeout(total, connect=min(self.connect_timeout_s, total))


def safe_url(url: str) -> str:
    """A base URL for display: no user:password, no query string."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return "<invalid url>"
    host = parts.hostname or ""
    if parts.port:
        host = f"{host}:{parts.port}"
    return urlunsplit((parts.scheme, host, parts.path, "", ""))


def resolve_connection(
    name: str,
    ctx: PluginContext,
    *,
    default_key_env: str | None,
    default_base_url: str,
    base_url_env: str | None,
    spec: ProviderSpec | None = None,
    base_url: str | None = None,
) -> Connection:
    """Read a provider's connection settings: routing.yaml first, then the environment.

    The key value is registered with the log redactor at once, so no log line can carry
    it from then on.
    """
    env: Mapping[str, str] = ctx.env
    spec = spec if spec is not None else ctx.settings.providers.get(name)
    key_env = (spec.key_env if spec and spec.key_env else None) or default_key_env
    raw_key = env.get(key_env, "").strip() if key_env else ""
    key = SecretStr(raw_key) if raw_key else None
    if raw_key:
        REDACTOR.add(raw_key)
    if spec is not None and spec.base_url:
        url, source = spec.base_url, f"routing.yaml providers.{name}.base_url"
    elif base_url:
        url, source = base_url, "routing.yaml"
    elif base_url_env and env.get(base_url_env):
        url, source = env[base_url_env], base_url_env
    else:
        url, source = default_base_url, "default"
    return Connection(
        name=name,
        base_url=url.rstrip("/"),
        key_env=key_env,
        key=key,
        timeout_s=spec.timeout_s if spec else 60.0,
        connect_timeout_s=spec.connect_timeout_s if spec else 10.0,
        base_url_from=source,
        max_response_bytes=ctx.settings.gateway.max_response_bytes,
    )


class BaseProvider:
    """The provider protocol's common half; subclasses speak one wire format."""

    #: Whether a call without a key is refused (an OpenAI-compatible endpoint may need none).
    key_required = True

    def __init__(self, conn: Connection, prices: PriceBook, models: list[str]) -> None:
        self.name = conn.name
        self.conn = conn
        self.prices = prices
        self.models = models

    # --- the Provider protocol ------------------------------------------------------------

    def status(self) -> ProviderStatus:
        if self.key_required and self.conn.key is None:
            return ProviderStatus(
                False,
                f"{self.conn.key_env} is not set; export it or add it to .env",
                key_env=self.conn.key_env,
                base_url=safe_url(self.conn.base_url),
            )
        if self.conn.key_unusable:
            return ProviderStatus(
                False,
                unusable_key_reason(self.conn.key_env or f"{self.name.upper()}_API_KEY"),
                key_env=self.conn.key_env,
                base_url=safe_url(self.conn.base_url),
            )
        return ProviderStatus(
            True, key_env=self.conn.key_env, base_url=safe_url(self.conn.base_url)
        )

    def price(self, model: str) -> Price | None:
        return self.prices.price(model)

    async def complete(self, request: ProviderRequest) -> Outcome:
        if self.key_required and self.conn.key is None:
            return missing_key(self.name, self.conn.key_env or f"{self.name.upper()}_API_KEY")
        if self.conn.key_unusable:  # the HTTP client would fail to encode the header
            return unusable_key(self.name, self.conn.key_env or f"{self.name.upper()}_API_KEY")
        try:
            return await self._send(request)
        except Exception as exc:
            return self._unexpected(request, exc)

    async def aclose(self) -> None:
        await self._close()

    # --- for subclasses ----------------------------------------------------------------------

    async def _send(self, request: ProviderRequest) -> Outcome:
        raise NotImplementedError

    async def in_time(
        self, request: ProviderRequest, setup: Awaitable[T]
    ) -> tuple[T, ProviderRequest] | Outcome:
        """Await ``setup`` (a client built on first use, importing its SDK), then
        :meth:`time_left`: its result and the request with what is left of its timeout,
        or the outcome that ends the attempt unsent."""
        started = time.monotonic()
        result = await setup
        ready = self.time_left(request, started)
        return ready if isinstance(ready, Outcome) else (result, ready)

    @staticmethod
    def time_left(request: ProviderRequest, started: float) -> ProviderRequest | Outcome:
        """``request`` with its timeout reduced by what the provider spent since
        ``started`` (``time.monotonic()``) before sending, e.g. importing its SDK on first
        use (~1 s); a ``deadline_exceeded`` outcome, nothing sent, when none is left."""
        left = request.timeout_s - (time.monotonic() - started)
        if left <= 0:
            return Outcome.failure(
                ErrorClass.DEADLINE_EXCEEDED,
                default_message(ErrorClass.DEADLINE_EXCEEDED) + "; nothing was sent",
                sent=False,
            )
        return replace(request, timeout_s=left)

    async def _close(self) -> None:
        return None

    def transport_failure(self, request: ProviderRequest, exc: BaseException) -> Outcome:
        """The outcome of a transport exception (:func:`.http_errors.transport_failure`);
        every provider bounds its timeouts by ``request.timeout_s``, so a connect timeout
        under a deadline shorter than the configured connect timeout is ours."""
        return transport_failure(
            self.name,
            request.model,
            exc,
            deadline_limited=self.conn.deadline_limited(request.timeout_s),
        )

    def _unexpected(self, request: ProviderRequest, exc: Exception) -> Outcome:
        """An exception that escaped the wire code: classify by its transport cause."""
        cause = find_cause(exc, (httpx2.HTTPError, TimeoutError))
        if cause is not None:
            return self.transport_failure(request, cause)
        if find_cause(exc, (ValueError, KeyError, TypeError, AttributeError)) is not None:
            # A body that did not parse or had the wrong shape; never log its text.
            log.warning(
                "provider.malformed",
                provider=self.name,
                model=request.model,
                error_type=type(exc).__name__,
            )
            return failure(self.name, request.model, ErrorClass.MALFORMED_RESPONSE, sent=True)
        log.error(
            "provider.unexpected",
            provider=self.name,
            model=request.model,
            error_type=type(exc).__name__,
        )
        return failure(self.name, request.model, ErrorClass.INTERNAL_ERROR, sent=True)

    # --- report_info ---------------------------------------------------------------------------

    def known_models(self) -> list[str]:
        """Models named for this provider anywhere in routing.yaml, plus configured ones."""
        found = {m for p, m in self.prices.settings.declared_models() if p == self.name}
        found.update(self.models)
        return sorted(found)

    def report(self) -> dict[str, Any]:
        """This provider's section of report_info: availability, URL, models, prices."""
        st = self.status()
        models: list[dict[str, Any]] = []
        for model in self.known_models():
            info: PriceInfo | None = self.prices.info(model)
            models.append({"model": model, **price_dict(info)})
        return {
            "available": st.available,
            "reason": st.reason or None,
            "key_env": self.conn.key_env,
            "key_present": self.conn.key is not None,
            "base_url": safe_url(self.conn.base_url),
            "base_url_from": self.conn.base_url_from,
            "timeout_s": self.conn.timeout_s,
            "models": models,
        }


class ProviderPlugin:
    """A plugin that registers one provider from routing.yaml and the environment.

    Subclasses name the provider and its defaults and say how to build the provider
    object; key, base URL, timeouts, prices and the override models are resolved here.
    """

    NAME: str = ""
    KEY_ENV: str = ""
    DEFAULT_BASE_URL: str = ""
    BASE_URL_ENV: str = ""
    GENAI_PROVIDER: str = ""

    def __init__(self, ctx: PluginContext) -> None:
        self.ctx = ctx
        conn = resolve_connection(
            self.NAME,
            ctx,
            default_key_env=self.KEY_ENV,
            default_base_url=self.DEFAULT_BASE_URL,
            base_url_env=self.BASE_URL_ENV,
        )
        spec = ctx.settings.providers.get(self.NAME)
        prices = PriceBook(self.NAME, ctx.settings, ctx.clock, genai_provider=self.GENAI_PROVIDER)
        self.provider = self.build(conn, prices, list(spec.models) if spec else [])

    def build(self, conn: Connection, prices: PriceBook, models: list[str]) -> BaseProvider:
        raise NotImplementedError

    @hookimpl
    def register_providers(self, register: Callable[[Provider], None]) -> None:
        register(self.provider)

    @hookimpl
    def report_info(self) -> dict[str, Any]:
        return self.provider.report()
