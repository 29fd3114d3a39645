"""Training-step and inference time of our DeepLabV3+ beside the models users already know, in one run.

    python bench/train_step.py                                  # CPU: batch 2 at 256 and at 320 px
    python bench/train_step.py --device cuda --amp bf16 --channels-last --compile --fast-peers \
        --sizes 8x512 16x512

Contenders, all random-initialised with 2 classes:

- ours: `SidewalkDeepLabForSemanticSegmentation` with the default config (timm resnet101s at output stride 16,
  Detectron2's dense DeepLabV3+ head);
- smp: segmentation_models_pytorch `DeepLabV3Plus` with the timm encoder `tu-resnet101`, output stride 16, the
  same decoder width (256), atrous rates (6, 12, 18) and ASPP dropout (0.1); its ASPP and fusion
  convolutions are depthwise-separable;
- torchvision: `deeplabv3_resnet101` (DeepLabV3, output stride 8, no low-level fusion), the stock model.

Each model runs in the setting "fp32 eager" (contiguous NCHW float32, no compilation; inference under
`torch.no_grad`). Ours also runs in the fast settings, inference under `torch.inference_mode` and through
`optimize_for_inference` (batch norms folded into the convolutions): the one the flags describe (`--amp`,
`--channels-last`, `--compile`), or on a CPU without flags channels-last float32 (our default for training
and evaluation, and the inference setting we recommend) and, where the CPU has native bfloat16
(AVX512-BF16 / AMX), channels-last with bf16 autocast as well, for information. `--fast-peers` also runs the
peers in the first fast setting (SMP and torchvision have no batch-norm folding of their own, so theirs stay
unfolded). Our ASPP skips the taps of its atrous convolutions that only read padding; FLOPs are counted for
the dense convolutions all the same, so that every model's count is that of its architecture.

A training step is forward, the same plain cross-entropy for every model, backward and an SGD (momentum)
step. FLOPs come from `torch.utils.flop_counter` on one forward pass; a training step counts 3x the forward,
because the counter over-counts the gradients of depthwise convolutions (SMP's decoder). Before timing,
every contender's logits must have the input's shape and its loss must be finite. Times are medians of
`--repeats` rounds taken round-robin after `--warmup` untimed rounds. Needs the `bench` extra.

Floors checked: on a CPU, training GFLOP/s of ours in our default setting (fp32 + channels_last) at least
1.2x SMP's in its default (fp32 eager), with the same-setting ratios printed beside it, and inference of ours
in the (first) fast setting at least 1.2x faster than fp32 eager; on a GPU, the training step of ours in the
fast setting at least 1.5x faster than fp32 eager.
"""

from __future__ import annotations

import argparse
import copy
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from common import (
    RESULTS_DIR,
    describe_disturbance,
    describe_machine,
    interleaved_seconds,
    machine_info,
    print_table,
    set_up_device,
    write_json,
)
from torch.utils.flop_counter import FlopCounterMode

from sidewalk_hf import SidewalkDeepLabConfig, SidewalkDeepLabForSemanticSegmentation
from sidewalk_hf.modeling_sidewalk_deeplab import AtrousConv2d

NUM_CLASSES = 2
MODEL_NAMES = {
    "ours": "ours (resnet101s, dense head)",
    "smp": "smp DeepLabV3Plus tu-resnet101",
    "torchvision": "torchvision deeplabv3_resnet101",
}
CPU_FLOORS = {"train_gflops_ours_over_smp": 1.2, "inference_fast_over_eager": 1.2}
GPU_FLOORS = {"train_fast_over_eager": 1.5}


class LogitsOnly(torch.nn.Module):
    """One calling convention for every model: normalised images in, (B, classes, H, W) logits out."""

    def __init__(self, model: torch.nn.Module, family: str):
        super().__init__()
        self.model, self.family = model, family

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        if self.family == "ours":
            return self.model(pixel_values=pixel_values).logits
        if self.family == "torchvision":
            return self.model(pixel_values)["out"]
        return self.model(pixel_values)


