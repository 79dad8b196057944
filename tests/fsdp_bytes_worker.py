"""Run under torchrun by tests/test_scale.py: shard a small TransformerLM with lib/distributed.shard_model, take one AdamW step,
and write what this rank really holds (bytes of its parameter shards and of AdamW's m and v) to OUT/rank<R>.json."""
import dataclasses
import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from lib import distributed  # noqa: E402
from model import ModelConfig, TransformerLM  # noqa: E402
from optim import AdamW, cross_entropy  # noqa: E402


def local_bytes(tensors) -> int:
    return sum(t.to_local().numel() * t.element_size() for t in tensors)  # the shard this rank stores


def main(out: Path, config: dict) -> None:
    dist.init_process_group("gloo")
    cfg = ModelConfig(**config)
    model = TransformerLM(**dataclasses.asdict(cfg))
    run = argparse_free_run(cfg)
    distributed.shard_model(model, run)
    optimizer = AdamW(model.parameters(), lr=1e-3, foreach=True)
    ids = torch.randint(0, cfg.vocab_size, (2, cfg.context_length + 1))
    cross_entropy(model(ids[:, :-1]), ids[:, 1:]).backward()
    optimizer.step()
    state = [s[k] for s in optimizer.state.values() for k in ("m", "v")]
    result = {"params": local_bytes(model.parameters()), "adamw_state": local_bytes(state),
              "grads": local_bytes(p.grad for p in model.parameters())}
    (out / f"rank{dist.get_rank()}.json").write_text(json.dumps(result))
    dist.destroy_process_group()


def argparse_free_run(cfg):
    """The two fields of lib.runs.Run that shard_model reads."""
    class Run:
        device = torch.device("cpu")
        world_size = dist.get_world_size()
        args = {"dtype": "fp32"}
    return Run()


if __name__ == "__main__":
    main(Path(sys.argv[1]), json.loads(sys.argv[2]))
    distributed.exit_skipping_teardown(0)  # as train.py's ranks end (gloo can abort in the interpreter's teardown)
