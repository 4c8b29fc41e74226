"""Settlement: epoch ledgers built and committed on the Vault, escrows charged, the
ledger published (``docs/ledger.md``)."""
