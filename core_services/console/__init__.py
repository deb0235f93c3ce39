"""The clinician web console: ward view and patient view, served by the core over aiohttp."""
