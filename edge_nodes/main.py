"""telehealth-edge: an edge node serving the vitals of the sessions placed on it."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

from edge_nodes.server import EdgeServer
from telehealth.config import EdgeSettings, parse_settings
from telehealth.rpc import install_signal_handlers
from telehealth.runtime import settle_heap
from telehealth.telemetry.logging import configure_logging


async def serve(settings: EdgeSettings) -> None:
    stop = asyncio.Event()
    install_signal_handlers(stop)
    edge = EdgeServer(settings)
    # Readiness follows the core link; the process itself keeps running while the core is away.
    await edge.start(wait_for_core=None)
    settle_heap()
    try:
        await stop.wait()
    finally:
        await edge.stop()


def main(argv: Sequence[str] | None = None) -> None:
    settings = parse_settings(
        EdgeSettings,
        argv,
        "Run a telehealth-mesh edge node: takes vitals from patients' devices, scores NEWS2, "
        "fans out live vitals to clinicians, reports load to the core.",
    )
    configure_logging(f"edge:{settings.edge_id}", settings.log_level, settings.log_format)
    asyncio.run(serve(settings))


if __name__ == "__main__":
    main()
