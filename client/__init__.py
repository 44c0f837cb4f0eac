"""tritonclient-based client library and the `chorus` client commands.

`ChorusClient` / `AsyncChorusClient` (client.py) talk to the `chorus` Triton model over HTTP or gRPC; `wire.py` holds
the I/O-free contract (task names, config round trip, request splitting, outputs -> `Prediction`); `cli.py` adds the
`classify`, `tasks`, `task add|remove` and `health` commands to the `chorus` console script.
"""

from .client import AsyncChorusClient, ChorusClient
from .wire import Prediction

__all__ = ["AsyncChorusClient", "ChorusClient", "Prediction"]
