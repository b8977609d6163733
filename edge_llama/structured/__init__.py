"""Structured output: a request's tools / tool_choice / response_format as a per-step token mask (the same for
every engine), the tool-call text formats, and the splitting of a streamed reply into content and calls.

plan.py checks a request and makes its Plan; constraint.py turns a Plan into a TokenConstraint for one engine's
vocabulary (llguidance); splitter.py reads the streamed text back into content and calls; formats.py is what both
agree on. Above engine/ (it imports engine.base, protocol, errors), below prompting/, safety/ and service/.
"""
