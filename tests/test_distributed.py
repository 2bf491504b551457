"""Data parallelism on the CPU: 2 processes, gloo, the same environment torchrun sets.

Global-scope geometry losses and the student gradients equal those of one process on the
concatenated batch; a DDP training run with 2 ranks x batch b equals 1 rank x batch 2b; a DDP
run interrupted and resumed ends bit-identical; checkpoints and logs are written once.
"""

from __future__ import annotations

import faulthandler
import json
import os
import socket
import time
import warnings
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from conftest import make_cfg

WORLD = 2


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


LAUNCH_TIMEOUT_S = 300  # the slowest launch here takes about 60 s on 2 busy cores
TEARDOWN_GRACE_S = 60  # once one rank has exited 0, how long the others get to tear down


def _launch(fn, *args) -> None:
    """Run ``fn(rank, *args)`` in WORLD processes with torchrun's environment variables. A launch
    that hangs fails after LAUNCH_TIMEOUT_S instead of holding the test suite until CI's own limit.

    As under torchrun, the launcher (this process) hosts the rendezvous store and every rank is a
    client (TORCHELASTIC_USE_AGENT_STORE): when rank 0 hosted it, rank 0 could exit first and leave
    rank 1 waiting on a store that was gone (seen twice here: exit codes [0, None]). Hangs at exit
    went on with the launcher hosting it, about one launch in five on 2 busy cores, and once in CI
    with both ranks stuck ([None, None]; no stacks were taken there): here py-spy showed a DDP
    module outliving the group, fixed in :func:`_close_group`. A rank still alive TEARDOWN_GRACE_S
    after another exited 0 is still killed with a warning, not failed: all a test checks is written
    before teardown."""
    from torch.distributed import TCPStore

    store = TCPStore("127.0.0.1", 0, WORLD, is_master=True, wait_for_workers=False)
    ctx = mp.start_processes(
        _entry, args=(fn, store.port, args), nprocs=WORLD, join=False, start_method="spawn"
    )
    deadline = time.monotonic() + LAUNCH_TIMEOUT_S
    first_done = None
    while not ctx.join(timeout=5):
        codes = [p.exitcode for p in ctx.processes]
        if first_done is None and 0 in codes:
            first_done = time.monotonic()
        if first_done is not None and time.monotonic() > first_done + TEARDOWN_GRACE_S:
            # A rank that exited 0 finished every collective, and a gloo collective finishes on
            # one rank only once every rank has joined it: the ones still alive are stuck in
            # tearing down (seen in CI: exit codes [0, None] after the final barrier). What a
            # test checks is written before that, so it still decides the outcome.
            for p in ctx.processes:
                p.kill()
            warnings.warn(
                f"{fn.__name__}: ranks stuck after the others finished (exit codes {codes}); killed",
                stacklevel=2,
            )
            break
        if time.monotonic() > deadline:
            for p in ctx.processes:
                p.kill()
            pytest.fail(f"{fn.__name__}: ranks not finished after {LAUNCH_TIMEOUT_S} s (exit codes {codes})")
    del store  # outlives every rank


def _entry(rank: int, fn, port: int, args: tuple) -> None:
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        WORLD_SIZE=str(WORLD),
        LOCAL_WORLD_SIZE=str(WORLD),
        TORCHELASTIC_USE_AGENT_STORE="True",  # the store is the launcher's, as torchrun's agent does
        HF_HUB_OFFLINE="1",
        TOKENIZERS_PARALLELISM="false",
    )
    torch.set_num_threads(1)
    # a rank still running near the launcher's deadline prints every thread's stack (into the
    # test's captured stderr), so a hang in CI says where it is
    faulthandler.dump_traceback_later(LAUNCH_TIMEOUT_S - 30, exit=False)
    fn(rank, *args)
    _close_group()


def _close_group() -> None:
    """Tear the group down once ``fn`` and everything it made are gone. A DDP module that outlives
    ``destroy_process_group`` holds the group's last reference; freeing it later runs
    ``~ProcessGroupGloo`` from the Reducer's dealloc with the GIL held, and that destructor joins
    gloo worker threads, one of which may still be releasing a finished work whose thread-local
    state needs the GIL: a deadlock (py-spy, here: main thread in ``~Reducer`` ->
    ``~ProcessGroupGloo`` -> ``thread::join``; worker in ``~AsyncAllreduceWork`` ->
    ``gil_scoped_acquire``). It hung about one launch in five on 2 busy cores, at exit."""
    import gc

    import torch.distributed as dist

    if not dist.is_initialized():  # the command under test closed it (geodistill.cli.main)
        return
    gc.collect()  # modules in reference cycles too, while the group is still registered
    alive = _ddp_modules_alive()
    assert not alive, f"{alive} DDP module(s) would outlive the process group"
    dist.barrier()  # no rank tears the group down while another still uses it
    dist.destroy_process_group()


