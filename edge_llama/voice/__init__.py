"""`edge-llama voice`: a spoken front end that is a client of the daemon, never part of it.

audio (devices and WAV files) -> vad (Silero, endpointing) -> asr (faster-whisper) -> answer (the daemon's streamed
reply, cut into sentences) -> tts (Piper or espeak-ng) -> player -> audio. loop.py is the state machine that
ties them together (listening / hearing / thinking / speaking, barge-in); cli.py is the command-line glue.
Heavy libraries (sounddevice, faster_whisper, ctranslate2, onnxruntime, piper) are imported inside the module that
uses them, so `import edge_llama.voice.<anything>` stays cheap and the daemon never loads them.
"""
