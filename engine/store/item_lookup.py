"""The item views a data snapshot serves from, read from the store when first used.

A recommendation shows ten items; reading the title, text and attributes of all of a
million items when a process starts (20 s on two cores) only to show ten is what made
the first request slow. :class:`ItemLookup` holds the snapshot's external ids (read at
once: cheap, and they name the items even if deleted later) and reads the other fields
of the items a request touches, in one query per batch, keeping what it read.

Fields read later than the snapshot reflect the store at that moment: an item edited
meanwhile shows its new title or attributes (the next refresh would show them anyway),
an item deleted meanwhile shows no title and no attributes, so filters drop it.
"""
from __future__ import annotations

import threading
from typing import TYPE_CHECKING, Iterable, Iterator, Mapping, Sequence

from polyrec.contracts import ItemView
from polyrec.store.catalog import item_views

if TYPE_CHECKING:  # pragma: no cover
    from polyrec.store import Store

#: Read everything at once when a request needs more than this share of the items.
READ_ALL_SHARE = 0.25
_CHUNK = 50_000


class ItemLookup:
    """Item views by internal id (``view``) or by dense index (``[i]``) over the item
    ids of one snapshot, read from ``store`` on first use."""

    def __init__(self, store: "Store", item_ids: Sequence[int], external: Mapping[int, str]
                 ) -> None:
        self._store = store
        self.item_ids = item_ids
        self.external = external
        self._views: dict[int, ItemView] = {}
        self._lock = threading.Lock()
        self._complete = False

    def __len__(self) -> int:
        return len(self.item_ids)

    def __getitem__(self, index: int) -> ItemView:
        """The view of the item at dense index ``index``."""
        return self.view(self.item_ids[index])

    def __iter__(self) -> Iterator[ItemView]:
        """Every item's view in dense index order (reads all that were not read yet)."""
        self.prefetch(self.item_ids)
        return (self._views[i] for i in self.item_ids)

    def view(self, item_id: int) -> ItemView:
        """The view of one item (read now when not read before)."""
        found = self._views.get(item_id)
        if found is None:
            self.prefetch([item_id])
            found = self._views[item_id]
        return found

    def title(self, item_id: int) -> str | None:
        return self.view(item_id).title

    def prefetch_indices(self, indices: Iterable[int]) -> None:
        """Read the views of these dense indices in one go."""
        self.prefetch(self.item_ids[i] for i in indices)

    def prefetch(self, ids: Iterable[int]) -> None:
        """Read the views of these items (internal ids) that were not read yet."""
        if self._complete:
            return
        missing = [i for i in dict.fromkeys(ids) if i not in self._views]
        if not missing:
            return
        with self._lock:
            missing = [i for i in missing if i not in self._views]
            if not missing:
                return
            read_all = len(missing) > READ_ALL_SHARE * len(self.item_ids)
            with self._store.snapshot() as session:
                if read_all:
                    views = item_views(session, None)
                else:
                    views = []
                    for start in range(0, len(missing), _CHUNK):
                        views += item_views(session, missing[start:start + _CHUNK])
            # filled in place (a reader's lookup of one key is atomic); a key is set only
            # once its view is complete
            self._views.update((v.id, v) for v in views)
            for i in missing:  # deleted since the snapshot: its name, nothing else
                if i not in self._views:
                    self._views[i] = ItemView(id=i, external_id=self.external.get(i, str(i)),
                                              title=None, text=None, image=None,
                                              attributes={}, entity=None)
            self._complete = read_all


class Titles(Mapping[int, "str | None"]):
    """Item titles by internal id through an :class:`ItemLookup` (read on first use)."""

    def __init__(self, lookup: ItemLookup) -> None:
        self._lookup = lookup

    def __getitem__(self, item_id: int) -> str | None:
        if item_id not in self._lookup.external:
            raise KeyError(item_id)
        return self._lookup.title(item_id)

    def __iter__(self) -> Iterator[int]:
        return iter(self._lookup.item_ids)

    def __len__(self) -> int:
        return len(self._lookup.item_ids)
