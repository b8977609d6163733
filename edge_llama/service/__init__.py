"""The daemon: asyncio Unix-socket server, scheduler, sessions, summarization and lifecycle."""
