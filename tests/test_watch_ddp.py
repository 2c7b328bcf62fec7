"""DDP over gloo, two processes: rank 0 records the all-reduced (averaged) gradient the update applies,
with the optimizer passed and without it, checked against a hand computation: the gradient of the two
ranks' mean loss on one undistributed copy of the model.
"""

import json

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

STEPS = 4


def shard(rank, step):
    g = torch.Generator().manual_seed(100 * rank + step)
    x = torch.randn(16, 6, generator=g)
    return x, x[:, :1] * 2 - x[:, 1:2] + rank  # the ranks' data differ: local gradients differ too


def by_layer(model):
    return {name: torch.cat([p.grad.double().reshape(-1) for p in m.parameters(recurse=False)]).norm().item()
            for name, m in model.named_modules() if list(m.parameters(recurse=False))}


def train(rank, with_optimizer):
    """STEPS DDP updates; on rank 0: (recorded norms, hand-computed ones, rank 0's local gradient, findings)."""
    from gradwatch.watch import watch

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 1))
    twin = nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 1))
    ddp = nn.parallel.DistributedDataParallel(model)
    opt = torch.optim.SGD(ddp.parameters(), lr=0.05)
    w = watch(ddp, opt if with_optimizer else None, every=2)
    expected = []
    for step in range(STEPS):
        twin.load_state_dict(model.state_dict())
        opt.zero_grad()
        x, y = shard(rank, step)
        nn.functional.mse_loss(ddp(x), y).backward()
        if rank == 0:  # the hand computation: the mean of both ranks' losses, on one undistributed copy
            twin.zero_grad()
            nn.functional.mse_loss(twin(x), y).backward()
            local = by_layer(twin)
            twin.zero_grad()
            sum(nn.functional.mse_loss(twin(x), y) for x, y in (shard(0, step), shard(1, step))).div(2).backward()
            expected.append(by_layer(twin))
        opt.step()
    w.detach()
    if rank == 0:
        got = [w.records.at("grad_norm", s) for s in range(STEPS)]
        return {"got": got, "want": expected, "local": local, "findings": [str(f) for f in w.diagnose()]}


def worker(rank, folder):
    import warnings

    warnings.simplefilter("ignore")  # watch() without an optimizer says what it records
    dist.init_process_group("gloo", init_method=f"file://{folder}/rendezvous", rank=rank, world_size=2)
    results = {str(with_optimizer): train(rank, with_optimizer) for with_optimizer in (True, False)}
    if rank == 0:
        (folder / "result.json").write_text(json.dumps(results))
    dist.destroy_process_group()


def test_rank_zero_records_the_all_reduced_gradient(tmp_path):
    if not dist.is_available() or dist.is_initialized():
        pytest.skip("torch.distributed unavailable or in use")
    mp.start_processes(worker, args=(tmp_path,), nprocs=2, start_method="fork")  # fork: no second torch import
    for with_optimizer, result in json.loads((tmp_path / "result.json").read_text()).items():
        assert len(result["got"]) == STEPS, with_optimizer
        for got, want in zip(result["got"], result["want"], strict=True):
            assert got.keys() == want.keys()
            assert all(got[k] == pytest.approx(v, rel=1e-5) for k, v in want.items()), with_optimizer
        assert result["local"]["0"] != pytest.approx(result["want"][-1]["0"], rel=0.05)  # rank 0's own differs
        assert result["findings"] == []
