"""``ue_client --chat``: a conversation on the terminal, one session for all of it, so that each turn runs only
what it adds to the conversation (``RemoteSession.chat``) while the earlier turns stay in the caches of both
sides."""

from __future__ import annotations

import sys
from typing import TextIO

from seam.ue_client.display import TextStream


def converse(session, args, eos: int | None, max_length: int, policy=None, stdin: TextIO = sys.stdin) -> None:
    """Answers ``args.prompt`` first when given, then every line read from ``stdin`` until it ends."""
    messages = [{"role": "system", "content": args.system}] if args.system is not None else []
    pending = args.prompt
    while True:
        question = pending if pending is not None else _read(stdin)
        pending = None
        if question is None:
            return
        if not question.strip():
            continue
        messages.append({"role": "user", "content": question})
        stream = TextStream(session.client.tokenizer, eos, sys.stdout, tuple(args.stop))
        answer: list[int] = []
        turn = session.chat(messages, args.max_new_tokens, policy, max_length)
        for token in turn:
            if not stream.push([token]):
                break
            answer.append(token)
        turn.close()  # the turn's prober stops now, not when the generator is collected
        stream.end()
        messages.append({"role": "assistant", "content": session.client.tokenizer.decode(answer)})
        print(f"ue_client: {len(answer)} tokens; {session.reused} positions of the earlier turns reused",
              file=sys.stderr, flush=True)


def _read(stdin: TextIO) -> str | None:
    if stdin.isatty():
        print("> ", end="", file=sys.stderr, flush=True)
    line = stdin.readline()
    return None if not line else line.rstrip("\n")
