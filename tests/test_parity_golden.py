"""Parity with the authors' implementation: their tensors (../shared/golden) vs our reconstructor/refiner.

The golden files come from the authors' code at 224 px with random weights (see golden/README.md). Each test
prints the measured max abs differences (run with -s to see them).
"""

from __future__ import annotations

import copy
import math
from pathlib import Path

import pytest
import torch
from torch import Tensor

from onenip_pl.errors import CheckpointError
from onenip_pl.models import OneNIP, official_to_onenip_state_dict, onenip_loss
from onenip_pl.models.official import official_reconstruction_key

GOLDEN_DIR = Path(__file__).resolve().parents[1].parent / "shared" / "golden"
TOLERANCE = 1e-5


def golden(name: str) -> dict:
    path = GOLDEN_DIR / f"{name}.pt"
    if not path.is_file():
        pytest.skip(f"golden tensors {path} are absent (they exist only beside the project's CI checkout)")
    return torch.load(path, map_location="cpu", weights_only=True)


def max_diff(ours: Tensor, theirs: Tensor) -> float:
    assert ours.shape == theirs.shape, f"shape {tuple(ours.shape)} != golden {tuple(theirs.shape)}"
    return float((ours.detach().float() - theirs.float()).abs().max())


def assert_close(name: str, ours: Tensor, theirs: Tensor, measured: dict[str, float]) -> None:
    diff = max_diff(ours, theirs)
    measured[name] = diff
    assert diff <= TOLERANCE, f"{name}: max abs diff {diff:.3g} > {TOLERANCE}"


def report(title: str, measured: dict[str, float], what: str = "max abs diff vs authors' tensors") -> None:
    print(f"\n[{title}] {what}:")
    for name, diff in measured.items():
        print(f"  {name:42s} {diff:.3g}")


def tokens_first(batch_first: Tensor) -> Tensor:
    """Our (image, token, channel) layout -> the authors' (token, image, channel)."""
    return batch_first.transpose(0, 1)


def model_with_golden_weights(**kwargs) -> OneNIP:
    """B4-sized OneNIP (random backbone, unused) with the authors' reconstructor+refiner, via the mapping."""
    model = OneNIP(image_size=224, **kwargs)
    expected = {k: v for k, v in model.state_dict().items() if k.startswith(("reconstructor.", "refiner."))}
    mapped = official_to_onenip_state_dict(golden("reconstruction_state_dict"), expected=expected)
    missing, unexpected = model.load_state_dict(mapped, strict=False)
    assert not unexpected
    assert all(key.startswith("backbone.") or key == "fusion_scale" for key in missing)
    return model


class Recorder:
    """Forward hooks capturing inputs and outputs of named submodules."""

    def __init__(self, model: OneNIP) -> None:
        self.outputs: dict[str, object] = {}
        self.inputs: dict[str, tuple] = {}
        self.handles = []
        reconstructor = model.reconstructor
        modules = {
            "input_proj": reconstructor.input_proj,
            "output_proj": reconstructor.output_proj,
            "decoder": reconstructor.decoder,
            "final_attn": reconstructor.decoder.final_attn,
            "seghead": model.refiner.predictor,
            **{f"encoder.{i}": layer for i, layer in enumerate(reconstructor.encoder.layers)},
            **{f"decoder.{i}": layer for i, layer in enumerate(reconstructor.decoder.layers)},
        }
        for name, module in modules.items():
            self.handles.append(module.register_forward_hook(self._keep_output(name)))
            self.handles.append(module.register_forward_pre_hook(self._keep_input(name)))

    def _keep_output(self, name: str):
        def hook(module, args, output):
            self.outputs[name] = output

        return hook

    def _keep_input(self, name: str):
        def hook(module, args):
            self.inputs[name] = args

        return hook


def head_averaged_weights(model: OneNIP, query: Tensor, key: Tensor) -> Tensor:
    """The final attention's probabilities averaged over heads (what nn.MultiheadAttention returns)."""
    attention = model.reconstructor.decoder.final_attn
    weight_q, weight_k, _ = attention.in_proj_weight.chunk(3)
    bias_q, bias_k, _ = attention.in_proj_bias.chunk(3)
    q = attention._heads(torch.nn.functional.linear(query, weight_q, bias_q))
    k = attention._heads(torch.nn.functional.linear(key, weight_k, bias_k))
    scores = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
    return scores.softmax(dim=-1).mean(dim=1)


