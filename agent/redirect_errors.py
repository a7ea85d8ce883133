"""Exceptions of the capture loader, one type per thing an operator has to fix differently."""

from __future__ import annotations


class RedirectError(Exception):
    """Base class: capture could not be set up or changed."""


class RedirectConfigError(RedirectError, ValueError):
    """A configuration field is invalid (the message names the field)."""


class RedirectCompileError(RedirectError):
    """BCC could not read or compile the eBPF source (the message carries the path and clang's diagnostics)."""


class RedirectKernelError(RedirectError):
    """The kernel refused something Ambit needs (verifier, missing tc/bpffs feature, netlink error)."""


class RedirectPinError(RedirectError):
    """Pinned maps exist but cannot be adopted (other netns, incompatible layout, unreadable)."""


class AttachError(RedirectError):
    """Attaching to or detaching from one interface failed; other interfaces are unaffected."""
