"""Sub-commands of ``hf-capgap``: each module defines ``register(subparsers)`` and imports lazily."""
