"""Test helper (not a test): write a real DeepSpeed ZeRO-2 checkpoint on the CPU.

The module holds exactly the tensors of a safetensors file (names with dots become nested
submodules); metadata ``frozen`` / ``buffers`` (JSON lists) name the frozen parameters and
the buffers. Two optimizer steps move the trainable ones, then the engine saves with tag
``checkpoint`` and a client state shaped like Lightning's (its DeepSpeed strategy passes the
checkpoint dict without ``state_dict`` and ``optimizer_states``): ``hyper_parameters`` an
``argparse.Namespace`` (a class that torch's weights-only unpickler refuses), epoch, global
step, loops, callbacks.

One process per rank, started by the caller (torchrun-style environment):

    RANK=0 WORLD_SIZE=1 LOCAL_RANK=0 MASTER_ADDR=127.0.0.1 MASTER_PORT=29500 \\
        python zero_writer.py params.safetensors out_folder

or all the ranks from one process, forked after DeepSpeed is imported (each rank would
otherwise spend seconds importing it again), one checkpoint after the other:

    python zero_writer.py params.safetensors --dtype fp16 --spawn 8:out8:masters8.safetensors --spawn 2:out2

``--dtype fp16`` / ``bf16`` train in half precision as a mixed-precision run does (module
states in that dtype, float32 master weights in the optimizer partitions; with bf16 DeepSpeed
names the shards ``bf16_zero_pp_rank_*``, with fp16 ``zero_pp_rank_*`` as in the published
checkpoints). ``--masters FILE`` (``WORLD:OUT:FILE`` with ``--spawn``): rank 0 also writes the
float32 master weights DeepSpeed holds after the last step, gathered by DeepSpeed itself
(``safe_get_full_fp32_param``), not read from the checkpoint files: the independent
reference a reader is checked against.
"""

import argparse
import json
import multiprocessing
import os
import socket
import sys

import torch
import torch.distributed as dist
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn


class Bag(nn.Module):
    def __init__(self, tensors: dict, frozen: set, buffers: set):
        super().__init__()
        for name, value in tensors.items():
            *path, leaf = name.split(".")
            module = self
            for part in path:
                if part not in module._modules:
                    module.add_module(part, nn.Module())
                module = module._modules[part]
            if name in buffers:
                module.register_buffer(leaf, value.clone())
            else:
                module.register_parameter(leaf, nn.Parameter(value.clone(), requires_grad=name not in frozen))

    def forward(self, scale: torch.Tensor) -> torch.Tensor:
        g = torch.Generator().manual_seed(0)
        return sum(((p.float() - scale * torch.randn(p.shape, generator=g)) ** 2).sum()
                   for p in self.parameters() if p.requires_grad)


