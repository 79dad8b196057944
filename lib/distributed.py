"""lib/distributed.py: train.py under torchrun: DistributedDataParallel or FSDP2, sharded state, a rank's exit.

train.py reads as one process; everything that differs with several is here. torchrun starts one process per GPU
and sets RANK / LOCAL_RANK / WORLD_SIZE (`process_ranks`). With DDP every rank keeps a full model and gradients are
all-reduced in backward (`wrap_model`); with --fsdp parameters, gradients and AdamW state are sharded over the ranks
(`shard_model`) and checkpoints gather the full state to rank 0 (`full_state`), in the single-process layout.

    torchrun --nproc_per_node 8 train.py --data data/owt --preset ts17m --batch-size 256 --compile
    torchrun --nproc_per_node 8 train.py --data data/owt --d-model 1024 --num-layers 24 --num-heads 16 --d-ff 4096 \
        --context-length 1024 --batch-size 256 --fsdp --activation-checkpointing
"""
import contextlib
import os
import sys

import torch
import torch.distributed as dist

from lib.checkpoints import AUTOCAST_DTYPES


# ---------------------------------------------------------------------------------------------------------------
# Processes and DDP
# ---------------------------------------------------------------------------------------------------------------


def process_ranks() -> tuple[int, int, int]:
    """(rank, local_rank, world_size): torchrun sets RANK / LOCAL_RANK / WORLD_SIZE; plain python is 0, 0, 1."""
    env = os.environ
    return int(env.get("RANK", 0)), int(env.get("LOCAL_RANK", 0)), int(env.get("WORLD_SIZE", 1))


def wrap_model(model: torch.nn.Module, run) -> tuple[torch.nn.Module, torch.nn.Module]:
    """(what evaluation runs, what training runs): torch.compile, then DDP under torchrun (FSDP is already in the
    model's own modules, so it needs no wrapper)."""
    forward = torch.compile(model) if run.args["compile"] else model  # CUDA extra: fused kernels, fewer launches
    if run.world_size == 1 or run.args["fsdp"]:
        return forward, forward
    # DDP: gradients all-reduced (averaged) across ranks during backward
    # gradient_as_bucket_view: the gradients live in DDP's all-reduce buckets instead of beside a copy of them (one
    # gradient-sized buffer less: 8.5 GB for GPT-2 XL in fp32; accounting.py assumes it)
    return forward, torch.nn.parallel.DistributedDataParallel(
        forward, device_ids=[run.device.index] if run.device.type == "cuda" else None, broadcast_buffers=False,
        gradient_as_bucket_view=True)


def gradient_sync(run, trainer, last: bool):
    """Reduce gradients across ranks only in the backward of a step's last micro-batch: the earlier ones just add
    to the local gradients (DDP's no_sync; FSDP's set_requires_gradient_sync)."""
    if run.args["fsdp"]:
        trainer.model.set_requires_gradient_sync(last)
    elif run.world_size > 1 and not last:
        return trainer.train.no_sync()
    return contextlib.nullcontext()


# ---------------------------------------------------------------------------------------------------------------
# FSDP2 (--fsdp): parameters, gradients and AdamW state sharded over the ranks
# ---------------------------------------------------------------------------------------------------------------
# DDP keeps a full copy of the model, its gradients and AdamW's two moments on every GPU: 16 bytes per parameter in
# fp32 (34 GB for GPT-2 XL) before any activation. FSDP2 (torch.distributed.fsdp.fully_shard) splits every parameter
# along dim 0 over the N ranks, so each keeps 1/N of all of that. Before a unit's forward (and again for its
# backward) its full parameters are all-gathered, and its gradients are reduce-scattered (averaged) after. Each
# TransformerBlock is one unit, so only one block's full parameters exist at a time; the root unit holds the
# embedding, the final norm and lm_head. Mixed precision comes from a MixedPrecisionPolicy (parameters cast to
# bf16/fp16 for the compute, gradients reduced in fp32) instead of autocast. Checkpoints gather the full state to
# rank 0, in the single-process layout, so last.pt is the same file either way: it resumes with or without FSDP and
# on any number of ranks.