def build_model(family: str) -> LogitsOnly:
    if family == "ours":
        return LogitsOnly(SidewalkDeepLabForSemanticSegmentation(SidewalkDeepLabConfig()), family)
    if family == "smp":
        import segmentation_models_pytorch as smp

        settings = {
            "encoder_name": "tu-resnet101",
            "encoder_weights": None,
            "encoder_output_stride": 16,
            "decoder_channels": 256,
            "decoder_atrous_rates": (6, 12, 18),
            "classes": NUM_CLASSES,
        }
        try:
            model = smp.DeepLabV3Plus(**settings, decoder_aspp_dropout=0.1)
        except TypeError:  # releases before the ASPP dropout became an argument: fixed 0.5, same cost
            model = smp.DeepLabV3Plus(**settings)
        return LogitsOnly(model, family)
    if family == "torchvision":
        from torchvision.models.segmentation import deeplabv3_resnet101

        model = deeplabv3_resnet101(
            weights=None, weights_backbone=None, num_classes=NUM_CLASSES, aux_loss=False
        )
        return LogitsOnly(model, family)
    raise ValueError(f"unknown model {family!r}; choose from {sorted(MODEL_NAMES)}")


@dataclass(frozen=True)
class Setting:
    amp: str = "none"
    channels_last: bool = False
    compile: bool = False

    @property
    def is_eager_baseline(self) -> bool:
        return self == Setting()

    @property
    def label(self) -> str:
        parts = ["bf16" if self.amp == "bf16" else "fp32"]
        if self.channels_last:
            parts.append("channels_last")
        if self.compile:
            parts.append("compile")
        return "fp32 eager" if self.is_eager_baseline else " + ".join(parts)


# What our training and evaluation use unless told otherwise (SOLVER.CHANNELS_LAST, fp32).
OUR_DEFAULT_SETTING = Setting(channels_last=True)


class Contender:
    """One model in one setting, with its own optimizer, inputs and (compiled) callable."""

    def __init__(self, family: str, model: LogitsOnly, setting: Setting, *, batch: int, size_px: int, device):
        self.family, self.setting, self.device = family, setting, device
        self.memory_format = torch.channels_last if setting.channels_last else torch.contiguous_format
        self.model = model.to(device=device, memory_format=self.memory_format)
        generator = torch.Generator().manual_seed(0)
        images = torch.randn(batch, 3, size_px, size_px, generator=generator)
        self.images = images.to(device).contiguous(memory_format=self.memory_format)
        self.labels = torch.randint(0, NUM_CLASSES, (batch, size_px, size_px), generator=generator).to(device)
        self.optimizer = torch.optim.SGD(self.model.parameters(), lr=1e-4, momentum=0.9)
        self.run = torch.compile(self.model) if setting.compile else self.model
        self.autocast = (
            torch.autocast(device.type, dtype=torch.bfloat16) if setting.amp == "bf16" else nullcontext()
        )
        self.inference_context = torch.no_grad if setting.is_eager_baseline else torch.inference_mode

    def train_loss(self) -> torch.Tensor:
        with self.autocast:
            logits = self.run(self.images)
        if logits.shape != (self.images.shape[0], NUM_CLASSES, *self.images.shape[-2:]):
            raise RuntimeError(
                f"{self.family} [{self.setting.label}] returned logits of shape {tuple(logits.shape)}; "
                f"expected {(self.images.shape[0], NUM_CLASSES, *self.images.shape[-2:])}"
            )
        return F.cross_entropy(logits.float(), self.labels)

    def train_step(self) -> torch.Tensor:
        self.optimizer.zero_grad(set_to_none=True)
        loss = self.train_loss()
        loss.backward()
        self.optimizer.step()
        return loss.detach()

    def prepare_inference(self) -> None:
        """Eval mode; ours outside fp32 eager goes through `optimize_for_inference` (folded batch norms), as
        we recommend for inference, on a copy, since that model can no longer train."""
        self.model.eval()
        if self.family == "ours" and not self.setting.is_eager_baseline:
            folded = copy.deepcopy(self.model.model).optimize_for_inference(self.setting.channels_last)
            inference_model = LogitsOnly(folded, self.family)
            self.run = torch.compile(inference_model) if self.setting.compile else inference_model

    def inference_step(self) -> None:
        with self.inference_context(), self.autocast:
            self.run(self.images)

    def check_comparable(self) -> float:
        """One training step that must give input-sized logits and a finite loss."""
        self.model.train()
        loss = float(self.train_step())
        if not torch.isfinite(torch.tensor(loss)):
            raise RuntimeError(f"{self.family} [{self.setting.label}] gave a non-finite loss {loss}")
        return loss


def forward_gflop_per_image(model: LogitsOnly, batch: int, size_px: int, device) -> float:
    """FLOPs of the architecture: our padding-skipping convolutions are counted as the dense ones they equal."""
    model = copy.deepcopy(model).to(device).eval()
    for module in model.modules():
        if isinstance(module, AtrousConv2d):
            module.skip_padding = False
    images = torch.randn(batch, 3, size_px, size_px, device=device)
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(images)
    return counter.get_total_flops() / 1e9 / batch


