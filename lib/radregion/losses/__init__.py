"""The three self-supervised losses, one per file, each citing its paper."""

from radregion.losses.byol import byol_loss
from radregion.losses.ntxent import ntxent_loss
from radregion.losses.supcon import supcon_loss

__all__ = ["byol_loss", "ntxent_loss", "supcon_loss"]
