"""exportctl: command-line client and asyncio client library for exportd."""