def peak_train_step_mib(contender: Contender) -> float | None:
    """Memory a training step allocates beyond what is resident (GPU only)."""
    if contender.device.type != "cuda":
        return None
    torch.cuda.synchronize()
    resident = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    contender.train_step()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - resident) / 2**20


def measure_size(
    args, base_models: dict[str, LogitsOnly], fast_settings: list[Setting], batch: int, size_px: int
) -> list[dict]:
    device = torch.device(args.device)
    contenders: dict[str, Contender] = {}
    for family, base_model in base_models.items():
        settings = [Setting()]
        if family == "ours":
            settings += fast_settings
        elif args.fast_peers:
            settings += fast_settings[:1]
        for setting in settings:
            contender = Contender(
                family, copy.deepcopy(base_model), setting, batch=batch, size_px=size_px, device=device
            )
            loss = contender.check_comparable()
            print(f"  {family} [{setting.label}] {batch}x{size_px}: logits ok, loss {loss:.3f}", flush=True)
            contenders[f"{family}|{setting.label}"] = contender
    peak_mib = {key: peak_train_step_mib(contender) for key, contender in contenders.items()}
    flops = {
        family: forward_gflop_per_image(model, batch, size_px, device)
        for family, model in base_models.items()
    }

    for contender in contenders.values():
        contender.model.train()
    print(f"  timing training steps ({args.warmup} warm-up + {args.repeats} rounds)", flush=True)
    train_s = interleaved_seconds(
        {key: c.train_step for key, c in contenders.items()},
        warmup=args.warmup,
        repeats=args.repeats,
        device=device,
    )
    for contender in contenders.values():
        contender.prepare_inference()
    print(f"  timing inference ({args.warmup} warm-up + {args.repeats} rounds)", flush=True)
    infer_s = interleaved_seconds(
        {key: c.inference_step for key, c in contenders.items()},
        warmup=args.warmup,
        repeats=args.repeats,
        device=device,
    )

    for phase, timings in (("training", train_s), ("inference", infer_s)):
        print(f"  {phase}: {describe_disturbance(timings)}", flush=True)
    rows = []
    for key, contender in contenders.items():
        gflop = flops[contender.family]
        train_step_s, infer_step_s = train_s.median(key), infer_s.median(key)
        rows.append(
            {
                "model": MODEL_NAMES[contender.family],
                "family": contender.family,
                "setting": contender.setting.label,
                "batch": batch,
                "size_px": size_px,
                "shape": f"{batch}x{size_px}",
                "forward_gflop_per_image": gflop,
                "train_ms_per_image": 1000 * train_step_s / batch,
                "train_gflop_per_s": 3 * gflop * batch / train_step_s,
                "infer_ms_per_image": 1000 * infer_step_s / batch,
                "infer_gflop_per_s": gflop * batch / infer_step_s,
                "train_peak_extra_mib": peak_mib[key],
                "train_step_seconds": train_s.seconds[key],
                "infer_step_seconds": infer_s.seconds[key],
                "train_foreign_cores": train_s.foreign_cores[key],
                "infer_foreign_cores": infer_s.foreign_cores[key],
            }
        )
    return rows


def ratios_and_floors(rows: list[dict], device_type: str, floor_setting: str) -> list[dict]:
    """Ratios per input size; each carries its floor (None where none is set for this device and setting)."""
    checks = []
    for shape in dict.fromkeys(row["shape"] for row in rows):
        pick = {(row["family"], row["setting"]): row for row in rows if row["shape"] == shape}
        ours, smp = pick.get(("ours", "fp32 eager")), pick.get(("smp", "fp32 eager"))
        ours_default = pick.get(("ours", OUR_DEFAULT_SETTING.label))
        if ours_default and smp and device_type == "cpu":
            checks.append(
                {
                    "shape": shape,
                    "ratio": f"train GFLOP/s, ours [{OUR_DEFAULT_SETTING.label}, our default] / smp [fp32 eager, its default]",
                    "value": ours_default["train_gflop_per_s"] / smp["train_gflop_per_s"],
                    "floor": CPU_FLOORS["train_gflops_ours_over_smp"],
                }
            )
        for setting in dict.fromkeys(("fp32 eager", OUR_DEFAULT_SETTING.label, floor_setting)):
            ours_same, smp_same = pick.get(("ours", setting)), pick.get(("smp", setting))
            if ours_same and smp_same:
                checks.append(
                    {
                        "shape": shape,
                        "ratio": f"train GFLOP/s, ours / smp, both [{setting}]",
                        "value": ours_same["train_gflop_per_s"] / smp_same["train_gflop_per_s"],
                        "floor": None,
                    }
                )
        fast_rows = [
            row for (family, setting), row in pick.items() if family == "ours" and setting != "fp32 eager"
        ]
        for fast in fast_rows:
            checks.append(
                {
                    "shape": shape,
                    "ratio": f"inference speed-up, ours [{fast['setting']}] over fp32 eager",
                    "value": ours["infer_ms_per_image"] / fast["infer_ms_per_image"],
                    "floor": (
                        CPU_FLOORS["inference_fast_over_eager"]
                        if device_type == "cpu" and fast["setting"] == floor_setting
                        else None
                    ),
                }
            )
            checks.append(
                {
                    "shape": shape,
                    "ratio": f"training speed-up, ours [{fast['setting']}] over fp32 eager",
                    "value": ours["train_ms_per_image"] / fast["train_ms_per_image"],
                    "floor": (
                        GPU_FLOORS["train_fast_over_eager"]
                        if device_type == "cuda" and fast["setting"] == floor_setting
                        else None
                    ),
                }
            )
    for check in checks:
        check["met"] = None if check["floor"] is None else check["value"] >= check["floor"]
    return checks


