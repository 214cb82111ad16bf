"""Test helpers for code built on ``diffusers_raven``.

:class:`~diffusers_raven.testing.hub_server.LocalHubServer` is a local Hub-protocol server (standard library only)
that the real ``huggingface_hub`` client can push to and download from, and
:func:`~diffusers_raven.testing.hub_server.use_hub_endpoint` points the client at it. The ``hub_server`` and
``local_hub`` pytest fixtures live in :mod:`diffusers_raven.testing.hub_server`.
"""

from .hub_server import LocalHubServer, use_hub_endpoint

__all__ = ["LocalHubServer", "use_hub_endpoint"]
