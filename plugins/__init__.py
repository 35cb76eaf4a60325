"""Built-in plugins of llm-gateway-mcp: providers, policies and orchestration.

Each is registered as an entry point in group ``llmgw`` and enabled by naming it in
``plugins:`` in routing.yaml, exactly like a third-party plugin.
"""
