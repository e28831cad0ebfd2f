"""The read decisions, as pure functions: no I/O, no clock, no shared state.

A reader asks for bytes of one version, block by block. For each block `next_step` says
what to do, from what the reader has done so far (`Reader`) and what the cache knows of
the block (`BlockState`); `readahead_runs` says what to fetch ahead of a sequential
reader; `run_end` where a reader's own GET stops. `objects.ObjectStore` carries the
steps out; tests drive these functions directly with random interleavings.

The rules, in the order they apply:
- a cached block is served;
- a cold seek (an open-ended read, not sequential, of a block never probed) gets a
  small probe streamed straight from S3 first, uncached: Mist reads a box header at
  every seek and hangs up. Not at the object's first block: every media client comes
  back to it (the box walk, an MP4's index), so it is fetched whole and kept at once,
  which saves the start-up a round trip to S3;
- such a read sends no GET past that probe (or its first block), read-ahead included,
  until the seek grace after its first bytes went out: the hang-up lands before a GET
  is sent, and S3 bills what it sends;
- a block being fetched is joined (one GET per block, whoever asks);
- else a fetch starts; it runs on when its reader leaves early only when it is the
  second seek to a probed block (so a popular block ends up cached);
- a reader is sequential by its own progress (it read the block before, in this request
  or an earlier one on its own connection), never by another client's; a media reader
  (reads.py: one that starts at a faststart MP4's media) streams, and is not held;
- a sequential reader's read-ahead window (`readahead_window`) is sized to what it takes
  while a GET comes back, grows while it waits and eases back while blocks wait for it;
  a seek starts it again from `cache.readahead_blocks`.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

# What a cold seek gets straight from S3, uncached, instead of its block: at most this
# much, and never past the block's end. Enough for Mist's box-header reads, little to
# waste when the client hangs up at once.
PROBE_BYTES = 64 * 1024


@dataclass(frozen=True)
class BlockState:
    """What the store knows of one block of the version being read."""

    cached: bool = False  # in a tier this worker can read
    fetching: bool = False  # a fetch in flight holds it
    probed: bool = False  # a seek's probe has read into it before


@dataclass(frozen=True)
class Reader:
    """One reader at one block."""

    index: int  # the block
    lo: int  # first byte wanted, block-relative
    hi: int  # last byte wanted, block-relative
    block_last: int  # the block's last byte, block-relative
    open_ended: bool  # it asked up to the object's end (Mist's `bytes=N-`)
    sequential: bool  # see `is_sequential`
    held: bool  # an open-ended read still inside its seek grace
    sent: bool  # its first bytes went out
    probed_here: bool = False  # it probed this very block itself


@dataclass(frozen=True)
class Serve:
    """Send the cached block's bytes lo..hi."""


@dataclass(frozen=True)
class Probe:
    """Stream bytes lo..stop of the block straight from S3, uncached."""

    stop: int


@dataclass(frozen=True)
class WaitGrace:
    """Sleep out the rest of the seek grace, then decide again (no longer held)."""


@dataclass(frozen=True)
class Join:
    """Read the block from the fetch in flight."""


@dataclass(frozen=True)
class StartFetch:
    """Fetch blocks index..last in one GET; `keep`: it runs on if its reader leaves."""

    last: int
    keep: bool


Step = Serve | Probe | WaitGrace | Join | StartFetch
StateOf = Callable[[int], BlockState]


def is_sequential(index: int, first_index: int, previous: int | None) -> bool:
    """A reader at block `index` is sequential when this request began at an earlier
    block, or when its connection's previous read ended in the block before."""
    return index > first_index or previous == index - 1


def next_step(
    reader: Reader, state: BlockState, state_of: StateOf, readahead_blocks: int, last_needed: int
) -> Step:
    if state.cached:
        return Serve()
    stop = min(reader.hi, reader.lo + PROBE_BYTES - 1)
    if (
        reader.held
        and not reader.sequential
        and reader.index > 0
        and not state.fetching
        and not state.probed
        and (reader.lo, stop) != (0, reader.block_last)
    ):
        return Probe(stop)
    if state.fetching:
        return Join()
    if reader.held and reader.sent:
        return WaitGrace()
    keep = reader.held and (reader.index == 0 or (state.probed and not reader.probed_here))
    return StartFetch(run_end(reader, state_of, readahead_blocks, last_needed), keep)


def run_end(reader: Reader, state_of: StateOf, readahead_blocks: int, last_needed: int) -> int:
    """Where a reader's own GET from its block stops: the blocks it asked for, at most
    `readahead_blocks` past this one, as long as they are missing. An open-ended read
    gets its block alone (Mist opens `bytes=N-` at every seek and mostly reads a few KiB
    before it hangs up); if it keeps reading, read-ahead, shared and bounded per
    process, fetches what follows, so each such reader holds one block of its own."""
    if reader.open_ended:
        return reader.index
    stop = min(last_needed, reader.index + readahead_blocks)
    end = reader.index
    while end < stop and missing(state_of(end + 1)):
        end += 1
    return end


def missing(state: BlockState) -> bool:
    return not state.cached and not state.fetching


def wants_readahead(reader: Reader) -> bool:
    """Read-ahead follows a sequential reader that is past its seek grace."""
    return reader.sequential and not reader.held


def readahead_runs(
    after: int,
    window: int,
    last_block: int,
    state_of: StateOf,
    inflight: int,
    max_inflight: int,
    min_run: int = 1,
) -> list[tuple[int, int]]:
    """Runs (first, last) of missing blocks among the `window` blocks from `after`, one
    GET each, while fewer than `max_inflight` read-ahead fetches are in flight. The run
    at the window's far end waits until it is `min_run` blocks long (or reaches the
    object's end): a streaming reader then extends its window a few blocks per GET,
    not one GET per block."""
    runs: list[tuple[int, int]] = []
    stop = min(last_block, after + window - 1)
    index = after
    while index <= stop:
        if not missing(state_of(index)):
            index += 1
            continue
        if inflight + len(runs) >= max_inflight:
            break
        first = index
        while index + 1 <= stop and missing(state_of(index + 1)):
            index += 1
        if index == stop < last_block and index - first + 1 < min_run:
            break  # the far end: later, in one longer GET
        runs.append((first, index))
        index += 1
    return runs


HEADROOM = 2.0  # a window holds twice what the reader takes while one GET comes back


def readahead_window(
    current: int,
    floor: int,
    ceiling: int,
    *,
    waited: bool,
    rate_bps: float,
    latency_s: float,
    block_size: int,
    share: int,
) -> int:
    """A streaming reader's next read-ahead window, in blocks: what it needs (its rate x
    the S3 first-byte latency, with headroom: a bandwidth-delay product), doubled while
    it waits on fetches, easing back to what it needs while blocks wait for it; between
    `floor` (cache.readahead_blocks) and `ceiling` (cache.readahead_max_blocks), and
    never over its `share` of the process-wide budget. 0 when read-ahead is off."""
    if floor == 0:
        return 0
    need = floor
    if rate_bps > 0 and latency_s > 0:
        need = math.ceil(rate_bps * latency_s * HEADROOM / block_size) + 1
    target = max(2 * current, need) if waited else max(need, current - 1)
    return max(1, min(max(target, floor), max(ceiling, floor), share))
