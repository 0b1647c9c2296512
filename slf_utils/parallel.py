"""Running one function over many clips: on the workers of a Dask cluster (features.scheduler, or a client given)
with the results streamed back to the one process that writes the store, or locally one after another."""

from __future__ import annotations

from slf_utils.basics import exists


def get_client(cfg, client=None):
    """The Dask client to use: the one given, else one connected to features.scheduler, else None (local)."""
    if exists(client):
        return client
    address = cfg.get("features", {}).get("scheduler")
    if exists(address):
        from distributed import Client

        return Client(address)
    return None


def run_clips(fn, items: list, client=None, desc: str = "", **kwargs):
    """Yield fn(item, **kwargs) for every item, as they complete, with a progress bar (clips/s and ETA).

    With a Dask client the calls run on its workers and results stream back to this process, which is the
    only one writing to the store. Locally they run one after another (the machine's cores are better spent
    inside ffmpeg, torch and numpy)."""
    from tqdm.auto import tqdm

    bar = tqdm(total=len(items), desc=desc, unit="clip", smoothing=0.1)
    try:
        if exists(client) and items:
            from distributed import as_completed

            futures = client.map(fn, items, pure=False, **kwargs)
            for fut in as_completed(futures):
                yield fut.result()
                bar.update(1)
                fut.release()
        else:
            for item in items:
                yield fn(item, **kwargs)
                bar.update(1)
    finally:
        bar.close()
