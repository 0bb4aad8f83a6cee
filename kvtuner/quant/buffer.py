"""A tensor that grows along its token axis (-2) without copying its history at every append.

`TokenBuffer` holds rows `[..., capacity, width]` of which `[start:end]` are live. Appending writes
into spare rows; when none are left it first reuses the dead rows in front (rows dropped by a
sliding window: the live rows move to the front), else it reallocates with spare room for
`max(MIN_SPARE, live // 16)` more rows, so each appended row costs amortized O(1) copies.

The first append allocates exactly what it is given (a prompt holds no spare rows, which is what
`kvtuner.memory` counts), and `drop_front(n, compact=True)` frees dropped rows at once (after a
prompt). `reserve(rows)` says how many rows the buffer will end with (a generation of known
length): growth then allocates exactly that. Spare rows are allocated memory: `tensors()` and so
every `nbytes()` count them.
"""

from __future__ import annotations

import torch

MIN_SPARE = 16  # rows added at least when a buffer grows (a decode step appends one)


def spare_rows(live: int, multiple: int = 1, min_spare: int = MIN_SPARE) -> int:
    """Rows of spare room a buffer of `live` rows gets when it grows, a multiple of `multiple`."""
    spare = max(min_spare, live // 16)
    return -(-spare // multiple) * multiple


class TokenBuffer:
    """Rows `[..., n, width]` along dim -2 with spare capacity; `view()` is the live part."""

    def __init__(self, multiple: int = 1, min_spare: int = MIN_SPARE) -> None:
        self.data: torch.Tensor | None = None
        self.start = 0
        self.end = 0
        self.multiple = multiple  # capacity grows in multiples of this (KIVI: rows per block)
        self.min_spare = min_spare  # KIVI's per-block scale rows: one a block, so fewer
        self.reserved = 0  # rows the buffer is known to end with (0: unknown)

    def reserve(self, rows: int) -> None:
        """The buffer will hold `rows` rows at most: grow to exactly that, not by spare rows."""
        self.reserved = rows

    def __len__(self) -> int:
        return self.end - self.start

    @property
    def capacity(self) -> int:
        return 0 if self.data is None else self.data.shape[-2]

    def view(self) -> torch.Tensor | None:
        """The live rows `[..., n, width]` (a view into the buffer)."""
        return None if self.data is None else self.data[..., self.start : self.end, :]

    def append(self, x: torch.Tensor) -> None:
        """Append rows `[..., n, width]`."""
        self.claim(x.shape, x.dtype, x.device).copy_(x)

    def claim(self, shape: torch.Size, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        """Make `shape[-2]` new live rows (shape `[..., n, width]`) and return them, unwritten:
        the caller fills them in place (a decode step's quantized token)."""
        n = shape[-2]
        if self.data is None:
            size = (*shape[:-2], max(n, self.reserved), shape[-1])
            self.data = torch.empty(size, dtype=dtype, device=device)
            self.start = self.end = 0
        elif self.end + n > self.capacity:
            live = len(self)
            if self.start and live + n <= self.capacity:
                self._move_front()
            elif live + n <= self.reserved:
                self._reallocate(self.reserved)
            else:
                self._reallocate(live + n + spare_rows(live + n, self.multiple, self.min_spare))
        rows = self.data[..., self.end : self.end + n, :]
        self.end += n
        return rows

    def drop_front(self, n: int, compact: bool = False) -> None:
        """Forget the oldest `n` rows; `compact` frees their memory now (else they are reused)."""
        if not n or self.data is None:
            return
        self.start += n
        if compact:
            self._reallocate(len(self))

    def index_select(self, dim: int, index: torch.Tensor) -> None:
        """Keep the entries `index` of a leading dim (beam search, batch selection)."""
        if self.data is not None:
            self.data = self.data.index_select(dim, index.to(self.data.device))

    def tensors(self) -> list[torch.Tensor]:
        return [] if self.data is None else [self.data]

    def _move_front(self) -> None:
        live = self.view().clone()  # source and target rows may overlap
        self.data[..., : live.shape[-2], :].copy_(live)
        self.start, self.end = 0, live.shape[-2]

    def _reallocate(self, capacity: int) -> None:
        live = self.view()
        data = live.new_empty((*live.shape[:-2], capacity, live.shape[-1]))
        data[..., : live.shape[-2], :].copy_(live)
        self.data, self.start, self.end = data, 0, live.shape[-2]
