"""A tiny Llama in a plain loop traced with ``gradtrace.trace``, under DDP, FSDP2 or DeepSpeed ZeRO-2/3
on CPU (gloo), or as one plain process: split tracking and elastic resume.

    torchrun --nproc_per_node 2 tests/engines/workers/loop_split.py OUT BACKEND [--save-at K] [--resume DIR]
    python tests/engines/workers/loop_split.py OUT BACKEND ...            # one process (BACKEND's plain model)

BACKEND: ``ddp`` (every rank holds the whole model; gradtrace splits the tracking among the ranks),
``fsdp2`` (``fully_shard``), ``zero2`` or ``zero3`` (DeepSpeed engines). Every run sees the same global
batches (each rank its share of every one). ``--save-at K`` stops after step K with the tracker state (``Tracer.save_state``) and the
model and optimizer, both as world-size-independent full state, in ``OUT/ckpt``; ``--resume DIR`` loads
them and runs the remaining steps, with any number of processes. ``--add-group`` (DDP) leaves one matrix
out of the optimizer until step 3, when it joins through ``add_param_group`` (a parameter added mid-run).
Each rank writes ``OUT/rank{r}.json``: the tracker's state bytes, tracked elements and spans, the collectives
each optimizer step issued (DDP), and on resume whether its reference copy is its part of the initial weights.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("DS_ACCELERATOR", "cpu")

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
from teardown import end_process_group  # noqa: E402
from transformers import LlamaConfig, LlamaForCausalLM  # noqa: E402

import gradtrace  # noqa: E402

VOCAB, SEQ, USED, GLOBAL_BATCH, STEPS = 35, 12, 30, 8, 4
ZERO = {"zero2": 2, "zero3": 3}  # DeepSpeed backends: their ZeRO stage
WIDE_VOCAB, ID_SPACING = 1000, 33  # DDP: USED token ids spread over the whole embedding, 0 ... 957
LATE = "model.layers.1.mlp.down_proj.weight"  # joins the optimizer at step 3 with --add-group


def build_model(backend: str) -> LlamaForCausalLM:
    torch.manual_seed(0)
    if backend == "ddp":
        # an embedding of more than half the trained parameters (a tied one is 28% of Qwen2-0.5B): split
        # tracking cuts it between the ranks rather than giving it whole to one. The output head is frozen
        # so that the embedding's gradient stays sparse (only the rows of the tokens seen), as untied.
        model = LlamaForCausalLM(LlamaConfig(vocab_size=WIDE_VOCAB, hidden_size=32, intermediate_size=63,
                                             num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2))
        model.lm_head.weight.requires_grad_(False)
        return model
    # odd sizes: FSDP2 shards and ZeRO-3 partitions are uneven, as in real models
    return LlamaForCausalLM(LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=63,
                                        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2))


def zero_config(world: int, stage: int) -> dict:
    return {"zero_optimization": {"stage": stage}, "train_batch_size": GLOBAL_BATCH,
            "train_micro_batch_size_per_gpu": GLOBAL_BATCH // world, "gradient_accumulation_steps": 1,
            "zero_allow_untested_optimizer": True, "steps_per_print": 10_000}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("out")
    parser.add_argument("backend", choices=("ddp", "fsdp2", "zero2", "zero3"))
    parser.add_argument("--save-at", type=int)
    parser.add_argument("--resume")
    parser.add_argument("--add-group", action="store_true")
    parser.add_argument("--no-split", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(1)
    distributed = "WORLD_SIZE" in os.environ
    rank, world = 0, 1
    if distributed:
        dist.init_process_group("gloo")
        rank, world = dist.get_rank(), dist.get_world_size()
    model = build_model(args.backend)
    start = 0
    saved = None
    if args.resume:
        saved = torch.load(os.path.join(args.resume, "training.pt"), weights_only=True)
        model.load_state_dict(saved["model"])
        start = saved["step"]
    engine = None
    if distributed and args.backend == "ddp":
        # gradient_as_bucket_view=False: .grad is the parameter's own tensor, as in a single process
        model = torch.nn.parallel.DistributedDataParallel(model)
    if distributed and args.backend == "fsdp2":
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        mesh = init_device_mesh("cpu", (world,))
        for layer in model.model.layers:
            fully_shard(layer, mesh=mesh)
        fully_shard(model, mesh=mesh)
    # after fully_shard, which replaces the parameters by DTensors
    late = [p for n, p in _named(model) if n == LATE] if args.add_group else []
    params = [p for n, p in _named(model) if not (args.add_group and n == LATE)]
    optimizer = torch.optim.AdamW(params, lr=1e-2, weight_decay=0.0)
    if distributed and args.backend in ZERO:
        import deepspeed

        engine, optimizer, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=zero_config(world, ZERO[args.backend]))
    if saved is not None:
        load_optimizer(model, optimizer, saved["optimizer"], args.backend if distributed else "plain")
    traced = engine.module if engine is not None else model
    config = gradtrace.TrackerConfig(sample_stride=3)
    # DeepSpeed: the engine and its optimizer (the gradient is read inside the engine's step)
    tracer = gradtrace.trace(engine if engine is not None else traced, optimizer, args.out, log_every=2, wandb=False,
                             strict=True, is_main_process=rank == 0, config=config,
                             split=False if args.no_split else None)
    reference_is_initial = None
    if args.resume:
        tracer.load_state(args.resume)
        reference_is_initial = reference_matches(tracer.tracker, build_model(args.backend))
    generator = torch.Generator().manual_seed(1234)
    stop = args.save_at or STEPS
    collectives_per_step: list[int] = []
    for step in range(STEPS):
        batch = torch.randint(0, USED, (GLOBAL_BATCH, SEQ), generator=generator)
        if args.backend == "ddp":  # rows with and without gradients in every rank's span of the embedding
            batch = batch * ID_SPACING
        if step < start:
            continue
        if step == stop:
            break
        if late and step == 2:
            optimizer.add_param_group({"params": late})
        mine = batch.chunk(world)[rank]
        if engine is not None:
            engine.backward(engine(input_ids=mine, labels=mine).loss)
            engine.step()
        else:
            model(input_ids=mine, labels=mine).loss.backward()  # DDP's own all-reduces: not counted
            with counting_collectives(distributed) as issued:  # gradtrace's, in its optimizer-step hook
                optimizer.step()
            collectives_per_step.append(len(issued))
            optimizer.zero_grad()
    if args.save_at:
        checkpoint = os.path.join(args.out, "ckpt")
        os.makedirs(checkpoint, exist_ok=True)
        tracer.save_state(checkpoint)
        state = {"model": full_model_state(traced, engine), "step": stop,
                 "optimizer": full_optimizer_state(traced, optimizer, args.backend if distributed else "plain")}
        if rank == 0:
            torch.save(state, os.path.join(checkpoint, "training.pt"))
    else:
        tracer.finish()
    tracker = tracer.tracker
    with open(os.path.join(args.out, f"rank{rank}.json"), "w") as handle:
        json.dump({"world_size": world, "sharded": tracker.sharded, "state_bytes": tracker.state_bytes(),
                   "tracked_numel": tracker.numel, "spans": tracker.spans, "steps": tracker.steps,
                   "collectives_per_step": collectives_per_step, "reference_is_initial": reference_is_initial},
                  handle)


def reference_matches(tracker, initial_model) -> bool:
    """Whether the reference copy each rank resumed with is exactly its part (its layout's run of each
    flattened parameter) of the initial weights, rebuilt here from the seed: a check of the re-cut state
    that does not go through gradtrace's own re-cutting."""
    initial = dict(initial_model.named_parameters())
    for name, (start, length) in tracker.layout().items():
        want = initial[name].detach().reshape(-1)[start:start + length]
        got = tracker.state[name]["reference"].reshape(-1)
        if not torch.equal(got, want.to(got.dtype)):
            return False
    return True


