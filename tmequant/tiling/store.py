"""The slide store now lives in :mod:`tmequant.store`; this module re-exports it (old imports)."""

from tmequant.store import (  # noqa: F401
    COMPLETE,
    STORE_SCHEMA_VERSION,
    AccessMode,
    SlideStore,
    StoreArray,
    StoreLockedError,
    clear_complete,
    is_complete,
    mark_complete,
    open_group,
    store_is_complete,
    store_path,
    store_state,
    verify_store,
)

__all__ = [
    "COMPLETE", "STORE_SCHEMA_VERSION", "AccessMode", "SlideStore", "StoreArray",
    "StoreLockedError", "clear_complete", "is_complete", "mark_complete", "open_group",
    "store_is_complete", "store_path", "store_state", "verify_store",
]
