"""The core: sessions and placement, edge registry, archive, console."""