@contextlib.contextmanager
def counting_collectives(distributed: bool):
    """The collectives issued inside the block (a list of their names), counted by wrapping
    torch.distributed's functions for its duration."""
    issued: list[str] = []
    names = ("all_reduce", "all_gather", "all_gather_object", "all_gather_into_tensor", "broadcast",
             "reduce_scatter_tensor", "barrier")
    real = {name: getattr(dist, name) for name in names}

    def counted(name):
        def call(*a, **k):
            issued.append(name)
            return real[name](*a, **k)
        return call

    if distributed:
        for name in names:
            setattr(dist, name, counted(name))
    try:
        yield issued
    finally:
        for name, function in real.items():
            setattr(dist, name, function)


def full_model_state(model, engine) -> dict:
    if engine is not None:
        import deepspeed

        with deepspeed.zero.GatheredParameters(list(model.parameters())):
            return {n: p.detach().clone() for n, p in model.named_parameters()}
    if isinstance(model, torch.nn.parallel.DistributedDataParallel):
        model = model.module
    from torch.distributed.tensor import DTensor

    return {n: (p.full_tensor() if isinstance(p, DTensor) else p).detach().clone() for n, p in model.named_parameters()}


def _names(model) -> list[str]:
    if isinstance(model, torch.nn.parallel.DistributedDataParallel):
        model = model.module
    return [n for n, _ in model.named_parameters()]


