"""An FFN-channel scorer that lives outside the package, named on the command line by its dotted path:

    PYTHONPATH=examples python -m compress.neuron --model DIR --calib DATA --ffn-width 256 \
        --scorer my_scorers.ffn:output_energy --out DIR

It scores channels only, so it serves a prune of FFN channels; asking it for heads (--heads) is a one-line error.
"""

import torch

from compress.scorers import UnitContext, register_scorer


@register_scorer("channels", "output_energy", needs=("act_norm",))
def output_energy(ctx: UnitContext) -> torch.Tensor:
    """How far each channel moves the residual stream: the L2 norm of its activation over the calibration tokens
    times the L2 norm of its column in the down projection. Higher = keep."""
    column_norms = ctx.output_weight().norm(dim=0)  # [FFN width]: down is [hidden, width]
    return ctx.stats["act_norm"] * column_norms  # [FFN width], one score per channel
