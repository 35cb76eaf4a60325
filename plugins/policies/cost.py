"""Cost preflight: the worst-case cost of a call before it is sent, with warn and block.

The estimate is a true upper bound, ``call.worst_case_micro_usd()``: the input token
bound at the input price plus every allowed output token (the kernel always sends an
explicit ``max_tokens``) at the output price. It is shown in ``meta.preflight``; the
actual cost is the kernel's ``meta.cost_usd_approx``.

A call above ``block_usd`` is refused with ``policy_refused``, not ``budget_exceeded``:
it is a rule about one call's size (fix: lower ``max_tokens`` or pick another class),
while ``budget_exceeded`` means a monthly cap is reached (fix: wait or raise the cap).
The refusal allows a fallback, which may be cheaper.
"""

from __future__ import annotations

from decimal import Decimal
from typing import Any, Literal

from pydantic import Field, ValidationInfo, field_validator, model_validator

from llmgw.kernel import Call, ErrorClass, PluginContext, Rejection, hookimpl
from llmgw.kernel.config import Model

MICRO = 1_000_000


def usd(micro: int) -> str:
    """Micro-dollars as a dollar figure for messages."""
    return f"${micro / MICRO:.4f}"


def _micro(value: Decimal | None) -> int | None:
    return None if value is None else int(value * MICRO)


