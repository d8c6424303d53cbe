"""Errors shared across the package, kept in a module with no imports so every layer can raise them."""


class ConfigError(ValueError):
  """A config field is unknown, ill-typed or inconsistent; the message names it."""