def full_optimizer_state(model, optimizer, backend: str) -> dict:
    """AdamW's moments and step counts of every parameter by name, whole (gathered where sharded)."""
    names = _names(model)
    out = {}
    if backend in ZERO:
        from deepspeed.utils import safe_get_full_optimizer_state

        step = torch.tensor(float(_zero_step(optimizer)))
        for name, param in model.named_parameters():
            out[name] = {key: safe_get_full_optimizer_state(param, key).clone() for key in ("exp_avg", "exp_avg_sq")}
            out[name]["step"] = step
        return out
    from torch.distributed.tensor import DTensor

    by_id = {id(p): n for n, p in zip(names, (p for _, p in _named(model)), strict=True)}
    for param, state in optimizer.state.items():
        out[by_id[id(param)]] = {k: (v.full_tensor() if isinstance(v, DTensor) else v).detach().clone()
                                 for k, v in state.items()}
    return out


def _named(model):
    if isinstance(model, torch.nn.parallel.DistributedDataParallel):
        model = model.module
    return list(model.named_parameters())


def _zero_step(optimizer) -> int:
    inner = optimizer.optimizer
    return int(next(iter(inner.state.values()))["step"])


def load_optimizer(model, optimizer, saved: dict, backend: str) -> None:
    if backend in ZERO:
        from deepspeed.utils import safe_set_full_optimizer_state

        # ZeRO keeps the moments of flat fp32 partitions, created by the first step: create them as
        # torch's AdamW would, then set each parameter's part of them and the partitions' step count
        inner = optimizer.optimizer
        flats = (optimizer.fp32_partitioned_groups_flat if backend == "zero3"
                 else optimizer.single_partition_of_fp32_groups)
        for flat in flats:
            inner.state[flat] = {"step": torch.tensor(0.0), "exp_avg": torch.zeros_like(flat),
                                 "exp_avg_sq": torch.zeros_like(flat)}
        if backend == "zero2":  # ZeRO-1/2 link each parameter's fragment of the moments when they exist
            optimizer._lazy_init_hp_params_optimizer_state()
        for name, param in model.named_parameters():
            for key in ("exp_avg", "exp_avg_sq"):
                safe_set_full_optimizer_state(param, saved[name][key], key)
        step = next(iter(saved.values()))["step"]
        for state in optimizer.optimizer.state.values():
            state["step"] = step.clone()
        return
    from torch.distributed.tensor import DTensor, distribute_tensor

    for name, param in _named(model):
        if name not in saved:
            continue
        state = optimizer.state[param]
        for key, value in saved[name].items():
            if isinstance(param, DTensor) and value.dim() > 0:
                value = distribute_tensor(value, param.device_mesh, param.placements)
            state[key] = value.clone()


if __name__ == "__main__":
    main()
    end_process_group()  # after main: DDP's reducer must not be what destroys the group (teardown.py)
