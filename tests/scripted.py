"""What tests of outgoing HTTP against scripted loopback servers (fakes/scripted.py) share;
their fixtures, ``serve`` and ``http``, are in conftest.py."""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from fakes.scripted import Script, ScriptedServer

Serve = Callable[[Script], Awaitable[ScriptedServer]]
