"""Run a function on several CPU processes joined in a gloo process group.

Every distributed test goes through :func:`run_gloo`, which gets three things
right once:

* Teardown.  A ``DistributedDataParallel`` reducer that outlives
  ``destroy_process_group()`` destroys the gloo group itself later, holding
  the GIL that gloo's worker thread may need: a deadlock at exit, or a
  SIGABRT ("terminate called without an active exception") under load, seen
  with torch 2.x.  The worker runs in its own frame, so its DDP objects are
  unreachable once it returns; after an exception only the formatted
  traceback is kept (the live one would hold the frames).  A garbage
  collection and a barrier then precede ``destroy_process_group()``.
* Start-up.  A forkserver that has imported torch and the test module once
  starts each rank in a fraction of a second (a spawned process imports
  torch again); ``spawn`` where forkserver is unavailable.
* Deadlines.  The process group's timeout makes a rank that waits for a
  failed one fail instead of hanging, and a wall-clock deadline kills a job
  whose ranks never exit.
"""

from __future__ import annotations

import datetime
import gc
import multiprocessing
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

#: The marks of a test module whose tests run gloo process groups.
GLOO = [
    pytest.mark.distributed,
    pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available"),
]


def require_fully_shard() -> None:
    """Skip the calling test module (at import) where FSDP2's
    ``fully_shard`` does not exist (torch < 2.6)."""
    fsdp = pytest.importorskip("torch.distributed.fsdp")
    if not hasattr(fsdp, "fully_shard"):  # pragma: no cover - torch < 2.6
        pytest.skip("torch.distributed.fsdp.fully_shard is not available", allow_module_level=True)


def _rank_main(rank: int, worker: Callable[..., None], world: int, tmp: str,
               args: tuple[Any, ...], group_timeout: float) -> None:
    init_file = str(Path(tmp) / "init")
    torch.set_num_threads(1)  # ranks share 2 cores: no intra-op oversubscription
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=group_timeout))
    error = None
    try:
        worker(rank, world, *args)
    except BaseException as exc:  # noqa: BLE001 - re-raised below, after the teardown
        error = "".join(traceback.format_exception(exc))
        # Written before the teardown: the other ranks notice this one's
        # exit (a closed connection) only after the file exists.
        (Path(tmp) / f"error-rank{rank}.txt").write_text(error, encoding="utf-8")
    # The worker's frames, and any DDP reducer in them, are released here.
    gc.collect()
    if error is None:
        dist.barrier()  # no rank tears the group down while another still uses it
    dist.destroy_process_group()
    if error is not None:
        raise RuntimeError(f"rank {rank} of {world} failed:\n{error}")


def run_gloo(worker: Callable[..., None], world: int, *args: Any, deadline: float = 150.0,
             group_timeout: float = 60.0) -> None:
    """Run ``worker(rank, world, *args)`` on ``world`` processes in one gloo group.

    ``worker`` must be a module-level function (it is pickled to the ranks).
    It saves what the test checks (``torch.save`` into a ``tmp_path`` passed
    in ``args``).  An exception in any rank fails the calling test with that
    rank's traceback; a job still running after ``deadline`` seconds is
    killed and fails the test.
    """
    method = "forkserver" if "forkserver" in multiprocessing.get_all_start_methods() else "spawn"
    if method == "forkserver":
        multiprocessing.set_forkserver_preload(["torch", "torch._dynamo", "flatness", worker.__module__])
    with tempfile.TemporaryDirectory(prefix="gloo-") as tmp:
        job = mp.start_processes(_rank_main, args=(worker, world, tmp, args, group_timeout),
                                 nprocs=world, join=False, start_method=method)
        stop = time.monotonic() + deadline
        try:
            while not job.join(timeout=1):
                if time.monotonic() > stop:
                    pytest.fail(f"the {world}-process job did not finish in {deadline:.0f} s (a rank hangs)"
                                + _worker_errors(tmp))
        except mp.ProcessRaisedException as exc:
            # Report the rank whose worker failed, not a rank that only saw
            # its peer's connection close during the teardown.
            errors = _worker_errors(tmp)
            if errors:
                raise RuntimeError(errors) from None
            raise exc
        finally:
            for p in job.processes:
                if p.is_alive():
                    p.kill()
                    p.join(5)


def _worker_errors(tmp: str) -> str:
    files = sorted(Path(tmp).glob("error-rank*.txt"))
    return "".join(f"\n{f.stem}:\n{f.read_text(encoding='utf-8')}" for f in files)


def fully_shard_linears(model: torch.nn.Module, mesh: Any) -> torch.nn.Module:
    """FSDP2 as the tests use it: every ``nn.Linear`` of ``model`` its own
    ``fully_shard`` unit, then the root (so every parameter is a DTensor)."""
    from torch import nn
    from torch.distributed.fsdp import fully_shard

    for layer in model.modules():
        if isinstance(layer, nn.Linear):
            fully_shard(layer, mesh=mesh)
    return fully_shard(model, mesh=mesh)
