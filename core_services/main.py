"""telehealth-core: sessions, placement and the edge registry of the mesh."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

from core_services.server import CoreServer
from telehealth.config import CoreSettings, parse_settings
from telehealth.rpc import install_signal_handlers
from telehealth.runtime import settle_heap
from telehealth.telemetry.logging import configure_logging


async def serve(settings: CoreSettings) -> None:
    stop = asyncio.Event()
    install_signal_handlers(stop)
    core = CoreServer(settings)
    await core.start()
    settle_heap()
    try:
        await stop.wait()
    finally:
        await core.stop()


def main(argv: Sequence[str] | None = None) -> None:
    settings = parse_settings(
        CoreSettings,
        argv,
        "Run the telehealth-mesh core: opens and places patient sessions on edge nodes, tracks "
        "edges by heartbeat, re-places sessions when an edge dies, serves /metrics.",
    )
    configure_logging("core", settings.log_level, settings.log_format)
    asyncio.run(serve(settings))


if __name__ == "__main__":
    main()
