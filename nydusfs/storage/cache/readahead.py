"""Sequential read detection for one blob: which reads deserve amplification and read-ahead.

Upstream amplifies every miss to ``batch_size`` bytes of whatever follows it in the blob. For a
start-up that reads a few scattered files, most of those bytes belong to files nobody reads:
``bench/storage.py`` measured 4.7x the bytes read. For a reader that walks the blob in order
(an image copy, a ``find | xargs cat``, or several readers that together cover a directory),
one request at a time is the other problem: each reader waits for the request of the one before.

So the cache keeps *streams*, as the kernel keeps read-ahead state per open file, except that
here many streams share one blob (concurrent readers in different places). A stream is a range
of compressed offsets that reads walk through in order: ``pos`` is the furthest end a read has
reached, ``end`` the furthest end fetched or claimed (read-ahead runs ahead of ``pos``).

* A read that starts at most ``back`` bytes before ``pos`` (concurrent readers arrive a little
  out of order) and at most ``gap`` (the merge gap) after ``end`` *continues* the stream. Any
  other read starts a new one (the oldest is forgotten beyond ``MAX_STREAMS``).
* A stream *spans files* once ``FILES_TO_SPAN`` continuing reads have started files, and
  while its reads cover at least half of the bytes it has walked over (``DENSE``). Only then
  does a miss amplify into the blob's following chunks (CI array), and read-ahead go past the
  file being read; otherwise both stay within that file. Both conditions matter: a start-up
  that reads 5% of the files, in the order they are stored, meets neighbours now and then and
  walks the blob in order, but sparsely; each false start costs a window of useless bytes.
* A continuing read that takes ``pos`` to the stream's ``trigger`` makes read-ahead *due*
  (the cache ignores that while the stream has missed nothing and read ahead nothing yet): the
  caller fetches ``window`` more bytes past ``end``, in the background, and reports what it
  claimed with ``advanced``. The window starts at ``initial_window`` and doubles on every
  read-ahead up to ``max_window`` (across files, never more than the stream has read so far);
  the trigger sits half a window before the new end, so the next read-ahead is issued while
  the readers still consume the previous one.

Everything here is pure bookkeeping on the trio thread (no I/O, no awaits).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

MAX_STREAMS = 32
FILES_TO_SPAN = 3
COUNTED_CHUNKS = 256
MIN_WINDOW = 0x2_0000  # 128 KiB
DENSE = 0.5


@dataclass(slots=True)
class Stream:
    start: int  # compressed offset where the stream began
    pos: int  # furthest compressed end reached by a read
    end: int  # furthest compressed end read, claimed or stepped over by read-ahead
    next_index: int  # CI index of the chunk after ``end``
    window: int = 0  # bytes of the last read-ahead (0: none issued yet)
    trigger: int = 0  # a continuing read taking ``pos`` here makes read-ahead due
    files_crossed: int = 0  # continuing reads that started a file
    covered: int = 0  # compressed bytes of the distinct chunks read (a measure of density)
    # Chunks counted in ``covered`` lately (index -> compressed offset): a chunk read in
    # several pieces (FUSE reads 128 KiB at a time) counts once.
    counted: dict[int, int] = field(default_factory=dict)
    age: int = 0  # last use, for forgetting the oldest stream

    @property
    def spans_files(self) -> bool:
        walked = self.pos - self.start
        return self.files_crossed >= FILES_TO_SPAN and self.covered >= DENSE * walked


@dataclass(slots=True)
class ReadSpan:
    """What one read touches: its chunks' compressed range and where the file is."""

    start: int  # lowest compressed offset among the read's chunks
    end: int  # highest compressed end among them
    last_index: int  # CI index of the chunk that ends at ``end``
    file_start: bool  # the read begins at offset 0 of its file
    chunks: Sequence[tuple[int, int, int]] = ()  # (CI index, compressed offset, size) read


class Streams:
    """The read streams of one blob."""

    def __init__(self, initial_window: int, max_window: int, gap: int, back: int) -> None:
        self.initial_window = initial_window
        self.max_window = max(max_window, initial_window)
        self.gap = gap
        self.back = back
        self._streams: list[Stream] = []
        self._clock = 0

    def observe(self, span: ReadSpan) -> tuple[Stream, bool]:
        """Record a read; returns its stream and whether read-ahead is due for it."""
        self._clock += 1
        for s in self._streams:
            if s.pos - self.back <= span.start <= max(s.pos, s.end) + self.gap:
                s.age = self._clock
                if span.file_start and span.start > s.start:
                    s.files_crossed += 1
                self._count(s, span)
                s.pos = max(s.pos, span.end)
                if span.end > s.end:
                    s.end, s.next_index = span.end, span.last_index + 1
                return s, s.pos >= s.trigger
        stream = Stream(span.start, span.end, span.end, span.last_index + 1, trigger=span.end,
                        age=self._clock)  # fmt: skip
        self._count(stream, span)
        if len(self._streams) >= MAX_STREAMS:
            self._streams.remove(min(self._streams, key=lambda x: x.age))
        self._streams.append(stream)
        return stream, False

    def _count(self, stream: Stream, span: ReadSpan) -> None:
        for index, offset, size in span.chunks:
            if index not in stream.counted:
                stream.counted[index] = offset
                stream.covered += size
        if len(stream.counted) > COUNTED_CHUNKS:
            # Chunks well behind the readers will not be read again by this stream.
            horizon = stream.pos - self.back
            stream.counted = {i: o for i, o in stream.counted.items() if o >= horizon}

    def window_of(self, stream: Stream) -> int:
        """The size of the read-ahead about to be issued for ``stream`` (and grow it)."""
        largest = self.max_window
        if stream.spans_files:
            # Across files a window ends where the readers stop (the end of a directory, of a
            # start-up), and what it fetched past that is waste. So never more ahead than the
            # readers have read in order: a directory of 300 KB read file by file earns 300 KB
            # of read-ahead, not megabytes past its end.
            largest = min(largest, max(stream.covered, MIN_WINDOW))
        stream.window = min(largest, stream.window * 2 or self.initial_window)
        return stream.window

    @staticmethod
    def advanced(stream: Stream, end: int, next_index: int) -> None:
        """Read-ahead claimed (or found ready) everything up to ``end``: move the stream on."""
        if end > stream.end:
            stream.end, stream.next_index = end, next_index
        stream.trigger = max(stream.pos + 1, stream.end - stream.window // 2)
