"""One rank of a gloo job training a small FSDP2 model, saving or loading it with stalwart's
checkpointer through ``torch.distributed.checkpoint.state_dict`` (see test_fsdp.py)."""

from __future__ import annotations

import argparse
import os
import sys

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
from torch.distributed.fsdp import fully_shard

from stalwart.checkpoint import CheckpointConfig, Checkpointer


def model(seed: int, world: int) -> nn.Module:
    torch.manual_seed(seed)
    m = nn.Sequential(nn.Linear(8, 10), nn.ReLU(), nn.Linear(10, 3))
    if world > 1:
        for layer in m:
            if isinstance(layer, nn.Linear):
                fully_shard(layer)
        fully_shard(m)
    return m


def train(m: nn.Module, opt: torch.optim.Optimizer, steps: int) -> None:
    for step in range(steps):
        x = torch.randn(6, 8, generator=torch.Generator().manual_seed(step))
        opt.zero_grad()
        m(x).pow(2).mean().backward()
        opt.step()


def full(v: object) -> object:
    """A state dict's value with every DTensor gathered whole (for comparison)."""
    if isinstance(v, dict):
        return {k: full(x) for k, x in v.items()}
    if hasattr(v, "full_tensor"):
        return v.full_tensor()  # type: ignore[union-attr]
    return v.clone() if isinstance(v, torch.Tensor) else v


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--mode", choices=["save", "load"], required=True)
    p.add_argument("--root", required=True)
    p.add_argument("--store", required=True)
    p.add_argument("--rank", type=int, required=True)
    p.add_argument("--world", type=int, required=True)
    p.add_argument("--expected", required=True, help="the saved state, gathered whole (torch.save)")
    args = p.parse_args()
    dist.init_process_group("gloo", init_method=f"file://{args.store}", rank=args.rank, world_size=args.world)
    config = CheckpointConfig(memory_tier=False, flush_on_sigterm=False)
    if args.mode == "save":
        m = model(0, args.world)
        opt = torch.optim.Adam(m.parameters(), lr=1e-2)
        train(m, opt, 3)
        msd, osd = get_state_dict(m, opt)
        ck = Checkpointer(args.root, config)
        ck.save(3, {"model": msd, "optim": osd, "step": 3}, blocking=True)
        ck.close()
        expected = {"model": full(msd), "optim": full(osd["state"])}
        if args.rank == 0:
            torch.save(expected, args.expected)
    else:
        m = model(1, args.world)  # other weights than the saved ones
        opt = torch.optim.Adam(m.parameters(), lr=1e-2)
        train(m, opt, 1)  # the optimizer's state exists (as DCP also requires before a load)
        msd, osd = get_state_dict(m, opt)
        state = {"model": msd, "optim": osd, "step": 0}
        ck = Checkpointer(args.root, config)
        assert ck.load_latest(state) == 3 and state["step"] == 3
        ck.close()
        set_state_dict(m, opt, model_state_dict=state["model"], optim_state_dict=state["optim"])
        msd, osd = get_state_dict(m, opt)  # read back from the model and optimizer themselves
        expected = torch.load(args.expected, weights_only=True)
        got = {"model": full(msd), "optim": full(osd["state"])}
        for part in ("model", "optim"):
            for key, want in expected[part].items():
                have = got[part][key]
                if isinstance(want, dict):
                    for name, tensor in want.items():
                        assert torch.equal(have[name], tensor), (part, key, name)
                else:
                    assert torch.equal(have, want), (part, key)
        assert osd["param_groups"][0]["lr"] == 1e-2
    dist.barrier()
    dist.destroy_process_group()
    sys.stdout.flush()
    os._exit(0)  # gloo's threads can abort C++ teardown at interpreter exit; not tested here


if __name__ == "__main__":
    main()
