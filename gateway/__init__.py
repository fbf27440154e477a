"""The push gateway: terminals subscribe to their Redis push stream over SSE or WebSocket.

A separate program from the engine (``touchstream gateway serve``). Terminals hold no
Redis credentials: each presents a signed token bound to its terminal id
(``touchstream gateway token TERMINAL_ID``). Modules: :mod:`gateway.settings`
(``TOUCHSTREAM_GATEWAY_*``), :mod:`gateway.tokens`, :mod:`gateway.hub` (the shared
reader), :mod:`gateway.app` (the ASGI app), :mod:`gateway.server` (uvicorn),
:mod:`gateway.cli` (the subcommands), :mod:`gateway.loadtest` (idle connections).
Importing this package imports nothing heavy.
"""
