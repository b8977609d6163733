"""Prompting: chat templates (rendered by us, sandboxed) and the KV-budget context policy."""
