"""Test helper (not a test): write a real DeepSpeed ZeRO-2 checkpoint on the CPU.

The module holds exactly the tensors of a safetensors file (names with dots become nested
submodules); metadata ``frozen`` / ``buffers`` (JSON lists) name the frozen parameters and
the buffers. Two optimizer steps move the trainable ones, then the engine saves with tag
``checkpoint`` and a client state holding an ``argparse.Namespace`` (a class that torch's
weights-only unpickler refuses, as Lightning's hyper-parameters would be).

    RANK=0 WORLD_SIZE=1 LOCAL_RANK=0 MASTER_ADDR=127.0.0.1 MASTER_PORT=29500 \\
        python zero_writer.py params.safetensors out_folder
"""

import argparse
import json
import sys

import torch
import torch.distributed as dist
from safetensors import safe_open
from safetensors.torch import load_file
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
        return sum(((p - scale * torch.randn(p.shape, generator=g)) ** 2).sum() for p in self.parameters() if p.requires_grad)


def main() -> None:
    params, out = sys.argv[1], sys.argv[2]
    with safe_open(params, framework="pt") as f:
        meta = f.metadata()
    dist.init_process_group("gloo")
    import deepspeed

    bag = Bag(load_file(params), set(json.loads(meta["frozen"])), set(json.loads(meta["buffers"])))
    opt = torch.optim.Adam([p for p in bag.parameters() if p.requires_grad], lr=0.05)
    config = {"train_micro_batch_size_per_gpu": 1, "gradient_accumulation_steps": 1, "zero_optimization": {"stage": 2},
              "zero_allow_untested_optimizer": True}
    engine, *_ = deepspeed.initialize(model=bag, optimizer=opt, config=config, dist_init_required=False)
    for _ in range(2):
        loss = engine(torch.tensor(1.0))
        engine.backward(loss)
        engine.step()
    engine.save_checkpoint(out, tag="checkpoint", client_state={"hyper_parameters": argparse.Namespace(lr=0.05), "epoch": 1})
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