def _ddp_modules_alive() -> int:
    import gc

    return sum(isinstance(o, torch.nn.parallel.DistributedDataParallel) for o in gc.get_objects())


# ----------------------------------------------------------------------------------------------
# the distances themselves


def _problem(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    inputs = torch.randn(30, 6, generator=g, dtype=torch.float64)
    teacher = torch.randn(30, 9, generator=g, dtype=torch.float64) + 1.0
    model = torch.nn.Linear(6, 5).double()
    with torch.no_grad():
        model.weight.copy_(torch.randn(5, 6, generator=g, dtype=torch.float64))
        model.bias.copy_(torch.randn(5, generator=g, dtype=torch.float64))
    return inputs, teacher, model


SHARDS = {"equal": [15, 15], "unequal": [11, 19]}


class _Wire:
    """Bytes this rank sends, counted at torch.distributed itself (ring algorithms: an all-reduce
    sends 2 (W - 1) / W of its tensor, an all-gather (W - 1) / W of its result): an account of
    the collectives independent of geodistill's own bookkeeping."""

    def __init__(self) -> None:
        import torch.distributed as dist

        self.bytes = 0.0
        self._reduce, self._gather = dist.all_reduce, dist.all_gather

        def all_reduce(t, *a, **k):
            self.bytes += 2 * (WORLD - 1) / WORLD * t.numel() * t.element_size()
            return self._reduce(t, *a, **k)

        def all_gather(parts, t, *a, **k):
            self.bytes += (WORLD - 1) / WORLD * sum(p.numel() * p.element_size() for p in parts)
            return self._gather(parts, t, *a, **k)

        dist.all_reduce, dist.all_gather = all_reduce, all_gather


def _global_loss_worker(rank: int, out: str) -> None:
    import torch.distributed as dist

    from geodistill.config import LossConfig
    from geodistill.distributed import TRAFFIC, global_distance
    from geodistill.losses import resolve_losses
    from geodistill.train import Objective

    dist.init_process_group("gloo")
    inputs, teacher, model = _problem()
    ddp = torch.nn.parallel.DistributedDataParallel(model)
    wire = _Wire()
    results = {}
    for shards_name, sizes in SHARDS.items():
        lo = sum(sizes[:rank])
        x_in, y = inputs[lo : lo + sizes[rank]], teacher[lo : lo + sizes[rank]]
        for kind in ("procrustes", "gram", "cka"):
            for route in ("gather", "stats"):
                ddp.zero_grad()
                feats = ddp(x_in)
                wire_before, traffic_before, plans = wire.bytes, TRAFFIC.bytes, []
                # a per-example term too, to check the mix: mean over the rank's rows (DDP averages)
                loss = global_distance(kind, feats, y, route=route, on_plan=plans.append)
                loss = loss + 0.1 * feats.square().mean()
                loss.backward()
                results[f"{shards_name}/{kind}/{route}"] = {
                    "loss": float(loss),
                    "grad": [p.grad.tolist() for p in model.parameters()],
                    "sent": [wire.bytes - wire_before, TRAFFIC.bytes - traffic_before, plans[0].bytes],
                    "route": plans[0].route,
                }
            # scope through the trainer's Objective: global = the distance above; local = this
            # rank's shard alone (DDP then averages the shards' gradients)
            for scope in ("global", "local"):
                (term,) = resolve_losses([LossConfig(name=kind, scope=scope)])
                objective = Objective((term,), {term.key: ((0, 0),)})
                ddp.zero_grad()
                feats = ddp(x_in)
                loss = objective._coupled(term, feats, y, "test")
                loss.backward()
                results[f"{shards_name}/{kind}/scope-{scope}"] = {
                    "loss": float(loss.detach()),
                    "grad": [p.grad.tolist() for p in model.parameters()],
                }
    # float32 features: sums and norms travel in float64, products in float32 (far from 0: no
    # float64 refinement round)
    for kind in ("procrustes", "gram", "cka"):
        for route in ("gather", "stats"):
            feats = ddp(inputs[rank * 15 : (rank + 1) * 15]).float()
            wire_before, traffic_before, plans = wire.bytes, TRAFFIC.bytes, []
            d = global_distance(
                kind, feats, teacher[rank * 15 : (rank + 1) * 15].float(), route=route, on_plan=plans.append
            )
            d.backward()
            results[f"float32/{kind}/{route}"] = {
                "sent": [wire.bytes - wire_before, TRAFFIC.bytes - traffic_before, plans[0].bytes],
                "value": float(d.detach()),
            }
    if rank == 0:
        Path(out).write_text(json.dumps(results))


def test_global_losses_and_gradients_equal_one_process(tmp_path: Path) -> None:
    from geodistill.geometry import cka_distance, gram_distance, procrustes_distance

    out = tmp_path / "ddp.json"
    _launch(_global_loss_worker, str(out))
    got = json.loads(out.read_text())
    inputs, teacher, model = _problem()
    for key, value in got.items():
        shards_name, kind, route = key.split("/")
        if shards_name == "float32":
            wire, counted, planned = value["sent"]
            assert value["value"] > 0.1  # not refined in float64: the plan's bytes are exact
            assert wire > 0 and abs(counted - wire) < 1e-6 and abs(planned - wire) < 1e-6, (key, value)
            continue
        if route.startswith("scope-"):
            continue
        # bytes: geodistill's count equals the count at torch.distributed, and the plan's estimate
        # (float64 here: no float32 refinement round)
        wire, counted, planned = value["sent"]
        assert wire > 0 and abs(counted - wire) < 1e-6 and abs(planned - wire) < 1e-6, (key, value)
        assert value["route"] == route
        model.zero_grad()
        feats = model(inputs)
        f = {"procrustes": procrustes_distance, "gram": gram_distance, "cka": cka_distance}[kind]
        loss = f(feats, teacher)
        # the per-example term: DDP averages two shard means, so with unequal shards that is the
        # mean of means (what any DDP loss does); the geometry term is exactly global either way
        sizes = SHARDS[shards_name]
        per = sum(feats[sum(sizes[:r]) : sum(sizes[: r + 1])].square().mean() for r in range(WORLD)) / WORLD
        (loss + 0.1 * per).backward()
        for p, g in zip(model.parameters(), value["grad"], strict=True):
            assert torch.allclose(p.grad, torch.tensor(g, dtype=torch.float64), atol=1e-10, rtol=0), key
        # rank 0's loss: the global distance plus its own shard's per-example term
        expected = float(loss.detach()) + 0.1 * float(feats[: sizes[0]].detach().square().mean())
        assert abs(value["loss"] - expected) < 1e-10, key

    # scope: global through the Objective is the global distance; local is per shard, and differs
    for shards_name, sizes in SHARDS.items():
        for kind in ("procrustes", "gram", "cka"):
            f = {"procrustes": procrustes_distance, "gram": gram_distance, "cka": cka_distance}[kind]
            bounds = [(sum(sizes[:r]), sum(sizes[: r + 1])) for r in range(WORLD)]
            for scope in ("global", "local"):
                value = got[f"{shards_name}/{kind}/scope-{scope}"]
                model.zero_grad()
                feats = model(inputs)
                if scope == "global":
                    loss, rank0 = f(feats, teacher), f(feats, teacher)
                else:  # DDP averages the ranks' gradients of their own shard's distance
                    parts = [f(feats[a:b], teacher[a:b]) for a, b in bounds]
                    loss, rank0 = sum(parts) / WORLD, parts[0]
                loss.backward()
                assert abs(value["loss"] - float(rank0.detach())) < 1e-10, (shards_name, kind, scope)
                for p, g in zip(model.parameters(), value["grad"], strict=True):
                    assert torch.allclose(p.grad, torch.tensor(g, dtype=torch.float64), atol=1e-10, rtol=0)
            local, glob = (got[f"{shards_name}/{kind}/scope-{s}"]["loss"] for s in ("local", "global"))
            assert abs(local - glob) > 1e-3, (shards_name, kind)  # the scopes are different objectives


def test_plan_picks_the_cheaper_route() -> None:
    from geodistill.distributed import plan

    assert plan("procrustes", 64, 768, 2048).route == "gather"  # few rows: gather them
    assert plan("procrustes", 16384, 768, 2048).route == "stats"  # many rows: d x d statistics
    # 2 ranks, float32: an all-reduce sends its tensor once a rank (2 (W-1)/W), an all-gather half
    # its result; the backward all-reduces the student's statistics; both count the row counts (8 B)
    p = plan("gram", 4096, 384, 384)
    assert p.route == "stats"
    assert p.forward_bytes == 8 + 8 * (384 + 384 + 2) + 4 * 3 * 384 * 384  # sums and norms in float64
    assert p.backward_bytes == 4 * (384 + 1 + 2 * 384 * 384)
    g = plan("procrustes", 100, 8, 16, route="gather", world=4, max_rows=30)
    assert g.forward_bytes == 3 / 4 * (4 * 8) + 3 / 4 * (4 * 30 * 24 * 4)
    assert g.backward_bytes == 2 * 3 / 4 * (4 * 30 * 8 * 4)
    # auto takes the route with fewer bytes, forward and backward together
    for n in (64, 512, 4096, 32768):
        a, b = (plan("procrustes", n, 256, 256, route=r) for r in ("gather", "stats"))
        assert plan("procrustes", n, 256, 256).route == ("gather" if a.bytes <= b.bytes else "stats")
    with pytest.raises(ValueError, match="route"):
        plan("gram", 10, 2, 2, route="scatter")


# ----------------------------------------------------------------------------------------------
# the training loop under DDP


def _train_worker(rank: int, cfg_dict: dict, out: str, crash_at: int | None) -> None:
    from geodistill.config import DistillConfig, from_dict
    from geodistill.train import setup, train

    cfg = from_dict(DistillConfig, cfg_dict)
    r = setup(cfg, progress=False)
    _to_float64(r)

    class Interrupt(Exception):
        pass

    def crash(event: str, state: dict) -> None:
        if state["step"] == crash_at:
            raise Interrupt

    saves, real_save = [], torch.save  # who writes checkpoints: counted on every rank

    def counting_save(obj, f, *a, **k):
        if isinstance(f, (str, os.PathLike)):  # files (gathering objects pickles to memory too)
            saves.append(str(f))
        return real_save(obj, f, *a, **k)

    ddp = torch.nn.parallel.DistributedDataParallel
    ddp_init, find_unused = ddp.__init__, []  # how the student was wrapped

    def recording_init(self, *a, **k):
        find_unused.append(bool(k.get("find_unused_parameters", False)))
        ddp_init(self, *a, **k)

    torch.save, ddp.__init__ = counting_save, recording_init
    try:
        results = train(r, progress=False, callbacks=[crash] if crash_at else None)
        torch.save = real_save
        if rank == 0:
            torch.save({"weights": r.student.state_dict(), "results": results}, out)
    except Interrupt:
        pass
    finally:
        torch.save, ddp.__init__ = real_save, ddp_init
    Path(f"{out}.rank{rank}.json").write_text(
        json.dumps({"saves": saves, "find_unused": find_unused, **_shard_sizes(r)})
    )


def _shard_sizes(r) -> dict:
    """Elements this rank holds of the student's and teacher's parameters, and their full sizes."""
    from torch.distributed.tensor import DTensor

    sizes = {}
    for name, module in (("student", r.student.model), ("teacher", r.teacher)):
        params = list(module.parameters()) if module is not None else []
        sizes[name] = {
            "local": sum((p.to_local() if isinstance(p, DTensor) else p).numel() for p in params),
            "full": sum(p.numel() for p in params),
            "dtensors": sum(isinstance(p, DTensor) for p in params),
        }
    return sizes


def _to_float64(r) -> None:
    r.student.double()
    r.teacher.double()
    if r.teacher_cache is not None:
        r.teacher_cache.logits = r.teacher_cache.logits.double()
        r.teacher_cache.features = {k: v.double() for k, v in r.teacher_cache.features.items()}


LOSSES = "[{name: ce}, {name: kd, temperature: 2.0}, {name: procrustes, pooling: tokens}, {name: gram, layers: uniform}, {name: cka, pooling: mean}, {name: proj_mse}]"


def _single_process(cfg) -> dict:
    from geodistill.train import setup, train

    r = setup(cfg, progress=False)
    _to_float64(r)
    train(r, progress=False)
    return r.student.state_dict()


#: feature terms alone, on student layer 1 of 2: layer 2, the pooler and the classifier get no gradient
FEATURES_ONLY = "[{name: procrustes, pooling: mean, layers: [[1, 2]]}, {name: proj_mse, layers: [[1, 2]]}]"


@pytest.mark.parametrize(
    ("variant", "unused"),
    [
        pytest.param([], False, id="plain"),
        pytest.param(["train.grad_accum=2"], False, id="accumulation"),
        pytest.param(["train.group_by_length=true"], False, id="length-groups"),
        # DDP must look for the parameters without a gradient (else it fails on step 2), and only then
        pytest.param([f"losses={FEATURES_ONLY}", "train.grad_accum=2"], True, id="features-only"),
    ],
)
def test_two_ranks_batch_b_equal_one_rank_batch_2b(
    assets, tmp_path: Path, variant: list[str], unused: bool
) -> None:
    from geodistill.config import to_dict

    common = [f"losses={LOSSES}", "train.max_steps=4", "train.eval_every=2", "train.log_every=1", *variant]
    ddp_cfg = make_cfg(assets, tmp_path / "ddp", *common, "train.batch_size=4")
    _launch(_train_worker, to_dict(ddp_cfg), str(tmp_path / "ddp.pt"), None)
    ddp = torch.load(tmp_path / "ddp.pt", weights_only=False)
    assert ddp["results"]["world_size"] == 2
    routes = ddp["results"]["collectives"]
    assert routes and all(v.startswith(("stats: ", "gather: ")) for v in routes.values()), routes
    assert ddp["results"]["comm_mib_per_step"] > 0

    single = _single_process(make_cfg(assets, tmp_path / "one", *common, "train.batch_size=8"))
    worst = max((ddp["weights"][k] - single[k]).abs().max().item() for k in single)
    assert worst < 1e-9, worst
    init = _initial_weights(make_cfg(assets, tmp_path / "init", *common))
    assert max((single[k] - init[k]).abs().max().item() for k in single) > 1e-3  # the steps did move

    # logs and checkpoints are written once, by the main process
    rows = [json.loads(x) for x in (tmp_path / "ddp" / "log.jsonl").read_text().splitlines() if "loss/" in x]
    assert [row["step"] for row in rows] == [1, 2, 3, 4]
    assert all(row["comm_mib_per_step"] > 0 for row in rows)  # bytes sent by the global terms
    assert sorted(p.name for p in (tmp_path / "ddp" / "checkpoint").iterdir()) == ["state.pt"]
    assert len(torch.load(tmp_path / "ddp" / "checkpoint" / "state.pt", weights_only=False)["rng"]) == 2
    saves = [
        json.loads(Path(f"{tmp_path / 'ddp.pt'}.rank{r}.json").read_text())["saves"] for r in range(WORLD)
    ]
    assert saves[0] and all("/ddp/checkpoint/state.pt" in f for f in saves[0]), saves[0]
    assert saves[1] == []  # rank 0 writes every checkpoint, rank 1 none
    for r in range(WORLD):
        got = json.loads(Path(f"{tmp_path / 'ddp.pt'}.rank{r}.json").read_text())["find_unused"]
        assert got == [unused], got

    # the logged loss terms and gradient norm are the global batch's, as one process on it logs
    # them (not rank 0's shard means)
    ones = [json.loads(x) for x in (tmp_path / "one" / "log.jsonl").read_text().splitlines() if "loss/" in x]
    for ddp_row, one in zip(rows, ones, strict=True):
        logged = sorted(k for k in one if k.startswith("loss/") or k == "grad_norm")
        assert logged == sorted(k for k in ddp_row if k.startswith("loss/") or k == "grad_norm")
        for k in logged:
            assert abs(ddp_row[k] - one[k]) <= 1e-9 * max(1.0, abs(one[k])), (
                one["step"],
                k,
                ddp_row[k],
                one[k],
            )


def _dropout_masks(cfg) -> list[list[list[list[bool]]]]:
    """The masks the student's first dropout layer drew in each training forward of ``cfg``'s run."""
    from geodistill.train import setup, train

    r = setup(cfg, progress=False)
    drop = next(m for m in r.student.model.modules() if isinstance(m, torch.nn.Dropout) and m.p > 0)
    masks = []

    def record(module, inputs, output) -> None:
        if module.training:
            masks.append((output != 0).tolist())

    drop.register_forward_hook(record)
    train(r, progress=False)
    return masks


def _dropout_worker(rank: int, cfg_dict: dict, out: str) -> None:
    from geodistill.config import DistillConfig, from_dict

    masks = _dropout_masks(from_dict(DistillConfig, cfg_dict))
    Path(f"{out}.rank{rank}.json").write_text(json.dumps(masks))


def test_each_rank_draws_its_own_dropout_masks(assets, tmp_path: Path) -> None:
    """Two ranks with rows of one length (equal shapes) draw different dropout masks at step 1 (the
    same seed on each would drop the same units of every rank's rows); rank 0 draws those of a
    one-process run, whose stream is unchanged."""
    import csv
    import random
    import shutil

    from geodistill.config import to_dict

    data = tmp_path / "data"
    data.mkdir()
    for split in ("dev", "test"):
        shutil.copy(assets["data"] / f"{split}.csv", data / f"{split}.csv")
    rng = random.Random(0)
    with open(data / "train.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["text", "label"])
        for i in range(16):  # five words each, label 1 iff w5 is one of them
            words = [f"w{rng.randrange(6, 60)}" for _ in range(5)]
            if i % 2:
                words[rng.randrange(5)] = "w5"
            w.writerow([" ".join(words), i % 2])
    common = ["train.max_steps=1", "train.eval_every=1", "train.batch_size=4"]
    cfg = make_cfg({**assets, "data": data}, tmp_path / "ddp", *common, teacher="teacher_dropout")
    _launch(_dropout_worker, to_dict(cfg), str(tmp_path / "masks"))
    masks = [json.loads(Path(f"{tmp_path / 'masks'}.rank{r}.json").read_text()) for r in range(WORLD)]
    assert [len(m) for m in masks] == [1, 1]  # one training forward each
    first = [torch.tensor(m[0]) for m in masks]
    assert first[0].shape == first[1].shape  # the same shapes, so the same seed would give the same masks
    assert all(0 < (~m).sum() < m.numel() for m in first)  # dropout dropped some units, not all
    assert not torch.equal(first[0], first[1])
    one = _dropout_masks(
        make_cfg({**assets, "data": data}, tmp_path / "one", *common, teacher="teacher_dropout")
    )
    assert torch.equal(torch.tensor(one[0]), first[0])


def _initial_weights(cfg) -> dict:
    from geodistill.train import setup

    return {k: v.double() for k, v in setup(cfg, progress=False).student.state_dict().items()}


def test_ddp_run_resumes_bit_identical(assets, tmp_path: Path) -> None:
    from geodistill.config import to_dict

    common = [
        "train.max_steps=6",
        "train.save_every=2",
        "train.eval_every=2",
        "train.batch_size=2",
        "train.grad_accum=2",
        "losses=[{name: kd}, {name: procrustes}]",
    ]
    a = make_cfg(assets, tmp_path / "a", *common, teacher="teacher_dropout")
    _launch(_train_worker, to_dict(a), str(tmp_path / "a.pt"), None)
    b = make_cfg(assets, tmp_path / "b", *common, teacher="teacher_dropout")
    _launch(_train_worker, to_dict(b), str(tmp_path / "b.pt"), 3)  # dies after step 3
    assert not (tmp_path / "b.pt").exists()
    # one process cannot take over a 2-process run's place in the data: a clear error, not a
    # silently different run
    from geodistill.config import ConfigError
    from geodistill.train import setup, train

    with pytest.raises(
        ConfigError, match=r"written by a run of 2 process\(es\); resume it with 2 \(this launch has 1\)"
    ):
        train(setup(b, progress=False), progress=False)
    _launch(_train_worker, to_dict(b), str(tmp_path / "b.pt"), None)  # resumes from step 2
    wa = torch.load(tmp_path / "a.pt", weights_only=False)["weights"]
    wb = torch.load(tmp_path / "b.pt", weights_only=False)["weights"]
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


@pytest.mark.parametrize(
    "teacher_sharded", [True, False], ids=["sharded-teacher", "replicated-teacher-resumed"]
)
def test_fsdp_equals_one_process(assets, tmp_path: Path, teacher_sharded: bool) -> None:
    """FSDP2 over 2 ranks x batch 2 equals one process x batch 4: with the frozen teacher sharded
    too, and with it replicated on every rank in a run that dies after step 2 and resumes."""
    from transformers import AutoModelForSequenceClassification

    from geodistill.config import to_dict

    common = [
        f"losses={LOSSES}",
        "train.max_steps=3",
        "train.eval_every=3",
        "train.save_every=1",
        "train.cache_teacher=false",
        "train.grad_accum=2",
    ]
    fsdp_cfg = make_cfg(
        assets,
        tmp_path / "fsdp",
        *common,
        "train.batch_size=2",
        "train.parallel=fsdp",
        f"teacher.shard={str(teacher_sharded).lower()}",
    )
    if not teacher_sharded:
        _launch(_train_worker, to_dict(fsdp_cfg), str(tmp_path / "fsdp.pt"), 2)  # dies after step 2
        assert not (tmp_path / "fsdp.pt").exists()
    _launch(_train_worker, to_dict(fsdp_cfg), str(tmp_path / "fsdp.pt"), None)
    fsdp = torch.load(tmp_path / "fsdp.pt", weights_only=False)
    # the ranks' shards of the student (and of a sharded teacher) add up to it, none holds it all
    held = [json.loads(Path(f"{tmp_path / 'fsdp.pt'}.rank{r}.json").read_text()) for r in range(WORLD)]
    for name in ("student", "teacher") if teacher_sharded else ("student",):
        parts = [h[name] for h in held]
        assert all(p["dtensors"] > 0 for p in parts), parts
        assert sum(p["local"] for p in parts) == parts[0]["full"], parts
        assert max(p["local"] for p in parts) < 0.7 * parts[0]["full"], parts
    for h in held:
        teacher = h["teacher"]
        if not teacher_sharded:
            assert teacher["dtensors"] == 0 and teacher["local"] == teacher["full"], held
    single = _single_process(make_cfg(assets, tmp_path / "one", *common, "train.batch_size=4"))
    # the FSDP module's own state_dict holds shards: compare the saved full checkpoint instead
    full = torch.load(tmp_path / "fsdp" / "checkpoint" / "state.pt", weights_only=False)["student"]
    assert (
        torch.load(tmp_path / "fsdp" / "checkpoint" / "state.pt", weights_only=False)["progress"]["step"] == 3
    )
    worst = max((full[k].double() - single[k]).abs().max().item() for k in single)
    assert worst < 1e-9, worst
    # the best student is saved whole and loads with plain transformers
    model = AutoModelForSequenceClassification.from_pretrained(fsdp["results"]["student_dir"])
    assert model.config.num_hidden_layers == 2


def test_sharding_a_cached_teacher_is_an_error(assets, tmp_path: Path) -> None:
    from geodistill.config import ConfigError
    from geodistill.train import setup

    cfg = make_cfg(assets, tmp_path / "run", "train.parallel=fsdp", "teacher.shard=true")
    with pytest.raises(ConfigError, match=r"teacher.shard: .*train.cache_teacher=false"):
        setup(cfg, progress=False)


def _sweep_worker(rank: int, data: dict, out: str) -> None:
    from geodistill.experiments import parse_sweep, run_sweep

    sweep = parse_sweep(data)
    first = run_sweep(sweep, progress=False)
    again = run_sweep(sweep, progress=False)  # everything finished: every rank skips every run
    Path(out, f"rank{rank}.json").write_text(
        json.dumps({"first": [first.finished, first.skipped], "again": [again.finished, again.skipped]})
    )


def test_sweep_under_torchrun_runs_each_run_across_all_ranks_and_writes_rows_once(
    assets, tmp_path: Path
) -> None:
    from geodistill.config import to_dict
    from geodistill.experiments import read_rows

    base = to_dict(make_cfg(assets, tmp_path / "unused", "train.max_steps=2", "train.eval_every=2"))
    data = {
        "name": "ddp",
        "base": base,
        "methods": {
            "kd": {"losses": [{"name": "kd", "temperature": 2.0}]},
            "ce": {"losses": [{"name": "ce"}]},
        },
        "grid": {"seed": [0]},
        "output_dir": str(tmp_path / "sweep"),
    }
    _launch(_sweep_worker, data, str(tmp_path))
    rows = read_rows(tmp_path / "sweep" / "results.jsonl")
    assert sorted(r["method"] for r in rows) == ["ce", "kd"]  # once each, by rank 0
    assert all(r["status"] == "ok" and r["world_size"] == 2 for r in rows)
    for rank in range(WORLD):
        counts = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert counts["again"] == [0, 2]
        assert counts["first"] == ([2, 0] if rank == 0 else [0, 0])  # rank 0 records, the others do not


# ----------------------------------------------------------------------------------------------
# the real launchers, as a user types them


def _launcher_env() -> dict:
    env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", OMP_NUM_THREADS="1")
    env.pop("RANK", None)
    env.pop("WORLD_SIZE", None)
    return env


def _launcher_command(launcher: str) -> list[str]:
    import sys

    port = str(_free_port())
    bindir = Path(sys.executable).parent
    if launcher == "torchrun":
        return [str(bindir / "torchrun"), "--nproc-per-node", "2", "--master-port", port]
    return [
        str(bindir / "accelerate"),
        "launch",
        "--multi_gpu",
        "--num_processes",
        "2",
        "--num_machines",
        "1",
        "--mixed_precision",
        "no",
        "--dynamo_backend",
        "no",
        "--main_process_port",
        port,
    ]


@pytest.mark.parametrize("launcher", ["torchrun", "accelerate"])
def test_real_launchers_run_a_sweep_on_two_processes(assets, tmp_path: Path, launcher: str) -> None:
    """`geodistill sweep` under each launcher: every run across both ranks, each row written
    once, by rank 0, and a second launch finds everything done."""
    import subprocess

    import yaml

    from geodistill.config import to_dict
    from geodistill.experiments import read_rows

    base = to_dict(make_cfg(assets, tmp_path / "unused", "train.max_steps=2", "train.eval_every=2"))
    sweep_file = tmp_path / "sweep.yaml"
    sweep_file.write_text(
        yaml.safe_dump(
            {
                "name": "launched",
                "base": base,
                "methods": {
                    "kd": {"losses": [{"name": "kd", "temperature": 2.0}]},
                    "kd+gram": {"losses": [{"name": "kd", "temperature": 2.0}, {"name": "gram"}]},
                },
                "grid": {"seed": [0]},
                "output_dir": str(tmp_path / "sweep"),
            }
        )
    )
    cmd = [*_launcher_command(launcher), "-m", "geodistill.cli", "sweep", str(sweep_file), "--quiet"]
    done = subprocess.run(cmd, env=_launcher_env(), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    rows = read_rows(tmp_path / "sweep" / "results.jsonl")
    assert sorted(r["method"] for r in rows) == ["kd", "kd+gram"]  # once each
    assert all(r["status"] == "ok" and r["world_size"] == 2 for r in rows)
    if launcher == "torchrun":  # resumes: nothing left to run, nothing written again
        again = subprocess.run(cmd, env=_launcher_env(), capture_output=True, text=True, timeout=300)
        assert again.returncode == 0, again.stderr[-3000:]
        assert "2 already finished, 0 to do" in again.stdout, again.stdout
        assert len(read_rows(tmp_path / "sweep" / "results.jsonl")) == 2


@pytest.mark.parametrize("launcher", ["torchrun", "accelerate"])
def test_real_launchers_run_distill_on_two_processes(assets, tmp_path: Path, launcher: str) -> None:
    """`torchrun --nproc-per-node 2` and `accelerate launch --multi_gpu --num_processes 2` (which
    goes through torchrun's launcher; gloo on a CPU) run `geodistill distill` with 2 ranks, and the
    run equals the 1-rank run on the doubled batch."""
    import subprocess

    import yaml

    from geodistill.config import to_dict

    common = [f"losses={LOSSES}", "train.max_steps=3", "train.eval_every=3"]
    cfg = make_cfg(assets, tmp_path / "ddp", *common, "train.batch_size=4")
    config_file = tmp_path / "run.yaml"
    config_file.write_text(yaml.safe_dump(to_dict(cfg)))
    cmd = [*_launcher_command(launcher), "-m", "geodistill.cli", "distill", str(config_file), "--quiet"]
    done = subprocess.run(cmd, env=_launcher_env(), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]

    results = json.loads((tmp_path / "ddp" / "results.json").read_text())
    assert results["world_size"] == 2
    assert results["best_step"] == 3
    from transformers import AutoModelForSequenceClassification

    ddp = AutoModelForSequenceClassification.from_pretrained(tmp_path / "ddp" / "best").state_dict()

    # the saved student is the bare transformers model: no wrapper prefix, no projection heads
    def bare(state: dict) -> dict:
        return {k.removeprefix("model."): v for k, v in state.items()}

    single = bare(_single_process(make_cfg(assets, tmp_path / "one", *common, "train.batch_size=8")))
    assert set(ddp) <= set(single)
    worst = max((ddp[k].double() - single[k]).abs().max().item() for k in ddp)
    # float32 training: the same steps up to summation order (one batch of 8 against two of 4 and
    # an all-reduce), which Adam's normalisation can carry into the weights: measured up to 1.1e-5
    # on an Intel Xeon (AVX-512 kernels), under 1e-5 on an AMD EPYC
    tolerance = 5e-5
    assert worst < tolerance, worst
    init = bare(_initial_weights(make_cfg(assets, tmp_path / "init", *common)))
    moved = max((ddp[k].double() - init[k]).abs().max().item() for k in ddp)
    assert moved > 20 * tolerance, moved  # the steps did move the weights, far beyond the tolerance


def _cli_worker(rank: int, config_file: str, out: str) -> None:
    import geodistill.cli as cli

    close, seen = cli._close_process_group, []

    def checked_close() -> None:
        # no collection first: what the command itself left alive when it closes the group
        seen.append(_ddp_modules_alive())
        close()

    cli._close_process_group = checked_close
    code = cli.main(["distill", config_file, "--quiet"])
    Path(out, f"rank{rank}.json").write_text(
        json.dumps({"code": code, "ddp_alive": seen, "closed": not torch.distributed.is_initialized()})
    )


def test_cli_frees_the_ddp_student_before_it_closes_the_group(assets, tmp_path: Path) -> None:
    """`geodistill distill` under 2 ranks: by the time the CLI destroys the process group, no DDP
    module is left alive. One freed later holds the group's last reference and can deadlock gloo's
    teardown at exit (see :func:`_close_group`)."""
    import yaml

    from geodistill.config import to_dict

    cfg = make_cfg(assets, tmp_path / "run", f"losses={LOSSES}", "train.max_steps=2", "train.eval_every=2")
    config_file = tmp_path / "run.yaml"
    config_file.write_text(yaml.safe_dump(to_dict(cfg)))
    _launch(_cli_worker, str(config_file), str(tmp_path))
    for rank in range(WORLD):
        got = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert got == {"code": 0, "ddp_alive": [0], "closed": True}, (rank, got)
    assert json.loads((tmp_path / "run" / "results.json").read_text())["world_size"] == WORLD
