"""What ``ue_client`` shows a person: the generated text as it streams, a line for every move of the split (and
a live status line on a terminal), and the closing summary of where each millisecond went."""

from __future__ import annotations

import sys

from tokenizers.decoders import DecodeStream


class TextStream:
    """Writes the first sequence's tokens to ``out`` as text, until the end-of-sequence token or one of ``stops``
    (which is not written)."""

    def __init__(self, tokenizer, eos: int | None, out, stops: tuple[str, ...] = ()):
        self.tokenizer, self.eos, self.out, self.stops = tokenizer, eos, out, tuple(stop for stop in stops if stop)
        self.decoder = DecodeStream(skip_special_tokens=True)
        self.held = ""  # text that could still be the start of a stop string

    def push(self, tokens) -> bool:
        """Writes the next token; False once the sequence ended."""
        token = int(tokens[0])
        if token == self.eos:
            return False
        self.held += self.decoder.step(self.tokenizer, token) or ""  # None: a character not yet whole
        found = [self.held.index(stop) for stop in self.stops if stop in self.held]
        if found:
            self._write(self.held[:min(found)])
            self.held = ""
            return False
        keep = max((size for stop in self.stops for size in range(len(stop) - 1, 0, -1)
                    if self.held.endswith(stop[:size])), default=0)
        self._write(self.held[:len(self.held) - keep])
        self.held = self.held[len(self.held) - keep:]
        return True

    def _write(self, text: str) -> None:
        if text:
            self.out.write(text)
            self.out.flush()

    def end(self, trailer: str = "\n") -> None:
        """Writes what was held back for a stop string that never came, then ``trailer``."""
        self._write(self.held + trailer)
        self.held = ""


def summary(session, socket) -> str:
    """Two lines: tokens, time to first token and rate; the median per-token parts and the bytes each way; before
    them, why the generation started at another split than asked, if it did."""
    stats, num_layers = session.stats, session.num_layers
    medians = stats.decode_medians_ms()
    moves = f"; {len(session.moves)} moves, ended at split {session.split}" if session.moves else ""
    chosen = f"ue_client: started at split {session.first_split} ({session.start_reason})\n" if session.start_reason else ""
    return (
        f"{chosen}ue_client: split {session.first_split}/{num_layers}{moves}; {len(stats.arrivals)} tokens; "
        f"time to first token {1e3 * stats.time_to_first_token_s:.1f} ms; {stats.tokens_per_second:.1f} tokens/s\n"
        f"ue_client: per token (median): UE {medians['ue_s']:.2f} ms, network {medians['network_s']:.2f} ms, "
        f"edge {medians['edge_s']:.2f} ms; sent {socket.bytes_sent} B, received {socket.bytes_received} B"
    )


class StatusLine:
    """A line of its own for every move, and a live line (split, link estimate) on a terminal whose text is
    not streaming there too (stdout redirected), since redrawing the line would wipe the text."""

    def __init__(self, stream, num_layers: int):
        self.stream = stream
        self.live = stream.isatty() and not sys.stdout.isatty()
        self.text_here = stream.isatty() and sys.stdout.isatty()  # a move's line must not run on from the text
        self.num_layers = num_layers
        self.moves_shown = 0

    def update(self, session) -> None:
        for move in session.moves[self.moves_shown:]:
            self._clear()
            why = f": {move.reason}" if move.reason else ""
            lead = "\n" if self.text_here else ""
            self.stream.write(f"{lead}ue_client: before token {move.before_step + 1}, split {move.from_split} -> "
                              f"{move.to_split} ({move.sent_bytes / 1e6:.2f} MB sent in {1e3 * move.seconds:.0f} ms){why}\n")
        self.moves_shown = len(session.moves)
        if self.live:
            link = session.link.link()
            self.stream.write(f"\r\x1b[2Kue_client: token {len(session.stats.arrivals)}, split {session.split}/"
                              f"{self.num_layers}, link up {link.up_mbit:.1f} down {link.down_mbit:.1f} Mbit/s, "
                              f"rtt {1e3 * link.rtt_s:.1f} ms")
        self.stream.flush()

    def _clear(self) -> None:
        if self.live:
            self.stream.write("\r\x1b[2K")

    def finish(self) -> None:
        self._clear()
        self.stream.flush()
