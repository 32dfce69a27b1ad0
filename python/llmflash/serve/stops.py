"""Stop sequences over text that arrives in pieces (one detokenized token at a time).

A stop sequence may span pieces, so the tail of the text that could still begin one is held back
until the next piece settles it; the text handed out is therefore the same whether it is
streamed or returned whole: everything before the first stop sequence to complete (the earliest
end; of two ending together, the longer one), which is itself left out.
"""

from __future__ import annotations


class StopMatcher:
    def __init__(self, stops: list[str]):
        self.stops = [s for s in stops if s]
        self.held = ""  # text not yet handed out: it may be the start of a stop sequence
        self.stopped = False

    def push(self, piece: str) -> str:
        """Take the next piece; return the text that is now safe to hand out. After a stop
        sequence completes, `stopped` is set and every later piece is dropped."""
        if self.stopped or not piece:
            return ""
        if not self.stops:
            return piece
        buf = self.held + piece
        best: tuple[int, int] | None = None  # (end, -length) of the first stop to complete
        for s in self.stops:
            i = buf.find(s)
            if i >= 0 and (best is None or (i + len(s), -len(s)) < best):
                best = (i + len(s), -len(s))
        if best is not None:
            self.stopped, self.held = True, ""
            return buf[: best[0] + best[1]]
        keep = 0  # the longest tail of buf that is a proper prefix of a stop sequence
        for s in self.stops:
            for k in range(min(len(s) - 1, len(buf)), keep, -1):
                if buf.endswith(s[:k]):
                    keep = k
                    break
        self.held = buf[len(buf) - keep :]
        return buf[: len(buf) - keep]

    def flush(self) -> str:
        """The end of the text: what was held back is not a stop sequence after all."""
        out, self.held = ("" if self.stopped else self.held), ""
        return out