class CostPlugin:
    """Estimates each call's worst case before dispatch; warns or refuses above limits."""

    class Config(Model):
        """Section ``cost`` of routing.yaml."""

        warn_usd: Decimal | None = Field(default=None, ge=0)
        """Above this worst-case cost (USD) the call proceeds with meta.preflight.warning."""
        block_usd: Decimal | None = Field(default=None, ge=0)
        """Above this worst-case cost (USD) the call (or panel, in total) is refused before
        dispatch with policy_refused; a fallback target may still be tried."""
        unknown_price: Literal["allow", "block"] = "allow"
        """What to do with a model whose price is unknown: allow (with a warning) or block."""
        panel_cap_usd: dict[str, Decimal] = Field(default_factory=dict)
        """Per panel task class: refuse the panel up front (nothing sent, nothing reserved)
        when the sum of its members' worst cases exceeds this many USD."""

        @model_validator(mode="after")
        def _order(self) -> CostPlugin.Config:
            if (
                self.warn_usd is not None
                and self.block_usd is not None
                and self.warn_usd > self.block_usd
            ):
                raise ValueError(
                    f"warn_usd ({self.warn_usd}) is above block_usd ({self.block_usd}); "
                    "a warning must come before the block"
                )
            return self

        @field_validator("panel_cap_usd")
        @classmethod
        def _panels(cls, caps: dict[str, Decimal], info: ValidationInfo) -> dict[str, Decimal]:
            for name, cap in caps.items():
                if cap < 0:
                    raise ValueError(f"panel_cap_usd.{name} must be >= 0, got {cap}")
            settings = (info.context or {}).get("settings")
            if settings is None:
                return caps
            panels = sorted(n for n, s in settings.task_classes.items() if s.is_panel)
            for name in caps:
                spec = settings.task_classes.get(name)
                if spec is None or not spec.is_panel:
                    what = "not a task class" if spec is None else "not a panel"
                    raise ValueError(
                        f"panel_cap_usd names {name!r}, which is {what}; panel task classes: "
                        f"{', '.join(panels) or 'none'}"
                    )
            return caps

    def __init__(self, ctx: PluginContext) -> None:
        self.ctx = ctx
        config = ctx.config if ctx.config is not None else self.Config()
        self.config = config
        self.warn_micro = _micro(config.warn_usd)
        self.block_micro = _micro(config.block_usd)
        self.panel_caps = {k: int(v * MICRO) for k, v in config.panel_cap_usd.items()}

    @hookimpl
    def preflight(self, call: Call) -> Rejection | None:
        """Estimate, record it in ``meta.preflight``, and refuse above the limits."""
        estimate = call.worst_case_micro_usd()
        what = (
            f"panel {call.task_class!r}"
            if call.is_panel
            else (call.target.key if call.target else call.task_class)
        )
        info: dict[str, Any] = {
            "estimate_usd": None if estimate is None else estimate / MICRO,
            "target": None if call.is_panel else what,
        }
        call.meta["preflight"] = info
        if estimate is None:
            unknown = self._unknown_members(call)
            info["warning"] = (
                f"the price of {', '.join(unknown)} is unknown, so the cost cannot be estimated; "
                "add it under prices: in routing.yaml"
            )
            panel_cap = self.panel_caps.get(call.task_class) if call.is_panel else None
            if panel_cap is not None:
                return self._reject(
                    f"{what} has a cost cap (cost.panel_cap_usd.{call.task_class} = "
                    f"{usd(panel_cap)}) but the price of {', '.join(unknown)} is unknown; "
                    "add it under prices: in routing.yaml",
                    fallback=False,
                )
            if self.config.unknown_price == "block":
                return self._reject(
                    f"the price of {', '.join(unknown)} is unknown and cost.unknown_price is "
                    "block; add it under prices: in routing.yaml or set unknown_price: allow",
                    fallback=True,
                )
            return None
        if call.is_panel:
            cap = self.panel_caps.get(call.task_class)
            if cap is not None and estimate > cap:
                parts = ", ".join(
                    f"{m.target.key if m.target else '?'} {usd(m.worst_case_micro_usd() or 0)}"
                    for m in call.members
                )
                return self._reject(
                    f"the worst-case cost of {what} is {usd(estimate)} ({parts}), above "
                    f"cost.panel_cap_usd.{call.task_class} = {usd(cap)}; pass a smaller "
                    "max_tokens or use a smaller panel",
                    fallback=False,
                )
        if self.block_micro is not None and estimate > self.block_micro:
            return self._reject(self._block_message(call, what, estimate), fallback=True)
        if self.block_micro is not None and not call.is_panel:
            # The kernel refuses to send it if a later plugin pushes it over block_usd.
            call.limit_cost(self.block_micro)
        if self.warn_micro is not None and estimate > self.warn_micro:
            info["warning"] = (
                f"worst-case cost {usd(estimate)} is above cost.warn_usd {usd(self.warn_micro)}"
            )
        return None

    def _block_message(self, call: Call, what: str, estimate: int) -> str:
        assert self.block_micro is not None
        head = (
            f"the worst-case cost of {what} is {usd(estimate)}, above cost.block_usd "
            f"{usd(self.block_micro)}"
        )
        if call.is_panel or call.price is None:
            return head + "; pass a smaller max_tokens or pick a cheaper task class"
        price = call.price
        bound = call.input_token_bound()
        input_micro = price.worst_case_micro_usd(bound, 0)
        head += (
            f" (input <= {bound} tokens at ${price.input_per_mtok}/Mtok + max_tokens "
            f"{call.max_tokens} at ${price.output_per_mtok}/Mtok)"
        )
        if price.output_per_mtok > 0 and input_micro < self.block_micro:
            fits = int((self.block_micro - input_micro) / price.output_per_mtok)
            if fits >= 1:
                return head + f"; pass max_tokens <= {fits} or pick a cheaper task class"
        return head + "; shorten the prompt or pick a cheaper task class"

    @staticmethod
    def _unknown_members(call: Call) -> list[str]:
        calls = call.members if call.is_panel else (call,)
        return [c.target.key for c in calls if c.target is not None and c.price is None] or [
            "this model"
        ]

    def _reject(self, message: str, *, fallback: bool) -> Rejection:
        return Rejection(
            ErrorClass.POLICY_REFUSED,
            message,
            fallback=fallback,
            plugin=self.ctx.name,
            details={"policy": "cost"},
        )

    @hookimpl
    def report_info(self) -> dict[str, Any]:
        c = self.config
        return {
            "warn_usd": None if c.warn_usd is None else float(c.warn_usd),
            "block_usd": None if c.block_usd is None else float(c.block_usd),
            "unknown_price": c.unknown_price,
            "panel_cap_usd": {k: float(v) for k, v in c.panel_cap_usd.items()},
        }