def compare_intermediates(
    model: OneNIP, recorder: Recorder, golden_intermediates: dict, num_images: int, measured: dict[str, float]
) -> None:
    """Every intermediate the authors recorded, against the same point of our model."""
    outputs, inputs, theirs = recorder.outputs, recorder.inputs, golden_intermediates
    final_query, final_key = inputs["final_attn"][:2]
    checks = [
        ("rec.input_proj_out", tokens_first(outputs["input_proj"]), theirs["rec.input_proj_out"]),
        ("rec.pos_embed_out", model.reconstructor.pos_embed(), theirs["rec.pos_embed_out"]),
        ("tr.encoder.out", tokens_first(outputs["encoder.3"]), theirs["tr.encoder.out"]),
        ("tr.decoder.in prompt stream", tokens_first(inputs["decoder"][0]), theirs["tr.decoder.in.args"][0]),
        ("tr.decoder.in query stream", tokens_first(inputs["decoder"][1]), theirs["tr.decoder.in.args"][1]),
        (
            "tr.decoder.final_attn output",
            tokens_first(outputs["final_attn"]),
            theirs["tr.decoder.final_attn.out"][0],
        ),
        (
            "tr.decoder.final_attn weights",
            head_averaged_weights(model, final_query, final_key),
            theirs["tr.decoder.final_attn.out"][1],
        ),
        ("tr.decoder.out", tokens_first(outputs["decoder"]), theirs["tr.decoder.out"]),
        ("rec.output_proj_out", tokens_first(outputs["output_proj"]), theirs["rec.output_proj_out"]),
        ("rec.seghead_out", outputs["seghead"], theirs["rec.seghead_out"]),
    ]
    for layer in range(4):
        prompt_stream, query_stream = outputs[f"decoder.{layer}"]
        golden_prompt, golden_query = theirs[f"tr.decoder.layers.{layer}.out"]
        checks += [
            (
                f"tr.encoder.layers.{layer}.out",
                tokens_first(outputs[f"encoder.{layer}"]),
                theirs[f"tr.encoder.layers.{layer}.out"],
            ),
            (f"tr.decoder.layers.{layer} prompt stream", tokens_first(prompt_stream), golden_prompt),
            (f"tr.decoder.layers.{layer} query stream", tokens_first(query_stream), golden_query),
        ]
    for name, ours, reference in checks:
        assert_close(name, ours, reference, measured)
    assert torch.equal(model.reconstructor.attention_bias, theirs["tr.neighbor_mask"]), (
        "neighbour mask differs"
    )
    assert outputs["encoder.0"].shape[0] == num_images, "query and prompt images are encoded in one batch"


@pytest.fixture(scope="module")
def inputs() -> dict:
    return golden("inputs")


def test_eval_outputs_match_the_authors(inputs):
    reference = golden("eval_outputs")
    model = model_with_golden_weights().eval()
    recorder = Recorder(model)
    query, prompt = inputs["query_features"], inputs["prompt_features"]
    with torch.no_grad():
        reconstruction = model.reconstruct(query, prompt)
        logit = model.refine(reconstruction, query)
        maps = model.anomaly_maps(query, reconstruction, logit)
        scale = (maps["rec_map"].max() + maps["rec_map"].min()) / 2
        fused = model.anomaly_maps(query, reconstruction, logit, fusion_scale=scale)
        losses = onenip_loss(reconstruction, query, logit, inputs["query_mask_eval"])
    golden_scale = (reference["rec_pred"].max() + reference["rec_pred"].min()) / 2
    golden_fused = 0.5 * reference["rec_pred"] + 0.5 * golden_scale * reference["ref_pred"]
    measured: dict[str, float] = {}
    assert_close("rec_feat", reconstruction, reference["rec_feat"], measured)
    assert_close("rec_pred", maps["rec_map"], reference["rec_pred"], measured)
    assert_close("ref_logit", logit, reference["ref_logit"], measured)
    assert_close("ref_pred", maps["refiner_map"], reference["ref_pred"], measured)
    assert_close("fused map (test-set scale)", fused["anomaly_map"], golden_fused, measured)
    golden_losses = reference["losses_validate_style"]
    assert_close("loss FeatureMSELoss", losses["mse"], golden_losses["FeatureMSELoss"], measured)
    assert_close("loss DiceLoss", losses["dice"], golden_losses["DiceLoss"], measured)
    assert_close("loss total", losses["total"], golden_losses["total"], measured)
    compare_intermediates(model, recorder, reference["intermediates"], num_images=4, measured=measured)
    report("eval", measured)


