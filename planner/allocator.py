"""PyTorch's CUDA caching allocator, replayed over a step's allocations (plain Python, no torch).

What runs a GPU out of memory is what the allocator has reserved from the driver, not what live
tensors hold. The gap comes from how it reuses memory (c10/cuda/CUDACachingAllocator.cpp, default
settings, no expandable segments):

- a request is rounded up to 512 bytes; requests up to 1 MiB come from a small pool, the rest
  from a large pool;
- a free cached block is reused best-fit (the smallest one that is large enough, in its pool);
  what remains is split off as a free block if it is at least 512 bytes (small pool) or more
  than 1 MiB (large pool);
- when no cached block fits, a new segment is reserved: 2 MiB for a small request, 20 MiB for
  a request under 10 MiB, else the request rounded up to 2 MiB;
- a freed block merges with free neighbours of its segment, never across segments, and
  segments are not returned (no `empty_cache`, and no out-of-memory retry on a large GPU).

So a step whose short-lived blocks are freed and then asked for again in other sizes (recomputed
layers, logits and their fp32 loss buffers) leaves free pieces that no later request fits, and
reserves new segments beside them. `replay` follows one event list to the peaks of both figures.

On a card with room to spare nothing is ever given back. On a smaller one, a segment the driver
cannot give makes the allocator release its cached segments that hold no live block and try again
(release_cached_blocks, before it raises out of memory), so a step can run on less memory than the
reserved peak a larger card shows. `replay(..., capacity=N)` follows that path and raises
OutOfMemory when even the retry finds no room; `smallest_capacity` searches for the least pool a
step runs in. With expandable segments only the free end of each pool is unmapped here (the
allocator also unmaps free pages inside, which this model cannot place): a threshold on the safe side.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass
from itertools import count

MIN_BLOCK = 512
SMALL_REQUEST = 1 << 20
SMALL_SEGMENT = 2 << 20
LARGE_SEGMENT = 20 << 20
MIN_LARGE_ALLOCATION = 10 << 20
LARGE_ROUNDING = 2 << 20


class OutOfMemory(Exception):
    """The replay needed a segment beyond its capacity even after releasing its cached ones."""


@dataclass(frozen=True)
class AllocatorPeaks:
    peak_allocated: int  # max_memory_allocated: live blocks, each rounded to 512 bytes
    peak_reserved: int  # max_memory_reserved: segments held from the driver
    allocations: int  # requests replayed
    # the smallest pool the step runs in, the allocator releasing its cached segments and retrying
    # where the driver has no more (smallest_capacity); None where it was not searched
    smallest_capacity: int | None = None

    @property
    def reserve(self) -> int:
        """What the allocator held above the live tensors at their peak."""
        return self.peak_reserved - self.peak_allocated


class _Block:
    __slots__ = ("address", "free", "next", "order", "previous", "size", "small")

    def __init__(self, size: int, address: int, small: bool, order: int):
        self.size, self.address, self.small, self.order = size, address, small, order
        self.previous: _Block | None = None
        self.next: _Block | None = None
        self.free = True

    def key(self) -> tuple[int, int, int]:
        return (self.size, self.address, self.order)


def rounded_size(nbytes: int) -> int:
    return max(MIN_BLOCK, -(-nbytes // MIN_BLOCK) * MIN_BLOCK)


def segment_size(size: int) -> int:
    if size <= SMALL_REQUEST:
        return SMALL_SEGMENT
    if size < MIN_LARGE_ALLOCATION:
        return LARGE_SEGMENT
    return -(-size // LARGE_ROUNDING) * LARGE_ROUNDING


class CachingAllocator:
    """One stream, one device: the allocator's block bookkeeping, without the memory. `capacity`:
    the most it may reserve (None: as much as it asks for)."""

    def __init__(self, capacity: int | None = None) -> None:
        self.capacity = capacity
        self.retries = 0
        # free blocks per pool as (size, address, order, block), sorted: bisect finds the best fit
        # (flat tuples: a plan replays a step's tens of thousands of events eight times)
        self._free: dict[bool, list[tuple[int, int, int, _Block]]] = {True: [], False: []}
        self._live: dict[object, _Block] = {}
        self._orders = count()
        self._next_address = 0
        self.allocated = self.reserved = self.peak_allocated = self.peak_reserved = 0
        self.allocations = 0

    def _insert(self, block: _Block) -> None:
        bisect.insort(self._free[block.small], (block.size, block.address, block.order, block))

    def _remove(self, block: _Block) -> None:
        pool = self._free[block.small]
        del pool[bisect.bisect_left(pool, (block.size, block.address, block.order))]

    def malloc(self, handle: object, nbytes: int) -> None:
        size = -(-nbytes // MIN_BLOCK) * MIN_BLOCK if nbytes > MIN_BLOCK else MIN_BLOCK  # rounded_size, inline
        small = size <= SMALL_REQUEST
        pool = self._free[small]
        index = bisect.bisect_left(pool, (size,))
        block = pool.pop(index)[3] if index < len(pool) else self._grow(size, small)
        remaining = block.size - size
        if self._should_split(remaining, small):
            rest = _Block(remaining, block.address + size, small, next(self._orders))
            rest.previous, rest.next = block, block.next
            if block.next is not None:
                block.next.previous = rest
            block.next = rest
            block.size = size
            self._insert(rest)
        block.free = False
        self.allocated += block.size
        if self.allocated > self.peak_allocated:
            self.peak_allocated = self.allocated
        self.allocations += 1
        self._live[handle] = block

    def _should_split(self, remaining: int, small: bool) -> bool:
        return remaining >= MIN_BLOCK if small else remaining > SMALL_REQUEST

    def _reserve(self, nbytes: int) -> None:
        self.reserved += nbytes
        self.peak_reserved = max(self.peak_reserved, self.reserved)

    def _make_room(self, needed) -> None:
        """Before reserving `needed()` bytes more: past the capacity, release the cached segments
        and retry (asking again: with expandable segments a release changes what must be mapped)."""
        if self.capacity is None or self.reserved + needed() <= self.capacity:
            return
        self.retries += 1
        self._release_cached()
        if self.reserved + needed() > self.capacity:
            raise OutOfMemory(f"{self.reserved + needed():,} bytes asked of {self.capacity:,}")

    def _release_cached(self) -> None:
        """Segments that hold no live block go back to the driver."""
        for small, pool in self._free.items():
            kept = []
            for entry in pool:
                block = entry[3]
                if block.previous is None and block.next is None:
                    self.reserved -= block.size
                else:
                    kept.append(entry)
            self._free[small] = kept

    def _grow(self, size: int, small: bool) -> _Block:
        """No cached block fits: a new segment from the driver."""
        segment = segment_size(size)
        self._make_room(lambda: segment)
        block = _Block(segment, self._next_address, small, next(self._orders))
        self._next_address += segment
        self._reserve(segment)
        return block

    def free(self, handle: object) -> None:
        block = self._live.pop(handle)
        block.free = True
        self.allocated -= block.size
        previous, following = block.previous, block.next
        if previous is not None and previous.free:
            self._remove(previous)
            block = _merged(previous, block)
        if following is not None and following.free:
            self._remove(following)
            block = _merged(block, following)
        self._insert(block)

    def is_live(self, handle: object) -> bool:
        return handle in self._live


def _merged(first: _Block, second: _Block) -> _Block:
    """`second` joined onto its neighbour `first`, in one segment."""
    first.size += second.size
    first.next = second.next
    if second.next is not None:
        second.next.previous = first
    return first


class ExpandableSegments(CachingAllocator):
    """`PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True`: each pool is one segment of reserved
    address space whose end is mapped to memory in pages (2 MiB for the small pool, 20 MiB for the
    large) as it is needed. A request no free block fits extends the end, taking in a free block
    that ends there, so freed blocks of other sizes are not stranded beside new segments; and any
    remainder of at least 512 bytes is split off, in both pools."""

    def __init__(self, capacity: int | None = None) -> None:
        super().__init__(capacity)
        self._tail: dict[bool, _Block | None] = {True: None, False: None}
        self._ends = {True: 0, False: 1 << 60}  # the two pools' address ranges never meet

    def _should_split(self, remaining: int, small: bool) -> bool:
        return remaining >= MIN_BLOCK

    def _mapped_for(self, size: int, small: bool) -> int:
        page = SMALL_SEGMENT if small else LARGE_SEGMENT
        tail = self._tail[small]
        if tail is not None and tail.free:
            return -(-(size - tail.size) // page) * page
        return -(-size // page) * page

    def _release_cached(self) -> None:
        """The free end of each pool is unmapped."""
        for small in (True, False):
            tail = self._tail[small]
            if tail is None or not tail.free:
                continue
            self._remove(tail)
            self.reserved -= tail.size
            self._ends[small] -= tail.size
            self._tail[small] = tail.previous
            if tail.previous is not None:
                tail.previous.next = None

    def _grow(self, size: int, small: bool) -> _Block:
        self._make_room(lambda: self._mapped_for(size, small))
        page = SMALL_SEGMENT if small else LARGE_SEGMENT
        tail = self._tail[small]
        if tail is not None and tail.free:
            self._remove(tail)
            mapped = -(-(size - tail.size) // page) * page
            tail.size += mapped
            self._ends[small] += mapped
            self._reserve(mapped)
            return tail
        mapped = -(-size // page) * page
        block = _Block(mapped, self._ends[small], small, next(self._orders))
        self._ends[small] += mapped
        self._reserve(mapped)
        block.previous = tail
        if tail is not None:
            tail.next = block
        self._tail[small] = block
        return block

    def malloc(self, handle: object, nbytes: int) -> None:
        super().malloc(handle, nbytes)
        self._follow_tail(self._live[handle].small)

    def free(self, handle: object) -> None:
        small = self._live[handle].small
        super().free(handle)
        self._follow_tail(small)

    def _follow_tail(self, small: bool) -> None:
        # splitting and merging move which block ends the mapped range
        tail = self._tail[small]
        while tail is not None and tail.next is not None:
            tail = tail.next
        while tail is not None and tail.previous is not None and tail.previous.next is not tail:
            tail = tail.previous
        self._tail[small] = tail


ALLOCATORS = {"default": CachingAllocator, "expandable_segments": ExpandableSegments}


def replay(events, allocator: str = "default", capacity: int | None = None) -> AllocatorPeaks:
    """Peaks of an event list: ("alloc", handle, nbytes) and ("free", handle), in program order.
    A free of a handle never allocated (a storage that existed before the trace) is ignored.
    With `capacity`, OutOfMemory where the step does not run in that much."""
    allocator = ALLOCATORS[allocator](capacity)
    malloc, free, live = allocator.malloc, allocator.free, allocator._live
    for event in events:
        if event[0] == "alloc":
            if event[2] > 0:
                malloc(event[1], event[2])
        elif event[1] in live:
            free(event[1])
    return AllocatorPeaks(allocator.peak_allocated, allocator.peak_reserved, allocator.allocations)


def runs_within(events, allocator: str, capacity: int) -> bool:
    try:
        replay(events, allocator, capacity)
    except OutOfMemory:
        return False
    return True


def smallest_capacity(events, allocator: str = "default", peaks: AllocatorPeaks | None = None, resolution: int = LARGE_ROUNDING) -> int:
    """The least pool, to `resolution`, in which the step runs: between the allocated peak (no
    allocator runs in less) and the reserved peak (where it never needs to give anything back)."""
    peaks = peaks or replay(events, allocator)
    low, high = peaks.peak_allocated, peaks.peak_reserved  # `high` runs; below `low` nothing can
    while high - low > resolution:
        middle = (low + high) // 2
        if runs_within(events, allocator, middle):
            high = middle
        else:
            low = middle
    return high
