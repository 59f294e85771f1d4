"""Query shrinking: GPQ on an exported graph (see ``gpq`` for the pass and the module map)."""
