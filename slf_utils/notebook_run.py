"""One notebook run in a kernel of its own (what each grid step is): papermill with a kernel manager that shuts the
kernel down without interrupting it and talks to it over Unix sockets, in an environment of one BLAS/torch thread per
worker without Dask's MALLOC_TRIM_THRESHOLD_."""

from __future__ import annotations

import os
import tempfile
import uuid

from slf_utils.basics import ROOT


def kernel_environ(threads: int, env=None) -> dict:
    """The environment a step's kernel runs in: `env` (default os.environ) with one BLAS/torch thread per worker, so
    parallel steps don't fight, and without Dask's MALLOC_TRIM_THRESHOLD_.

    Dask's nanny starts its workers with MALLOC_TRIM_THRESHOLD_=65536 (distributed.nanny.pre-spawn-environ), which a
    kernel would inherit: glibc then returns every freed block above 64 KB to the OS and faults it back in on the
    next training step (150 demo-preset steps: 9 M page faults and 1.5x the wall time, half of it in the kernel;
    `python benchmarks/kernel_env.py`). A step's kernel exits when it is done, which returns its memory anyway."""
    env = {k: v for k, v in (os.environ if env is None else env).items() if k != "MALLOC_TRIM_THRESHOLD_"}
    return env | {
        "OMP_NUM_THREADS": str(threads),
        "MKL_NUM_THREADS": str(threads),
        "SLF_THREADS": str(threads),
        "TQDM_MININTERVAL": "10",
        # torch/imagen-pytorch deprecation notices would otherwise fill the terminal once per notebook
        "PYTHONWARNINGS": env.get("PYTHONWARNINGS", "ignore::FutureWarning"),
    }


def run_notebook(nb, out, parameters: dict, log_file, cwd=ROOT):
    """papermill-execute `nb` into `out` with `parameters`, its outputs logged to `log_file` (an open file). The
    kernel is shut down without the interrupt jupyter_client sends first (see `kernel_manager_class`)."""
    import papermill as pm

    return pm.execute_notebook(
        str(nb),
        str(out),
        parameters=parameters,
        cwd=str(cwd),
        kernel_name="python3",
        progress_bar=False,
        log_output=True,
        stdout_file=log_file,
        stderr_file=log_file,
        kernel_manager_class=kernel_manager_class(),
    )


_KERNEL_MANAGER = None


def kernel_manager_class():
    """jupyter_client's AsyncKernelManager whose graceful shutdown does not interrupt the kernel first.

    jupyter_client always sends SIGINT before the shutdown request. papermill's last request (kernel_info, right
    after the last cell) is answered before its handler returns, so on a loaded machine the interrupt can land in
    that handler: ipykernel catches the KeyboardInterrupt and prints `[IPKernelApp] ERROR | KeyboardInterrupt caught
    in kernel.` in a run where nothing failed. When papermill shuts a kernel down it has finished with it, so there
    is nothing to interrupt: the shutdown request ends the kernel (ipykernel then stops its own subprocesses), and
    a kernel that does not end (a cell still running because the client was stopped) is still terminated (SIGTERM,
    then SIGKILL, within `shutdown_wait_time`). Restarts and `now=True` shutdowns keep the interrupt. The kernel's
    log level is untouched: real kernel errors still print.

    It also talks to the kernel over IPC (Unix sockets in the kernel's runtime folder) instead of TCP on localhost:
    ipykernel warns, once per kernel, that TCP without CurveZMQ keys "is susceptible to eavesdropping", which a grid
    printed dozens of times and users read as a security problem; a Unix socket is not reachable from the network."""
    global _KERNEL_MANAGER
    if _KERNEL_MANAGER is None:
        from jupyter_client import AsyncKernelManager

        class NoInterruptShutdownKernelManager(AsyncKernelManager):
            _skip_interrupt = False

            def __init__(self, **kwargs):
                super().__init__(**{"transport": "ipc", **kwargs})
                if self.transport == "ipc" and "ip" not in kwargs:
                    # jupyter_client's default IPC name is `kernel-ipc` in the working folder, shared by every kernel
                    # started there: two grid workers then bind the same sockets and read each other's messages
                    # (Invalid Signature). A name of its own in the temporary folder, short enough for a socket.
                    self.ip = os.path.join(tempfile.gettempdir(), f"slf-kernel-{uuid.uuid4().hex[:12]}-ipc")

            async def shutdown_kernel(self, now: bool = False, restart: bool = False) -> None:
                self._skip_interrupt = not now and not restart
                try:
                    await super().shutdown_kernel(now=now, restart=restart)
                finally:
                    self._skip_interrupt = False

            async def _async_interrupt_kernel(self) -> None:
                if not self._skip_interrupt:
                    await super()._async_interrupt_kernel()

        _KERNEL_MANAGER = NoInterruptShutdownKernelManager
    return _KERNEL_MANAGER
