"""Imago provider node: attested keys, an inference engine, sealed jobs with receipts.

- ``node.app.create_app(config: NodeConfig, *, keys=None) -> web.Application``: the
  aiohttp service of docs/protocol.md (identity, attest, status, jobs, health).
- ``node.engine.EngineBackend``: the narrow engine interface; ``OpenAIHttpBackend``
  talks to any OpenAI-compatible server.
- ``node.supervisor``: launches and supervises vLLM (``vllm_launch``, ``Supervisor``).
- ``node.attest``: ``dev`` and ``tdx`` (configfs-tsm) evidence providers, ``Attester``.
- ``node.keys``: the node's keystore (``protocol.keystore``), encrypted at rest with a
  passphrase; the Provider recorded for its key.
- ``node.jobs``: the sealed job path and receipts.
- ``node.cli``: ``imago node serve``.
"""
