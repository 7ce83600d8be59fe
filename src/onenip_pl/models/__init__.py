"""OneNIP in plain torch: backbone, neck, reconstructor, refiner, loss, loading the authors' checkpoints."""

from onenip_pl.models.losses import onenip_loss
from onenip_pl.models.official import official_to_onenip_state_dict
from onenip_pl.models.onenip import OneNIP

__all__ = ["OneNIP", "official_to_onenip_state_dict", "onenip_loss"]
