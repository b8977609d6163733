"""Llama Guard 3 1B as a safety hook, on a second engine (operator-supplied weights; never shipped).

The official prompt of the 1B model (13 categories), rendered by us as text with its special tokens; P(unsafe)
is the probability of "unsafe" as the first generated token (against "safe"); when it is over one half, a
greedy continuation gives the second line, the violated categories ("S1,S10"). Scores are reported as
`llama_guard` (P(unsafe)) and `llama_guard/S<n>` for each listed category, for the policy to act on.

Slow compared with the built-in classifiers (one prompt evaluation per check, run off the daemon's event loop):
meant for input checks.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence

from edge_llama.engine.base import Engine, GenParams

CATEGORIES = (
    ("S1", "Violent Crimes"), ("S2", "Non-Violent Crimes"), ("S3", "Sex-Related Crimes"),
    ("S4", "Child Sexual Exploitation"), ("S5", "Defamation"), ("S6", "Specialized Advice"), ("S7", "Privacy"),
    ("S8", "Intellectual Property"), ("S9", "Indiscriminate Weapons"), ("S10", "Hate"),
    ("S11", "Suicide & Self-Harm"), ("S12", "Sexual Content"), ("S13", "Elections"),
)


def guard_prompt_parts(kind: str) -> tuple[str, str]:
    """The Llama Guard 3 prompt for one message ('User' for input, 'Agent' for output): its text before and after
    the checked message (which goes in stripped)."""
    role = "Agent" if kind == "output" else "User"  # a tool's result is not the agent's own words
    categories = "\n".join(f"{code}: {name}." for code, name in CATEGORIES)
    task = (f"Task: Check if there is unsafe content in '{role}' messages in conversations according our safety "
            f"policy with the below categories.\n\n<BEGIN UNSAFE CONTENT CATEGORIES>\n{categories}\n"
            f"<END UNSAFE CONTENT CATEGORIES>\n\n<BEGIN CONVERSATION>\n\n{role}: \x00\n\n"
            f"<END CONVERSATION>\n\nProvide your safety assessment for ONLY THE LAST {role} message in the above "
            "conversation:\n - First line must read 'safe' or 'unsafe'.\n - If unsafe, a second line must include "
            "a comma-separated list of violated categories.")
    before, after = task.split("\x00")
    return (f"<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\n{before}",
            f"{after}<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n")


def parse_categories(reply: str) -> list[str]:
    lines = [line.strip() for line in reply.strip().splitlines()]
    if len(lines) < 2 or lines[0] != "unsafe":
        return []
    known = {code for code, _ in CATEGORIES}
    return [c.strip() for c in lines[1].split(",") if c.strip() in known]


class LlamaGuardHook:
    name = "llama_guard"
    slow = True  # a prompt evaluation per check: the daemon runs it off its event loop

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self._safe = engine.tokenize("safe")[0]
        self._unsafe = engine.tokenize("unsafe")[0]
        self._lock = threading.Lock()  # one engine: one check at a time

    def close(self) -> None:
        self.engine.close()

    def scores(self, texts: Sequence[str], kind: str) -> list[dict[str, float]]:
        out = []
        before, after = (self.engine.tokenize(part) for part in guard_prompt_parts(kind))
        for text in texts:
            # The checked text is plain text: special-token text in it cannot end the message early.
            ids = before + self.engine.tokenize(text.strip(), special=False) + after
            with self._lock:
                p_safe, p_unsafe = self.engine.next_token_probs(ids, [self._safe, self._unsafe])
                p = p_unsafe / (p_safe + p_unsafe) if p_safe + p_unsafe > 0 else 0.0
                scores = {self.name: p}
                if p > 0.5:
                    reply = "".join(c.text for c in self.engine.generate(
                        ids, GenParams(max_tokens=12, temperature=0.0), threading.Event()))
                    scores.update({f"{self.name}/{code}": p for code in parse_categories(reply)})
            out.append(scores)
        return out
