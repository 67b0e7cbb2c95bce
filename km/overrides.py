"""Command-line overrides (`key=value`): the one parser, used by `km train`, `km eval`, resume and sweeps.

Standard library only, so the commands that do not train (`km sweep`, `km compare`) stay fast.

What an override may be (decisions, each from a failure seen in use):
- `key=value` only. The Hydra prefixes `+key` / `++key` (add a key) and `~key` (delete one) are refused: every
  option exists already in the typed schema, and an added key trained a run that could then never be
  evaluated or resumed (its config no longer matched the schema).
- No interpolation (`${...}`) in a value: `logger.tags=[${oc.env:WANDB_API_KEY}]` resolved the secret into
  config.yaml and every checkpoint. Interpolations stay where they belong, in the config files.
- A run's name and id are single directory names (checked with the other ranges in `km.config`).
"""

from __future__ import annotations


class ConfigError(ValueError):
    """A bad configuration or override: the message is one line, meant for the user (exit code 2)."""


def split_override(ov: str) -> tuple[str, str]:
    """`key=value` -> (key, value), refusing the forms above with a one-line ConfigError."""
    if "=" not in ov:
        raise ConfigError(f"override '{ov}' is not of the form key=value")
    key, value = ov.split("=", 1)
    if key.startswith(("+", "~")):
        raise ConfigError(
            f"'{ov}': adding or deleting config keys (+, ++, ~) is not supported; every option "
            f"already exists (km config lists them): write {key.lstrip('+~')}=..."
        )
    if not key:
        raise ConfigError(f"override '{ov}' has no key")
    if "${" in value:
        raise ConfigError(
            f"'{ov}': interpolations (${{...}}) are not allowed in override values; they would be "
            "resolved (secrets included) into config.yaml and the checkpoints"
        )
    return key, value


def override_key(ov: str) -> str:
    """The key of an override, as written (no checks): for filtering lists of overrides."""
    return ov.split("=", 1)[0]
