"""Suffix decoding on the edge: model-free drafts from what the text, and this device, wrote before.

SuffixDecoding (Oliaro et al., arXiv 2411.04975) matches the context's last
tokens against a suffix tree of earlier text and proposes the continuation
seen most often there. Its speculation is as long as the pattern is
reliable: each token's probability is estimated from how often it followed
(counting one more, unseen, continuation), the run's probability is the
product, and drafting stops where that falls below a threshold (and, as in
the paper, at the matched pattern's length).
Two indexes are searched and the better scoring one (the sum of its
tokens' probabilities: the tokens it expects to be accepted) wins:

* the session's own: the prompt and the answer committed so far, which
  catches the copies the n-gram prompt lookup catches, and counts them;
* the device's history: its own earlier answers, bounded in bytes, oldest
  forgotten first. It lives in this process's memory only: it is never
  sent to the server nor written to disk.

Both are `SuffixTrie`s: every substring of at most ``depth`` tokens with its
number of occurrences, a suffix tree cut at a depth and left uncompressed,
so that forgetting an answer is the mirror image of adding it.

Memory is counted as ``sys.getsizeof`` of every object the structure owns
(each node, its child dict, each dict key, each count, and the stored token
arrays), with every int counted in full even where CPython shares small ones;
``SuffixTrie.measure`` recounts that by walking the structure, and the
running count ``nbytes`` is kept equal to it.
"""

from __future__ import annotations

import sys
from array import array
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field

from wisp_common.config import EdgeConfig

_INT_BYTES = sys.getsizeof(2**20)  # a count or a token id (any id below 2**30), counted as its own object


class _Node:
    __slots__ = ("count", "children")

    def __init__(self) -> None:
        self.count = 0  # occurrences of the substring that ends at this node
        self.children: dict[int, _Node] | None = None


_NODE_BYTES = sys.getsizeof(_Node()) + _INT_BYTES  # the node and its count


@dataclass(frozen=True)
class Speculation:
    """A proposed continuation: its tokens, each one's estimated probability that the run up to it is right."""

    tokens: list[int]
    probabilities: list[float]  # cumulative: non-increasing
    match_length: int  # how many of the context's last tokens the index matched

    @property
    def score(self) -> float:
        """The tokens it expects to be accepted."""
        return sum(self.probabilities)


NO_SPECULATION = Speculation([], [], 0)


