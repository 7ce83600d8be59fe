"""The speed path computes what the plain path computes: feature cache (memory, disk) and NHWC backbone.

The plain path is OneNIPModule with ``feature_cache="none"`` and ``channels_last=False`` (the backbone run
on queries, synthetic anomalies and prompts at every step, NCHW). Every optimised step must give the same
loss and gradients to 1e-5 with the same random stream, and run the backbone on the anomalies only once
the normal images are cached.
"""

from __future__ import annotations

import copy

import lightning as L
import pytest
import torch
from conftest import TINY_MODEL_ARGS, tiny_overrides
from torch.utils.data import DataLoader, default_collate

from onenip_pl.config import compose
from onenip_pl.data.datasets import ImageSource, TrainTripletDataset
from onenip_pl.data.readers import read_dataset
from onenip_pl.data.synthesis import AnomalySynthesizer
from onenip_pl.errors import ConfigError, DataError
from onenip_pl.lightning.feature_cache import backbone_fingerprint, cache_bytes
from onenip_pl.lightning.guards import NonFiniteGuard
from onenip_pl.lightning.module import OneNIPModule
from onenip_pl.models import OneNIP
from onenip_pl.train import train

TOLERANCE = 1e-5
SIZE = 64
TINY = {**TINY_MODEL_ARGS, "image_size": SIZE}


@pytest.fixture(scope="module")
def triplets(tiny_demo_root) -> TrainTripletDataset:
    records = [r for r in read_dataset("mvtec", tiny_demo_root) if r.split == "train"]
    return TrainTripletDataset(ImageSource(records, SIZE), AnomalySynthesizer(SIZE), seed=3)


def batch_of(dataset: TrainTripletDataset, items: list[int], epoch: int = 0) -> dict:
    return default_collate([dataset[(item, epoch, position)] for position, item in enumerate(items)])


def plain_and_optimised(**optimised) -> tuple[OneNIPModule, OneNIPModule]:
    torch.manual_seed(0)
    plain = OneNIPModule(**TINY, channels_last=False)
    fast = OneNIPModule(**TINY, channels_last=True, **optimised)
    fast.load_state_dict(plain.state_dict())
    return plain.train(), fast.train()


class BackboneBatchSizes:
    """Records how many images each backbone call gets."""

    def __init__(self, module: OneNIPModule) -> None:
        self.sizes: list[int] = []
        module.net.backbone.register_forward_pre_hook(lambda _, args: self.sizes.append(args[0].shape[0]))