def shard_model(model: torch.nn.Module, run) -> None:
    """fully_shard each block, then the root, over a 1-D mesh of all ranks."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
    # subtle: name the device type. The default mesh takes the accelerator's type even for gloo, and gloo on a GPU
    # machine then crashes (pytorch/pytorch#132471).
    mesh = init_device_mesh(run.device.type, (run.world_size,))
    policy = MixedPrecisionPolicy(param_dtype=AUTOCAST_DTYPES.get(run.args["dtype"]), reduce_dtype=torch.float32)
    for block in model.layers:
        fully_shard(block, mesh=mesh, mp_policy=policy)
    fully_shard(model, mesh=mesh, mp_policy=policy)


def full_state(run, trainer) -> tuple[dict, dict]:
    """(model state dict, optimizer state dict) in the single-process layout. Under FSDP every rank must call this
    (it all-gathers the shards); rank 0 gets the full tensors on the CPU, the others empty dicts."""
    if not run.args["fsdp"]:
        return trainer.model.state_dict(), trainer.optimizer.state_dict()
    from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                         get_optimizer_state_dict)
    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    model_state = get_model_state_dict(trainer.model, options=options)
    optim_state = get_optimizer_state_dict(trainer.model, trainer.optimizer, options=options)
    return model_state, (indexed_optimizer_state(optim_state) if run.master else {})


def indexed_optimizer_state(state: dict) -> dict:
    """torch.distributed's optimizer state keyed by parameter name -> torch.optim's, keyed by the parameter's index
    in the optimizer (what optimizer.state_dict() gives in one process). named_optimizer_state is the inverse."""
    index = {name: i for i, name in enumerate(name for g in state["param_groups"] for name in g["params"])}
    return {"state": {index[name]: s for name, s in state["state"].items()},
            "param_groups": [dict(g, params=[index[name] for name in g["params"]]) for g in state["param_groups"]]}


def named_optimizer_state(state: dict, model: torch.nn.Module) -> dict:
    names = [name for name, _ in model.named_parameters()]  # the optimizer's order: it was built from parameters()
    return {"state": {names[i]: s for i, s in state["state"].items()},
            "param_groups": [dict(g, params=[names[i] for i in g["params"]]) for g in state["param_groups"]]}


def load_optimizer_state(run, model: torch.nn.Module, optimizer: torch.optim.Optimizer, state: dict) -> None:
    """A checkpoint's (single-process layout) optimizer state into the optimizer, sharding it under FSDP."""
    if not run.args["fsdp"]:
        optimizer.load_state_dict(state)
        return
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict
    set_optimizer_state_dict(model, optimizer, named_optimizer_state(state, model) if run.master else {},
                             options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True))


# ---------------------------------------------------------------------------------------------------------------
# A rank's exit
# ---------------------------------------------------------------------------------------------------------------


def wait_for_all_ranks() -> None:
    """Every rank waits here for the others before the process group is torn down (a no-op in one process).

    Without it a rank that finishes first (rank 0 still writing last.pt) and exits could die in gloo's teardown
    ("terminate called without an active exception", SIGABRT after the last step: 8 of 45 two-rank runs on a busy
    2-core machine, 0 of 60 with the barrier). Call it only when the loop ended normally (done, or a stop all ranks
    agreed on), never in `finally`: after an error on one rank the others would wait here forever."""
    if dist.is_initialized():
        dist.barrier()


def end_process_group() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def exit_skipping_teardown(code: int) -> None:
    """End a torchrun rank at once with `code`, skipping the interpreter's teardown (os._exit).

    Why: a gloo rank could die at the very end, after its last step, destroy_process_group and all its Python code:
    "terminate called without an active exception", SIGABRT (faulthandler shows no Python frame left), in ~1 of 50
    two-rank FSDP runs on a loaded 2-core machine. gloo's threads can still hold work objects whose tensors need
    the GIL to die, which an interpreter being torn down no longer gives (pytorch/pytorch#179291). Nothing is lost:
    by then train() has closed everything it wrote (checkpoints are written atomically, the log and a W&B run are
    closed in its `finally`); only stdout and stderr may still hold buffered text."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
