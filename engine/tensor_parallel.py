"""Tensor parallelism: rank 0 (this process) drives the schedule; ranks 1..N-1 are worker processes that
mirror every forward. Each step rank 0 sends the workers the scheduler's batch (without its Sequence objects)
over a pipe; the ranks exchange activations through torch.distributed collectives (NCCL on CUDA, gloo on CPU)."""
import multiprocessing as mp
import os
import socket
import threading
import time
import weakref

import torch.distributed as dist

from engine.config import Config
from engine.logger import get_logger
from engine.model_runner import ModelRunner, SampledTokens
from engine.outputs import SchedulerOutput

logger = get_logger(__name__)
# NVLink multicast (NVLS / symmetric-memory multicast) must stay off on the shared GPU hosts.
SAFE_ENV = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1"}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _init_process_group(config: Config, rank: int, port: int) -> None:
    os.environ.update(SAFE_ENV)
    backend = "nccl" if config.device == "cuda" else "gloo"
    dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{port}",
                            world_size=config.tensor_parallel_size, rank=rank)


def _exit_when_orphaned(parent_pid: int) -> None:
    """Die with rank 0 even when it is killed mid-collective (a blocked NCCL call never returns)."""
    while True:
        time.sleep(1.0)
        if os.getppid() != parent_pid:
            os._exit(1)


def _worker_main(config: Config, rank: int, port: int, conn, parent_pid: int) -> None:
    """Worker rank: build the same runner, then replay each batch rank 0 sends until told to exit."""
    threading.Thread(target=_exit_when_orphaned, args=(parent_pid,), daemon=True).start()
    _init_process_group(config, rank, port)
    runner = ModelRunner(config, rank)
    try:
        while True:
            try:
                message = conn.recv()
            except EOFError:  # rank 0 is gone
                break
            if message is None:
                break
            runner.run(message)
    finally:
        dist.destroy_process_group()


class TensorParallelRunner(ModelRunner):
    """Rank 0's runner: starts the worker ranks, then forwards every batch to them before running it."""

    def __init__(self, config: Config):
        os.environ.update(SAFE_ENV)
        port, ctx = _free_port(), mp.get_context("spawn")
        self.workers, self.conns = [], []
        for rank in range(1, config.tensor_parallel_size):
            parent, child = ctx.Pipe()
            proc = ctx.Process(target=_worker_main, args=(config, rank, port, child, os.getpid()), daemon=True,
                               name=f"nanovllm-tp-rank{rank}")
            proc.start()
            self.workers.append(proc)
            self.conns.append(parent)
        self._finalizer = weakref.finalize(self, _stop_workers, self.workers, self.conns)
        try:
            _init_process_group(config, 0, port)
            super().__init__(config, 0)
        except BaseException:
            self._finalizer()
            raise
        layer = self.attention_layers[0]
        logger.info("Tensor parallel layout: tp_size=%d, backend=%s, per rank: %d query heads, %d KV heads%s, "
                    "vocab shard=%d", config.tensor_parallel_size, dist.get_backend(), layer.num_heads,
                    layer.num_kv_heads,
                    " (replicated)" if config.hf_config.num_key_value_heads < config.tensor_parallel_size else "",
                    self.model.model.embed_tokens.shard_size)

    def run(self, batch: SchedulerOutput) -> SampledTokens | None:
        message = batch.for_workers()
        for proc, conn in zip(self.workers, self.conns):
            if not proc.is_alive():
                raise RuntimeError(f"tensor-parallel worker {proc.name} died (exit code {proc.exitcode})")
            conn.send(message)
        return super().run(batch)

    def shutdown(self) -> None:
        """Stop the worker ranks and leave the process group; safe to call twice."""
        self._finalizer()
        super().shutdown()


def _stop_workers(workers: list, conns: list) -> None:
    """Runs on shutdown(), when the runner is garbage collected (``del llm``), or at interpreter exit."""
    for conn in conns:
        try:
            conn.send(None)
        except (BrokenPipeError, OSError):
            pass
    for proc in workers:
        proc.join(timeout=30)
        if proc.is_alive():
            proc.kill()
            proc.join()
    workers.clear()
    conns.clear()
    if dist.is_initialized():
        dist.destroy_process_group()
