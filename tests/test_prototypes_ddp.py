"""Prototype refresh under DDP (2 gloo processes): every rank contributes its shard, all get the same bank."""

from __future__ import annotations

import os
import socket

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from detkd.distill.base import DistillContext
from detkd.distill.global_kd.pool import PrototypeBank, PrototypeOptions
from detkd.models import build_detector
from tests.test_prototypes import tiny, toy_loader


def _models():
    torch.manual_seed(0)
    return build_detector(tiny("retinanet", "resnet34")), build_detector(tiny("retinanet"))


def _context(t, s, loader, epoch):
    return DistillContext(teacher=t, student=s, loader=loader, device=torch.device("cpu"), epoch=epoch, epochs=2)


def _rank(rank: int, world: int, port: int, out: str) -> None:
    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        t, s = _models()
        batches = toy_loader()
        # rank 1 sees batch 0 again, as a DistributedSampler pads the last shard by repeating images
        shard = [batches[rank]] + ([batches[0]] if rank == 1 else [])
        for cap in (0, 1):
            bank = PrototypeBank(PrototypeOptions(k=2, lam=1.0, max_images_per_class=cap))
            bank.refresh(_context(t, s, shard, 0))
            bank.refresh(_context(t, s, shard, 1))  # the second refresh reuses the cached teacher features
            torch.save(bank.state(), f"{out}/rank{rank}_cap{cap}.pt")
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_two_ranks_select_the_same_prototypes_as_one_process(tmp_path):
    mp.spawn(_rank, args=(2, _free_port(), str(tmp_path)), nprocs=2)
    t, s = _models()
    for cap in (0, 1):
        bank = PrototypeBank(PrototypeOptions(k=2, lam=1.0, max_images_per_class=cap))
        bank.refresh(_context(t, s, toy_loader(), 0))
        ref = bank.state()["entries"]
        assert ref
        for rank in (0, 1):
            got = torch.load(tmp_path / f"rank{rank}_cap{cap}.pt", weights_only=True)["entries"]
            assert set(got) == set(ref)
            for key, entry in ref.items():
                assert torch.equal(got[key]["indices"], entry["indices"]), (cap, rank, key)
                for name in ("teacher", "student"):
                    torch.testing.assert_close(got[key][name], entry[name], rtol=1e-4, atol=1e-4)
