"""Imago provider node: attested keys, an inference engine, sealed jobs with receipts.

- ``node.app.create_app(config: NodeConfig, *, keys=None) -> web.Application``: the
  aiohttp service of docs/protocol.md (identity, attest, status, jobs, health).
- ``node.engine.EngineBackend``: the narrow engine interface; ``OpenAIHttpBackend``
  talks to any OpenAI-compatible server.
- ``node.supervisor``: launches and supervises vLLM (``vllm_launch``, ``Supervisor``).
- ``node.attest``: ``dev`` and ``tdx`` (configfs-tsm) evidence providers, ``Attester``.
- ``node.keys``: the node's keystore (``protocol.keystore``), encrypted at rest with a
  passphrase; the Provider recorded for its key.
- ``node.jobs``: admitting a sealed job (job id, tickets, replay, prices) or refusing it;
  ``node.runner``: its frames and signed receipt; ``node.seen``: the ids served
  (replay memory); ``node.usage``: token counts; ``node.offers``: models and prices.
- ``node.receipt_log``: every signed receipt, one JSON line each; ``node.claims``,
  ``node.claim_loop``: the payout claims; ``node.earnings``: ``imago provider earnings``.
- ``node.cli``: ``imago node serve``.
"""
