"""`edge-llama wyoming`: Home Assistant's Wyoming protocol (asr, tts, handle) in front of the daemon, whose client
it is (the daemon never imports it). server.py serves and announces, handler.py answers one connection's events,
handle.py asks the daemon, services.py holds what connections share, wire.py reads events with limits. ASR and TTS
are voice/'s modules.
"""
