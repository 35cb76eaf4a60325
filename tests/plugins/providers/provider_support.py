"""Helpers shared by the provider tests (fixtures are in conftest.py)."""

from __future__ import annotations

from dataclasses import dataclass

from llmgw.kernel import Gateway, Message, Provider, ProviderRequest
from llmgw.kernel.fake_upstream import FakeUpstream

#: provider name -> (model used in tests, key variable)
PROVIDERS: dict[str, tuple[str, str]] = {
    "openai": ("gpt-4o-mini", "OPENAI_API_KEY"),
    "deepseek": ("deepseek-chat", "DEEPSEEK_API_KEY"),
    "anthropic": ("claude-haiku-4-5", "ANTHROPIC_API_KEY"),
    "gemini": ("gemini-2.5-flash", "GEMINI_API_KEY"),
    "local": ("llama3.2", "LOCAL_LLM_KEY"),  # an openai_compatible endpoint
}

KEYS = {
    "OPENAI_API_KEY": "sk-proj-test-openai-0123456789abcdef",
    "DEEPSEEK_API_KEY": "sk-test-deepseek-0123456789abcdef",
    "ANTHROPIC_API_KEY": "sk-ant-test-anthropic-0123456789abcdef",
    "GEMINI_API_KEY": "AIza-test-gemini-0123456789abcdef",
    "LOCAL_LLM_KEY": "local-test-key-0123456789abcdef",
}


def gateway_yaml(
    up: FakeUpstream | None,
    *,
    base_urls: dict[str, str] | None = None,
    extra: str = "",
    plugins: str = "",
) -> str:
    """A routing.yaml with one task class per provider, every base_url at the fake."""
    urls = {name: up.base_url(name) for name in PROVIDERS} if up else {}
    urls.update(base_urls or {})
    lines = [
        f"plugins: [router, openai, deepseek, anthropic, gemini, openai_compatible{plugins}]",
        "providers:",
    ]
    for name in ("openai", "deepseek", "anthropic", "gemini"):
        lines.append(f"  {name}: {{base_url: '{urls[name]}', timeout_s: 10}}")
    lines += [
        "  local: {timeout_s: 10}",
        "openai_compatible:",
        "  endpoints:",
        f"    - {{name: local, base_url: '{urls['local']}', key_env: LOCAL_LLM_KEY,",
        "       models: [llama3.2]}",
        "task_classes:",
    ]
    for name, (model, _) in PROVIDERS.items():
        lines.append(f"  ask_{name}: {{provider: {name}, model: {model}, max_tokens: 64}}")
    return "\n".join(lines) + "\n" + extra


def request(
    provider: str,
    prompt: str = "hello there",
    *,
    system: str | None = None,
    max_tokens: int = 64,
    timeout_s: float = 5.0,
    model: str | None = None,
) -> ProviderRequest:
    return ProviderRequest(
        provider=provider,
        model=model or PROVIDERS[provider][0],
        system=system,
        messages=(Message("user", prompt),),
        max_tokens=max_tokens,
        timeout_s=timeout_s,
    )


@dataclass
class Stack:
    up: FakeUpstream
    gw: Gateway

    def provider(self, name: str) -> Provider:
        return self.gw.providers[name]
