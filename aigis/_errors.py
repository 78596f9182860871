"""The AIGIS error hierarchy: every error names its culprit (file, key, plugin)."""

from __future__ import annotations


class AigisError(Exception):
    """Base of every error AIGIS raises on purpose."""


class ConfigError(AigisError):
    """The AIGIS config file is unusable; carries one line per problem."""

    def __init__(self, problems: list[str]) -> None:
        self.problems = list(problems)
        super().__init__("\n".join(self.problems))


class PluginError(AigisError):
    """Something went wrong with one plugin; the message starts with its name."""

    def __init__(self, plugin: str, message: str) -> None:
        self.plugin = plugin
        self.reason = message
        super().__init__(f'plugin "{plugin}": {message}')


class NotSupervised(PluginError):
    """The supervisor has no process for this plugin (never added, or removed meanwhile)."""

    def __init__(self, plugin: str) -> None:
        super().__init__(plugin, "not supervised")


class ManifestError(PluginError):
    """AIGIS/AIGIS.config is not a valid literal-only manifest."""

    def __init__(self, plugin: str, problems: list[str]) -> None:
        self.problems = list(problems)
        super().__init__(plugin, "; ".join(self.problems))


class SourceError(PluginError):
    """A plugin source could not be fetched (clone, copy)."""


class RequirementsError(PluginError):
    """System requirements are missing or the requirements command failed."""


class SecretsError(PluginError):
    """Secrets are missing or would land outside the plugin directory."""


class SkillError(PluginError):
    """AIGIS.core could not be imported or its SKILLS could not be registered."""


class RemoteError(Exception):
    """Base of exceptions raised in the core whose type the caller cannot import.

    ``remote_traceback`` holds the core's traceback text.
    """

    remote_traceback: str = ""


class CoreUnavailable(AigisError, ConnectionError):
    """The AIGIS core could not be reached (after bounded retries)."""


class CallTimeout(CoreUnavailable):
    """A call got no reply within the caller's timeout; it may or may not have run."""