def write(params: str, out: str, dtype: str = "fp32", masters: str | None = None) -> None:
    with safe_open(params, framework="pt") as f:
        meta = f.metadata()
    dist.init_process_group("gloo")
    import deepspeed
    from deepspeed.utils import safe_get_full_fp32_param

    _gloo_collectives_only()

    bag = Bag(load_file(params), set(json.loads(meta["frozen"])), set(json.loads(meta["buffers"])))
    opt = torch.optim.Adam([p for p in bag.parameters() if p.requires_grad], lr=0.05)
    config = {"train_micro_batch_size_per_gpu": 1, "gradient_accumulation_steps": 1, "zero_optimization": {"stage": 2},
              "zero_allow_untested_optimizer": True}
    if dtype == "bf16":
        config["bf16"] = {"enabled": True}
    elif dtype == "fp16":
        from deepspeed.accelerator import get_accelerator

        # DeepSpeed refuses fp16 on a CPU without AVX512-FP16 (float16 matmuls); the module here only
        # casts its parameters to float32 (forward), so storage in float16 is all that is needed.
        get_accelerator().is_fp16_supported = lambda: True
        # a small initial loss scale: the default 2**16 overflows float16 gradients, skipping both steps
        config["fp16"] = {"enabled": True, "initial_scale_power": 4}
    engine, *_ = deepspeed.initialize(model=bag, optimizer=opt, config=config, dist_init_required=False)
    for _ in range(2):
        loss = engine(torch.tensor(1.0))
        engine.backward(loss)
        engine.step()
    lightning_state = {
        "epoch": 1, "global_step": 2, "pytorch-lightning_version": "2.4.0",
        "hyper_parameters": argparse.Namespace(lr=0.05, subject=1), "hparams_name": "args",
        "loops": {"fit_loop": {"epoch_progress": {"total": {"completed": 1}}}}, "callbacks": {}, "lr_schedulers": [],
    }
    engine.save_checkpoint(out, tag="checkpoint", client_state=lightning_state)
    if masters is not None:
        fp32 = {}
        for name, p in engine.module.named_parameters():
            if p.requires_grad:
                full = safe_get_full_fp32_param(p)  # collective: every rank takes part
                assert full is not None and full.dtype == torch.float32, name
                fp32[name] = full.detach().clone().contiguous()
        if dist.get_rank() == 0:
            save_file(fp32, masters, metadata={"world_size": str(dist.get_world_size())})
    dist.barrier()
    dist.destroy_process_group()


def _gloo_collectives_only() -> None:
    """No DeepSpeed shared-memory CPU collectives: a C++ op it compiles on first use (minutes on a busy 2-core
    machine, again on each fresh one), after probing every op with the compiler. gloo's collectives do for these
    few tensors. DeepSpeed reads ``deepspeed.ops.__compatible_ops__`` (probed on first access) only to decide that."""
    import deepspeed.ops

    deepspeed.ops.__compatible_ops__ = {"deepspeed_shm_comm": False}


def _warm_imports() -> None:
    """Import once, before the fork, what DeepSpeed imports lazily while it initialises (torch's
    compiler stack through its optimizer checks: seconds per rank otherwise)."""
    import importlib

    import deepspeed  # noqa: F401

    for name in ("torch._dynamo", "torch._inductor.compile_fx", "deepspeed.runtime.zero.stage_1_and_2",
                 "deepspeed.runtime.zero.muon.muon_optimizer", "deepspeed.ops.op_builder.all_ops"):
        try:
            importlib.import_module(name)
        except ImportError:  # another DeepSpeed or torch version: only slower
            pass


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank(rank: int, world: int, port: int, job: dict) -> None:
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), LOCAL_WORLD_SIZE=str(world),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    write(**job)


def _spawn(world: int, job: dict) -> None:
    ctx = multiprocessing.get_context("fork")
    port = _free_port()
    procs = [ctx.Process(target=_rank, args=(rank, world, port, job)) for rank in range(world)]
    for p in procs:
        p.start()
    for p in procs:
        p.join()
    codes = [p.exitcode for p in procs]
    if any(codes):
        raise SystemExit(f"{world} ranks writing {job['out']}: exit codes {codes}")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("params")
    parser.add_argument("out", nargs="?", help="one rank of a launch whose environment names it (RANK, ...)")
    parser.add_argument("--dtype", choices=("fp32", "fp16", "bf16"), default="fp32")
    parser.add_argument("--masters", default=None)
    parser.add_argument("--spawn", action="append", default=[], metavar="WORLD:OUT[:MASTERS]",
                        help="write OUT with WORLD ranks forked from this process; repeatable (one after the other)")
    args = parser.parse_args()
    if args.out is not None:
        write(args.params, args.out, args.dtype, args.masters)
        return
    _warm_imports()
    for spec in args.spawn:
        world, out, *masters = spec.split(":")
        job = {"params": args.params, "out": out, "dtype": args.dtype, "masters": masters[0] if masters else None}
        _spawn(int(world), job)
    # the checkpoints are complete; skip the interpreter's teardown of torch's compiler stack (seconds)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


if __name__ == "__main__":
    main()
