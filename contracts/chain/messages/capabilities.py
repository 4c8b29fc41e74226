"""What a node declares in its Provider contract: its GPUs, region, and models with
their prices."""

from __future__ import annotations

from dataclasses import dataclass

from pytoniq_core import Cell, begin_cell

from .body import MessageError

__all__ = ["Capabilities", "ModelPrice"]


TAG_CAPABILITIES = 0x43415031  # "CAP1"


@dataclass(frozen=True, slots=True)
class ModelPrice:
    """A served model and its prices (nanoTON per million tokens)."""

    model: int  # sha256 of the model id (protocol.signed.model_hash)
    price_prompt: int
    price_completion: int


def _text(value: str) -> Cell:
    raw = value.encode()
    if len(raw) > 127:
        raise MessageError("a text field holds at most 127 bytes")
    return begin_cell().store_bytes(raw).end_cell()


def _load_text(cell: Cell) -> str:
    s = cell.begin_parse()
    return s.load_bytes(s.remaining_bits // 8).decode()


@dataclass(frozen=True, slots=True)
class Capabilities:
    """What a node declares in its Provider contract::

    capabilities#43415031 gpu_count:uint8 gpu_memory_gb:uint16 gpu_model:^Text
        region:^Text models:(Maybe ^ModelEntry) = Capabilities;
    model_entry$_ model:uint256 price_prompt:Coins price_completion:Coins
        next:(Maybe ^ModelEntry) = ModelEntry;
    text$_ {n:#} utf8:(bits (n * 8)) = Text;   // n <= 127
    """

    gpu_model: str
    gpu_memory_gb: int
    gpu_count: int
    region: str
    models: tuple[ModelPrice, ...] = ()

    def to_cell(self) -> Cell:
        nxt: Cell | None = None
        for m in reversed(self.models):
            b = (
                begin_cell()
                .store_uint(m.model, 256)
                .store_coins(m.price_prompt)
                .store_coins(m.price_completion)
            )
            b.store_maybe_ref(nxt)
            nxt = b.end_cell()
        b = (
            begin_cell()
            .store_uint(TAG_CAPABILITIES, 32)
            .store_uint(self.gpu_count, 8)
            .store_uint(self.gpu_memory_gb, 16)
            .store_ref(_text(self.gpu_model))
            .store_ref(_text(self.region))
        )
        b.store_maybe_ref(nxt)
        return b.end_cell()

    @classmethod
    def from_cell(cls, cell: Cell) -> Capabilities:
        try:
            s = cell.begin_parse()
            if s.load_uint(32) != TAG_CAPABILITIES:
                raise MessageError("Capabilities: wrong tag")
            count = s.load_uint(8)
            memory = s.load_uint(16)
            gpu = _load_text(s.load_ref())
            region = _load_text(s.load_ref())
            models: list[ModelPrice] = []
            nxt = s.load_maybe_ref()
            while nxt is not None:
                e = nxt.begin_parse()
                models.append(ModelPrice(e.load_uint(256), e.load_coins(), e.load_coins()))
                nxt = e.load_maybe_ref()
        except MessageError:
            raise
        except Exception as e:
            raise MessageError(f"Capabilities: malformed cell: {e}") from e
        return cls(gpu, memory, count, region, tuple(models))
