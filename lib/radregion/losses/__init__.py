"""The losses, one per file, each citing its paper: three self-supervised ones and the energy bound of outlier
exposure."""

from radregion.losses.byol import byol_loss
from radregion.losses.energy import energy_margin_loss
from radregion.losses.ntxent import ntxent_loss
from radregion.losses.supcon import supcon_loss

__all__ = ["byol_loss", "energy_margin_loss", "ntxent_loss", "supcon_loss"]