def training_step(model: OneNIP, inputs: dict, dtype: torch.dtype = torch.float32) -> dict:
    """The authors' training forward: query batch [q0, q1, s0, s1], prompts [p0, p1] encoded once."""
    clean = inputs["train_query_features"].to(dtype)
    query = torch.cat([clean, inputs["train_synthetic_features"].to(dtype)])
    reconstruction = model.reconstruct(query, inputs["train_prompt_features"].to(dtype))
    logit = model.refine(reconstruction, query)
    masks = torch.cat([inputs["query_mask_train"], inputs["synthetic_mask"]]).to(dtype)
    return {
        "reconstruction": reconstruction,
        "logit": logit,
        "maps": model.anomaly_maps(query, reconstruction, logit),
        "losses": onenip_loss(reconstruction, clean.repeat(2, 1, 1, 1), logit, masks),
    }


def test_training_step_matches_the_authors(inputs):
    """Training mode with dropout 0 and no jitter: outputs, loss, refiner BN buffers, intermediates."""
    reference = golden("train_outputs")
    model = model_with_golden_weights(dropout=0.0, jitter_prob=0.0).train()
    recorder = Recorder(model)
    step = training_step(model, inputs)
    measured: dict[str, float] = {}
    assert_close("rec_feat", step["reconstruction"], reference["rec_feat"], measured)
    assert_close("rec_pred", step["maps"]["rec_map"], reference["rec_pred"], measured)
    assert_close("ref_logit", step["logit"], reference["ref_logit"], measured)
    assert_close("ref_pred", step["maps"]["refiner_map"], reference["ref_pred"], measured)
    for ours, theirs in [("mse", "FeatureMSELoss"), ("dice", "DiceLoss"), ("total", "total")]:
        assert_close(f"loss {theirs}", step["losses"][ours], reference["losses"][theirs], measured)
    compare_intermediates(model, recorder, reference["intermediates"], num_images=6, measured=measured)
    state = model.state_dict()
    for their_key, value in reference["seghead_bn_buffers_after_forward"].items():
        ours = state[official_reconstruction_key(f"reconstruction.seghead.{their_key}")]
        if their_key.endswith("num_batches_tracked"):
            assert torch.equal(ours, value), f"{their_key}: {ours} != {value}"
        else:
            assert_close(f"BN buffer {their_key}", ours, value, measured)
    report("train", measured)


def trainable_gradients(model: OneNIP) -> dict[str, Tensor]:
    return {name: p.grad for name, p in model.named_parameters() if p.requires_grad}


# float32 unit roundoff: one rounding moves a value by at most this fraction of itself
UNIT_ROUNDOFF = 2.0**-24
# how far float32 rounding has moved a value after a reduction of ~256 terms (sqrt(n) * u, n = 256): the
# size of the relative perturbation the float64 sensitivity below is measured with
ROUNDING_PERTURBATION = 2.0**-20
# a gradient is a sum over every token of every image of the step (6 images x 196 tokens for the
# reconstructor, 6 x 224 x 224 pixels for the refiner): float32 accumulation over that many terms adds
# sqrt(n) * u of the tensor's scale, whichever order a kernel sums in
TRANSFORMER_REDUCTION = 6 * 14 * 14
REFINER_REDUCTION = 6 * 224 * 224
# The authors' float32 gradients (fixed data) against the float64 evaluation of our model. A float32
# evaluation of this step is not more exact than a few parts in 10^3 of a tensor's scale: ReLUs whose
# input lies within rounding of 0 switch between float32 and float64 (a 1e-3 step in encoder layer 1's
# feed-forward), and the authors' float32 BatchNorm backward in the refiner loses up to ~4e-3. A mistake in
# our maths (a missing 1/sqrt(d), a dropped residual, a wrong norm) moves gradients by tens of percent.
AUTHORS_BOUND = {"reconstructor.": 3e-3, "refiner.": 1.5e-2}


