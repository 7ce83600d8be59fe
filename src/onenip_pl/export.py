"""Export a checkpoint for deployment:
`python -m onenip_pl.export ckpt_path=PATH [format=onnx|openvino|torch_export]`.

See onenip_pl.inference.exporters for what the graph takes and returns; the onenip.json sidecar written
next to it says the same for a reader without this package.
"""

from __future__ import annotations

import logging
from pathlib import Path

import hydra
from omegaconf import DictConfig

from onenip_pl.config import config_dir
from onenip_pl.errors import run_or_exit
from onenip_pl.inference import OneNIPDetector
from onenip_pl.inference.exporters import ExportResult, export_detector

log = logging.getLogger(__name__)
# |runtime - PyTorch| accepted per unit of output magnitude (float32 arithmetic in another order)
RELATIVE_TOLERANCE = 1e-5


def export(cfg: DictConfig) -> ExportResult:
    """Export `cfg.ckpt_path` in `cfg.format` and report how closely the runtime reproduces PyTorch."""
    directory = Path(cfg.out_dir if cfg.get("out_dir") else cfg.paths.output_dir)
    detector = OneNIPDetector.from_checkpoint(cfg.ckpt_path)
    result = export_detector(
        detector, directory, cfg.format, int(cfg.opset), bool(cfg.encoder), checkpoint=str(cfg.ckpt_path)
    )
    for name, difference in result.max_abs_diff.items():
        magnitude = result.max_abs_value[name]
        level = logging.INFO if difference <= RELATIVE_TOLERANCE * max(1.0, magnitude) else logging.WARNING
        log.log(
            level,
            "%s: max |%s - PyTorch| = %.3g on sample images (values up to %.3g)",
            name,
            cfg.format,
            difference,
            magnitude,
        )
    log.info("Wrote %s, %s and %s", result.model, result.sidecar, result.prompt_features or "no prompt bank")
    return result


@hydra.main(version_base="1.3", config_path=str(config_dir()), config_name="export")
def main(cfg: DictConfig) -> None:
    run_or_exit(export, cfg, log)


if __name__ == "__main__":
    main()
