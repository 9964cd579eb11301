"""What every config section shares: unknown keys fail, assignments are validated."""

from pydantic import BaseModel, ConfigDict


class ConfigError(ValueError):
    """A config key or value is wrong; the message names it."""


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)