def main():
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument(
        "--amp", choices=["none", "bf16"], default="none", help="autocast of the fast setting"
    )
    parser.add_argument("--channels-last", action="store_true", help="fast setting uses channels-last")
    parser.add_argument("--compile", action="store_true", help="fast setting uses torch.compile")
    parser.add_argument("--fast-peers", action="store_true", help="also run the peers in the fast setting")
    parser.add_argument(
        "--sizes", nargs="+", default=["2x256", "2x320"], help="BATCHxPIXELS entries, e.g. 8x512"
    )
    parser.add_argument(
        "--models", nargs="+", choices=sorted(MODEL_NAMES), default=["ours", "smp", "torchvision"]
    )
    parser.add_argument("--warmup", type=int, default=1, help="untimed rounds (at least 2 with --compile)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    parser.add_argument("--json", type=Path, default=RESULTS_DIR / "train_step.json")
    args = parser.parse_args()

    device = set_up_device(parser, args)
    if args.compile:
        args.warmup = max(args.warmup, 2)
    fast_settings = [Setting(amp=args.amp, channels_last=args.channels_last, compile=args.compile)]
    if fast_settings == [Setting()]:
        fast_settings = [Setting(channels_last=True)] if device.type == "cpu" else []
        if device.type == "cpu" and torch.ops.mkldnn._is_mkldnn_bf16_supported():
            fast_settings.append(Setting(amp="bf16", channels_last=True))
    machine = machine_info(device)
    print(f"machine: {describe_machine(machine)}")

    torch.manual_seed(0)
    base_models = {family: build_model(family) for family in args.models}
    rows = []
    for entry in args.sizes:
        batch, size_px = (int(part) for part in entry.lower().split("x"))
        print(f"size {batch}x{size_px}", flush=True)
        rows.extend(measure_size(args, base_models, fast_settings, batch, size_px))

    print()
    columns = [
        ("model", "model", ""),
        ("setting", "setting", ""),
        ("shape", "BxS", ""),
        ("forward_gflop_per_image", "GFLOP/img fwd", ".1f"),
        ("train_ms_per_image", "train ms/img", ".0f"),
        ("train_gflop_per_s", "train GFLOP/s", ".1f"),
        ("infer_ms_per_image", "infer ms/img", ".0f"),
        ("infer_gflop_per_s", "infer GFLOP/s", ".1f"),
    ]
    if device.type == "cuda":
        columns.append(("train_peak_extra_mib", "train peak MiB", ".0f"))
    print_table(rows, columns)
    floor_setting = fast_settings[0].label if fast_settings else None
    checks = ratios_and_floors(rows, device.type, floor_setting)
    print()
    for check in checks:
        verdict = "" if check["met"] is None else (" [floor met]" if check["met"] else " [FLOOR MISSED]")
        floor = "" if check["floor"] is None else f" (floor {check['floor']:.1f}x)"
        print(f"{check['shape']:<7} {check['ratio']:<72} {check['value']:5.2f}x{floor}{verdict}")
    machine["load_average_1min_at_end"] = machine_info(device)["load_average_1min"]
    write_json(
        args.json,
        {
            "benchmark": "train_step",
            "machine": machine,
            "settings": {
                **vars(args),
                "json": str(args.json),
                "fast_settings": [setting.label for setting in fast_settings],
            },
            "rows": rows,
            "checks": checks,
        },
    )


if __name__ == "__main__":
    main()