class SuffixTrie:
    """Occurrence counts of every substring of at most ``depth`` tokens of the texts added."""

    def __init__(self, depth: int):
        if depth < 2:
            raise ValueError("a suffix trie needs depth 2 or more: a matched token and one to propose")
        self.depth = depth
        self.root = _Node()
        self.nbytes = _NODE_BYTES
        self._active: list[_Node] = []  # nodes of the streamed text's suffixes, by length 1..depth-1

    def extend(self, tokens: Sequence[int]) -> None:
        """Appends ``tokens`` to the streamed text: counts the substrings that end in them."""
        for token in tokens:
            active = []
            for node in [self.root, *self._active]:
                child = self._child(node, token)
                child.count += 1
                if len(active) < self.depth - 1:
                    active.append(child)
            self._active = active

    def end_text(self) -> None:
        """Ends the streamed text: the next `extend` starts a new one, and no substring spans the two."""
        self._active = []

    def add(self, tokens: Sequence[int]) -> None:
        """Counts the substrings of ``tokens``, a text of its own."""
        self.end_text()
        self.extend(tokens)
        self.end_text()

    def remove(self, tokens: Sequence[int]) -> None:
        """Undoes `add` of ``tokens``: nodes whose count reaches zero go, with what they hold."""
        for start in range(len(tokens)):
            node = self.root
            for token in tokens[start : start + self.depth]:
                assert node.children is not None, "removing a text that was not added"
                child = node.children[token]
                child.count -= 1
                if child.count == 0:  # every node below it counted only occurrences that are gone too
                    before = sys.getsizeof(node.children)
                    del node.children[token]
                    self.nbytes -= self._subtree_bytes(child) + _INT_BYTES + before - sys.getsizeof(node.children)
                    if not node.children:  # a dict does not shrink as keys go: drop it whole
                        self.nbytes -= sys.getsizeof(node.children)
                        node.children = None
                    break
                node = child

    def match(self, context: Sequence[int], longest: int) -> tuple[_Node, int]:
        """The node of the longest suffix of ``context`` (up to ``longest`` tokens) that occurred with a
        continuation, and its length. (The context's own occurrence, at the end of the streamed text, has none.)

        Every suffix of an occurring substring occurs too, so the lengths that match are 1..k for one k.
        """
        found, length = self.root, 0
        for k in range(1, min(longest, self.depth - 1, len(context)) + 1):
            node: _Node | None = self.root
            for token in context[len(context) - k :]:
                node = None if node is None or node.children is None else node.children.get(token)
            if node is None:
                break
            if node.children:
                found, length = node, k
        return found, length

    def speculate(self, context: Sequence[int], max_tokens: int, min_probability: float) -> Speculation:
        """The most frequent continuation after the longest match, while its run stays likely enough.

        At most as many tokens as the match is long: a short match says little about what follows. The match
        leaves room in the trie's depth for ``max_tokens``.
        """
        node, length = self.match(context, max(1, self.depth - max_tokens))
        tokens: list[int] = []
        probabilities: list[float] = []
        probability = 1.0
        while length and len(tokens) < min(max_tokens, length) and node.children:
            # Among the occurrences that had a continuation (one at the very end of a text, the context
            # itself say, is no evidence against any), plus one for a continuation not seen yet: a pattern
            # seen once is right half the time, one seen followed the same way nine times 90%.
            token, child = max(node.children.items(), key=lambda item: item[1].count)
            probability *= child.count / (sum(c.count for c in node.children.values()) + 1)
            if probability < min_probability:
                break
            tokens.append(token)
            probabilities.append(probability)
            node = child
        return Speculation(tokens, probabilities, length)

    def measure(self) -> int:
        """The structure's bytes, recounted by walking it: what ``nbytes`` keeps track of."""
        return self._subtree_bytes(self.root)

    def _child(self, node: _Node, token: int) -> _Node:
        if node.children is None:
            node.children = {}
            self.nbytes += sys.getsizeof(node.children)
        child = node.children.get(token)
        if child is None:
            before = sys.getsizeof(node.children)
            child = node.children[token] = _Node()
            self.nbytes += _NODE_BYTES + _INT_BYTES + sys.getsizeof(node.children) - before
        return child

    @staticmethod
    def _subtree_bytes(node: _Node) -> int:
        total, stack = 0, [node]
        while stack:
            node = stack.pop()
            total += _NODE_BYTES
            if node.children is not None:
                total += sys.getsizeof(node.children) + _INT_BYTES * len(node.children)
                stack.extend(node.children.values())
        return total


_ENTRY_BYTES = sys.getsizeof((0, array("i"))) + _INT_BYTES  # a history entry's tuple and its prompt key


class SuffixHistory:
    """This device's earlier answers, indexed, within ``max_bytes``; the oldest are forgotten first."""

    def __init__(self, max_bytes: int, depth: int):
        self.max_bytes = max_bytes
        self.trie = SuffixTrie(depth)
        self._answers: deque[tuple[int, array]] = deque()  # (prompt key, answer tokens), oldest first
        self._stored_bytes = sys.getsizeof(self._answers)

    @property
    def nbytes(self) -> int:
        """The index's bytes and the stored answers' (their token arrays, entries and the queue)."""
        return self.trie.nbytes + self._stored_bytes

    def __len__(self) -> int:
        return len(self._answers)

    def add(self, prompt_key: int, answer: Sequence[int]) -> None:
        """Remembers an answer; then forgets the oldest until the history fits its bound again (this one too if
        it alone does not fit)."""
        if not answer:
            return
        tokens = array("i", answer)
        self.trie.add(tokens)
        self._answers.append((prompt_key, tokens))
        self._stored_bytes = self._queue_bytes()
        while self._answers and self.nbytes > self.max_bytes:
            self.trie.remove(self._answers.popleft()[1])
            self._stored_bytes = self._queue_bytes()

    def forget(self, prompt_key: int) -> None:
        """Forgets every answer to the prompt with ``prompt_key``."""
        kept: deque[tuple[int, array]] = deque()
        for key, tokens in self._answers:
            if key == prompt_key:
                self.trie.remove(tokens)
            else:
                kept.append((key, tokens))
        self._answers = kept
        self._stored_bytes = self._queue_bytes()

    def _queue_bytes(self) -> int:
        entries = sum(_ENTRY_BYTES + sys.getsizeof(tokens) for _, tokens in self._answers)
        return sys.getsizeof(self._answers) + entries


