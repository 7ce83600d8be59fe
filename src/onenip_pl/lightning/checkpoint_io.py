"""Lightning's checkpoint reading, routed through the package's one safe reader.

``trainer.fit(ckpt_path=...)`` would otherwise open the file with Lightning's own ``torch.load``; through
this plugin a resumed run reads it like every other entry point: weights_only, and a hostile or broken
file stops with one line naming it.
"""

from __future__ import annotations

from typing import Any

from lightning.pytorch.plugins.io import TorchCheckpointIO

from onenip_pl.checkpoint_file import read_checkpoint


class SafeCheckpointIO(TorchCheckpointIO):
    def load_checkpoint(self, path: Any, *args: Any, **kwargs: Any) -> dict[str, Any]:
        return read_checkpoint(path)
