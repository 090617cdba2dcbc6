"""torchrun entry of test_pretrain's DDP test: `radregion ARGS...` as the console runs it, except that every rank
writes its final parameters to RANKS_DIR (before rank 0 writes the bundle), so the test can compare the ranks.

    python -m torch.distributed.run --nproc_per_node 2 tests/ddp_rank_state.py RANKS_DIR pretrain ...
"""

import sys
from pathlib import Path

from safetensors.torch import save_file

from radregion import pretrain
from radregion.cli import main

RANKS = Path(sys.argv[1])
_finish = pretrain.PretrainRun.finish


def _dump_then_finish(run):
    RANKS.mkdir(parents=True, exist_ok=True)
    save_file(
        {k: v.detach().float().cpu().contiguous() for k, v in run.model.named_parameters()},
        str(RANKS / f"rank{run.world.rank}.safetensors"),
    )
    return _finish(run)


if __name__ == "__main__":
    pretrain.PretrainRun.finish = _dump_then_finish
    sys.exit(main(sys.argv[2:]))
