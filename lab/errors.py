"""Exceptions raised by the lab, one type per failure class so callers (CLI, tests, bench) can react precisely."""

from __future__ import annotations


class LabError(Exception):
    """Base class for every lab failure."""


class LabConfigError(LabError):
    """The lab's YAML directory is invalid; nothing was created.

    ``problems`` holds one ``<file>:<Kind>/<ns>/<name>: <field>: <reason>`` line per problem so that a user fixes
    them all in one pass instead of one per run.
    """

    def __init__(self, problems: list[str]) -> None:
        self.problems = list(problems)
        super().__init__("invalid lab config:\n  " + "\n  ".join(self.problems))


class NetnsError(LabError):
    """A netlink / `ip` operation failed (message carries the command and the kernel's answer)."""


class LabProcessError(LabError):
    """A process the lab started died or never became ready (message names its log file and last lines)."""


class LabStateError(LabError):
    """The lab's recorded state is missing or conflicts with the request (e.g. a lab of that name exists)."""
