"""`eagle`: speculative decoding with an EAGLE head trained for this target (`egpt-speed train-draft`).

The head drafts from the target's own last hidden states, so it sees the event features through
them; chain drafting with γ tokens, verified by the shared lossless loop.
"""

from __future__ import annotations

from egpt_speed.errors import EgptError
from egpt_speed.strategies.registry import register
from egpt_speed.strategies.speculative import Speculative


@register
class Eagle(Speculative):
    name = "eagle"
    summary = "EAGLE head (--draft HEAD_DIR, default: the shipped tiny-eagle for tiny) drafts a chain from target features; lossless (greedy or rejection sampling)"

    def prepare(self, model) -> None:
        super().prepare(model)
        if self.draft.head is None:
            raise EgptError(f"eagle needs a draft head dir from `egpt-speed train-draft`, not {self.draft.name!r}; use speculative for draft models.")
