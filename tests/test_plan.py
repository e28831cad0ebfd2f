"""The read plan and the answer check are pure: tested directly, and by a model of many
readers, fetch arrivals and hang-ups in random interleavings (hypothesis)."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import UTC, datetime

from hypothesis import event, given, settings
from hypothesis import strategies as st

from s3proxy.store import plan
from s3proxy.store.blocks import BlockKey, block_bounds, last_block
from s3proxy.store.fetch import FetchTable, answer_problem
from s3proxy.upstream import ObjectMeta

PROBE = plan.PROBE_BYTES


def reader(**changes: object) -> plan.Reader:
    base: dict[str, object] = dict(
        index=3,
        lo=0,
        hi=PROBE * 4 - 1,
        block_last=PROBE * 4 - 1,
        open_ended=True,
        sequential=False,
        held=True,
        sent=False,
    )
    base.update(changes)
    return plan.Reader(**base)  # type: ignore[arg-type]


def nothing(_index: int) -> plan.BlockState:
    return plan.BlockState()


def test_a_cold_seek_mid_block_is_probed() -> None:
    step = plan.next_step(reader(lo=100), plan.BlockState(), nothing, 2, 9)
    assert step == plan.Probe(stop=100 + PROBE - 1)


def test_the_first_block_is_never_probed_but_fetched_whole_and_kept() -> None:
    # Mist's first read is `bytes=0-` for a box header; its next reads come back to it
    first = reader(index=0, lo=0)
    assert plan.next_step(first, plan.BlockState(), nothing, 2, 9) == plan.StartFetch(0, True)
    assert plan.next_step(reader(index=0, lo=32), plan.BlockState(), nothing, 2, 9) == (
        plan.StartFetch(0, True)
    )


def test_a_probed_block_is_fetched_whole_and_kept_by_the_next_seek() -> None:
    step = plan.next_step(reader(lo=100), plan.BlockState(probed=True), nothing, 2, 9)
    assert step == plan.StartFetch(last=3, keep=True)


def test_after_its_probe_a_reader_waits_out_the_grace_before_a_get() -> None:
    after_probe = reader(lo=100 + PROBE, sent=True, probed_here=True)
    assert plan.next_step(after_probe, plan.BlockState(probed=True), nothing, 2, 9) == (
        plan.WaitGrace()
    )
    released = reader(lo=100 + PROBE, sent=True, probed_here=True, held=False)
    assert plan.next_step(released, plan.BlockState(probed=True), nothing, 2, 9) == (
        plan.StartFetch(last=3, keep=False)
    )


def test_a_sequential_reader_is_never_probed_and_a_fetch_in_flight_is_joined() -> None:
    assert plan.next_step(
        reader(lo=100, sequential=True), plan.BlockState(), nothing, 2, 9
    ) == plan.StartFetch(last=3, keep=False)
    assert plan.next_step(reader(lo=100), plan.BlockState(fetching=True), nothing, 2, 9) == (
        plan.Join()
    )
    assert plan.next_step(reader(), plan.BlockState(cached=True), nothing, 2, 9) == plan.Serve()


def test_a_closed_range_fetches_what_it_needs_up_to_the_window() -> None:
    closed = reader(open_ended=False, held=False)
    assert plan.next_step(closed, plan.BlockState(), nothing, 2, 9) == plan.StartFetch(5, False)
    assert plan.next_step(closed, plan.BlockState(), nothing, 2, 4) == plan.StartFetch(4, False)

    def fifth_cached(index: int) -> plan.BlockState:
        return plan.BlockState(cached=index == 5)

    assert plan.run_end(closed, fifth_cached, 8, 9) == 4


@given(
    st.integers(0, 40),
    st.integers(0, 8),
    st.integers(0, 60),
    st.integers(0, 4),
    st.integers(1, 4),
    st.sets(st.integers(0, 60)),
)
def test_readahead_runs_are_missing_blocks_within_the_window(
    after: int, window: int, last: int, inflight: int, max_inflight: int, present: set[int]
) -> None:
    def state_of(index: int) -> plan.BlockState:
        return plan.BlockState(cached=index in present)

    runs = plan.readahead_runs(after, window, last, state_of, inflight, max_inflight)
    covered = [i for first, end in runs for i in range(first, end + 1)]
    assert len(covered) == len(set(covered))
    assert all(after <= i <= min(last, after + window - 1) and i not in present for i in covered)
    assert inflight + len(runs) <= max(max_inflight, inflight)
    if inflight + len(runs) < max_inflight:  # not stopped by the bound: every gap taken
        wanted = {i for i in range(after, min(last, after + window - 1) + 1) if i not in present}
        assert set(covered) == wanted


@given(
    st.integers(0, 40),
    st.integers(1, 32),
    st.integers(0, 80),
    st.integers(1, 8),
    st.sets(st.integers(0, 80)),
)
def test_the_far_end_of_a_window_waits_for_a_longer_run(
    after: int, window: int, last: int, min_run: int, present: set[int]
) -> None:
    def state_of(index: int) -> plan.BlockState:
        return plan.BlockState(cached=index in present)

    runs = plan.readahead_runs(after, window, last, state_of, 0, 99, min_run=min_run)
    stop = min(last, after + window - 1)
    for first, end in runs:
        if end == stop and stop < last:
            assert end - first + 1 >= min_run, (first, end)
    plain = plan.readahead_runs(after, window, last, state_of, 0, 99)
    assert runs == plain[: len(runs)] and len(plain) - len(runs) <= 1  # only the far end waits


@given(st.integers(0, 5000), st.integers(0, 5000), st.integers(1, 6000))
def test_an_answer_is_accepted_only_when_it_is_exactly_what_was_asked(
    start: int, length: int, size: int
) -> None:
    end = start + length
    meta = ObjectMeta("k", size, '"v1"', datetime.now(UTC), None)
    if start >= size:
        return
    last = min(end, size - 1)
    good = (206, (start, last, size), last - start + 1, '"v1"')
    assert answer_problem(*good, start, end, meta) is None
    assert answer_problem(*good, start, end, None) is None
    bad = [
        (200, None, size, '"v1"'),
        (200, (start, last, size), last - start + 1, '"v1"'),
        (206, None, last - start + 1, '"v1"'),
        (206, (start, last, size), last - start + 1, '"v2"'),
        (206, (start, last, size), last - start, '"v1"'),
        (206, (start, last, size), last - start + 2, '"v1"'),
        (206, (start, last, size + 1), last - start + 1, '"v1"'),
    ]
    if last + 1 < size:
        bad.append((206, (start + 1, last + 1, size), last - start + 1, '"v1"'))
    if start > 0:
        bad.append((206, (start - 1, last - 1, size), last - start + 1, '"v1"'))
    for answer in bad:
        assert answer_problem(*answer, start, end, meta) is not None, answer


def test_the_fetch_table_claims_all_or_nothing_and_only_owners_release() -> None:
    table = FetchTable()
    first, overlapping, other = (
        ModelFetch(0, 2, False),
        ModelFetch(2, 3, False),
        ModelFetch(5, 5, False),
    )
    assert table.claim(first)  # type: ignore[arg-type]
    assert not table.claim(overlapping), "block 2 is first's"  # type: ignore[arg-type]
    assert BlockKey("b", "k", "e", 3) not in table, "nothing of a refused claim is kept"
    table.release(other, BlockKey("b", "k", "e", 1))  # type: ignore[arg-type]
    assert table.get(BlockKey("b", "k", "e", 1)) is first, "only its owner removes it"
    table.release(first)  # type: ignore[arg-type]
    assert len(table) == 0


# --- a model of the store: the plan's steps applied to a cache and a fetch table ----

BS = 100  # bytes per block in the model


@dataclass
class ModelFetch:
    first: int
    last: int
    keep: bool
    readers: int = 0
    next_block: int = 0

    def keys(self) -> list[BlockKey]:
        return [BlockKey("b", "k", "e", i) for i in range(self.first, self.last + 1)]


@dataclass
class ModelReader:
    start: int
    end: int
    previous: int | None
    index: int = 0
    lo: int = 0
    held: bool = True
    sent: bool = False
    probed_here: bool = False
    waiting: ModelFetch | None = None
    got: list[int] = field(default_factory=list)  # offsets received, in order
    attached: list[ModelFetch] = field(default_factory=list)
    done: bool = False


@dataclass
class Model:
    size: int
    window: int
    cached: set[int] = field(default_factory=set)
    probed: set[int] = field(default_factory=set)
    table: FetchTable = field(default_factory=FetchTable)
    fetches: list[ModelFetch] = field(default_factory=list)
    gets: dict[int, int] = field(default_factory=dict)  # block -> GETs that carried it

    def key(self, index: int) -> BlockKey:
        return BlockKey("b", "k", "e", index)

    def state(self, index: int) -> plan.BlockState:
        return plan.BlockState(
            cached=index in self.cached,
            fetching=self.key(index) in self.table,
            probed=index in self.probed,
        )

    def start_fetch(self, first: int, last: int, keep: bool) -> ModelFetch:
        fetch = ModelFetch(first, last, keep, next_block=first)
        for index in range(first, last + 1):
            assert index not in self.cached, "a cached block was fetched"
        assert self.table.claim(fetch), "two GETs for one block"  # type: ignore[arg-type]
        for index in range(first, last + 1):
            self.gets[index] = self.gets.get(index, 0) + 1
        self.fetches.append(fetch)
        return fetch

    def arrive(self, fetch: ModelFetch) -> None:
        index = fetch.next_block
        self.cached.add(index)
        self.table.release(fetch, self.key(index))  # type: ignore[arg-type]
        fetch.next_block += 1
        if fetch.next_block > fetch.last:
            self.fetches.remove(fetch)

    def cancel(self, fetch: ModelFetch) -> None:
        self.table.release(fetch)  # type: ignore[arg-type]
        self.fetches.remove(fetch)

    def step(self, r: ModelReader) -> None:
        """One decision for reader `r`, applied."""
        if r.waiting is not None:
            if r.index not in self.cached:
                return  # still waiting for its block
            r.waiting = None
        bs_first, bs_last = block_bounds(r.index, BS, self.size)
        lo = max(r.lo, r.start - bs_first, 0)
        hi = min(r.end, bs_last) - bs_first
        view = plan.Reader(
            index=r.index,
            lo=lo,
            hi=hi,
            block_last=bs_last - bs_first,
            open_ended=r.end == self.size - 1,
            sequential=plan.is_sequential(r.index, r.start // BS, r.previous),
            held=r.held,
            sent=r.sent,
            probed_here=r.probed_here,
        )
        step = plan.next_step(view, self.state(r.index), self.state, self.window, r.end // BS)
        if isinstance(step, plan.Probe):
            assert r.index not in self.probed and not view.sequential and r.held
            assert r.index > 0, "the first block is fetched whole, never probed"
            assert lo <= step.stop <= hi
            self.probed.add(r.index)
            r.got.extend(range(bs_first + lo, bs_first + step.stop + 1))
            r.sent, r.probed_here, r.lo = True, True, step.stop + 1
            if step.stop == hi:
                self.advance(r)
            return
        if isinstance(step, plan.WaitGrace):
            assert r.held and r.sent
            r.held = False
            return
        if isinstance(step, plan.Serve):
            assert r.index in self.cached
            self.read_ahead(r, view)
            r.got.extend(range(bs_first + lo, bs_first + hi + 1))
            r.sent = True
            self.advance(r)
            return
        if isinstance(step, plan.StartFetch):
            assert not (r.held and r.sent), "a GET inside the seek grace"
            fetch = self.start_fetch(r.index, step.last, step.keep)
        else:
            fetch = self.table.get(self.key(r.index))  # type: ignore[assignment]
            assert fetch is not None
        if fetch not in r.attached:
            fetch.readers += 1
            r.attached.append(fetch)
        self.read_ahead(r, view)  # as the store does: after its own fetch has its blocks
        r.waiting = fetch
        r.lo = lo  # served once the block arrives (the next step finds it cached)

    def read_ahead(self, r: ModelReader, view: plan.Reader) -> None:
        if not plan.wants_readahead(view):
            return
        assert not r.held, "read-ahead inside the seek grace"
        for first, last in plan.readahead_runs(
            r.index + 1, self.window, last_block(self.size, BS), self.state, 0, 99
        ):
            assert last <= r.index + self.window, "read-ahead beyond the window"
            self.start_fetch(first, last, keep=True)

    def advance(self, r: ModelReader) -> None:
        r.index += 1
        r.lo, r.probed_here = 0, False
        for fetch in [f for f in r.attached if f.last < r.index]:
            r.attached.remove(fetch)
            fetch.readers -= 1
        if r.index > r.end // BS:
            r.done = True
            for fetch in r.attached:
                fetch.readers -= 1
            r.attached.clear()

    def hang_up(self, r: ModelReader) -> None:
        r.done = True
        for fetch in r.attached:
            fetch.readers -= 1
            if fetch.readers == 0 and not fetch.keep and fetch in self.fetches:
                self.cancel(fetch)
        r.attached.clear()


@settings(max_examples=300, deadline=None)
@given(st.data())
def test_random_interleavings_serve_exact_ranges_with_one_get_per_block(
    data: st.DataObject,
) -> None:
    size = data.draw(st.integers(1, 12 * BS), label="size")
    model = Model(size=size, window=data.draw(st.integers(0, 3), label="window"))
    readers: list[ModelReader] = []
    for _ in range(data.draw(st.integers(1, 5), label="readers")):
        start = data.draw(st.integers(0, size - 1))
        end = data.draw(st.one_of(st.just(size - 1), st.integers(start, size - 1)))
        previous = data.draw(st.one_of(st.none(), st.integers(0, 12)))
        r = ModelReader(
            start=start, end=end, previous=previous, index=start // BS, held=end == size - 1
        )
        readers.append(r)
    for _ in range(400):
        live = [r for r in readers if not r.done]
        if not live and not model.fetches:
            break
        choice = data.draw(st.integers(0, 9))
        if model.fetches and (choice < 3 or not live):
            model.arrive(data.draw(st.sampled_from(model.fetches)))
        elif live and choice == 3:
            model.hang_up(data.draw(st.sampled_from(live)))
        elif live and choice == 4:
            r = data.draw(st.sampled_from(live))
            r.held = r.held and not r.sent  # its grace ran out
        elif live:
            model.step(data.draw(st.sampled_from(live)))
    for r in readers:
        event("reader finished" if r.got and r.got[-1] == r.end else "reader left or stalled")
        if r.done and not r.attached and r.got and r.got[-1] == r.end:
            assert r.got == list(range(r.start, r.end + 1)), "every byte once, in order"
        else:
            assert r.got == list(range(r.start, r.start + len(r.got))), "no gap, no repeat"
    assert all(count >= 1 for count in model.gets.values())
