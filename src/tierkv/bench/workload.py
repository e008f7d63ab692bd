"""A multi-turn serving workload: the requests an engine's prefix cache sees, in arrival order.

``sessions`` users are active at any time. Each session starts from a shared system prompt (Zipf-popular:
a few prompts serve most sessions); a share of them are questions about a long document (also
Zipf-popular, so many sessions read the same one). A session sends a turn, the model replies, the user
thinks (exponential think time) and comes back with the next turn, whose prompt is the whole history so far
plus the new message. After a geometric number of turns (or when its context would pass ``max_context``)
the session ends and a new one takes its place, so ``sessions`` stay active.

Time is virtual: requests are ordered by arrival, and the number of active sessions decides how many other
requests run between two turns of one conversation, which is what presses on the cache's tiers.
"""
from __future__ import annotations

import heapq
from dataclasses import asdict, dataclass, field
from typing import Any, Iterator

import numpy as np

__all__ = ["WorkloadShape", "Request", "generate"]

VOCAB = 128_256  # Llama-3 vocabulary: token ids in a realistic range


@dataclass(frozen=True)
class WorkloadShape:
    sessions: int = 16                            # active sessions at any time
    requests: int = 200                           # requests in the trace
    system_prompts: int = 4
    system_tokens: tuple[int, int] = (256, 1024)  # uniform range of a system prompt's length
    documents: int = 8
    document_tokens: tuple[int, int] = (1024, 4096)
    document_share: float = 0.3                   # share of sessions that ask about a document
    user_tokens: tuple[int, int] = (16, 128)      # a user message
    reply_tokens: tuple[int, int] = (32, 256)     # the model's reply
    mean_turns: float = 6.0                       # turns per session (geometric)
    think_s: float = 30.0                         # mean think time between turns (exponential)
    zipf: float = 1.1                             # popularity exponent of system prompts and documents
    max_context: int = 8192                       # a session ends before its prompt would pass this

    def __post_init__(self) -> None:
        checks = [(self.sessions >= 1, "sessions >= 1", self.sessions),
                  (self.requests >= 1, "requests >= 1", self.requests),
                  (self.system_prompts >= 1, "system_prompts >= 1", self.system_prompts),
                  (self.documents >= 1, "documents >= 1", self.documents),
                  (0.0 <= self.document_share <= 1.0, "document_share in [0, 1]", self.document_share),
                  (self.mean_turns >= 1.0, "mean_turns >= 1", self.mean_turns),
                  (self.think_s > 0, "think_s > 0", self.think_s)]
        for name in ("system_tokens", "document_tokens", "user_tokens", "reply_tokens"):
            lo, hi = getattr(self, name)
            checks.append((1 <= lo <= hi, f"{name} as (low, high) with 1 <= low <= high", (lo, hi)))
        longest = self.system_tokens[1] + self.document_tokens[1] + self.user_tokens[1]
        checks.append((self.max_context >= longest, f"max_context >= {longest} (the longest first turn)",
                       self.max_context))
        for ok, expected, got in checks:
            if not ok:
                raise ValueError(f"expected {expected}, got {got}")

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class Request:
    at: float                 # arrival, virtual seconds
    session: int              # session id (unique over the trace)
    turn: int                 # 0 for a session's first request
    kind: str                 # "chat" | "document"
    prompt: np.ndarray        # uint32 token ids: the whole prompt (history + the new message)
    reply: np.ndarray         # token ids the model answers with (their KV is cached after the request)
    shared_prefix: int = 0    # tokens of the system prompt (+ document) this prompt starts with

    @property
    def prompt_tokens(self) -> int:
        return len(self.prompt)


@dataclass(order=True)
class _Session:
    next_at: float
    id: int = field(compare=False)
    kind: str = field(compare=False)
    history: np.ndarray = field(compare=False, repr=False)
    shared_prefix: int = field(compare=False)
    turn: int = field(compare=False, default=0)


def generate(shape: WorkloadShape, seed: int) -> Iterator[Request]:
    """The trace's requests in arrival order (deterministic for a seed)."""
    rng = np.random.default_rng(seed)

    def tokens(span: tuple[int, int]) -> np.ndarray:
        return rng.integers(0, VOCAB, size=int(rng.integers(span[0], span[1] + 1)), dtype=np.uint32)

    def zipf_pick(n: int) -> int:
        weights = 1.0 / np.arange(1, n + 1) ** shape.zipf
        return int(rng.choice(n, p=weights / weights.sum()))

    systems = [tokens(shape.system_tokens) for _ in range(shape.system_prompts)]
    documents = [tokens(shape.document_tokens) for _ in range(shape.documents)]
    next_id = 0

    def new_session(at: float) -> _Session:
        nonlocal next_id
        prefix = systems[zipf_pick(shape.system_prompts)]
        kind = "chat"
        if rng.random() < shape.document_share:
            prefix = np.concatenate([prefix, documents[zipf_pick(shape.documents)]])
            kind = "document"
        next_id += 1
        return _Session(next_at=at, id=next_id - 1, kind=kind, history=prefix, shared_prefix=len(prefix))

    # Sessions start staggered over one think time, as if the service had been running.
    active = [new_session(float(rng.uniform(0.0, shape.think_s))) for _ in range(shape.sessions)]
    heapq.heapify(active)
    for _ in range(shape.requests):
        s = heapq.heappop(active)
        prompt = np.concatenate([s.history, tokens(shape.user_tokens)])
        reply = tokens(shape.reply_tokens)
        yield Request(at=s.next_at, session=s.id, turn=s.turn, kind=s.kind, prompt=prompt, reply=reply,
                      shared_prefix=s.shared_prefix)
        s.history = np.concatenate([prompt, reply])
        s.turn += 1
        think = float(rng.exponential(shape.think_s))
        longest_next = len(s.history) + shape.user_tokens[1]
        if rng.random() < 1.0 / shape.mean_turns or longest_next > shape.max_context:
            s = new_session(s.next_at + think)  # this user leaves; a new one arrives
        else:
            s.next_at += think
        heapq.heappush(active, s)
