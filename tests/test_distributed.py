"""Alpha initialisation under data parallelism: every process ends with the global batch's alpha."""

import os

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from spikelm import SpikeLMForPreTraining


def _worker(rank, world, init_file, result_dir):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        from conftest import tiny_config

        torch.manual_seed(0)
        model = SpikeLMForPreTraining(tiny_config())
        torch.manual_seed(100 + rank)  # each process sees a different batch
        ids = torch.randint(1, 97, (4, 12))
        model(input_ids=ids)
        alphas = torch.cat([n.alpha.detach() for _, n in model.neurons()])
        torch.save({"alphas": alphas, "ids": ids}, os.path.join(result_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_two_process_alpha_init_is_identical_and_global(tmp_path):
    mp.spawn(_worker, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    r0 = torch.load(tmp_path / "rank0.pt", weights_only=True)
    r1 = torch.load(tmp_path / "rank1.pt", weights_only=True)
    assert not torch.equal(r0["ids"], r1["ids"])
    assert torch.equal(r0["alphas"], r1["alphas"])
    # the same as one process initialising on the union of both batches
    from conftest import tiny_config

    torch.manual_seed(0)
    single = SpikeLMForPreTraining(tiny_config())
    single(input_ids=torch.cat([r0["ids"], r1["ids"]]))
    torch.testing.assert_close(
        torch.cat([n.alpha.detach() for _, n in single.neurons()]), r0["alphas"], atol=1e-5, rtol=1e-5
    )