def prompt_key(prompt: Sequence[int]) -> int:
    return hash(tuple(prompt))


@dataclass(frozen=True)
class SuffixDecoding:
    """The edge's suffix decoding settings; `decoder` makes a drafter's own, with its own history."""

    max_bytes: int = 64 << 20  # the history's bound
    depth: int = 16  # the longest substring indexed: a match and the speculation after it
    min_probability: float = 0.1  # a speculation stops where its run's estimated probability falls below this
    max_tokens: int = 8  # the longest speculation (the controller and the server's hints cap each round anyway)
    forget_same_prompt: bool = False  # benchmarks: never draft a prompt's answer from an earlier answer to it

    @classmethod
    def of(cls, config: EdgeConfig) -> SuffixDecoding | None:
        """The edge configuration's settings; None where suffix decoding is off."""
        if not config.suffix:
            return None
        return cls(config.suffix_max_bytes, config.suffix_max_depth, config.suffix_min_probability, config.draft_tokens)

    def decoder(self) -> SuffixDecoder:
        return SuffixDecoder(self)


@dataclass
class SuffixDecoder:
    """A drafter's suffix decoding: the session's index, the device's history and the speculation being followed."""

    settings: SuffixDecoding
    history: SuffixHistory = field(init=False)
    _session: SuffixTrie | None = field(default=None, init=False)
    _prompt: list[int] | None = field(default=None, init=False)
    _indexed: int = field(default=0, init=False)  # committed tokens in the session's index
    _plan: Speculation = field(default=NO_SPECULATION, init=False)
    _plan_context: list[int] = field(default_factory=list, init=False)  # the context it was made for

    def __post_init__(self) -> None:
        self.history = SuffixHistory(self.settings.max_bytes, self.settings.depth)

    def start(self, prompt: Sequence[int], previous: Sequence[int] = ()) -> None:
        """Begins a session; ``previous`` is the last session's committed text, whose answer joins the history."""
        if self._prompt is not None and len(previous) > len(self._prompt):
            self.history.add(prompt_key(self._prompt), previous[len(self._prompt) :])
        self._prompt = list(prompt)
        if self.settings.forget_same_prompt:
            self.history.forget(prompt_key(prompt))
        self._session = SuffixTrie(self.settings.depth)
        self._session.extend(prompt)
        self._indexed = len(prompt)
        self._plan, self._plan_context = NO_SPECULATION, []

    def propose(self, committed: Sequence[int], pending: Sequence[int]) -> tuple[int, float] | None:
        """The next token after ``committed + pending`` and its probability given the tokens before it, if any."""
        assert self._session is not None, "start() a session first"
        if len(committed) > self._indexed:
            self._session.extend(committed[self._indexed :])
            self._indexed = len(committed)
        context = [*committed, *pending]
        done = len(context) - len(self._plan_context)
        if not (0 <= done < len(self._plan.tokens) and self._follows_plan(context, done)):
            self._plan, self._plan_context = self.speculate(context), context
            done = 0
            if not self._plan.tokens:
                return None
        probabilities = self._plan.probabilities
        return self._plan.tokens[done], probabilities[done] / (probabilities[done - 1] if done else 1.0)

    def speculate(self, context: Sequence[int]) -> Speculation:
        """The better scoring speculation of the session's index and the history's."""
        assert self._session is not None, "start() a session first"
        s = self.settings
        ours = self._session.speculate(context, s.max_tokens, s.min_probability)
        earlier = self.history.trie.speculate(context, s.max_tokens, s.min_probability)
        return earlier if earlier.score > ours.score else ours

    def _follows_plan(self, context: list[int], done: int) -> bool:
        made = len(self._plan_context)
        tail = max(0, made - self.settings.depth)  # the match can only have looked this far back
        return context[tail:made] == self._plan_context[tail:] and context[made:] == self._plan.tokens[:done]
