"""The state directory: where every Imago command keeps its state, and what goes where.

One directory holds all of it: ``$IMAGO_HOME``, by default ``~/.imago``. Its layout is
fixed; each entry below has a function here, and nothing else in the code spells a path
inside it::

    $IMAGO_HOME/
      wallets/<name>.json     wallet keystores (`imago wallet new`; --name, default "default")
      keys/<name>.json        role keys the CLI makes: operator.json (the Vault's operator)
      deployment.json         addresses of the Registry, Vaults, Providers, Escrows
      devnet/                 the local devnet: state.json, devnet.log, devnet.pid
      node/                   `imago node serve`: node_keys.json (the node's keystore),
                              provider.json (the Provider `imago provider register` staked
                              for that key), jobs.seen, engine temp files
      matcher/                `imago matcher serve`: matcher.db, ticket_key.json
      client/                 `imago gateway`: spend.key (the escrow's spend key),
                              escrow.json (the escrow `imago escrow open` made for it),
                              spend-*.json (voucher ledgers)
      logs/                   logs of what `imago up` started
      stack.json              what `imago up` runs (read by `imago chat`, `gateway`, `down`)

Every key file is a keystore in the one format of :mod:`protocol.keystore` (mode 0600).
The ``--state-dir`` flags of the services move one sub-directory elsewhere.
"""

from __future__ import annotations

import os
from pathlib import Path

__all__ = [
    "ENV",
    "NODE_KEYSTORE",
    "NODE_PROVIDER",
    "SPEND_KEY",
    "ESCROW_RECORD",
    "TICKET_KEY",
    "client_dir",
    "deployment_file",
    "devnet_dir",
    "escrow_record",
    "imago_home",
    "key_file",
    "keys_dir",
    "logs_dir",
    "matcher_dir",
    "node_dir",
    "node_keystore",
    "spend_key_file",
    "stack_file",
    "wallet_file",
    "wallets_dir",
]

ENV = "IMAGO_HOME"
DEFAULT = "~/.imago"

# file names inside a service's state directory (which --state-dir may move)
NODE_KEYSTORE = "node_keys.json"
NODE_PROVIDER = "provider.json"
TICKET_KEY = "ticket_key.json"
SPEND_KEY = "spend.key"
ESCROW_RECORD = "escrow.json"


def imago_home() -> Path:
    """``$IMAGO_HOME``, or ``~/.imago`` when it is unset or empty."""
    return Path(os.environ.get(ENV) or DEFAULT).expanduser()


def _home(home: Path | None) -> Path:
    return imago_home() if home is None else Path(home)


def wallets_dir(home: Path | None = None) -> Path:
    return _home(home) / "wallets"


def wallet_file(name: str, home: Path | None = None) -> Path:
    return wallets_dir(home) / f"{name}.json"


def keys_dir(home: Path | None = None) -> Path:
    return _home(home) / "keys"


def key_file(name: str, home: Path | None = None) -> Path:
    return keys_dir(home) / f"{name}.json"


def deployment_file(home: Path | None = None) -> Path:
    return _home(home) / "deployment.json"


def devnet_dir(home: Path | None = None) -> Path:
    return _home(home) / "devnet"


def node_dir(home: Path | None = None) -> Path:
    return _home(home) / "node"


def node_keystore(state_dir: Path | None = None) -> Path:
    """The node's keystore in a node state directory (default ``$IMAGO_HOME/node``)."""
    return (node_dir() if state_dir is None else Path(state_dir)) / NODE_KEYSTORE


def matcher_dir(home: Path | None = None) -> Path:
    return _home(home) / "matcher"


def client_dir(home: Path | None = None) -> Path:
    return _home(home) / "client"


def spend_key_file(state_dir: Path | None = None) -> Path:
    """The spend key in a client state directory (default ``$IMAGO_HOME/client``)."""
    return (client_dir() if state_dir is None else Path(state_dir)) / SPEND_KEY


def escrow_record(state_dir: Path | None = None) -> Path:
    """The escrow the client's spend key pays from (default ``$IMAGO_HOME/client``)."""
    return (client_dir() if state_dir is None else Path(state_dir)) / ESCROW_RECORD


def logs_dir(home: Path | None = None) -> Path:
    return _home(home) / "logs"


def stack_file(home: Path | None = None) -> Path:
    return _home(home) / "stack.json"