def perturbed_float64_gradients(model: OneNIP, inputs: dict) -> dict[str, Tensor]:
    """Float64 gradients after every weight and input feature is moved by a random relative amount up to
    ROUNDING_PERTURBATION: how much rounding of that size can move each gradient (the step's conditioning),
    computed in float64 and so the same on every machine."""
    generator = torch.Generator().manual_seed(0)

    def jiggle(tensor: Tensor) -> Tensor:
        noise = 2 * torch.rand(tensor.shape, generator=generator, dtype=torch.float64) - 1
        return tensor.double() * (1 + ROUNDING_PERTURBATION * noise)

    perturbed = copy.deepcopy(model).double()
    with torch.no_grad():
        for parameter in perturbed.parameters():
            parameter.copy_(jiggle(parameter))
    jiggled = {k: jiggle(v) if k.endswith("features") else v for k, v in inputs.items()}
    training_step(perturbed, jiggled, torch.float64)["losses"]["total"].backward()
    return trainable_gradients(perturbed)


def test_gradients_match_the_authors(inputs):
    """Gradients of the total loss before clipping, tensor by tensor, and their total norm.

    Our float32 gradients differ from the authors' by the rounding of each machine's kernels (oneDNN/MKL
    choose other summation orders on other processors), so neither is compared with the other directly;
    both are compared with a float64 evaluation of our model, each relative to the tensor's scale:
    - ours is a faithful float32 evaluation: its error is at most 4x the larger of the authors' own float32
      error and the step's sensitivity to rounding-sized perturbations, plus float32 accumulation over the
      gradient's reduction length (sqrt(n) * u);
    - the authors' gradients are our maths: they lie within float32 accuracy of our float64 gradients
      (AUTHORS_BOUND), which a real mistake in our model breaks.
    """
    golden_grads = golden("train_step")["grads_before_clip"]
    model = model_with_golden_weights(dropout=0.0, jitter_prob=0.0).train()
    exact_model = copy.deepcopy(model).double()
    training_step(model, inputs)["losses"]["total"].backward()
    training_step(exact_model, inputs, torch.float64)["losses"]["total"].backward()
    grads, exact_grads = trainable_gradients(model), trainable_gradients(exact_model)
    sensitivity_grads = perturbed_float64_gradients(model, inputs)
    assert len(grads) == len(golden_grads) == 144

    worst: dict[str, float] = {}
    for their_key, their_grad in golden_grads.items():
        our_key = official_reconstruction_key(their_key.removeprefix("module."))
        part = "refiner." if our_key.startswith("refiner.") else "reconstructor."
        exact = exact_grads[our_key]
        scale = float(exact.abs().max())
        ours = float((grads[our_key].double() - exact).abs().max()) / scale
        authors = float((their_grad.double() - exact).abs().max()) / scale
        sensitivity = float((sensitivity_grads[our_key] - exact).abs().max()) / scale
        reduction = REFINER_REDUCTION if part == "refiner." else TRANSFORMER_REDUCTION
        bound = 4 * max(authors, sensitivity) + math.sqrt(reduction) * UNIT_ROUNDOFF
        for name, value in [(f"{part} ours vs float64", ours), (f"{part} authors' vs float64", authors)]:
            worst[name] = max(worst.get(name, 0.0), value)
        worst[f"{part} ours / bound"] = max(worst.get(f"{part} ours / bound", 0.0), ours / bound)
        assert ours <= bound, (
            f"gradient of {our_key}: {ours:.3g} of its scale from float64, above {bound:.3g} (4x the "
            f"authors' {authors:.3g} or the rounding sensitivity {sensitivity:.3g}, + accumulation)"
        )
        assert authors <= AUTHORS_BOUND[part], (
            f"gradient of {our_key}: the authors' is {authors:.3g} of its scale from our float64 gradient, "
            f"above float32 accuracy {AUTHORS_BOUND[part]:g}: our maths differs from theirs"
        )

    def total_norm(gradients: list[Tensor]) -> Tensor:
        norms = [torch.linalg.vector_norm(gradient.double()) for gradient in gradients]
        return torch.linalg.vector_norm(torch.stack(norms))

    exact_norm = float(total_norm(list(exact_grads.values())))
    ours_norm = float(total_norm(list(grads.values())))
    their_norm = float(golden("train_step")["total_grad_norm_before_clip"])
    # a norm sums the squares of all 8.4M gradient entries: float32 accumulation adds sqrt(n) * u of it
    norm_bound = 4 * abs(their_norm - exact_norm) + math.sqrt(8.4e6) * UNIT_ROUNDOFF * exact_norm
    worst["total grad norm: ours vs float64"] = abs(ours_norm - exact_norm)
    worst["total grad norm: authors' vs float64"] = abs(their_norm - exact_norm)
    assert abs(ours_norm - exact_norm) <= norm_bound, f"total grad norm {ours_norm} vs float64 {exact_norm}"
    assert abs(their_norm - exact_norm) <= AUTHORS_BOUND["reconstructor."] * exact_norm
    report("gradients", worst, "worst error relative to the tensor's scale (norms absolute)")


