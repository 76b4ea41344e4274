"""freshrec's shared contracts: record schemas, topic names, settings, the embedded
infrastructure launcher, the Kafka adapters and the CLI. Every other package imports
from here; nothing else is shared between them."""

__version__ = "0.1.0"
