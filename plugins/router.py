"""The default router: ``resolve_route`` from ``task_classes`` in routing.yaml.

It is ``trylast``, so any plugin listed in ``plugins:`` may route a request first.
"""

from __future__ import annotations

from llmgw.kernel import (
    ErrorClass,
    PluginContext,
    Request,
    Route,
    RouteError,
    Settings,
    Target,
    hookimpl,
)


class RouterPlugin:
    """Routes a task class to its target or panel; honours declared ``override_model``."""

    def __init__(self, ctx: PluginContext) -> None:
        self.ctx = ctx

    @hookimpl(trylast=True)
    def resolve_route(self, request: Request, settings: Settings) -> Route:
        spec = settings.task_classes.get(request.task_class)
        if spec is None:
            valid = ", ".join(sorted(settings.task_classes))
            raise RouteError(
                f"unknown task_class {request.task_class!r}; valid task classes: {valid}",
                error_class=ErrorClass.UNKNOWN_TASK_CLASS,
            )
        if spec.members:
            if request.override_model:
                raise RouteError(
                    f"override_model does not apply to panel class {request.task_class!r}"
                )
            members = tuple(
                Route(
                    request.task_class,
                    targets=(
                        Target(
                            m.provider,
                            m.model,
                            request.max_tokens or m.max_tokens or spec.max_tokens,
                            label=f"member[{i}]",
                        ),
                    ),
                    system=spec.system,
                )
                for i, m in enumerate(spec.members)
            )
            return Route(
                request.task_class,
                members=members,
                quorum=spec.effective_quorum(),
                min_distinct_providers=spec.min_distinct_providers,
                system=spec.system,
            )
        assert spec.provider is not None and spec.model is not None
        provider, model = spec.provider, spec.model
        if request.override_model:
            provider, model = self._override(request.override_model, settings)
        max_tokens = request.max_tokens or spec.max_tokens
        return Route(
            request.task_class,
            targets=(Target(provider, model, max_tokens, label="primary"),),
            system=spec.system,
        )

    @staticmethod
    def _override(wanted: str, settings: Settings) -> tuple[str, str]:
        declared = settings.declared_models()
        if "/" in wanted:
            provider, _, model = wanted.partition("/")
            if (provider, model) in declared:
                return provider, model
        matches = sorted((p, m) for p, m in declared if m == wanted)
        if len(matches) == 1:
            return matches[0]
        if len(matches) > 1:
            options = ", ".join(f"{p}/{m}" for p, m in matches)
            raise RouteError(
                f"override_model {wanted!r} is declared for several providers; "
                f"write one of: {options}"
            )
        options = ", ".join(sorted(f"{p}/{m}" for p, m in declared))
        raise RouteError(
            f"override_model {wanted!r} is not declared in routing.yaml; declared models: "
            f"{options}. Add it under providers.<name>.models to allow it"
        )
