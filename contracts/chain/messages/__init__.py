"""Typed builders and parsers for every message body of the Imago contracts.

One frozen dataclass per message, with ``to_cell()`` and ``from_cell()``; each class's
``OP`` is its opcode. The layouts are those of the Tolk structs in
``contracts/<name>/messages.tolk`` (TL-B in each class docstring).

Signed objects travel as ``signature:bits512`` next to a reference to the object's cell
(``protocol.signed``).

- ``opcodes``: every opcode (``OP_*``), in one place.
- ``body``: the base of every body (``_Body``), its field codecs, ``MessageError``, and
  ``ReturnExcess``, which every contract sends.
- ``registry``, ``provider``, ``vault``, ``escrow``: the bodies of each contract's
  messages, with ``RegistryParams`` in ``registry`` and ``SignedPayout``/``SignedReceipt``
  in ``provider``.
- ``capabilities``: ``Capabilities`` and ``ModelPrice``, what a node declares.
- ``parse``: ``MESSAGES`` (opcode -> class) and ``parse_body``.
"""
