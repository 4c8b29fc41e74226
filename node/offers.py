"""What a node offers: its models, each with its prices and the hash receipts carry."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from protocol.api import ModelOffer
from protocol.signed import model_hash

__all__ = ["OfferBook", "PricedModel"]


@dataclass(frozen=True)
class PricedModel:
    offer: ModelOffer
    hash: int


class OfferBook:
    """The models this node offers, with its prices (nanoTON per million tokens)."""

    def __init__(self, price_prompt: int, price_completion: int) -> None:
        self.price_prompt = price_prompt
        self.price_completion = price_completion
        self._models: dict[str, PricedModel] = {}

    def set_models(self, models: Iterable[tuple[str, int | None]]) -> None:
        self._models = {
            model_id: PricedModel(
                ModelOffer(
                    id=model_id,
                    price_prompt=self.price_prompt,
                    price_completion=self.price_completion,
                    max_model_len=max_len,
                ),
                model_hash(model_id),
            )
            for model_id, max_len in models
        }

    def get(self, model_id: object) -> PricedModel | None:
        return self._models.get(model_id) if isinstance(model_id, str) else None

    @property
    def offers(self) -> list[ModelOffer]:
        return [m.offer for m in self._models.values()]
