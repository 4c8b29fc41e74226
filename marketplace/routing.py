"""Ranking: which nodes get a job, best first.

Eligible: attested, healthy, serving the model, both prices at or below the caps.
Score (lower is better), a product of factors that are 1 for an ideal node:
- price: the node's prompt+completion price over the cheapest eligible node's;
- load: (1 + load)², load = (active jobs it reported + relays we opened) / max_concurrent,
  and a full node (load ≥ 1) goes behind every node with room;
- latency: 1 + measured time to first token / 1 s;
- speed: 1 + 20 / measured tokens/s (an unmeasured node counts as 20 tokens/s);
- reliability: divided by the success rate (EWMA of relays that served).
"""

from __future__ import annotations

from dataclasses import dataclass

from marketplace.registry import NodeState
from protocol.api import ModelOffer

__all__ = ["NoRoute", "Ranked", "rank"]

DEFAULT_TOKENS_PER_S = 20.0


class NoRoute(Exception):
    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.code = code


@dataclass(frozen=True)
class Ranked:
    node: NodeState
    offer: ModelOffer
    score: float


def _score(node: NodeState, offer: ModelOffer, cheapest: int) -> float:
    price = (offer.price_prompt + offer.price_completion + 1) / (cheapest + 1)
    load = node.load
    stats = node.stats
    ttft = 1.0 + (stats.ttft_ms or 0.0) / 1000.0
    speed = 1.0 + DEFAULT_TOKENS_PER_S / (stats.tokens_per_s or DEFAULT_TOKENS_PER_S)
    reliability = max(stats.success, 0.01)
    score = price * (1.0 + load) ** 2 * ttft * speed / reliability
    return score * (1000.0 if load >= 1.0 else 1.0)


def rank(
    candidates: list[NodeState],
    model: str,
    max_price_prompt: int | None = None,
    max_price_completion: int | None = None,
) -> list[Ranked]:
    """Rank ``candidates`` (nodes serving ``model``). Raises NoRoute with the HTTP status:
    404 nobody serves the model, 503 none healthy, 402 every healthy one above the cap."""
    if not candidates:
        raise NoRoute(404, "model_not_found", f"no node serves the model {model!r}")
    healthy = [n for n in candidates if n.routable]
    if not healthy:
        raise NoRoute(503, "no_healthy_node", f"no healthy node serves {model!r} right now")
    within = []
    for node in healthy:
        offer = node.offers[model]
        if (max_price_prompt is None or offer.price_prompt <= max_price_prompt) and (
            max_price_completion is None or offer.price_completion <= max_price_completion
        ):
            within.append((node, offer))
    if not within:
        cheapest = min(healthy, key=lambda n: n.offers[model].price_prompt)
        offer = cheapest.offers[model]
        raise NoRoute(
            402,
            "price_cap_too_low",
            f"every node serving {model!r} is above the price cap (lowest: "
            f"{offer.price_prompt} prompt / {offer.price_completion} completion nanoTON "
            "per million tokens)",
        )
    cheapest_total = min(o.price_prompt + o.price_completion for _, o in within)
    ranked = [Ranked(n, o, _score(n, o, cheapest_total)) for n, o in within]
    ranked.sort(key=lambda r: r.score)
    return ranked