def test_from_official_checkpoint_file_round_trip(tmp_path, inputs):
    """A file in the authors' format (module. prefix, efficientnet_pytorch keys) loads and matches."""
    efficientnet_pytorch = pytest.importorskip("efficientnet_pytorch")
    torch.manual_seed(0)
    authors_backbone = efficientnet_pytorch.EfficientNet.from_name("efficientnet-b4").state_dict()
    state_dict = {f"module.backbone.{k}": v for k, v in authors_backbone.items()}
    state_dict.update({f"module.{k}": v for k, v in golden("reconstruction_state_dict").items()})
    path = tmp_path / "ckpt.pth.tar"
    torch.save({"epoch": 1000, "best_metric": 0.98, "state_dict": state_dict}, path)

    model = OneNIP.from_official(path)
    assert not model.training and float(model.fusion_scale) == 1.0
    assert model.backbone.official_padding
    assert torch.equal(
        model.backbone.body.blocks[2][0].conv_dw.weight, authors_backbone["_blocks.6._depthwise_conv.weight"]
    )
    assert torch.equal(
        model.backbone.body.blocks[4][5].bn3.running_var, authors_backbone["_blocks.21._bn2.running_var"]
    )
    with torch.no_grad():
        reconstruction = model.reconstruct(inputs["query_features"], inputs["prompt_features"])
    diff = max_diff(reconstruction, golden("eval_outputs")["rec_feat"])
    print(f"\n[from_official] rec_feat max abs diff {diff:.3g}")
    assert diff <= TOLERANCE


def test_official_mapping_names_bad_keys():
    state_dict = {f"module.{k}": v for k, v in golden("reconstruction_state_dict").items()}
    model = OneNIP(image_size=256)
    expected = {k: v for k, v in model.state_dict().items() if k.startswith(("reconstructor.", "refiner."))}

    with pytest.raises(
        CheckpointError, match=r"reconstructor\.pos_embed\.row_embed\.weight \(14, 128\) vs \(16, 128\)"
    ):
        official_to_onenip_state_dict(state_dict, expected=expected)
    unknown = {**state_dict, "module.reconstruction.extra_head.weight": torch.zeros(1)}
    with pytest.raises(CheckpointError, match=r"reconstruction\.extra_head\.weight"):
        official_to_onenip_state_dict(unknown)
    missing = {k: v for k, v in state_dict.items() if "decoder.norm." not in k}
    model_224 = OneNIP(image_size=224)
    expected_224 = {
        k: v for k, v in model_224.state_dict().items() if k.startswith(("reconstructor.", "refiner."))
    }
    with pytest.raises(CheckpointError, match=r"missing keys: reconstructor\.decoder\.final_norm\.bias"):
        official_to_onenip_state_dict(missing, expected=expected_224)
