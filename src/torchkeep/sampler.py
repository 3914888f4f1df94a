"""A sampler that remembers where the data loader was, for exact resumption."""

from __future__ import annotations

from collections.abc import Iterator, Sized
from typing import Any

import torch
from torch.utils.data import Sampler


class ResumableSampler(Sampler[int]):
    """Shuffles like ``RandomSampler`` (a new order each epoch, from ``seed`` and the epoch) and
    resumes in the middle of an epoch: save it with the model (it is Stateful) and a resumed
    run sees exactly the batches the interrupted run had not seen yet.

    Call ``set_epoch(epoch)`` at the start of each epoch, as with ``DistributedSampler``: the
    sampler then holds the loop's epoch, after a restore ``sampler.epoch`` is where to start,
    and the first ``set_epoch`` after the restore continues that epoch where it stopped. Its
    position counts the samples handed to the data loader; with ``num_workers=0``
    that is exactly what the loop consumed. Worker processes fetch batches ahead of the loop:
    there, keep the loop's own position (batches done) in the checkpoint and call
    ``resume(epoch, batches_done * batch_size)`` after restoring.

    Two things a bitwise-exact resumption also needs: give the DataLoader its own generator
    (``generator=torch.Generator()``; otherwise each ``iter(loader)`` draws a seed from the
    global random state, which a resumed run draws at another moment), and save either inside
    the batch loop or, between epochs, after ``set_epoch(epoch + 1)``.

    Example:
        ```python
        sampler = tk.ResumableSampler(dataset, seed=0)
        loader = DataLoader(dataset, batch_size=32, sampler=sampler, generator=torch.Generator())
        state = {"model": model, "optimizer": optimizer, "sampler": sampler, "rng": tk.RNGState()}
        mgr.restore(state)
        for epoch in range(sampler.epoch, epochs):
            sampler.set_epoch(epoch)          # keeps the position when resuming this epoch
            for batch in loader:              # continues mid-epoch after a restore
                ...
        ```
    """

    def __init__(self, data_source: Sized | int, *, shuffle: bool = True, seed: int = 0) -> None:
        self.length = data_source if isinstance(data_source, int) else len(data_source)
        if self.length < 0:
            raise ValueError(f"the data source's length must be 0 or more, not {self.length}")
        self.shuffle = shuffle
        self.seed = int(seed)
        self.epoch = 0
        self.index = 0
        self._epoch_set = False
        self._resumed = False

    def order(self, epoch: int) -> list[int]:
        """The indices of ``epoch``, in the order they are sampled."""
        if not self.shuffle:
            return list(range(self.length))
        generator = torch.Generator().manual_seed(self.seed + epoch)
        return [int(i) for i in torch.randperm(self.length, generator=generator)]

    def set_epoch(self, epoch: int) -> None:
        """Start ``epoch`` from its first sample; right after a restore (``load_state_dict``
        or ``resume``) into that same epoch, continue from the restored position instead."""
        if epoch < 0:
            raise ValueError(f"epoch must be 0 or more, not {epoch}")
        if epoch != self.epoch or not self._resumed:
            self.epoch, self.index = int(epoch), 0
        self._resumed = False
        self._epoch_set = True

    def __iter__(self) -> Iterator[int]:
        # Iterated again without set_epoch() after a finished epoch: the next epoch begins.
        if not self._epoch_set and self.length and self.index >= self.length:
            self.epoch, self.index = self.epoch + 1, 0
        self._epoch_set = False
        self._resumed = False
        order = self.order(self.epoch)
        while self.index < self.length:
            index = order[self.index]
            self.index += 1
            yield index

    def __len__(self) -> int:
        return self.length

    def resume(self, epoch: int, index: int) -> None:
        """Continue from position ``index`` of ``epoch`` (the count of samples already used)."""
        if epoch < 0 or not 0 <= index <= self.length:
            raise ValueError(
                f"cannot resume at sample {index} of epoch {epoch}: the data source has "
                f"{self.length} samples"
            )
        self.epoch, self.index = int(epoch), int(index)
        self._epoch_set = True
        self._resumed = True

    def state_dict(self) -> dict[str, Any]:
        return {
            "epoch": self.epoch,
            "index": self.index,
            "seed": self.seed,
            "length": self.length,
            "shuffle": self.shuffle,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("length") != self.length or state.get("shuffle") != self.shuffle:
            raise ValueError(
                f"the saved sampler was for {state.get('length')} samples "
                f"(shuffle={state.get('shuffle')}); this one has {self.length} "
                f"(shuffle={self.shuffle}): the dataset changed"
            )
        self.seed = int(state["seed"])
        self.resume(int(state["epoch"]), int(state["index"]))