def step(module: OneNIPModule, batch: dict, seed: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """One training step as Lightning runs it (hook, then step, then backward), with a fixed random stream."""
    module.zero_grad(set_to_none=True)
    batch = module.on_before_batch_transfer(copy.copy(batch), 0)
    torch.manual_seed(seed)
    loss = module.training_step(batch, 0)
    loss.backward()
    grads = {name: p.grad for name, p in module.named_parameters() if p.requires_grad}
    return loss.detach(), grads


def assert_same_step(plain: OneNIPModule, fast: OneNIPModule, batch: dict, seed: int) -> None:
    plain_loss, plain_grads = step(plain, batch, seed)
    fast_loss, fast_grads = step(fast, batch, seed)
    assert abs(float(plain_loss - fast_loss)) <= TOLERANCE, (float(plain_loss), float(fast_loss))
    assert plain_grads.keys() == fast_grads.keys()
    worst = max(float((plain_grads[k] - fast_grads[k]).abs().max()) for k in plain_grads)
    assert worst <= TOLERANCE, f"gradients differ by {worst:.3g}"


@pytest.mark.filterwarnings("ignore:.*self.trainer. reference is not registered")
def test_memory_cache_matches_the_plain_step_and_skips_normal_images(triplets):
    plain, fast = plain_and_optimised(feature_cache="memory")
    calls = BackboneBatchSizes(fast)
    first = batch_of(triplets, [0, 5, 9, 13])
    assert_same_step(plain, fast, first, seed=1)
    distinct = len(set(first["query_index"].tolist()) | set(first["prompt_index"].tolist()))
    assert calls.sizes == [4 + distinct], "anomalies and each distinct normal image in one backbone call"
    assert len(fast.feature_cache) == distinct

    # a later epoch: same queries, other prompts and anomalies; cached images are not recomputed
    later = batch_of(triplets, [0, 5, 9, 13], epoch=1)
    new = set(later["query_index"].tolist()) | set(later["prompt_index"].tolist())
    missing = len(new - set(first["query_index"].tolist()) - set(first["prompt_index"].tolist()))
    assert_same_step(plain, fast, later, seed=2)
    assert calls.sizes[-1] == 4 + missing


@pytest.mark.filterwarnings("ignore:.*self.trainer. reference is not registered")
def test_disk_cache_is_reused_by_a_new_model_and_matches(triplets, tmp_path):
    batch = batch_of(triplets, [1, 2, 7, 16])
    plain, writer = plain_and_optimised(feature_cache="disk", feature_cache_dir=str(tmp_path))
    assert_same_step(plain, writer, batch, seed=5)
    folder = tmp_path / backbone_fingerprint(writer.net)
    indices = set(batch["query_index"].tolist()) | set(batch["prompt_index"].tolist())
    assert sorted(int(p.stem) for p in folder.glob("*.npz")) == sorted(indices)

    _, reader = plain_and_optimised(feature_cache="disk", feature_cache_dir=str(tmp_path))
    calls = BackboneBatchSizes(reader)
    assert_same_step(plain, reader, batch, seed=6)
    assert calls.sizes == [4], "every normal image came from the files written before"


@pytest.mark.filterwarnings("ignore:.*self.trainer. reference is not registered")
def test_a_changed_normal_image_is_refused(triplets, tmp_path):
    batch = batch_of(triplets, [0, 3])
    _, fast = plain_and_optimised(feature_cache="memory")
    step(fast, batch, seed=0)
    flipped = {**batch, "query": batch["query"].flip(-1)}
    with pytest.raises(DataError, match="augmented"):
        step(fast, flipped, seed=0)

    _, writer = plain_and_optimised(feature_cache="disk", feature_cache_dir=str(tmp_path))
    step(writer, batch, seed=0)
    _, stale_reader = plain_and_optimised(feature_cache="disk", feature_cache_dir=str(tmp_path))
    with pytest.raises(DataError, match="stale cache folder"):
        step(stale_reader, flipped, seed=0)


def test_unknown_cache_mode_and_disk_without_folder_are_refused(triplets):
    with pytest.raises(ConfigError, match="feature_cache"):
        OneNIPModule(**TINY, feature_cache="gpu")
    module = OneNIPModule(**TINY, feature_cache="disk")
    with pytest.raises(ConfigError, match="feature_cache_dir"):
        module.on_before_batch_transfer(batch_of(triplets, [0]), 0)


@pytest.mark.parametrize("backbone", ["tf_efficientnet_b4", "tf_efficientnet_lite0"])
def test_channels_last_backbone_gives_the_same_outputs(backbone):
    torch.manual_seed(0)
    kwargs = {**TINY, "backbone": backbone}
    nchw = OneNIP(**kwargs, channels_last=False).eval()
    nhwc = OneNIP(**kwargs, channels_last=True).eval()
    nhwc.load_state_dict(nchw.state_dict())
    query, prompt = torch.rand(2, 3, SIZE, SIZE), torch.rand(2, 3, SIZE, SIZE)
    with torch.no_grad():
        expected, actual = nchw(query, prompt), nhwc(query, prompt)
    for name, value in expected.items():
        assert float((value - actual[name]).abs().max()) <= TOLERANCE, name


class AugmentingTriplets(TrainTripletDataset):
    augments_normals = True


def test_training_with_an_augmenting_dataset_is_refused(triplets, tmp_path):
    dataset = AugmentingTriplets(triplets.source, triplets.synthesizer, seed=0)
    module = OneNIPModule(**TINY, feature_cache="memory")
    trainer = L.Trainer(
        accelerator="cpu", max_steps=1, logger=False, enable_checkpointing=False, default_root_dir=tmp_path
    )
    with pytest.raises(ConfigError, match="augments_normals"):
        trainer.fit(module, DataLoader(dataset, batch_size=2))


def test_cache_size_estimate():
    # MVTec AD at 224 px with the B4 backbone: 3629 images x 272 x 14 x 14 float32
    assert cache_bytes(3629, (272, 14, 14)) == 3629 * 272 * 196 * 4


def test_tiny_training_with_the_disk_cache_through_hydra(tiny_demo_root, tmp_path):
    output = tmp_path / "run"
    extra = ("logger=none", "test=false", "model.feature_cache=disk")
    train(compose("train", tiny_overrides(tiny_demo_root, output, *extra)))
    cached = list((output / "feature_cache").glob("*/*.npz"))
    normal_train_images = sum(1 for _ in tiny_demo_root.glob("*/train/good/*.png"))
    assert 4 <= len(cached) <= normal_train_images


class PoisonedFirstTriplet(TrainTripletDataset):
    """Its first sample's synthetic mask is NaN: the loss of the first step is NaN."""

    def __getitem__(self, item):
        sample = super().__getitem__(item)
        if (item[2] if isinstance(item, tuple) else item) == 0:
            sample["synthetic_mask"] = torch.full_like(sample["synthetic_mask"], float("nan"))
        return sample


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the deferred loss check only exists on a GPU")
def test_gpu_non_finite_loss_stops_at_the_next_step_naming_its_step(triplets, tmp_path):
    dataset = PoisonedFirstTriplet(triplets.source, triplets.synthesizer, seed=0)
    trainer = L.Trainer(
        accelerator="gpu",
        devices=1,
        max_steps=3,
        logger=False,
        enable_checkpointing=False,
        callbacks=[NonFiniteGuard()],
        default_root_dir=tmp_path,
    )
    with pytest.raises(FloatingPointError, match="global step 0"):
        trainer.fit(OneNIPModule(**TINY), DataLoader(dataset, batch_size=2))
