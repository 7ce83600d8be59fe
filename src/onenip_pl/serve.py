"""Serve: `python -m onenip_pl.serve ckpt_path=PATH [host=127.0.0.1 port=8000 device=cpu|cuda runtime=torch]`.

An inspection server on LitServe. `POST /predict` takes one image (the raw body, or one file part of a
multipart form) with optional `category`, `map=png16` and `overlay=1` (query parameters or form fields) and
answers JSON: category, similarity, image score, decision, the category's thresholds and the checkpoint's
SHA-256. Requests from concurrent clients are scored in dynamic batches (max_batch_size, batch_timeout_ms).
`GET /health` answers "ok" once the model is loaded; `GET /info` describes the model and the server.
"""

from __future__ import annotations

import logging
import math

import hydra
import torch
from omegaconf import DictConfig

from onenip_pl.checkpoint_file import file_sha256
from onenip_pl.config import config_dir
from onenip_pl.errors import ConfigError, check_choice, run_or_exit
from onenip_pl.extras import require_extra
from onenip_pl.inference.runtimes import RUNTIME_PACKAGES, RUNTIMES

log = logging.getLogger(__name__)

DEVICES = ("cpu", "cuda")
# LitServe binds one of these; a wider choice of interfaces is a reverse proxy's job
HOSTS = ("127.0.0.1", "0.0.0.0", "::")
SERVE_PACKAGES = ("litserve", "python_multipart")


def check_settings(cfg: DictConfig) -> None:
    """A ConfigError naming the first setting a server cannot start with."""
    check_choice("host", cfg.host, HOSTS)
    check_choice("device", cfg.device, DEVICES)
    check_choice("runtime", cfg.runtime, RUNTIMES)
    if cfg.device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device=cuda, but PyTorch sees no CUDA GPU on this machine; use device=cpu.")
    if not 1024 <= int(cfg.port) <= 65535:
        raise ConfigError(f"port={cfg.port} must be between 1024 and 65535.")
    if int(cfg.max_batch_size) < 1:
        raise ConfigError(f"max_batch_size={cfg.max_batch_size} must be at least 1.")
    if float(cfg.batch_timeout_ms) < 0:
        raise ConfigError(f"batch_timeout_ms={cfg.batch_timeout_ms} must be 0 or more.")
    if int(cfg.max_image_pixels) < 1:
        raise ConfigError(f"max_image_pixels={cfg.max_image_pixels} must be at least 1.")
    if int(cfg.max_request_bytes) < 1:
        raise ConfigError(f"max_request_bytes={cfg.max_request_bytes} must be at least 1.")
    if float(cfg.timeout_s) <= 0:
        raise ConfigError(f"timeout_s={cfg.timeout_s} must be positive.")
    if cfg.png16_max is not None and not (math.isfinite(float(cfg.png16_max)) and float(cfg.png16_max) > 0):
        raise ConfigError(f"png16_max={cfg.png16_max} must be a positive number (or null).")


def map_full_scale(cfg: DictConfig, pixel_threshold: float) -> float | None:
    """The map value sent as 65535 in a 16-bit PNG: png16_max, else twice the pooled pixel threshold (as
    `predict` writes them); None when neither is known, so map requests are refused."""
    scale = float(cfg.png16_max) if cfg.png16_max is not None else 2.0 * pixel_threshold
    return scale if math.isfinite(scale) and scale > 0 else None


def serve(cfg: DictConfig) -> None:
    """Check the settings and the checkpoint, then serve until interrupted."""
    check_settings(cfg)
    packages = SERVE_PACKAGES + RUNTIME_PACKAGES.get(cfg.runtime, ())
    require_extra("deploy", "python -m onenip_pl.serve", packages)
    import litserve as ls

    from onenip_pl.inference import OneNIPDetector
    from onenip_pl.serving.api import InspectionAPI, ServeSettings
    from onenip_pl.serving.inputs import RequestRules
    from onenip_pl.serving.outputs import ModelIdentity, model_json

    # read here, in PyTorch on the CPU, so an unreadable checkpoint stops serve with the reader's message
    # before any worker starts; the inference worker loads it again on its device and runtime
    detector = OneNIPDetector.from_checkpoint(cfg.ckpt_path)
    identity = ModelIdentity(file_sha256(cfg.ckpt_path))
    full_scale = map_full_scale(cfg, detector.pixel_threshold)
    max_pixels = int(cfg.max_image_pixels)
    api = InspectionAPI(
        ServeSettings(str(cfg.ckpt_path), str(cfg.runtime), identity, full_scale),
        max_batch_size=int(cfg.max_batch_size),
        batch_timeout=float(cfg.batch_timeout_ms) / 1000.0,
    )
    server = ls.LitServer(
        api,
        accelerator=str(cfg.device),
        devices=1,
        timeout=float(cfg.timeout_s),
        max_payload_size=int(cfg.max_request_bytes),
        model_metadata=model_json(detector, identity, max_pixels, full_scale, str(cfg.runtime)),
    )
    server.app.state.request_rules = RequestRules(
        tuple(detector.categories), max_pixels, int(cfg.max_request_bytes), full_scale
    )
    del detector
    log.info(
        "Starting the server for %s (sha256 %s, %s on %s) at http://%s:%d/predict",
        cfg.ckpt_path,
        identity.checkpoint_sha256[:12],
        cfg.runtime,
        cfg.device,
        cfg.host,
        int(cfg.port),
    )
    server.run(
        host=str(cfg.host), port=int(cfg.port), generate_client_file=False, log_level=str(cfg.log_level)
    )


@hydra.main(version_base="1.3", config_path=str(config_dir()), config_name="serve")
def main(cfg: DictConfig) -> None:
    run_or_exit(serve, cfg, log)


if __name__ == "__main__":
    main()
